"""`make scan`: checkov over the rendered manifests, every finding fixed or explained.

Runs checkov (its own venv, .venv-scan: its pins conflict with the program's
lock) on ``out/plan/<stack>/kubernetes/`` for every stack, then compares its
failed checks with ``checkov-suppressions.yaml``, the ONE place where a finding
is accepted, per check, resource and stack, with the reason. Fails on:

* a finding that no entry explains (fix it in the component, or add an entry);
* an entry that explains nothing any more (remove it, so none outlives its reason).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tools.mockrun import ROOT, stack_names

CHECKOV = ROOT / ".venv-scan" / "bin" / "checkov"
SUPPRESSIONS = ROOT / "checkov-suppressions.yaml"
PLAN_DIR = ROOT / "out" / "plan"


@dataclass(frozen=True)
class Finding:
    stack: str
    check_id: str
    check_name: str
    resource: str  # Kind.namespace.name, as checkov names it

    def __str__(self) -> str:
        return f"{self.stack}: {self.check_id} {self.resource} ({self.check_name})"


@dataclass
class Suppression:
    check: str
    resources: list[str]
    reason: str
    stacks: list[str] | None = None  # None: every stack
    matched: list[Finding] = field(default_factory=list)

    def explains(self, finding: Finding) -> bool:
        return (
            finding.check_id == self.check
            # A resource may be a glob: the scheduler Job's name carries its run key.
            and any(fnmatch.fnmatchcase(finding.resource, r) for r in self.resources)
            and (self.stacks is None or finding.stack in self.stacks)
        )


def load_suppressions(path: Path = SUPPRESSIONS) -> list[Suppression]:
    entries = yaml.safe_load(path.read_text()) or []
    result = []
    for i, entry in enumerate(entries):
        unknown = set(entry) - {"check", "resources", "stacks", "reason"}
        if unknown:
            raise ValueError(f"{path.name} entry {i + 1}: unknown keys {sorted(unknown)}")
        reason = str(entry.get("reason") or "").strip()
        if not entry.get("check") or not entry.get("resources") or len(reason) < 20:
            raise ValueError(
                f"{path.name} entry {i + 1}: needs check, resources and a reason (a sentence)"
            )
        result.append(
            Suppression(
                check=entry["check"],
                resources=list(entry["resources"]),
                reason=reason,
                stacks=list(entry["stacks"]) if entry.get("stacks") else None,
            )
        )
    return result


def parse_reports(text: str) -> list[dict[str, Any]]:
    """checkov -o json prints one JSON document per directory, back to back."""
    decoder = json.JSONDecoder()
    documents: list[dict[str, Any]] = []
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            return documents
        document, position = decoder.raw_decode(text, position)
        documents.extend(document if isinstance(document, list) else [document])


def findings(reports: Iterable[dict[str, Any]]) -> list[Finding]:
    found = []
    for report in reports:
        for check in report.get("results", {}).get("failed_checks", []):
            # /<plan>/<stack>/kubernetes/<file>.yaml
            stack = Path(check["file_path"]).parent.parent.name
            found.append(Finding(stack, check["check_id"], check["check_name"], check["resource"]))
    return sorted(set(found), key=lambda f: (f.stack, f.check_id, f.resource))


def passed(reports: Iterable[dict[str, Any]]) -> int:
    return sum(int(r.get("summary", {}).get("passed", 0)) for r in reports)


def triage(
    found: Sequence[Finding], suppressions: Sequence[Suppression]
) -> tuple[list[Finding], list[Suppression]]:
    """(findings nothing explains, suppressions that explain nothing)."""
    unexplained = []
    for finding in found:
        explaining = [s for s in suppressions if s.explains(finding)]
        for s in explaining:
            s.matched.append(finding)
        if not explaining:
            unexplained.append(finding)
    return unexplained, [s for s in suppressions if not s.matched]


def run_checkov(plan: Path) -> list[dict[str, Any]]:
    """checkov on every <plan>/<stack>/kubernetes/*.yaml, in one run.

    One directory and skip-paths, not one --directory per stack: with several
    directories checkov 3.3 mixes up the file paths and reports files twice.
    """
    if not CHECKOV.exists():
        raise SystemExit(f"{CHECKOV} is missing: run `make setup` (tools/bootstrap.py)")
    argv = [str(CHECKOV), "--framework", "kubernetes", "--output", "json", "--directory", str(plan)]
    # The all-in-one file repeats every object; the rest is not Kubernetes.
    for skip in (r"kubernetes\.yaml$", "/resources/", r"outputs\.yaml$", r"\.json$"):
        argv += ["--skip-path", skip]
    # --skip-download: no network (no Prisma Cloud metadata); --soft-fail: this
    # tool decides what fails.
    argv += ["--skip-download", "--soft-fail", "--quiet", "--compact"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"checkov failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return parse_reports(proc.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.scan", description=__doc__)
    parser.add_argument("--plan", type=Path, default=PLAN_DIR, help="default: out/plan")
    args = parser.parse_args(argv)
    directories = [args.plan / stack / "kubernetes" for stack in stack_names()]
    missing = [d for d in directories if not d.is_dir()]
    if missing:
        print(f"missing {', '.join(map(str, missing))}: run `make plans` first", file=sys.stderr)
        return 2
    reports = run_checkov(args.plan)
    found = findings(reports)
    suppressions = load_suppressions()
    unexplained, stale = triage(found, suppressions)
    print(
        f"checkov on {', '.join(str(d) for d in directories)}: "
        f"{passed(reports)} passed, {len(found)} failed, "
        f"{len(found) - len(unexplained)} of them explained in {SUPPRESSIONS.name}"
    )
    for s in suppressions:
        if s.matched:
            print(f"  accepted {s.check} x{len(s.matched)}: {s.reason.splitlines()[0][:90]}")
    for finding in unexplained:
        print(f"UNEXPLAINED {finding}", file=sys.stderr)
    for s in stale:
        print(
            f"STALE {SUPPRESSIONS.name}: {s.check} on {s.resources} matches no finding any more:"
            " remove it",
            file=sys.stderr,
        )
    return 1 if unexplained or stale else 0


if __name__ == "__main__":
    sys.exit(main())
