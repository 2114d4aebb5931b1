"""Shared fixtures: the program run under mocks once per stack file."""

from __future__ import annotations

import pytest

from tools.mockrun import ProgramRun, run_program, stack_config, stack_names


@pytest.fixture(scope="session")
def stack_runs() -> dict[str, ProgramRun]:
    """Every stack file in the repository, run once under mocks."""
    runs = {name: run_program(stack_config(name), name) for name in stack_names()}
    for name, run in runs.items():
        assert run.error is None, f"Pulumi.{name}.yaml: {run.error!r}"
    return runs


@pytest.fixture(params=stack_names())
def stack_run(request: pytest.FixtureRequest, stack_runs: dict[str, ProgramRun]) -> ProgramRun:
    return stack_runs[request.param]
