"""The pack as the Pulumi CLI runs it, on every resource the program registers.

The program's resources come from `make plans` (out/plan/<stack>/resources.json,
written by the main .venv: the program's pulumi cannot be imported here). The
Makefile writes them before it runs these tests; set PLAN_DIR to read another.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from pulumi_policy import (
    EnforcementLevel,
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

from policy import pack

ROOT = Path(__file__).resolve().parents[2]
PLAN_DIR = Path(os.environ.get("PLAN_DIR", ROOT / "out" / "plan"))
STACKS = sorted(p.name[len("Pulumi.") : -len(".yaml")] for p in ROOT.glob("Pulumi.*.yaml"))


def _options() -> PolicyResourceOptions:
    return PolicyResourceOptions(False, [], None, [], PolicyCustomTimeouts(0, 0, 0), [])


def run_pack(resources: list[dict[str, Any]], config: dict[str, Any] | None = None) -> list[str]:
    """Every violation the pack reports for these registrations (resources.json entries)."""
    violations: list[str] = []

    def report(message: str, urn: str | None = None) -> None:
        violations.append(message)

    for policy in pack.policies():
        if isinstance(policy, ResourceValidationPolicy):
            for r in resources:
                args = ResourceValidationArgs(
                    r["type"], r["inputs"], r["urn"], r["name"], _options(), None, config or {}
                )
                policy.validate(args, report)
        elif isinstance(policy, StackValidationPolicy):
            stack = [
                PolicyResource(
                    r["type"], r["inputs"], r["urn"], r["name"], _options(), None, None, [], {}
                )
                for r in resources
            ]
            policy.validate(StackValidationArgs(stack, config or {}), report)
    return violations


def plan(stack: str) -> list[dict[str, Any]]:
    path = PLAN_DIR / stack / "resources.json"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make plans` (the program's plan) first")
    resources: list[dict[str, Any]] = json.loads(path.read_text())
    return resources


def test_every_policy_is_mandatory_and_named_once() -> None:
    policies = pack.policies()
    assert all(p.enforcement_level == EnforcementLevel.MANDATORY for p in policies)
    assert len({p.name for p in policies}) == len(policies) == 7


@pytest.mark.parametrize("stack", STACKS)
def test_the_program_has_no_violation(stack: str) -> None:
    resources = plan(stack)
    # Not vacuous: the resources the rules are about are there.
    types = {r["type"] for r in resources}
    assert {"kubernetes:apps/v1:StatefulSet", "kubernetes:apps/v1:Deployment"} <= types
    assert "kubernetes:policy/v1:PodDisruptionBudget" in types
    assert run_pack(resources) == []


def _statefulset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    [sts] = [r for r in resources if r["type"] == "kubernetes:apps/v1:StatefulSet"]
    return sts


def test_the_pack_knows_production_from_the_stack_name() -> None:
    resources = copy.deepcopy(plan("dev"))
    _statefulset(resources)["inputs"]["spec"]["replicas"] = 4
    # Four RabbitMQ nodes are allowed in dev...
    assert run_pack(resources) == []
    # ...not once the pack is told dev is production (nor are dev's preferred
    # anti-affinity and its cluster without deletion protection).
    messages = run_pack(resources, {"productionStacks": ["dev"]})
    assert len(messages) == 3, messages
    assert any("replicas = 4" in m for m in messages)
    assert any("*required* pod anti-affinity" in m for m in messages)
    assert any("deletionProtection is false" in m for m in messages)


def test_a_violating_change_to_the_program_is_caught() -> None:
    resources = copy.deepcopy(plan("prod"))
    sts = _statefulset(resources)["inputs"]
    del sts["spec"]["template"]["spec"]["affinity"]
    sts["spec"]["replicas"] = 2
    resources = [r for r in resources if not r["name"].endswith("-pdb")]
    cluster = next(r for r in resources if r["type"] == "gcp:container/cluster:Cluster")
    cluster["inputs"]["deletionProtection"] = False
    messages = run_pack(resources)
    assert len(messages) == 5, messages
    assert sum("no PodDisruptionBudget" in m for m in messages) == 2
