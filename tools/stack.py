"""`make up|preview|destroy STACK=...`: the Pulumi CLI, after checking what it will need.

A missing tool is reported by name with how to install it, before Pulumi
starts, instead of as a provider error halfway through an update. `destroy`
does more than `pulumi destroy` (see tools/destroy.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from tools import destroy

ROOT = Path(__file__).resolve().parent.parent

REQUIRED_TOOLS = {
    "pulumi": "the Pulumi CLI: curl -fsSL https://get.pulumi.com | sh",
    "gcloud": "the Google Cloud CLI: https://cloud.google.com/sdk/docs/install",
    "gke-gcloud-auth-plugin": (
        "the GKE auth plugin the kubeconfig uses: gcloud components install gke-gcloud-auth-plugin "
        "(or apt-get install google-cloud-cli-gke-gcloud-auth-plugin)"
    ),
}
# Only destroy labels the RabbitMQ pods (tools/destroy.py).
COMMAND_TOOLS = {
    "destroy": {
        "kubectl": (
            "kubectl, to let the RabbitMQ pods skip their preStop quorum wait: "
            "gcloud components install kubectl (or apt-get install kubectl)"
        ),
    },
}

COMMANDS = {
    "preview": ["preview", "--diff"],
    "up": ["up"],
    "destroy": ["destroy"],
}


def missing_tools(
    which: Callable[[str], str | None] | None = None, command: str = "up"
) -> dict[str, str]:
    find = which or shutil.which
    required = {**REQUIRED_TOOLS, **COMMAND_TOOLS.get(command, {})}
    return {tool: hint for tool, hint in required.items() if find(tool) is None}


def stacks() -> list[str]:
    return sorted(p.name[len("Pulumi.") : -len(".yaml")] for p in ROOT.glob("Pulumi.*.yaml"))


def pulumi_argv(command: str, stack: str, extra: list[str]) -> list[str]:
    return ["pulumi", *COMMANDS[command], "--stack", stack, *extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.stack", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--stack", required=True, help="stack name, e.g. dev, prod or <org>/dev")
    # Anything else (--yes, --target ...) is passed on to pulumi.
    args, extra = parser.parse_known_args(argv)

    known = stacks()
    if destroy.short_name(args.stack) not in known:
        print(
            f"unknown stack {args.stack!r}: allowed are {', '.join(known)} (Pulumi.<stack>.yaml)",
            file=sys.stderr,
        )
        return 2
    missing = missing_tools(command=args.command)
    if missing:
        print("missing before `pulumi " + args.command + "` can run:", file=sys.stderr)
        for tool, hint in missing.items():
            print(f"  - {tool}: {hint}", file=sys.stderr)
        return 2
    if args.command == "destroy":
        # A child process, not exec: there is work to do after it (tools/destroy.py).
        return destroy.destroy(args.stack, extra)
    argv_out = pulumi_argv(args.command, args.stack, extra)
    print("+ " + " ".join(argv_out), flush=True)
    os.chdir(ROOT)
    os.execvp(argv_out[0], argv_out)


if __name__ == "__main__":
    sys.exit(main())
