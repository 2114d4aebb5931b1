"""The worker image's build context is exactly what app/Dockerfile copies.

The context is the repository root (components/worker_image.py), filtered by
.dockerignore. The matcher below is Docker's own rules (moby/patternmatcher,
as `docker build` and BuildKit apply them), written out in a few lines: no
library in the locked requirements implements them. `pathspec` (there for
mypy) does gitignore, which differs: e.g. `*` matches at every depth in a
.gitignore but only at the root of a .dockerignore.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = ROOT
DOCKERFILE = ROOT / "app" / "Dockerfile"


@dataclass(frozen=True)
class Pattern:
    text: str  # cleaned, without the leading "!"
    exclusion: bool  # a "!" line: re-includes what earlier lines excluded
    regex: re.Pattern[str]


def _regex(pattern: str) -> re.Pattern[str]:
    """moby/patternmatcher's translation: `*` and `?` stop at "/", `**` does not."""
    out, i = "^", 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern[i : i + 1] == "/":
                i += 1  # "**/" is "**"
            out += ".*" if i == len(pattern) else "(.*/)?"
            continue
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif ch in "[]":
            out += ch  # a character class, as in Go's filepath.Match
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out + "$")


def parse_dockerignore(text: str) -> list[Pattern]:
    """Lines as moby/patternmatcher/ignorefile reads them."""
    patterns = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        pattern = line.strip()
        exclusion = pattern.startswith("!")
        if exclusion:
            pattern = pattern[1:].strip()
        if not pattern:
            continue
        pattern = posixpath.normpath(pattern)
        if len(pattern) > 1 and pattern.startswith("/"):
            pattern = pattern.lstrip("/")
        patterns.append(Pattern(pattern, exclusion, _regex(pattern)))
    return patterns


def excluded(path: str, patterns: list[Pattern]) -> bool:
    """MatchesOrParentMatches: the last matching line wins; a dir matching excludes its files."""
    matched = False
    parents = posixpath.dirname(path).split("/") if "/" in path else []
    for pattern in patterns:
        if pattern.exclusion != matched:
            continue  # cannot change the result
        match = bool(pattern.regex.match(path)) or any(
            pattern.regex.match("/".join(parents[: i + 1])) for i in range(len(parents))
        )
        if match:
            matched = not pattern.exclusion
    return matched


def context_files(root: Path, patterns: list[Pattern]) -> set[str]:
    """The files sent to the builder, walked the way the Docker client walks."""
    files: set[str] = set()
    for directory, dirs, names in os.walk(root):
        rel_dir = Path(directory).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        kept = []
        for name in sorted(dirs):
            path = prefix + name
            # An excluded directory is entered only if a "!" line may re-include
            # something under it (as moby's archive walker decides).
            if not excluded(path, patterns) or any(
                p.exclusion and (p.text + "/").startswith(path + "/") for p in patterns
            ):
                kept.append(name)
        dirs[:] = kept
        files.update(prefix + n for n in names if not excluded(prefix + n, patterns))
    return files


def dockerfile_sources(dockerfile: Path) -> list[str]:
    """Every COPY/ADD source from the build context (not `--from` another stage)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    sources: list[str] = []
    for line in text.splitlines():
        words = line.strip().split(None, 1)
        if len(words) < 2 or words[0].upper() not in ("COPY", "ADD"):
            continue
        rest = words[1].strip()
        flags = re.findall(r"--[a-z-]+(?:=\S+)?\s*", rest)
        if any(flag.startswith("--from") for flag in flags):
            continue
        for flag in flags:
            rest = rest.replace(flag, "", 1)
        args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        sources.extend(args[:-1])
    return sources


def files_of(source: str) -> set[str]:
    """What one COPY source takes from the context (a glob; a directory: all of it)."""
    found: set[str] = set()
    for path in CONTEXT.glob(source):
        inside = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        found.update(p.relative_to(CONTEXT).as_posix() for p in inside)
    return found


def ignore_file() -> Path:
    # BuildKit prefers a Dockerfile-specific ignore file next to the Dockerfile.
    specific = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    return specific if specific.exists() else CONTEXT / ".dockerignore"


def load_patterns() -> list[Pattern]:
    path = ignore_file()
    assert path.exists(), (
        f"no {path.relative_to(ROOT)}: the worker image's build context is the whole "
        "repository (virtualenvs, .git, out/); add an allow-list of what app/Dockerfile copies"
    )
    return parse_dockerignore(path.read_text())


def test_the_context_is_exactly_what_the_dockerfile_copies() -> None:
    patterns = load_patterns()
    sources = dockerfile_sources(DOCKERFILE)
    assert "app/requirements.txt" in sources, "the COPY parser found no sources"
    copied = set().union(*(files_of(s) for s in sources))
    context = context_files(CONTEXT, patterns)
    assert context - copied == set(), "sent to the builder but never copied: exclude them"
    assert copied - context == set(), "copied by app/Dockerfile but excluded: allow them"


@pytest.mark.parametrize("source", dockerfile_sources(DOCKERFILE))
def test_every_copy_source_is_in_the_context(source: str) -> None:
    patterns = load_patterns()
    matched = files_of(source)
    assert matched, f"COPY {source}: nothing in the repository matches"
    for path in matched:
        assert not excluded(path, patterns), f"COPY {source}: {path} is excluded"


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".venv-scan/lib/python3.11/site-packages/checkov/__init__.py",
        ".venv-policy/bin/python",
        ".git/HEAD",
        "out/plan/dev/resources.json",
        "app/__pycache__/tasks.cpython-311.pyc",
        "tests/unit/test_dockerignore.py",
        "Pulumi.prod.yaml",
    ],
)
def test_what_must_never_be_sent_is_excluded(path: str) -> None:
    assert excluded(path, load_patterns())


# The examples of Docker's .dockerignore reference, as a check on the matcher.
@pytest.mark.parametrize(
    ("lines", "path", "expected"),
    [
        (["*/temp*"], "somedir/temporary.txt", True),
        (["*/temp*"], "somedir/temp/file", True),
        (["*/temp*"], "temp.txt", False),
        (["*/*/temp*"], "somedir/subdir/temporary.txt", True),
        (["*/*/temp*"], "somedir/temporary.txt", False),
        (["temp?"], "tempa", True),
        (["temp?"], "temp", False),
        (["**/*.go"], "a/b/c.go", True),
        (["**/*.go"], "c.go", True),
        (["*.md", "!README*.md", "README-secret.md"], "README.md", False),
        (["*.md", "!README*.md", "README-secret.md"], "README-secret.md", True),
        (["*.md", "!README*.md", "README-secret.md"], "CHANGES.md", True),
        (["*", "!app/*.py"], "app/sub/x.py", True),
        (["/out"], "out/plan/x", True),
    ],
)
def test_the_matcher_follows_dockers_documented_examples(
    lines: list[str], path: str, expected: bool
) -> None:
    assert excluded(path, parse_dockerignore("\n".join(lines))) is expected
