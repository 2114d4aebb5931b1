"""`make destroy`: label the RabbitMQ pods, destroy, then name the disks still billed.

A fake command runner stands in for pulumi, kubectl and gcloud; every test
asserts the exact commands, in order.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tools import destroy, stack
from tools.mockrun import stack_config

ROOT = Path(__file__).resolve().parents[2]
PROJECT_ID = "celery-cluster-test"
KUBECONFIG = "apiVersion: v1\nkind: Config\n# the stack's kubeconfig output\n"
SELECTOR = "app.kubernetes.io/name=rabbitmq"
TIMEOUT = "--request-timeout=30s"


class FakeRunner:
    """Records every command; answers from `replies` (first argv prefix that matches)."""

    def __init__(self, replies: dict[tuple[str, ...], destroy.Result] | None = None) -> None:
        self.replies = replies or {}
        self.calls: list[list[str]] = []
        self.interactive: list[list[str]] = []
        self.kubeconfigs: list[tuple[str, str, int]] = []  # path, text, mode when used

    def __call__(self, argv: Sequence[str], *, capture: bool = True) -> destroy.Result:
        argv = list(argv)
        self.calls.append(argv)
        if not capture:
            self.interactive.append(argv)
        if "--kubeconfig" in argv:
            path = argv[argv.index("--kubeconfig") + 1]
            self.kubeconfigs.append((path, Path(path).read_text(), os.stat(path).st_mode))
        for prefix, result in self.replies.items():
            if tuple(argv[: len(prefix)]) == prefix:
                return result
        return destroy.Result(0)


def file_config(name: str) -> Callable[[str], dict[str, Any]]:
    """The real Pulumi.<name>.yaml, without gcp:project (set by `pulumi config set`)."""

    def read(stack_name: str) -> dict[str, Any]:
        assert destroy.short_name(stack_name) == name
        config = stack_config(name, gcp_project=None)
        config.pop("gcp:project", None)
        return config

    return read


def existing_config(context: str) -> Callable[[str], dict[str, Any]]:
    def read(stack_name: str) -> dict[str, Any]:
        return {
            "celery-cluster:target": "existing",
            "celery-cluster:environment": "development",
            "celery-cluster:kubernetes": {"context": context},
            "celery-cluster:rabbitmq": {
                "namespace": "queues",
                "storageClass": "standard",
                "pvcRetention": "Delete",
            },
            "celery-cluster:workers": {"image": "registry.example/celery-worker:1.0"},
        }

    return read


def gke_replies(**overrides: destroy.Result) -> dict[tuple[str, ...], destroy.Result]:
    replies: dict[tuple[str, ...], destroy.Result] = {
        ("pulumi", "config", "get", "gcp:project"): destroy.Result(0, PROJECT_ID + "\n"),
        ("pulumi", "stack", "output", "kubeconfig"): destroy.Result(0, KUBECONFIG),
        ("gcloud", "compute", "disks", "list"): destroy.Result(0, ""),
    }
    keys = {
        "config": ("pulumi", "config", "get", "gcp:project"),
        "kubeconfig": ("pulumi", "stack", "output", "kubeconfig"),
        "kubectl": ("kubectl",),
        "destroy": ("pulumi", "destroy"),
        "disks": ("gcloud", "compute", "disks", "list"),
    }
    for name, result in overrides.items():
        replies[keys[name]] = result
    return replies


def label(kubectl: list[str], namespace: str = "rabbitmq") -> list[str]:
    return [
        *kubectl,
        *("-n", namespace, "label", "pods", "-l", SELECTOR),
        *("skipPreStopChecks=true", "--overwrite", TIMEOUT),
    ]


def expected_gke_calls(name: str, kubeconfig: str, *extra: str) -> list[list[str]]:
    return [
        ["pulumi", "config", "get", "gcp:project", "--stack", name],
        ["pulumi", "stack", "output", "kubeconfig", "--show-secrets", "--stack", name],
        label(["kubectl", "--kubeconfig", kubeconfig]),
        ["pulumi", "destroy", "--stack", name, *extra],
        [
            *("gcloud", "compute", "disks", "list", "--project", PROJECT_ID),
            "--filter=labels.celery-cluster-stack=dev",
            "--format=value(name,zone.basename())",
        ],
    ]


def test_labels_the_pods_then_destroys_then_lists_the_stacks_disks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = FakeRunner(gke_replies())
    assert destroy.destroy("dev", ["--yes"], run, file_config("dev")) == 0

    [(kubeconfig, text, mode)] = run.kubeconfigs
    assert run.calls == expected_gke_calls("dev", kubeconfig, "--yes")
    # Only pulumi destroy talks to the terminal (its prompt and progress).
    assert run.interactive == [["pulumi", "destroy", "--stack", "dev", "--yes"]]
    # The kubeconfig was the stack's output, private while it existed, and is gone.
    assert text == KUBECONFIG and stat.S_IMODE(mode) == 0o600
    assert not Path(kubeconfig).exists()
    assert "no disk labelled celery-cluster-stack=dev is left" in capsys.readouterr().err


def test_surviving_disks_are_named_with_their_delete_commands_and_fail(
    capsys: pytest.CaptureFixture[str],
) -> None:
    listed = destroy.Result(0, "pvc-1111\tus-east1-c\npvc-2222\tus-east1-b\n")
    run = FakeRunner(gke_replies(disks=listed))
    assert destroy.destroy("dev", ["--yes"], run, file_config("dev")) == 1

    err = capsys.readouterr().err
    assert "2 persistent disk(s) labelled celery-cluster-stack=dev" in err
    assert "still billed" in err
    for name, zone in (("pvc-1111", "us-east1-c"), ("pvc-2222", "us-east1-b")):
        assert f"gcloud compute disks delete {name} --zone {zone} --project {PROJECT_ID}" in err
    assert "production" not in err


def test_production_disks_are_kept_on_purpose_but_still_fail(
    capsys: pytest.CaptureFixture[str],
) -> None:
    listed = destroy.Result(0, "pvc-3333\tus-east1-c\n")
    run = FakeRunner(gke_replies(disks=listed))
    assert destroy.destroy("prod", ["--yes"], run, file_config("prod")) == 1

    assert run.calls[2] == label(["kubectl", "--kubeconfig", run.kubeconfigs[0][0]])
    assert run.calls[-1][-2] == "--filter=labels.celery-cluster-stack=prod"
    err = capsys.readouterr().err
    assert "production stack" in err and "Retain on purpose" in err
    assert "hold the messages" in err
    assert f"gcloud compute disks delete pvc-3333 --zone us-east1-c --project {PROJECT_ID}" in err


def test_an_unreachable_cluster_is_reported_and_destroy_still_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    unreachable = destroy.Result(1, "", "Unable to connect to the server: dial tcp: i/o timeout")
    run = FakeRunner(gke_replies(kubectl=unreachable))
    assert destroy.destroy("dev", ["--yes"], run, file_config("dev")) == 0

    [(kubeconfig, _, _)] = run.kubeconfigs
    assert run.calls == expected_gke_calls("dev", kubeconfig, "--yes")
    assert not Path(kubeconfig).exists()
    err = capsys.readouterr().err
    assert "could not label the RabbitMQ pods (cluster unreachable?)" in err
    assert "Unable to connect to the server" in err and "destroying anyway" in err


def test_a_stack_without_kubeconfig_output_skips_the_label(
    capsys: pytest.CaptureFixture[str],
) -> None:
    gone = destroy.Result(
        255, "", "error: current stack does not have output property 'kubeconfig'"
    )
    run = FakeRunner(gke_replies(kubeconfig=gone))
    assert destroy.destroy("dev", [], run, file_config("dev")) == 0

    assert [call[:2] for call in run.calls] == [
        ["pulumi", "config"],
        ["pulumi", "stack"],
        ["pulumi", "destroy"],
        ["gcloud", "compute"],
    ]
    assert "has no kubeconfig output (already destroyed?)" in capsys.readouterr().err


def test_a_failed_destroy_keeps_its_exit_code_and_takes_the_label_off_again() -> None:
    run = FakeRunner(gke_replies(destroy=destroy.Result(255)))
    assert destroy.destroy("dev", ["--yes"], run, file_config("dev")) == 255

    [first, again] = run.kubeconfigs
    assert first[0] == again[0] and not Path(first[0]).exists()
    kubectl = ["kubectl", "--kubeconfig", first[0]]
    # The pods that stay must drain on their next restart; no disk listing.
    assert run.calls[-2:] == [
        ["pulumi", "destroy", "--stack", "dev", "--yes"],
        [
            *kubectl,
            "-n",
            "rabbitmq",
            "label",
            "pods",
            "-l",
            SELECTOR,
            "skipPreStopChecks-",
            TIMEOUT,
        ],
    ]


def test_an_existing_cluster_uses_the_current_kubeconfig_and_lists_no_disks() -> None:
    run = FakeRunner()
    assert destroy.destroy("dev", ["--yes"], run, existing_config("kind-celery")) == 0

    assert run.calls == [
        label(["kubectl", "--context", "kind-celery"], namespace="queues"),
        ["pulumi", "destroy", "--stack", "dev", "--yes"],
    ]
    assert run.kubeconfigs == []


def test_a_qualified_stack_name_reads_the_short_names_file() -> None:
    run = FakeRunner(gke_replies())
    assert destroy.destroy("acme/dev", ["--yes"], run, file_config("dev")) == 0

    assert ["pulumi", "destroy", "--stack", "acme/dev", "--yes"] in run.calls
    assert run.calls[-1][-2] == "--filter=labels.celery-cluster-stack=dev"


def test_a_missing_gcp_project_stops_before_anything_is_touched(
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = FakeRunner(gke_replies(config=destroy.Result(255, "", "configuration key not found")))
    assert destroy.destroy("dev", ["--yes"], run, file_config("dev")) == 2

    assert run.calls == [["pulumi", "config", "get", "gcp:project", "--stack", "dev"]]
    assert "pulumi config set gcp:project" in capsys.readouterr().err


def test_preview_only_labels_nothing_and_lists_nothing() -> None:
    run = FakeRunner()
    assert destroy.destroy("dev", ["--preview-only"], run, file_config("dev")) == 0
    assert run.calls == [["pulumi", "destroy", "--stack", "dev", "--preview-only"]]


def test_make_destroy_runs_this_path_with_the_extra_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    received: list[tuple[str, list[str]]] = []

    def fake_destroy(stack_name: str, extra: list[str]) -> int:
        received.append((stack_name, extra))
        return 7

    monkeypatch.setattr(stack.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(stack.destroy, "destroy", fake_destroy)
    monkeypatch.setattr(stack.os, "execvp", lambda *a: pytest.fail(f"exec of {a}"))
    assert stack.main(["destroy", "--stack", "dev", "--yes"]) == 7
    assert received == [("dev", ["--yes"])]


def test_the_makefile_passes_args_to_the_stack_cli() -> None:
    dry_run = subprocess.run(
        ["make", "-n", "destroy", "STACK=dev", "ARGS=--yes --skip-preview"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert ".venv/bin/python -m tools.stack destroy --stack dev --yes --skip-preview" in (
        dry_run.stdout.splitlines()
    )


def test_the_real_runner_reports_a_missing_program_instead_of_raising() -> None:
    result = destroy.run_command(["celery-cluster-no-such-program"])
    assert result.returncode == 127 and "celery-cluster-no-such-program" in result.stderr
