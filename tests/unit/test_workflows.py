"""GitHub Actions: every action pinned by commit SHA, least privilege, actionlint clean."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
ACTIONS = sorted((ROOT / ".github" / "actions").glob("*/action.yml"))
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+\.\d+\.\d+$")


def _uses_lines(path: Path) -> list[str]:
    return [
        line.split("uses:", 1)[1].strip()
        for line in path.read_text().splitlines()
        if re.match(r"^\s*(- )?uses:", line)
    ]


def _load(path: Path) -> dict[Any, Any]:
    document: dict[Any, Any] = yaml.safe_load(path.read_text())
    return document


def test_there_are_workflows() -> None:
    names = {p.name for p in WORKFLOWS}
    assert {"pull-request.yml", "plan-diff.yml", "deploy.yml", "destroy-dev.yml"} <= names


@pytest.mark.parametrize("path", WORKFLOWS + ACTIONS, ids=lambda p: p.name)
def test_every_action_is_pinned_by_sha_with_its_version(path: Path) -> None:
    for uses in _uses_lines(path):
        if uses.startswith("./"):
            continue  # this repository's own action or reusable workflow
        assert PINNED.match(uses), f"{path.name}: {uses!r} is not `owner/repo@<sha> # vX.Y.Z`"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_least_privilege_permissions(path: Path) -> None:
    workflow = _load(path)
    # Nothing by default; each job asks for what it needs.
    assert workflow["permissions"] == {}, f"{path.name}: top-level permissions must be {{}}"
    for name, job in workflow["jobs"].items():
        assert "permissions" in job, f"{path.name}: job {name} has no permissions"
        granted = {k for k, v in job["permissions"].items() if v == "write"}
        assert granted <= {"id-token", "pull-requests"}, f"{path.name}: {name} writes {granted}"


def test_production_waits_for_approval_and_destroy_is_dev_only() -> None:
    deploy = _load(ROOT / ".github" / "workflows" / "deploy.yml")
    assert deploy["jobs"]["up-prod"]["environment"] == "production"
    assert deploy["jobs"]["up-prod"]["needs"] == "up-dev"
    destroy = (ROOT / ".github" / "workflows" / "destroy-dev.yml").read_text()
    assert "prod" not in destroy.split("jobs:", 1)[1]


def test_nightly_destroy_takes_the_make_destroy_path() -> None:
    """Labels the RabbitMQ pods and checks for disks left, as on a laptop (tools/destroy.py)."""
    steps = _load(ROOT / ".github" / "workflows" / "destroy-dev.yml")["jobs"]["destroy"]["steps"]
    # pulumi/actions only installs the CLI: with a `command` it would bypass make destroy.
    [pulumi] = [s for s in steps if str(s.get("uses", "")).startswith("pulumi/actions@")]
    assert "command" not in pulumi["with"] and pulumi["with"]["pulumi-version"]
    [make] = [s for s in steps if "make destroy" in s.get("run", "")]
    assert 'make destroy STACK="$STACK" ARGS="--yes' in make["run"]
    assert make["env"]["STACK"].endswith("|| 'dev' }}")
    assert make["env"]["PULUMI_K8S_DELETE_UNREACHABLE"] == "true"
    assert any("install kubectl" in s.get("run", "") for s in steps[: steps.index(make)])


def test_previews_run_the_policy_pack_on_both_stacks() -> None:
    pr = _load(ROOT / ".github" / "workflows" / "pull-request.yml")
    preview = pr["jobs"]["preview"]
    assert preview["strategy"]["matrix"]["stack"] == ["dev", "prod"]
    [pulumi] = [s for s in preview["steps"] if str(s.get("uses", "")).startswith("pulumi/")]
    assert pulumi["with"]["command"] == "preview"
    assert pulumi["with"]["policyPacks"] == "policy"
    assert pulumi["with"]["comment-on-pr"] is True


def test_actionlint_passes() -> None:
    venv = ROOT / ".venv" / "bin"
    files = [str(p.relative_to(ROOT)) for p in WORKFLOWS]
    shellcheck = str(venv / "shellcheck")
    proc = subprocess.run(
        [str(venv / "actionlint"), "-no-color", "-shellcheck", shellcheck, "-pyflakes", "", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
