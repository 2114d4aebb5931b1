"""The cloud wrappers say exactly what is missing before Pulumi starts."""

from __future__ import annotations

import pytest

from tools import stack


def test_every_missing_tool_is_named_with_how_to_install_it() -> None:
    missing = stack.missing_tools(which=lambda tool: None)
    assert set(missing) == {"pulumi", "gcloud", "gke-gcloud-auth-plugin"}
    assert "gcloud components install gke-gcloud-auth-plugin" in missing["gke-gcloud-auth-plugin"]


def test_nothing_is_missing_when_all_tools_are_on_path() -> None:
    assert stack.missing_tools(which=lambda tool: f"/usr/bin/{tool}") == {}


def test_unknown_stack_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    assert stack.main(["up", "--stack", "staging"]) == 2
    err = capsys.readouterr().err
    assert "'staging'" in err and "dev, prod" in err


def test_missing_tools_stop_the_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(stack.shutil, "which", lambda tool: None if tool == "gcloud" else "/x")
    assert stack.main(["preview", "--stack", "dev"]) == 2
    err = capsys.readouterr().err
    assert "gcloud" in err and "pulumi:" not in err


def test_pulumi_arguments() -> None:
    assert stack.pulumi_argv("preview", "prod", []) == [
        "pulumi",
        "preview",
        "--diff",
        "--stack",
        "prod",
    ]
    assert stack.pulumi_argv("destroy", "dev", ["--yes"]) == [
        "pulumi",
        "destroy",
        "--stack",
        "dev",
        "--yes",
    ]


def test_destroy_also_needs_kubectl() -> None:
    missing = stack.missing_tools(which=lambda tool: None, command="destroy")
    assert "gcloud components install kubectl" in missing["kubectl"]
    assert "kubectl" not in stack.missing_tools(which=lambda tool: None, command="up")


def test_a_qualified_stack_name_is_checked_by_its_own_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert stack.main(["up", "--stack", "acme/staging"]) == 2
    assert "'acme/staging'" in capsys.readouterr().err
    monkeypatch.setattr(stack.shutil, "which", lambda tool: None)
    # Past the stack check: stopped by the (missing) tools instead.
    assert stack.main(["destroy", "--stack", "acme/dev"]) == 2
    assert "kubectl" in capsys.readouterr().err
