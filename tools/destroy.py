"""`make destroy STACK=...`: one command that finishes, and says what is still billed.

Three steps around `pulumi destroy`, each a small function over an injected
command runner (the tests replace it with a fake):

1. Label the RabbitMQ pods `skipPreStopChecks=true`. Their preStop hook otherwise
   waits (up to most of the grace period, per pod) for every quorum queue to keep
   a majority without the pod; when the whole cluster goes, no majority ever comes
   back and the destroy hangs for that long. An unreachable cluster or a stack
   without a kubeconfig output (already destroyed) is reported and skipped.
2. `pulumi destroy` as a child process, extra arguments passed on, its exit code kept.
3. Target "gke": list the persistent disks carrying this stack's label that
   outlived the destroy. Any left: name them, print the exact delete commands and
   exit non-zero, so nobody believes nothing is billed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from components import names
from components.config import PROJECT, ConfigError, load_stack_config
from components.gcp_ids import stack_label
from components.rabbitmq import SKIP_PRESTOP_LABEL, selector

ROOT = Path(__file__).resolve().parent.parent

# kubectl's default is to wait for the server indefinitely; an unreachable
# cluster must not hold up the destroy that is about to delete it anyway.
KUBECTL_TIMEOUT = "--request-timeout=30s"


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str = ""
    stderr: str = ""


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], *, capture: bool = True) -> Result: ...


def run_command(argv: Sequence[str], *, capture: bool = True) -> Result:
    """The real runner: captured output, or (capture=False) the terminal's."""
    if capture:
        try:
            proc = subprocess.run(list(argv), cwd=ROOT, capture_output=True, text=True, check=False)
        except FileNotFoundError as error:
            return Result(127, "", f"{argv[0]}: {error.strerror}")
        return Result(proc.returncode, proc.stdout, proc.stderr)
    child = subprocess.Popen(list(argv), cwd=ROOT)
    # Ctrl-C reaches pulumi directly (same process group) and pulumi stops
    # cleanly, saving its state; this process must neither die first nor kill it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return Result(child.wait())
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass(frozen=True)
class Stack:
    """What destroy needs to know about a stack, from Pulumi.<stack>.yaml."""

    name: str  # as pulumi takes it: "dev" or "org/dev"
    target: str
    production: bool
    gcp_project: str
    rabbitmq_namespace: str
    kube_context: str

    @property
    def short_name(self) -> str:
        return short_name(self.name)

    @property
    def disk_label(self) -> str:
        """The GCP label the RabbitMQ StorageClass puts on every disk it provisions."""
        return f"{names.STACK_LABEL}={stack_label(self.short_name)}"


def short_name(stack: str) -> str:
    """The stack's own name: `org/dev` and `org/project/dev` are dev (Pulumi.dev.yaml)."""
    return stack.rsplit("/", 1)[-1]


def read_stack_file(stack: str) -> dict[str, Any]:
    # Imported here: the mocks module loads the Pulumi runtime, needed only now.
    from tools.mockrun import stack_config

    return stack_config(short_name(stack), gcp_project=None)


def load_stack(
    stack: str,
    run: Runner,
    read_config: Callable[[str], Mapping[str, Any]] = read_stack_file,
) -> Stack:
    """The stack's configuration; gcp:project from `pulumi config` if not in the file.

    Raises ConfigError (naming the key and what to do) when it is invalid.
    """
    raw = dict(read_config(stack))
    if raw.get(f"{PROJECT}:target", "gke") == "gke" and not raw.get("gcp:project"):
        # `pulumi config set gcp:project ...` on another machine or in CI: ask the CLI.
        got = run(["pulumi", "config", "get", "gcp:project", "--stack", stack])
        if got.returncode == 0 and got.stdout.strip():
            raw["gcp:project"] = got.stdout.strip()
    config = load_stack_config(raw, short_name(stack))
    return Stack(
        name=stack,
        target=config.target,
        production=config.production,
        gcp_project=config.gcp_project,
        rabbitmq_namespace=config.rabbitmq.namespace,
        kube_context=config.kubernetes.context,
    )


def _say(message: str) -> None:
    print(f"make destroy: {message}", file=sys.stderr, flush=True)


def _echo(argv: Sequence[str]) -> None:
    print("+ " + " ".join(argv), flush=True)


@contextmanager
def kubectl_prefix(stack: Stack, run: Runner) -> Iterator[list[str] | None]:
    """`kubectl` with the stack's cluster credentials, or None if there is no cluster.

    GKE: the stack's kubeconfig output in a private temporary file (0600,
    removed on exit). Existing cluster: the current kubeconfig, with the
    configured context if any.
    """
    if stack.target != "gke":
        context = ["--context", stack.kube_context] if stack.kube_context else []
        yield ["kubectl", *context]
        return
    argv = ["pulumi", "stack", "output", "kubeconfig", "--show-secrets", "--stack", stack.name]
    _echo(argv)
    output = run(argv)
    if output.returncode != 0 or not output.stdout.strip():
        _say(
            f"stack {stack.name} has no kubeconfig output (already destroyed?): "
            f"{output.stderr.strip() or 'empty'}; not labelling the RabbitMQ pods"
        )
        yield None
        return
    fd, path = tempfile.mkstemp(prefix="kubeconfig-", suffix=".yaml")  # mode 0600
    try:
        with os.fdopen(fd, "w") as file:
            file.write(output.stdout)
        yield ["kubectl", "--kubeconfig", path]
    finally:
        Path(path).unlink(missing_ok=True)


def _label_argv(kubectl: list[str], namespace: str, change: list[str]) -> list[str]:
    pods = ",".join(f"{key}={value}" for key, value in selector().items())
    return [*kubectl, "-n", namespace, "label", "pods", "-l", pods, *change, KUBECTL_TIMEOUT]


def label_argv(kubectl: list[str], namespace: str) -> list[str]:
    return _label_argv(kubectl, namespace, [f"{SKIP_PRESTOP_LABEL}=true", "--overwrite"])


def unlabel_argv(kubectl: list[str], namespace: str) -> list[str]:
    return _label_argv(kubectl, namespace, [f"{SKIP_PRESTOP_LABEL}-"])


def skip_prestop_checks(kubectl: list[str], stack: Stack, run: Runner) -> bool:
    """Label the RabbitMQ pods; False (and why) if the cluster cannot be reached."""
    argv = label_argv(kubectl, stack.rabbitmq_namespace)
    _echo(argv)
    result = run(argv)
    if result.returncode != 0:
        _say(
            f"could not label the RabbitMQ pods (cluster unreachable?): "
            f"{result.stderr.strip()}; destroying anyway (a pod that still exists may "
            "wait for quorum in its preStop hook)"
        )
        return False
    return True


def restore_prestop_checks(kubectl: list[str], stack: Stack, run: Runner) -> None:
    # The destroy did not happen (declined, failed, protected resources): pods
    # that stay must drain properly again on their next rolling restart.
    argv = unlabel_argv(kubectl, stack.rabbitmq_namespace)
    _echo(argv)
    if run(argv).returncode != 0:
        _say(
            f"could not remove {SKIP_PRESTOP_LABEL} from the RabbitMQ pods; remove it "
            f"yourself: {' '.join(argv)}"
        )


def disk_list_argv(stack: Stack) -> list[str]:
    return [
        "gcloud",
        "compute",
        "disks",
        "list",
        "--project",
        stack.gcp_project,
        f"--filter=labels.{stack.disk_label}",
        # zone.basename(): "us-east1-c", not the zone's full API URL.
        "--format=value(name,zone.basename())",
    ]


def surviving_disks_message(stack: Stack, disks: list[tuple[str, str]]) -> str:
    lines = [
        f"{len(disks)} persistent disk(s) labelled {stack.disk_label} outlived the "
        f"destroy of stack {stack.name} in project {stack.gcp_project}, and are still billed:",
        *(f"  {name}  ({zone})" for name, zone in disks),
    ]
    if stack.production:
        lines.append(
            "This is a production stack: its RabbitMQ volumes are Retain on purpose, they "
            "hold the messages. Delete them only when no message on them is needed any more:"
        )
    else:
        lines.append(
            "This stack's volumes are deleted with it (reclaimPolicy Delete), but the CSI "
            "driver deletes disks asynchronously and stops with the cluster. Delete them:"
        )
    lines.extend(
        f"  gcloud compute disks delete {name} --zone {zone} --project {stack.gcp_project}"
        for name, zone in disks
    )
    return "\n".join(lines)


def check_disks(stack: Stack, run: Runner) -> int:
    """0 if no disk of this stack is left, 1 (and what to delete) otherwise."""
    argv = disk_list_argv(stack)
    _echo(argv)
    listed = run(argv)
    if listed.returncode != 0:
        _say(
            f"could not list the disks left by stack {stack.name}: {listed.stderr.strip()}; "
            f"check by hand: {' '.join(argv)}"
        )
        return 1
    disks = [
        (fields[0], fields[1] if len(fields) > 1 else "")
        for fields in (line.split() for line in listed.stdout.splitlines())
        if fields
    ]
    if disks:
        _say(surviving_disks_message(stack, disks))
        return 1
    _say(f"no disk labelled {stack.disk_label} is left in project {stack.gcp_project}")
    return 0


def destroy(
    stack_name: str,
    extra: list[str],
    run: Runner = run_command,
    read_config: Callable[[str], Mapping[str, Any]] = read_stack_file,
) -> int:
    """The whole `make destroy`; the exit code to return."""
    destroy_argv = ["pulumi", "destroy", "--stack", stack_name, *extra]
    if "--preview-only" in extra:
        # Nothing is deleted: no label to set, no disk to look for.
        _echo(destroy_argv)
        return run(destroy_argv, capture=False).returncode
    try:
        stack = load_stack(stack_name, run, read_config)
    except ConfigError as error:
        _say(f"Pulumi.{short_name(stack_name)}.yaml: {error}")
        return 2
    with kubectl_prefix(stack, run) as kubectl:
        labelled = kubectl is not None and skip_prestop_checks(kubectl, stack, run)
        _echo(destroy_argv)
        code = run(destroy_argv, capture=False).returncode
        if code != 0 and kubectl is not None and labelled:
            restore_prestop_checks(kubectl, stack, run)
    if code != 0:
        return code
    if stack.target != "gke":
        return 0  # the cluster and its volumes are not this program's to list
    return check_disks(stack, run)
