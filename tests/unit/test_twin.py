"""The pod twin's translation of manifests into pods, without starting any."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.config import quantity_bytes
from localcluster import podnet, pods, twin


@pytest.fixture(scope="module")
def rendered() -> twin.RenderedStack:
    return twin.RenderedStack.render("prod")


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        "rabbitmq:x:101:101:RabbitMQ messaging server:/var/lib/rabbitmq:/usr/sbin/nologin\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nrabbitmq:x:101:\n")
    return root


def test_env_is_expanded_as_the_kubelet_does() -> None:
    env = {"POD": "rabbitmq-server-0", "SVC": "rabbitmq-nodes"}
    assert twin.expand("rabbit@$(POD).$(SVC)", env) == "rabbit@rabbitmq-server-0.rabbitmq-nodes"
    assert twin.expand("$(UNKNOWN)/x", env) == "$(UNKNOWN)/x"
    assert twin.expand("$$(POD)", env) == "$(POD)"


def _pod(
    rendered: twin.RenderedStack, root: Path, tmp_path: Path, ordinal: int
) -> tuple[pods.PodSpec, twin.PodFiles]:
    files = twin.PodFiles(tmp_path / "pod", tmp_path / "pvc")
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    sts = rendered.get("StatefulSet", "rabbitmq-server")
    return twin.stateful_set_pod(rendered, sts, ordinal, root, files, hosts), files


def test_a_statefulset_pod_is_its_manifest(
    rendered: twin.RenderedStack, fake_root: Path, tmp_path: Path
) -> None:
    spec, files = _pod(rendered, fake_root, tmp_path, 1)
    sts = rendered.get("StatefulSet", "rabbitmq-server")
    manifest = sts["spec"]["template"]["spec"]
    (main,) = manifest["containers"]
    assert spec.name == "rabbitmq-server-1"
    env = dict(spec.container.env)
    assert env["RABBITMQ_NODENAME"] == "rabbit@rabbitmq-server-1.rabbitmq-nodes.rabbitmq"
    assert env["MY_POD_NAMESPACE"] == "rabbitmq"
    # The manifest's command: pod 0's rejoin check, then the image's rabbitmq-server.
    shell, flag, script = spec.container.argv
    assert (shell, flag) == ("/bin/bash", "-c") and script.endswith("exec rabbitmq-server")
    assert (spec.container.uid, spec.container.gid) == (999, 999)
    assert spec.container.read_only_root is True
    targets = [m.target for m in spec.container.mounts]
    assert targets[: len(main["volumeMounts"])] == [m["mountPath"] for m in main["volumeMounts"]]
    assert {"/etc/hosts", "/etc/passwd", "/etc/group"} <= set(targets)
    assert spec.memory_limit == quantity_bytes(main["resources"]["limits"]["memory"])
    assert spec.cpu_limit_millis == 2000
    assert spec.grace_seconds == manifest["terminationGracePeriodSeconds"]
    assert spec.pre_stop == tuple(main["lifecycle"]["preStop"]["exec"]["command"])
    assert spec.startup_probe is not None and spec.startup_probe.exec == tuple(
        main["startupProbe"]["exec"]["command"]
    )
    assert spec.readiness_probe is not None and spec.readiness_probe.tcp_port == 5672
    assert [c.name for c in spec.init_containers] == ["setup-erlang-cookie"]
    # The ConfigMap's file, byte for byte, where the manifest mounts it.
    conf = next(m for m in spec.container.mounts if m.target == "/etc/rabbitmq/rabbitmq.conf")
    config_map = rendered.data("ConfigMap", "rabbitmq-config", "rabbitmq")
    assert conf.source.read_text() == config_map["rabbitmq.conf"] and conf.read_only
    # The PVC is a directory outside the pod's own (it outlives the pod).
    data = next(m for m in spec.container.mounts if m.target == "/var/lib/rabbitmq/mnesia")
    assert data.source == files.claim("persistence")
    # The image's user: Debian's rabbitmq renumbered to the pod's uid.
    passwd = next(m for m in spec.container.mounts if m.target == "/etc/passwd")
    assert "rabbitmq:x:999:999:" in passwd.source.read_text()


def test_the_container_script_mounts_then_drops_to_the_pod_user(
    rendered: twin.RenderedStack, fake_root: Path, tmp_path: Path
) -> None:
    spec, files = _pod(rendered, fake_root, tmp_path, 0)
    script = pods.container_script(spec, spec.container, files.pod_dir)
    lines = script.splitlines()
    assert lines[1] == "hostname rabbitmq-server-0"
    assert any(line.startswith("mount -t overlay") and str(fake_root) in line for line in lines)
    merged = files.pod_dir / "layers" / "rabbitmq" / "merged"
    # The read-only remount of the root comes after every mount below it.
    ro = lines.index(f"mount -o remount,bind,ro {merged}")
    assert all(not line.startswith("mount --bind") for line in lines[ro:])
    assert lines[-1].startswith(f"exec chroot {merged} setpriv --reuid=999 --regid=999")
    assert lines[-1].endswith("exec rabbitmq-server'")


def test_hosts_file_names_every_pod() -> None:
    text = podnet.hosts_file(
        {"10.244.0.2": twin.pod_dns_names("rabbitmq-server-0", "rabbitmq-nodes", "rabbitmq")}
    )
    assert (
        "10.244.0.2\trabbitmq-server-0.rabbitmq-nodes.rabbitmq.svc.cluster.local "
        "rabbitmq-server-0.rabbitmq-nodes.rabbitmq.svc rabbitmq-server-0.rabbitmq-nodes.rabbitmq "
        "rabbitmq-server-0"
    ) in text
    assert text.startswith("127.0.0.1\tlocalhost\n")


def test_every_adaptation_is_listed() -> None:
    assert {"image", "PersistentVolumeClaim", "Service DNS", "secrets"} <= set(twin.ADAPTATIONS)


def test_the_shipped_image_and_the_twin_root_are_one_rabbitmq_version() -> None:
    """The image that ships and the broker the twin boots: same major.minor."""
    from localcluster import rootfs

    for stack in ("dev", "prod"):
        version = twin.stack_rabbitmq_version(stack)
        spec = rootfs.for_version(version)
        assert spec.upstream_version.split(".")[:2] == version.split(".")
        assert spec.suite == "sid"
