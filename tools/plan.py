"""`make plan STACK=...`: everything the program would register, as files, with no cloud.

Runs the real ``__main__.py`` under Pulumi's mocks (:mod:`tools.mockrun`) with the
stack's ``Pulumi.<stack>.yaml`` and writes ``<out>/<stack>/``:

``kubernetes/<kind>-<namespace>-<name>.yaml``
    every Kubernetes object as it would be applied (``<kind>-<name>.yaml`` when
    cluster-scoped), and ``kubernetes.yaml``, all of them in one multi-document file;
``resources/<type>-<name>.yaml``
    every other custom resource (GCP, docker-build, random, providers) with its inputs;
``resources.json``
    every registration, components included, with its inputs and options (what the
    policy pack's tests and a reviewer's tools read);
``outputs.yaml``
    the stack outputs.

Every secret value is replaced by ``[secret]``: values the program marked secret,
and the outputs a resource declares secret (``additionalSecretOutputs``). The
structure stays (a Secret's keys are listed, its values are not), so a base/head
diff shows that a key was added without showing any value. Keys are sorted and
the mocks are deterministic, so two runs of the same commit write the same bytes.

Values the cloud computes at creation (cluster endpoint, image digest, random
passwords) are the mocks' placeholders: the plan shows what the program asks for.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from tools.mockrun import (
    HELM_TYPE_PREFIX,
    ROOT,
    ProgramRun,
    Registered,
    is_secret,
    run_program,
    stack_config,
    stack_names,
)

REDACTED = "[secret]"
DEFAULT_OUT = ROOT / "out" / "plan"


def mock_random_result(name: str, length: int) -> str:
    """A distinctive, deterministic stand-in for a RandomPassword: easy to grep for."""
    stream = ""
    counter = 0
    while len(stream) < length:
        stream += hashlib.sha256(f"{name}:{counter}".encode()).hexdigest()
        counter += 1
    return stream[:length]


def _redact_all(value: Any) -> Any:
    """Keep the shape (keys, list lengths), replace every leaf."""
    if is_secret(value):
        return _redact_all(value["value"])
    if isinstance(value, dict):
        return {k: _redact_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_all(v) for v in value]
    return REDACTED


def redact(value: Any) -> Any:
    """The value with every secret redacted and integral floats made ints.

    The mock wire format carries numbers as floats; manifests want integers.
    """
    if is_secret(value):
        return _redact_all(value["value"])
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def inputs(r: Registered) -> dict[str, Any]:
    """What the program passed (not what the mocks computed), secrets redacted."""
    secret_keys = set(r.additional_secret_outputs)
    passed = {k: v for k, v in r.inputs.items() if k in r.input_keys and not k.startswith("__")}
    return {k: _redact_all(v) if k in secret_keys else redact(v) for k, v in sorted(passed.items())}


def is_kubernetes_object(r: Registered) -> bool:
    """A manifest; a Helm release renders its chart's objects in the cluster instead."""
    return r.custom and r.type.startswith("kubernetes:") and not r.type.startswith(HELM_TYPE_PREFIX)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def kubernetes_file_name(manifest: dict[str, Any]) -> str:
    meta = manifest.get("metadata") or {}
    parts = [manifest["kind"], meta.get("namespace"), meta["name"]]
    return "-".join(_slug(str(p)) for p in parts if p) + ".yaml"


def resource_file_name(r: Registered) -> str:
    # gcp:container/nodePool:NodePool -> gcp-container-nodepool
    package, module, _ = [*r.type.split(":"), "", ""][:3]
    prefix = _slug(f"{package}-{module.split('/')[0]}") if module != "index" else _slug(package)
    return f"{prefix}-{_slug(r.name)}.yaml"


def _reference(value: str) -> str:
    """A provider reference is ``<urn>::<id>``: the URN says which one."""
    return value.split("::")[0] if value else ""


def registration(r: Registered) -> dict[str, Any]:
    return {
        "urn": r.urn,
        "type": r.type,
        "name": r.name,
        "custom": r.custom,
        "protect": r.protect,
        "retainOnDelete": r.retain_on_delete,
        "parent": r.parent,
        "provider": _reference(r.provider),
        "additionalSecretOutputs": sorted(r.additional_secret_outputs),
        # What a reviewer of the plan diff must see change: a new ignoreChanges or
        # dependency alters how `pulumi up` treats the resource.
        "ignoreChanges": sorted(r.ignore_changes),
        "dependsOn": sorted(r.dependencies),
        "inputs": inputs(r),
    }


def dump_yaml(value: Any) -> str:
    return yaml.safe_dump(value, sort_keys=True, default_flow_style=False, width=100)


def plan_files(run: ProgramRun) -> dict[str, str]:
    """Relative path -> file content, for one program run."""
    files: dict[str, str] = {}
    manifests: list[dict[str, Any]] = []
    for r in run.resources:
        if is_kubernetes_object(r) and r.type != "pulumi:providers:kubernetes":
            manifest = inputs(r)
            name = f"kubernetes/{kubernetes_file_name(manifest)}"
            if name in files:
                raise ValueError(f"two Kubernetes objects would be written to {name}")
            files[name] = dump_yaml(manifest)
            manifests.append(manifest)
        elif r.custom:
            name = f"resources/{resource_file_name(r)}"
            if name in files:
                raise ValueError(f"two resources would be written to {name}")
            files[name] = dump_yaml(registration(r))
    manifests.sort(key=kubernetes_file_name)
    files["kubernetes.yaml"] = yaml.safe_dump_all(
        manifests, sort_keys=True, default_flow_style=False, width=100
    )
    everything = sorted((registration(r) for r in run.resources), key=lambda e: e["urn"])
    files["resources.json"] = json.dumps(everything, indent=2, sort_keys=True) + "\n"
    outputs = {
        k: _redact_all(v) if k in run.secret_outputs else redact(v) for k, v in run.outputs.items()
    }
    files["outputs.yaml"] = dump_yaml(outputs)
    return dict(sorted(files.items()))


def run_stack(stack: str) -> ProgramRun:
    run = run_program(stack_config(stack), stack, random_result=mock_random_result)
    if run.error is not None:
        raise SystemExit(f"Pulumi.{stack}.yaml: the program failed: {run.error}")
    return run


def write_files(files: dict[str, str], target: Path) -> list[Path]:
    """Write ``target/`` afresh (stale files of a removed object must go)."""
    if target.exists():
        shutil.rmtree(target)
    written = []
    for relative, content in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        written.append(path)
    return written


def write_plan(stack: str, out: Path) -> list[Path]:
    """Run the program for `stack` and write ``out/<stack>/``."""
    return write_files(plan_files(run_stack(stack)), out / stack)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.plan", description=__doc__)
    parser.add_argument(
        "--stack",
        action="append",
        help="stack name (repeatable; default: every Pulumi.<stack>.yaml)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: out/plan")
    args = parser.parse_args(None if argv is None else list(argv))
    known = stack_names()
    chosen = args.stack or known
    unknown = [s for s in chosen if s not in known]
    if unknown:
        print(
            f"unknown stack {', '.join(unknown)}: allowed are {', '.join(known)}",
            file=sys.stderr,
        )
        return 2
    for stack in chosen:
        written = write_plan(stack, args.out)
        k8s = sum(1 for p in written if p.parent.name == "kubernetes")
        other = sum(1 for p in written if p.parent.name == "resources")
        print(
            f"{args.out / stack}: {k8s} Kubernetes objects, {other} other resources, "
            f"{len(written)} files"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
