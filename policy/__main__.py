"""Entry point the Pulumi CLI runs for `--policy-pack policy` (serves until stopped)."""

import sys
from pathlib import Path

# The CLI runs this file from the pack's directory: make `policy` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policy.pack import serve

serve()
