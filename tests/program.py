"""The mock runner the tests use; it lives in :mod:`tools.mockrun` (``make plan`` uses it too)."""

from tools.mockrun import (
    MOCK_CLUSTER_DNS,
    MOCK_CLUSTER_IP,
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
    "MOCK_CLUSTER_DNS",
    "MOCK_CLUSTER_IP",
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
