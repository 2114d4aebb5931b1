"""GCP resource IDs, GCP labels and cluster-scoped Kubernetes names derived from the stack name.

Every stack of this project may share one GCP project (the workflows deploy dev
and prod into the same one), so an ID the program sets explicitly must differ
per stack. A Pulumi stack name may be long and may hold characters GCP rejects
(upper case, '_', '.'); these functions give a valid value for any stack name.
"""

from __future__ import annotations

import hashlib
import re

_NOT_ID = re.compile(r"[^a-z0-9]+")
_HASH_LENGTH = 6
# GCP label values: lowercase letters, digits, '_' and '-', at most 63.
LABEL_VALUE_MAX = 63


def stack_id(prefix: str, stack: str, max_length: int) -> str:
    """``<prefix>-<stack>``, a valid GCP ID (lowercase letters, digits, '-') unique per stack.

    A stack name that does not fit as it is (too long, or characters an ID cannot
    hold) is shortened and a hash of the full name appended: "Dev" and "dev", or
    two long names sharing their first characters, still get different IDs.
    `prefix` starts with a letter, so the ID does, and it ends with a letter or digit.
    An empty `prefix` gives the stack's own part alone (e.g. a label value).
    """
    slug = _NOT_ID.sub("-", stack.lower()).strip("-")
    plain = "-".join(part for part in (prefix, slug) if part)
    if slug == stack and len(plain) <= max_length:
        return plain
    digest = hashlib.sha256(stack.encode()).hexdigest()[:_HASH_LENGTH]
    room = max_length - len(prefix) - _HASH_LENGTH - (2 if prefix else 1)
    if room < 0:
        raise ValueError(f"prefix {prefix!r} leaves no room for a stack in {max_length}")
    short = slug[:room].strip("-")
    return "-".join(part for part in (prefix, short, digest) if part)


def stack_label(stack: str) -> str:
    """The stack as a label value (GCP's and Kubernetes' rules), unique per stack:
    what `make destroy` filters the stack's disks by."""
    return stack_id("", stack, LABEL_VALUE_MAX)
