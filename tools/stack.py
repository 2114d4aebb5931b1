"""`make up|preview|destroy STACK=...`: the Pulumi CLI, after checking what it will need.

A missing tool is reported by name with how to install it, before Pulumi
starts, instead of as a provider error halfway through an update.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

REQUIRED_TOOLS = {
    "pulumi": "the Pulumi CLI: curl -fsSL https://get.pulumi.com | sh",
    "gcloud": "the Google Cloud CLI: https://cloud.google.com/sdk/docs/install",
    "gke-gcloud-auth-plugin": (
        "the GKE auth plugin the kubeconfig uses: gcloud components install gke-gcloud-auth-plugin "
        "(or apt-get install google-cloud-cli-gke-gcloud-auth-plugin)"
    ),
}

COMMANDS = {
    "preview": ["preview", "--diff"],
    "up": ["up"],
    "destroy": ["destroy"],
}


def missing_tools(which: Callable[[str], str | None] | None = None) -> dict[str, str]:
    find = which or shutil.which
    return {tool: hint for tool, hint in REQUIRED_TOOLS.items() if find(tool) is None}


def stacks() -> list[str]:
    return sorted(p.name[len("Pulumi.") : -len(".yaml")] for p in ROOT.glob("Pulumi.*.yaml"))


def pulumi_argv(command: str, stack: str, extra: list[str]) -> list[str]:
    return ["pulumi", *COMMANDS[command], "--stack", stack, *extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.stack", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--stack", required=True, help="stack name, e.g. dev or prod")
    # Anything else (--yes, --target ...) is passed on to pulumi.
    args, extra = parser.parse_known_args(argv)

    known = stacks()
    if args.stack not in known:
        print(
            f"unknown stack {args.stack!r}: allowed are {', '.join(known)} (Pulumi.<stack>.yaml)",
            file=sys.stderr,
        )
        return 2
    missing = missing_tools()
    if missing:
        print("missing before `pulumi " + args.command + "` can run:", file=sys.stderr)
        for tool, hint in missing.items():
            print(f"  - {tool}: {hint}", file=sys.stderr)
        return 2
    argv_out = pulumi_argv(args.command, args.stack, extra)
    print("+ " + " ".join(argv_out), flush=True)
    os.chdir(ROOT)
    os.execvp(argv_out[0], argv_out)


if __name__ == "__main__":
    sys.exit(main())
