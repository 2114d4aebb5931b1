"""Kubernetes object plumbing every component shares: metadata, the restricted
security contexts, and registering a plain manifest with its typed class.

The builders in :mod:`components.rabbitmq` and :mod:`components.workers` return
plain camelCase dicts (schema-checked in the tests); :func:`register` is the one
way they become Pulumi resources.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

Manifest = dict[str, Any]

_KINDS: dict[tuple[str, str], Callable[..., pulumi.CustomResource]] = {
    ("v1", "Namespace"): k8s.core.v1.Namespace,
    ("v1", "Secret"): k8s.core.v1.Secret,
    ("v1", "ConfigMap"): k8s.core.v1.ConfigMap,
    ("v1", "ServiceAccount"): k8s.core.v1.ServiceAccount,
    ("v1", "Service"): k8s.core.v1.Service,
    ("rbac.authorization.k8s.io/v1", "Role"): k8s.rbac.v1.Role,
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): k8s.rbac.v1.RoleBinding,
    ("storage.k8s.io/v1", "StorageClass"): k8s.storage.v1.StorageClass,
    ("apps/v1", "StatefulSet"): k8s.apps.v1.StatefulSet,
    ("apps/v1", "Deployment"): k8s.apps.v1.Deployment,
    ("batch/v1", "Job"): k8s.batch.v1.Job,
    ("policy/v1", "PodDisruptionBudget"): k8s.policy.v1.PodDisruptionBudget,
    ("networking.k8s.io/v1", "NetworkPolicy"): k8s.networking.v1.NetworkPolicy,
}


def metadata(
    name: str,
    labels: Mapping[str, str],
    namespace: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Manifest:
    """``metadata`` of an object; cluster-scoped objects have no namespace."""
    meta: Manifest = {"name": name, "labels": dict(labels)}
    if namespace is not None:
        meta["namespace"] = namespace
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def pod_security_context(uid: int) -> Manifest:
    """The "restricted" Pod Security Standard at pod level, running as ``uid``."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> Manifest:
    """The "restricted" Pod Security Standard at container level, plus a read-only root."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


def snake(key: str) -> str:
    """camelCase manifest key -> the typed class's snake_case argument."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def register(
    name: str, manifest: Mapping[str, Any], opts: pulumi.ResourceOptions
) -> pulumi.CustomResource:
    """Register a manifest with its typed class; the dict parts pass through as is."""
    cls = _KINDS[(manifest["apiVersion"], manifest["kind"])]
    args = {snake(k): v for k, v in manifest.items() if k not in ("apiVersion", "kind")}
    return cls(name, opts=opts, **args)


#: The CustomResourceDefinitions' kinds the program registers (not in Kubernetes' own
#: schema: tests/unit/test_monitoring.py and test_autoscaling.py check them field by field).
CUSTOM_KINDS = frozenset(
    {
        ("monitoring.googleapis.com/v1", "PodMonitoring"),
        ("monitoring.googleapis.com/v1", "Rules"),
        ("keda.sh/v1alpha1", "ScaledObject"),
        ("keda.sh/v1alpha1", "TriggerAuthentication"),
    }
)


def is_custom(manifest: Mapping[str, Any]) -> bool:
    return (manifest["apiVersion"], manifest["kind"]) in CUSTOM_KINDS


def register_custom(
    name: str, manifest: Mapping[str, Any], opts: pulumi.ResourceOptions
) -> pulumi.CustomResource:
    """Register an object of a CustomResourceDefinition's kind (no typed class exists)."""
    if not is_custom(manifest):
        raise ValueError(f"{manifest['apiVersion']} {manifest['kind']} is not in CUSTOM_KINDS")
    rest = {k: v for k, v in manifest.items() if k not in ("apiVersion", "kind", "metadata")}
    return k8s.apiextensions.CustomResource(
        name,
        api_version=manifest["apiVersion"],
        kind=manifest["kind"],
        metadata=manifest["metadata"],
        opts=opts,
        **rest,
    )
