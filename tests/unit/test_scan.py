"""`make scan`: checkov's findings against checkov-suppressions.yaml (no checkov run here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import scan


def report(*failed: tuple[str, str, str]) -> dict[str, object]:
    return {
        "check_type": "kubernetes",
        "summary": {"passed": 10, "failed": len(failed)},
        "results": {
            "failed_checks": [
                {
                    "check_id": check,
                    "check_name": "a check",
                    "resource": resource,
                    "file_path": f"/{stack}/kubernetes/x.yaml",
                }
                for stack, check, resource in failed
            ]
        },
    }


STS = "StatefulSet.rabbitmq.rabbitmq-server"
DEPLOYMENT = "Deployment.workers.celery-worker"


def test_back_to_back_json_documents_are_all_read() -> None:
    text = json.dumps(report(("dev", "CKV_K8S_8", STS))) + "\n" + json.dumps([report(), report()])
    reports = scan.parse_reports(text)
    assert len(reports) == 3
    assert scan.passed(reports) == 30
    assert scan.findings(reports) == [scan.Finding("dev", "CKV_K8S_8", "a check", STS)]


def test_a_suppression_explains_its_check_resource_and_stacks_only() -> None:
    found = scan.findings(
        [
            report(
                ("dev", "CKV_K8S_11", STS),
                ("prod", "CKV_K8S_11", STS),
                ("dev", "CKV_K8S_11", DEPLOYMENT),
                ("dev", "CKV_K8S_8", STS),
            )
        ]
    )
    dev_limits = scan.Suppression("CKV_K8S_11", [STS], "dev is burstable", stacks=["dev"])
    unexplained, stale = scan.triage(found, [dev_limits])
    assert [str(f) for f in unexplained] == [
        "dev: CKV_K8S_11 Deployment.workers.celery-worker (a check)",
        "dev: CKV_K8S_8 StatefulSet.rabbitmq.rabbitmq-server (a check)",
        "prod: CKV_K8S_11 StatefulSet.rabbitmq.rabbitmq-server (a check)",
    ]
    assert stale == []
    assert dev_limits.matched == [scan.Finding("dev", "CKV_K8S_11", "a check", STS)]


def test_a_suppression_resource_may_be_a_glob_and_matches_nothing_else() -> None:
    job = "Job.workers.celery-scheduler-1a2b3c4d"
    found = scan.findings([report(("dev", "CKV_K8S_35", job), ("dev", "CKV_K8S_35", DEPLOYMENT))])
    jobs = scan.Suppression("CKV_K8S_35", ["Job.workers.celery-scheduler-*"], "secrets as env vars")
    unexplained, stale = scan.triage(found, [jobs])
    assert [f.resource for f in unexplained] == [DEPLOYMENT]
    assert stale == []
    assert [f.resource for f in jobs.matched] == [job]


def test_a_suppression_that_explains_nothing_is_stale() -> None:
    gone = scan.Suppression("CKV_K8S_43", [STS], "pinned by tag for now")
    unexplained, stale = scan.triage([], [gone])
    assert unexplained == [] and stale == [gone]


def test_every_suppression_has_a_reason(tmp_path: Path) -> None:
    suppressions = scan.load_suppressions()
    assert suppressions
    assert all(len(s.reason) >= 20 for s in suppressions)
    bad = tmp_path / "s.yaml"
    bad.write_text("- check: CKV_K8S_8\n  resources: [x]\n  reason: because\n")
    with pytest.raises(ValueError, match="reason"):
        scan.load_suppressions(bad)
    bad.write_text("- check: CKV_K8S_8\n  resource: [x]\n  reason: a long enough reason here\n")
    with pytest.raises(ValueError, match="unknown keys"):
        scan.load_suppressions(bad)


def test_scan_without_a_plan_says_what_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert scan.main(["--plan", str(tmp_path)]) == 2
    assert "make plans" in capsys.readouterr().err
