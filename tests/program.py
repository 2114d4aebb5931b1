"""The mock runner the tests use; it lives in :mod:`tools.mockrun` (``make plan`` uses it too)."""

from tools.mockrun import (
    PROJECT,
    ROOT,
    SECRET_SIGNATURE,
    TEST_GCP_PROJECT,
    ProgramRun,
    Registered,
    is_secret,
    manifest,
    repeated_x,
    reveal,
    run_program,
    stack_config,
    stack_names,
)

__all__ = [
    "PROJECT",
    "ROOT",
    "SECRET_SIGNATURE",
    "TEST_GCP_PROJECT",
    "ProgramRun",
    "Registered",
    "is_secret",
    "manifest",
    "repeated_x",
    "reveal",
    "run_program",
    "stack_config",
    "stack_names",
]
