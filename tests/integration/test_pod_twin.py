"""The pod twin: the prod stack's own StatefulSet, run as three RabbitMQ 4.3 pods here.

Each pod has its own network namespace on a bridge, hostname, cgroups with the
container's limits, the rendered files at the manifest's mount paths and the
kubelet's probes and stop sequence; peer discovery is the Kubernetes plugin as
shipped. Every test leaves nothing behind, checked by the fixture.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from components.config import load_stack_config
from localcluster import pods, rootfs, twin
from tools.mockrun import reveal, run_program, stack_config

pytestmark = pytest.mark.timeout(600)
STACK = "prod"


def _nothing_left(cluster: twin.StatefulSetTwin) -> None:
    left = cluster.leftovers()
    assert left == {k: [] for k in left}, left


@pytest.fixture(scope="module")
def cluster() -> Iterator[twin.StatefulSetTwin]:
    running = twin.StatefulSetTwin(STACK)
    try:
        running.start()
        yield running
    finally:
        running.close()
        _nothing_left(running)


def test_the_twin_boots_the_rabbitmq_version_that_ships(cluster: twin.StatefulSetTwin) -> None:
    shipped = load_stack_config(stack_config(STACK), STACK).rabbitmq.image
    assert twin.image_version(shipped) == cluster.version == "4.3"
    printed = cluster.rabbitmqctl(0, "version").strip()
    assert printed == rootfs.for_version(cluster.version).upstream_version
    assert printed.startswith("4.3.")


def test_three_pods_form_one_cluster_by_kubernetes_peer_discovery(
    cluster: twin.StatefulSetTwin,
) -> None:
    expected = [f"rabbit@rabbitmq-server-{i}.rabbitmq-nodes.rabbitmq" for i in range(3)]
    for ordinal in range(3):
        assert cluster.running_nodes(ordinal) == expected
    for pod in cluster.pods.values():
        log = pod.log_file().read_text()
        assert "configured backend: rabbit_peer_discovery_k8s" in log
        # From 4.1 the plugin joins ordinal 0, derived from the node's own name.
        assert "node 'rabbit@rabbitmq-server-0.rabbitmq-nodes.rabbitmq' selected" in log
        assert pod.ready_at is not None and pod.started_at is not None


def test_every_mounted_file_is_the_rendered_object_byte_for_byte(
    cluster: twin.StatefulSetTwin,
) -> None:
    """The ConfigMap as `make plan` renders it (a separate run of the program), and the
    Secret's files as this run's program rendered them."""
    plan = run_program(stack_config(STACK), STACK)
    config_map = reveal(plan.kubernetes_object("ConfigMap", "rabbitmq-config"))["data"]
    secret = cluster.rendered.data("Secret", "rabbitmq-credentials", "rabbitmq")
    expected = {
        "/etc/rabbitmq/rabbitmq.conf": config_map["rabbitmq.conf"],
        "/etc/rabbitmq/enabled_plugins": config_map["enabled_plugins"],
        "/etc/rabbitmq/conf.d/default_user.conf": secret["default_user.conf"],
        "/etc/rabbitmq/definitions.json": secret["definitions.json"],
        "/var/lib/rabbitmq/.erlang.cookie": secret[".erlang.cookie"],
    }
    for pod in cluster.pods.values():
        for path, text in expected.items():
            done = pod.exec(["cat", path])
            assert done.returncode == 0, (pod.name, path, done.stderr)
            assert done.stdout == text, (pod.name, path)
        # The StatefulSet's environment, $(VAR)s expanded as the kubelet does.
        env = dict(line.split("=", 1) for line in pod.exec(["env"]).stdout.splitlines())
        assert env["RABBITMQ_NODENAME"] == f"rabbit@{pod.name}.rabbitmq-nodes.rabbitmq"
        assert pod.exec(["hostname"]).stdout.strip() == pod.name
        # readOnlyRootFilesystem, uid 999.
        assert pod.exec(["touch", "/usr/x"]).returncode != 0
        assert pod.exec(["id", "-u"]).stdout.strip() == "999"


def test_the_container_memory_limit_is_the_cgroup_and_rabbitmqs_alarm_fits_in_it(
    cluster: twin.StatefulSetTwin,
) -> None:
    limit = load_stack_config(stack_config(STACK), STACK).rabbitmq.memory_limit_bytes
    assert limit is not None
    pod = cluster.pods["rabbitmq-server-0"]
    cgroup = int((pod.cgroup("memory") / "memory.limit_in_bytes").read_text())
    assert cgroup == limit
    status = json.loads(cluster.rabbitmqctl(0, "status", "--formatter", "json"))
    watermark = int(status["vm_memory_high_watermark_limit"])
    # 0.6 of (limit - 20 % headroom): the alarm fires long before the OOM killer.
    assert watermark == int(0.6 * (limit - limit // 5))
    assert watermark < limit // 2


def test_a_killed_pod_is_replaced_on_its_volume_and_rejoins(
    cluster: twin.StatefulSetTwin,
) -> None:
    victim = cluster.pods["rabbitmq-server-1"]
    claim = cluster.files("rabbitmq-server-1").claim("persistence")
    data_before = sorted(p.name for p in claim.iterdir())
    assert data_before, "the node wrote nothing to its volume"
    address = victim.address
    victim.kill()
    assert not victim.pids()
    replacement = cluster.start_pod(1)
    replacement.wait_ready(240)
    # Same name, address and PVC directory: the node comes back as itself.
    assert replacement.address == address
    assert set(data_before) <= {p.name for p in claim.iterdir()}
    assert len(cluster.running_nodes(1)) == 3
    assert len(cluster.running_nodes(0)) == 3


def test_a_graceful_stop_runs_the_prestop_hook_then_sigterm(
    cluster: twin.StatefulSetTwin,
) -> None:
    pod = cluster.pods["rabbitmq-server-2"]
    seconds = pod.stop()
    events = [what for _, what in pod.events]
    assert events.index("preStop hook") < events.index("SIGTERM")
    assert any(e.startswith("preStop hook exited 0") for e in events)
    assert seconds < pod.spec.grace_seconds
    assert not pod.pids()
    cluster.start_pod(2).wait_ready(240)
    assert len(cluster.running_nodes(0)) == 3


def test_a_failing_run_leaves_nothing_behind() -> None:
    broken = twin.StatefulSetTwin(STACK)
    try:
        pod = broken.start_pod(0)
        assert pod.pids()
        with pytest.raises(pods.PodError, match="not Ready"):
            pod.wait_ready(0.5)  # fails while the pod runs: the run ends here
    finally:
        broken.close()
    _nothing_left(broken)
