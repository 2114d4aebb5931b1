"""Run the real `__main__.py` under Pulumi's mocks and record what it registers.

No Pulumi CLI, no provider plugin, no cloud: the program's resource graph,
every input, and the options the engine would see (protect, parent, provider,
ignoreChanges, dependencies) are captured from the mock monitor, in one fresh
Pulumi runtime per run.

Used by the tests (they import it directly) and by ``make plan``
(:mod:`tools.plan`), which writes what a run registered to ``out/plan/``.
"""

from __future__ import annotations

import asyncio
import json
import runpy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import settings as pulumi_settings
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "celery-cluster"
# What `pulumi config set gcp:project ...` adds to a stack file in the README's steps.
TEST_GCP_PROJECT = "celery-cluster-test"
# What the mocks say GCP computed for every cluster.
MOCK_CLUSTER_IP = "203.0.113.10"
MOCK_CLUSTER_DNS = "gke-0123456789abcdef0123456789abcdef-000000000000.us-east1.gke.goog"


def stack_names() -> list[str]:
    return sorted(p.name[len("Pulumi.") : -len(".yaml")] for p in ROOT.glob("Pulumi.*.yaml"))


def stack_config(stack: str, *, gcp_project: str | None = TEST_GCP_PROJECT) -> dict[str, Any]:
    """The `config:` map of Pulumi.<stack>.yaml, as the engine hands it over."""
    document = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text()) or {}
    config = dict(document.get("config") or {})
    if gcp_project is not None:
        config.setdefault("gcp:project", gcp_project)
    return config


@dataclass
class Registered:
    """One resource registration as the engine would receive it."""

    urn: str
    type: str
    name: str
    inputs: dict[str, Any]
    custom: bool
    protect: bool
    parent: str
    provider: str
    retain_on_delete: bool
    additional_secret_outputs: list[str]
    # The keys the program passed (``inputs`` also holds what the mocks computed).
    input_keys: list[str] = field(default_factory=list)
    # Property names whose changes the engine ignores (the resource's own option).
    ignore_changes: list[str] = field(default_factory=list)
    # URNs registered before this one may be: explicit depends_on and inputs' resources.
    dependencies: list[str] = field(default_factory=list)


@dataclass
class ProgramRun:
    stack: str
    resources: list[Registered] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    secret_outputs: set[str] = field(default_factory=set)
    error: BaseException | None = None

    def of_type(self, type_: str) -> list[Registered]:
        return [r for r in self.resources if r.type == type_]

    def one(self, type_: str, name: str | None = None) -> Registered:
        found = [r for r in self.of_type(type_) if name is None or r.name == name]
        assert len(found) == 1, (
            f"expected one {type_} {name or ''}, found {[r.name for r in found]}"
        )
        return found[0]

    def kubernetes_objects(self) -> Iterator[tuple[Registered, dict[str, Any]]]:
        """Every Kubernetes object the program registers, as a manifest."""
        for r in self.resources:
            if (
                r.custom
                and r.type.startswith("kubernetes:")
                and not r.type.startswith(HELM_TYPE_PREFIX)
                and r.type != "pulumi:providers:kubernetes"
            ):
                yield r, manifest(r)

    def helm_releases(self) -> list[Registered]:
        """Helm charts the program installs (a Release is no manifest: it renders many)."""
        return [r for r in self.resources if r.type.startswith(HELM_TYPE_PREFIX)]

    def kubernetes_object(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [
            m
            for _, m in self.kubernetes_objects()
            if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)
        ]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]


HELM_TYPE_PREFIX = "kubernetes:helm.sh/"


def manifest(r: Registered) -> dict[str, Any]:
    """The object as it is applied: inputs minus Pulumi's bookkeeping."""
    return {k: v for k, v in r.inputs.items() if not k.startswith("__")}


def repeated_x(name: str, length: int) -> str:
    """What a RandomPassword's ``result`` is under the mocks unless told otherwise."""
    return "x" * length


class _Mocks(pulumi.runtime.Mocks):
    def __init__(self, random_result: Callable[[str, int], str] = repeated_x) -> None:
        super().__init__()
        self.random_result = random_result

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict]:
        outputs = dict(args.inputs)
        if args.typ == "gcp:container/cluster:Cluster":
            # Computed by GCP at creation time; the kubeconfig is built from them.
            endpoints = dict(args.inputs.get("controlPlaneEndpointsConfig") or {})
            endpoints["dnsEndpointConfig"] = {
                **(endpoints.get("dnsEndpointConfig") or {}),
                "endpoint": MOCK_CLUSTER_DNS,
            }
            outputs.update(
                name=args.inputs.get("name", args.name),
                endpoint=MOCK_CLUSTER_IP,
                masterAuth={"clusterCaCertificate": "TU9DSy1DQQ=="},
                controlPlaneEndpointsConfig=endpoints,
            )
        elif args.typ == "gcp:serviceaccount/account:Account":
            outputs["email"] = (
                f"{args.inputs['accountId']}@{TEST_GCP_PROJECT}.iam.gserviceaccount.com"
            )
        elif args.typ == "random:index/randomPassword:RandomPassword":
            outputs["result"] = self.random_result(args.name, int(args.inputs.get("length", 16)))
        elif args.typ == "gcp:artifactregistry/repository:Repository":
            outputs["repositoryId"] = args.inputs.get("repositoryId", args.name)
        elif args.typ == "docker-build:index:Image":
            outputs["ref"] = (
                "us-east1-docker.pkg.dev/celery-cluster-test/workers/app@sha256:" + "0" * 64
            )
        if args.typ.startswith("kubernetes:") and "metadata" in outputs:
            metadata = dict(outputs["metadata"])
            metadata.setdefault("name", args.name)
            outputs["metadata"] = metadata
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict:  # type: ignore[override]
        if args.token == "gcp:organizations/getClientConfig:getClientConfig":
            return {"accessToken": "mock-access-token", "project": TEST_GCP_PROJECT}
        return {}


class _RecordingMonitor(pulumi_mocks.MockMonitor):
    def __init__(self, mocks: pulumi.runtime.Mocks, run: ProgramRun) -> None:
        super().__init__(mocks)
        self.run = run

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            self.run.resources.append(
                Registered(
                    urn=response.urn,
                    type=request.type,
                    name=request.name,
                    inputs=self.resources[response.urn].state
                    if response.urn in self.resources
                    else {},
                    custom=request.custom,
                    protect=request.protect,
                    parent=request.parent,
                    provider=request.provider,
                    retain_on_delete=request.retainOnDelete,
                    additional_secret_outputs=list(request.additionalSecretOutputs),
                    input_keys=sorted(request.object.fields.keys()),
                    ignore_changes=list(request.ignoreChanges),
                    dependencies=list(request.dependencies),
                )
            )
        return response


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run_program(
    config: Mapping[str, Any],
    stack: str = "dev",
    *,
    random_result: Callable[[str, int], str] = repeated_x,
) -> ProgramRun:
    """Run __main__.py once with `config` (full keys -> values) under mocks.

    ``random_result(name, length)`` is the ``result`` of each RandomPassword.
    """
    run = ProgramRun(stack=stack)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        pulumi_settings.set_root_resource(None)  # type: ignore[arg-type]
        mocks = _Mocks(random_result)
        pulumi.runtime.set_mocks(
            mocks,
            project=PROJECT,
            stack=stack,
            preview=False,
            monitor=_RecordingMonitor(mocks, run),
        )
        # The engine hands structured values over as JSON text.
        pulumi.runtime.set_all_config(
            {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
        )
        pulumi_settings.SETTINGS.rpc_manager.clear()
        pulumi_settings.SETTINGS.outputs.clear()

        def program() -> None:
            runpy.run_path(str(ROOT / "__main__.py"), run_name="__main__")

        try:
            _sync_await(run_pulumi_func(program))
        except Exception as error:  # recorded for the tests to assert on
            run.error = error
            return run

        stack_resource = pulumi_settings.get_root_resource()
        exported = getattr(stack_resource, "outputs", {}) or {}
        for key, value in exported.items():
            output = pulumi.Output.from_input(value)
            run.outputs[key] = _plain(_sync_await(output.future()))
            if _sync_await(output.is_secret()):
                run.secret_outputs.add(key)
        return run
    finally:
        pulumi.runtime.set_all_config({})
        loop.close()
        asyncio.set_event_loop(None)


# How the engine marks a secret value on the wire (pulumi.runtime.rpc).
SECRET_SIGNATURE = "1b47061264138c4ac30d75fd1eb44270"
_SIG_KEY = "4dabf18193072939515e22adb298388d"


def is_secret(value: Any) -> bool:
    return isinstance(value, dict) and value.get(_SIG_KEY) == SECRET_SIGNATURE


def reveal(value: Any) -> Any:
    """The value with every secret marker unwrapped and integral floats made ints.

    The mock wire format carries numbers as floats; Kubernetes wants integers.
    """
    if is_secret(value):
        return reveal(value["value"])
    if isinstance(value, dict):
        return {k: reveal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [reveal(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
