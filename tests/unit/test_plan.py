"""`make plan`: every registration written to out/plan/<stack>/, no secret value in any file."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from components import kube
from components.config import KEDA_CHART_VERSION, load_stack_config
from tools import plan
from tools.mockrun import ProgramRun, is_secret, reveal, stack_config, stack_names

STACKS = stack_names()


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ProgramRun, Path]]:
    out = tmp_path_factory.mktemp("plan")
    result = {}
    for stack in STACKS:
        # The run the files come from, kept for the secret values to look for.
        run = plan.run_stack(stack)
        plan.write_files(plan.plan_files(run), out / stack)
        result[stack] = (run, out / stack)
    return result


def _files(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): p.read_text()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _leaves(value: Any) -> list[Any]:
    if is_secret(value):
        return _leaves(value["value"])
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _secret_and_public_leaves(value: Any, inside: bool = False) -> tuple[set[str], set[str]]:
    secret: set[str] = set()
    public: set[str] = set()
    if is_secret(value):
        return {str(v) for v in _leaves(value["value"])}, public
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, list):
        items = value
    else:
        (secret if inside else public).add(str(value))
        return secret, public
    for item in items:
        s, p = _secret_and_public_leaves(item, inside)
        secret |= s
        public |= p
    return secret, public


def secret_values(run: ProgramRun) -> set[str]:
    """Every value the program treats as secret that is not also public (e.g. a host name)."""
    secret: set[str] = set()
    public: set[str] = set()
    for r in run.resources:
        for key, value in r.inputs.items():
            if key in r.additional_secret_outputs:
                secret |= {str(v) for v in _leaves(value)}
                continue
            s, p = _secret_and_public_leaves(value)
            secret |= s
            public |= p
    for key, value in run.outputs.items():
        if key in run.secret_outputs:
            secret |= {str(v) for v in _leaves(value)}
    decoded = set()
    for value in secret:
        # Not base64, or not text: binascii.Error and UnicodeDecodeError are ValueErrors.
        with contextlib.suppress(ValueError):
            decoded.add(base64.b64decode(value, validate=True).decode())
    # A value also found in a plain input (a registry host in an image name) is
    # public; the test asserts the generated credentials are not among those.
    return {v for v in secret | decoded if len(v) >= 8 and not any(v in p for p in public)}


@pytest.mark.parametrize("stack", STACKS)
def test_no_secret_value_is_written(
    stack: str, planned: dict[str, tuple[ProgramRun, Path]]
) -> None:
    run, directory = planned[stack]
    secrets = secret_values(run)
    # Not vacuous: the generated credentials, the broker URLs and (on GKE) the
    # kubeconfig and registry token are among the values looked for.
    for r in run.of_type("random:index/randomPassword:RandomPassword"):
        assert r.inputs["result"] in secrets
    assert any(v.startswith("amqp://") for v in secrets)
    if run.of_type("gcp:container/cluster:Cluster"):
        assert any("gke-gcloud-auth-plugin" in v for v in secrets)
        assert "mock-access-token" in secrets
    for name, content in _files(directory).items():
        for value in secrets:
            assert value not in content, f"{name} holds a secret value ({value[:12]}...)"


@pytest.mark.parametrize("stack", STACKS)
def test_every_kubernetes_object_has_a_file_and_is_in_the_all_in_one(
    stack: str, planned: dict[str, tuple[ProgramRun, Path]]
) -> None:
    run, directory = planned[stack]
    expected = {
        (m["kind"], m["metadata"].get("namespace"), m["metadata"]["name"])
        for _, m in run.kubernetes_objects()
    }
    files = sorted((directory / "kubernetes").glob("*.yaml"))
    written = [yaml.safe_load(p.read_text()) for p in files]
    assert {
        (m["kind"], m["metadata"].get("namespace"), m["metadata"]["name"]) for m in written
    } == expected
    assert len(files) == len(expected)
    assert list(yaml.safe_load_all((directory / "kubernetes.yaml").read_text())) == written


@pytest.mark.parametrize("stack", STACKS)
def test_non_secret_fields_are_written_as_the_program_sets_them(
    stack: str, planned: dict[str, tuple[ProgramRun, Path]]
) -> None:
    run, directory = planned[stack]
    statefulset = run.kubernetes_object("StatefulSet", "rabbitmq-server")
    written = yaml.safe_load(
        (directory / "kubernetes" / "statefulset-rabbitmq-rabbitmq-server.yaml").read_text()
    )
    assert written == reveal(statefulset)
    assert isinstance(written["spec"]["replicas"], int)
    secret = yaml.safe_load(
        (directory / "kubernetes" / "secret-rabbitmq-rabbitmq-credentials.yaml").read_text()
    )
    # The keys are shown (a diff sees one added), the values are not.
    assert ".erlang.cookie" in secret["data"]
    assert set(secret["data"].values()) == {plan.REDACTED}


@pytest.mark.parametrize("stack", STACKS)
def test_written_manifests_are_valid_kubernetes_objects(
    stack: str, planned: dict[str, tuple[ProgramRun, Path]]
) -> None:
    """What reviewers read and checkov scans is applicable as it is (strict schema)."""
    _, directory = planned[stack]
    version = load_stack_config(stack_config(stack), stack).kubernetes.version
    for path in sorted((directory / "kubernetes").glob("*.yaml")):
        manifest = yaml.safe_load(path.read_text())
        if kube.is_custom(manifest):  # a CRD's kind: tests/unit/test_monitoring.py
            continue
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            raise AssertionError(f"{path.name}: {error.message}") from None


@pytest.mark.parametrize("stack", STACKS)
def test_every_other_resource_is_written_with_its_inputs(
    stack: str, planned: dict[str, tuple[ProgramRun, Path]]
) -> None:
    run, directory = planned[stack]
    others = [r for r in run.resources if r.custom and not r.type.startswith("kubernetes:")]
    others += run.of_type("pulumi:providers:kubernetes")
    # A Helm release (KEDA) is written with its inputs: chart, pinned version, values.
    others += run.helm_releases()
    assert [r.inputs["version"] for r in run.helm_releases()] == [KEDA_CHART_VERSION]
    written = {
        (d["type"], d["name"]): d
        for d in (yaml.safe_load(p.read_text()) for p in (directory / "resources").glob("*.yaml"))
    }
    assert set(written) == {(r.type, r.name) for r in others}
    for r in others:
        assert set(written[(r.type, r.name)]["inputs"]) == set(r.input_keys) - {"__defaults"}
    index = json.loads((directory / "resources.json").read_text())
    assert {e["urn"] for e in index} == {r.urn for r in run.resources}
    if stack == "prod":
        cluster = written[("gcp:container/cluster:Cluster", "celery")]
        assert cluster["inputs"]["deletionProtection"] is True
        assert cluster["protect"] is True
    # How `pulumi up` treats a resource is in the plan too, so the plan diff shows it.
    by_urn = {e["urn"]: e for e in index}
    cluster_urn = run.one("gcp:container/cluster:Cluster").urn
    assert by_urn[cluster_urn]["ignoreChanges"] == ["nodeConfig"]
    assert by_urn[cluster_urn]["dependsOn"]
    for r in run.resources:
        assert by_urn[r.urn]["dependsOn"] == sorted(r.dependencies)


def test_the_plan_is_deterministic(
    tmp_path: Path, planned: dict[str, tuple[ProgramRun, Path]]
) -> None:
    # A second run of the program, through the CLI, writes the same bytes.
    assert plan.main(["--stack", "dev", "--out", str(tmp_path)]) == 0
    assert _files(tmp_path / "dev") == _files(planned["dev"][1])


def test_a_removed_object_leaves_no_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "dev" / "kubernetes" / "service-gone-gone.yaml"
    stale.parent.mkdir(parents=True)
    stale.write_text("kind: Service\n")
    plan.write_files({"kubernetes.yaml": ""}, tmp_path / "dev")
    assert not stale.exists()


def test_unknown_stack_is_rejected(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert plan.main(["--stack", "staging", "--out", str(tmp_path)]) == 2
    assert "staging" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_redaction_keeps_the_shape_and_no_value() -> None:
    wire = {"4dabf18193072939515e22adb298388d": "1b47061264138c4ac30d75fd1eb44270"}
    value = {
        "plain": 3.0,
        "hidden": {**wire, "value": {"a": "s3cret", "b": [1, True]}},
        "list": [{**wire, "value": "token"}],
    }
    assert plan.redact(value) == {
        "plain": 3,
        "hidden": {"a": plan.REDACTED, "b": [plan.REDACTED, plan.REDACTED]},
        "list": [plan.REDACTED],
    }
