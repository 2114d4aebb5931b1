"""The pulumi-policy wrappers around :mod:`policy.rules`: every policy is MANDATORY.

`policy/__main__.py` serves :func:`policies` when the Pulumi CLI runs the pack
(``pulumi preview --policy-pack policy``); the tests call :func:`policies` too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pulumi_policy import (
    EnforcementLevel,
    PolicyConfigSchema,
    PolicyPack,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

from policy import rules

PACK_NAME = "celery-cluster"

# Which stacks are production (stack name from the URN): `--policy-pack-config`.
PRODUCTION_SCHEMA = PolicyConfigSchema(
    properties={
        "productionStacks": {
            "type": "array",
            "items": {"type": "string"},
            "default": list(rules.DEFAULT_PRODUCTION_STACKS),
            "description": "stack names whose resources get the production rules",
        }
    }
)

ResourceRule = Callable[[str, Mapping[str, Any]], list[str]]
StackAwareRule = Callable[..., list[str]]


def _production(args: ResourceValidationArgs) -> bool:
    stacks = args.get_config().get("productionStacks") or rules.DEFAULT_PRODUCTION_STACKS
    return rules.is_production(args.urn, stacks)


def _resource_policy(name: str, rule: ResourceRule) -> ResourceValidationPolicy:
    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        for message in rule(args.resource_type, args.props):
            report_violation(message, None)

    return ResourceValidationPolicy(
        name=name,
        description=(rule.__doc__ or name).strip().splitlines()[0],
        validate=validate,
        enforcement_level=EnforcementLevel.MANDATORY,
    )


def _stack_aware_policy(name: str, rule: StackAwareRule) -> ResourceValidationPolicy:
    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        for message in rule(args.resource_type, args.props, production=_production(args)):
            report_violation(message, None)

    return ResourceValidationPolicy(
        name=name,
        description=(rule.__doc__ or name).strip().splitlines()[0],
        validate=validate,
        enforcement_level=EnforcementLevel.MANDATORY,
        config_schema=PRODUCTION_SCHEMA,
    )


def _validate_stack(args: StackValidationArgs, report_violation: ReportViolation) -> None:
    resources: Sequence[tuple[str, Mapping[str, Any]]] = [
        (r.resource_type, r.props) for r in args.resources
    ]
    for message in rules.pod_disruption_budgets(resources):
        report_violation(message, None)


def policies() -> list[ResourceValidationPolicy | StackValidationPolicy]:
    return [
        _stack_aware_policy("rabbitmq-statefulset-ha", rules.rabbitmq_statefulset_ha),
        _stack_aware_policy("rabbitmq-replicas-odd-in-production", rules.rabbitmq_replicas),
        _resource_policy("rabbitmq-no-default-credentials", rules.rabbitmq_credentials),
        _resource_policy("management-ui-not-exposed", rules.management_ui_not_exposed),
        _resource_policy("containers-requests-and-non-root", rules.containers_hardened),
        _stack_aware_policy("gke-deletion-protection-in-production", rules.gke_deletion_protection),
        StackValidationPolicy(
            name="pod-disruption-budgets",
            description=(rules.pod_disruption_budgets.__doc__ or "").strip().splitlines()[0],
            validate=_validate_stack,
            enforcement_level=EnforcementLevel.MANDATORY,
        ),
    ]


def serve() -> None:
    """Blocks: the Pulumi CLI talks to the pack over gRPC."""
    PolicyPack(name=PACK_NAME, policies=list(policies()))
