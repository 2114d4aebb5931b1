"""make bench without a broker: results.json from per-run values, the table, and the
twin's one change for the article's RabbitMQ 3.10 pods (peer discovery)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from bench import run
from bench.results import CONFIG_KEYS, build_results, format_table
from localcluster import twin


def _run(publish: float, lost: int, duplicates: int) -> dict[str, Any]:
    return {
        "publish_rate": publish,
        "publish_rate_confirms_toggled": publish / 2,
        "drain_rate": 100.0,
        "sleep_drain_s": 2.0,
        "sleep_ideal_s": 1.0,
        "failover_lost": lost,
        "failover_duplicates": duplicates,
        "failover_gap_s": 0.5,
        "failover": {"published": 600},
        "sleep": {
            "ideal_s": 1.0,
            "tasks": 300,
            "task_seconds": 1.0,
            "slots": 6,
            "pool": "prefork",
            "concurrency_per_worker": 2,
        },
    }


def _results(**changes: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "args": argparse.Namespace(runs=3, out="out/bench", verbose=False, publish_tasks=5000),
        "argv": ["--runs", "3"],
        "status": "ok",
        "problems": [],
        "configs": {"article": {"pool": "prefork"}, "ours": {"pool": "threads"}},
        "runs": {
            "article": [_run(2000, 1, 0), _run(2100, 0, 0), _run(1900, 2, 0)],
            "ours": [_run(700, 0, 2), _run(720, 0, 1), _run(650, 0, 0)],
        },
        "checks": {"article": {"type": "classic"}, "ours": {"type": "quorum"}},
        "timings": {"total_s": 1.0},
        "rabbitmq_versions": {"article": "3.10.8", "ours": "4.3.6"},
        "twins": {
            "article": {"stack": "prod", "run_id": "aaaaaa", "erlang": "1:25.2.3"},
            "ours": {"stack": "prod", "run_id": "bbbbbb", "erlang": "1:29.1.2"},
        },
        "bench_adaptations": {"article workers": "..."},
    }
    return build_results(**{**inputs, **changes})


def test_results_carry_each_sides_version_and_twin() -> None:
    results = _results()
    assert results["configs"]["article"]["rabbitmq"] == "3.10.8"
    assert results["configs"]["ours"]["rabbitmq"] == "4.3.6"
    assert results["configs"]["ours"]["twin"]["run_id"] == "bbbbbb"
    assert results["machine"]["rabbitmq"] == "3.10.8 (article), 4.3.6 (ours)"
    assert results["machine"]["erlang"] == "1:25.2.3 (article), 1:29.1.2 (ours)"
    assert results["bench_adaptations"] == {"article workers": "..."}
    assert results["command"] == "python -m bench --runs 3"
    assert "out" not in results["params"] and results["params"]["runs"] == 3


def test_medians_spread_totals_and_the_ratio() -> None:
    results = _results()
    publish = results["configs"]["article"]["summary"]["publish_rate"]
    assert (publish["median"], publish["min"], publish["max"]) == (2000, 1900, 2100)
    lost = results["configs"]["article"]["summary"]["failover_lost"]
    assert (lost["median"], lost["total"]) == (1, 3)
    assert results["comparison"]["publish_rate"]["ours_over_article"] == pytest.approx(0.35)
    table = format_table(results)
    # A median of 0 must not hide the runs that lost tasks: the total says it.
    assert "total 3 of 1,800" in table
    assert "RabbitMQ 3.10.8 (article), 4.3.6 (ours)" in table


def test_a_side_without_runs_has_no_values_not_an_error() -> None:
    results = _results(
        status="error",
        problems=["error: boom"],
        runs={"article": [], "ours": []},
        rabbitmq_versions={},
        twins={},
    )
    for key in CONFIG_KEYS:
        assert results["configs"][key]["summary"]["publish_rate"]["median"] is None
        assert results["configs"][key]["rabbitmq"] is None
    assert results["machine"]["rabbitmq"] is None
    assert results["problems"] == ["error: boom"]


def test_the_article_runs_rabbitmq_3_10_which_still_has_classic_mirroring() -> None:
    assert twin.image_version(run.ARTICLE_RABBITMQ_IMAGE) == "3.10"


def _stack(image: str) -> tuple[twin.RenderedStack, dict[str, Any]]:
    conf = (
        "listeners.tcp.default = 5672\n"
        "## Peer discovery: Kubernetes (StatefulSet pods behind a headless Service).\n"
        "cluster_formation.peer_discovery_backend = rabbit_peer_discovery_k8s\n"
        "cluster_formation.k8s.host = kubernetes.default\n"
        "cluster_formation.k8s.address_type = hostname\n"
        "cluster_formation.target_cluster_size_hint = 3\n"
    )
    config_map = {
        "kind": "ConfigMap",
        "metadata": {"name": "rabbitmq-config", "namespace": "rabbitmq"},
        "data": {"rabbitmq.conf": conf, "enabled_plugins": "[rabbitmq_peer_discovery_k8s]."},
    }
    statefulset = {
        "kind": "StatefulSet",
        "metadata": {"name": "rabbitmq-server", "namespace": "rabbitmq"},
        "spec": {
            "replicas": 3,
            "serviceName": "rabbitmq-nodes",
            "template": {
                "spec": {
                    "volumes": [{"name": "conf", "configMap": {"name": "rabbitmq-config"}}],
                    "containers": [
                        {
                            "image": image,
                            "env": [
                                {
                                    "name": "MY_POD_NAME",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                },
                                {"name": "SVC", "value": "rabbitmq-nodes"},
                                {
                                    "name": "RABBITMQ_NODENAME",
                                    "value": "rabbit@$(MY_POD_NAME).$(SVC)",
                                },
                            ],
                        }
                    ],
                }
            },
        },
    }
    return twin.RenderedStack("prod", (config_map, statefulset)), statefulset


def test_before_4_1_the_twin_lists_the_statefulset_pods_instead_of_asking_kubernetes() -> None:
    rendered, statefulset = _stack("rabbitmq:3.10.8-management")
    adapted = twin.adapt_peer_discovery(rendered, statefulset)
    conf = adapted.data("ConfigMap", "rabbitmq-config", "rabbitmq")["rabbitmq.conf"]
    assert "cluster_formation.peer_discovery_backend = classic_config\n" in conf
    for i in range(3):
        node = f"rabbit@rabbitmq-server-{i}.rabbitmq-nodes"
        assert f"cluster_formation.classic_config.nodes.{i + 1} = {node}\n" in conf
    assert "k8s" not in conf
    # Everything else as rendered.
    assert conf.startswith("listeners.tcp.default = 5672\n")
    assert conf.endswith("cluster_formation.target_cluster_size_hint = 3\n")
    plugins = adapted.data("ConfigMap", "rabbitmq-config", "rabbitmq")["enabled_plugins"]
    assert plugins == "[rabbitmq_peer_discovery_k8s]."


def test_from_4_1_the_rendered_stack_is_left_as_shipped() -> None:
    rendered, statefulset = _stack("rabbitmq:4.3.6-management")
    assert twin.adapt_peer_discovery(rendered, statefulset) is rendered


def test_a_conf_without_the_kubernetes_backend_is_an_error_not_a_silent_pass() -> None:
    rendered, statefulset = _stack("rabbitmq:3.10.8-management")
    (config_map, _) = rendered.objects
    broken = {**config_map, "data": {"rabbitmq.conf": "listeners.tcp.default = 5672\n"}}
    with pytest.raises(twin.TwinError, match="rabbit_peer_discovery_k8s"):
        twin.adapt_peer_discovery(twin.RenderedStack("prod", (broken, statefulset)), statefulset)
