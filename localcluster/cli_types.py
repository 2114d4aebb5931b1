"""argparse value types shared by the command-line tools (make local, make bench)."""

from __future__ import annotations

import argparse
import math


def positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {raw!r}")
    return value


def non_negative_float(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {raw!r}")
    return value


def positive_float(raw: str) -> float:
    value = non_negative_float(raw)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {raw!r}")
    return value


def fraction(raw: str) -> float:
    value = float(raw)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {raw!r}")
    return value


def non_negative_floats(raw: str) -> list[float]:
    """A comma-separated list of non-negative numbers ("5" or "2,4,6")."""
    try:
        return [non_negative_float(part) for part in raw.split(",")]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"expected non-negative numbers separated by commas, got {raw!r}"
        ) from None
