"""Every Kubernetes object the program registers, against the OpenAPI schema.

For every stack file, each manifest is validated STRICTLY (an unknown or
misspelled field fails) against the schema of that stack's
``kubernetes.version``, with kubernetes-validate's bundled schemas: no cluster,
no network. Secret values are unwrapped (tools.mockrun.reveal) and checked
like any other value.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import kubernetes_validate
import pytest

from components import kube
from components.config import SUPPORTED_KUBERNETES_VERSIONS, load_stack_config
from tools.mockrun import ProgramRun, reveal, run_program, stack_config, stack_names

STACKS = stack_names()
# A valid object to mutate in the negative tests (kept tiny on purpose).
CONFIG_MAP = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": {"name": "example", "namespace": "default"},
    "data": {"key": "value"},
}


@cache
def _run(stack: str) -> ProgramRun:
    run = run_program(stack_config(stack), stack)
    assert run.error is None, run.error
    return run


def _version(stack: str) -> str:
    return load_stack_config(stack_config(stack), stack).kubernetes.version


def _objects(stack: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{m['kind']}/{m['metadata'].get('name', r.name)}", reveal(m))
        for r, m in _run(stack).kubernetes_objects()
        if not kube.is_custom(m)
    ]


def _validate(manifest: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(manifest, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        raise AssertionError(
            f"{manifest['kind']}/{manifest['metadata'].get('name')} is not a valid "
            f"Kubernetes {error.version} object at {path or '<root>'}: {error.message}"
        ) from None


@pytest.mark.parametrize("stack", STACKS)
def test_every_registered_object_is_valid_for_the_stacks_kubernetes_version(stack: str) -> None:
    objects = _objects(stack)
    kinds = {name.split("/")[0] for name, _ in objects}
    # The whole program is covered, not a subset: both components' workloads.
    assert {"StatefulSet", "Deployment", "Service", "Secret", "NetworkPolicy"} <= kinds
    version = _version(stack)
    for _, manifest in objects:
        _validate(manifest, version)
    # What is left out is the monitoring and KEDA objects and nothing else (their
    # fields: tests/unit/test_monitoring.py, test_autoscaling.py).
    custom = {m["kind"] for _, m in _run(stack).kubernetes_objects() if kube.is_custom(m)}
    assert custom <= {"PodMonitoring", "Rules", "ScaledObject", "TriggerAuthentication"}, custom


@pytest.mark.parametrize("version", SUPPORTED_KUBERNETES_VERSIONS)
def test_the_bundled_schemas_cover_every_supported_version(version: str) -> None:
    # Each supported minor has its own schema: validation never silently falls back.
    assert kubernetes_validate.validate(CONFIG_MAP, version, strict=True) == version


def test_a_misspelled_field_is_rejected() -> None:
    bad = copy.deepcopy(CONFIG_MAP)
    bad["dta"] = bad.pop("data")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.33", strict=True)


def test_a_misspelled_field_deep_in_a_registered_statefulset_is_rejected() -> None:
    stack = STACKS[0]
    statefulset = next(m for name, m in _objects(stack) if name == "StatefulSet/rabbitmq-server")
    _validate(statefulset, _version(stack))
    bad = copy.deepcopy(statefulset)
    pod = bad["spec"]["template"]["spec"]
    pod["containers"][0]["readinessProbe"]["tcpSoket"] = pod["containers"][0]["readinessProbe"].pop(
        "tcpSocket"
    )
    with pytest.raises(AssertionError, match="tcpSoket"):
        _validate(bad, _version(stack))


def test_a_wrong_type_is_rejected() -> None:
    bad = copy.deepcopy(CONFIG_MAP)
    bad["data"] = {"key": 5}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.33", strict=True)
