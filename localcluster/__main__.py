"""``python -m localcluster``: see :mod:`localcluster.run`."""

from __future__ import annotations

import sys

from localcluster.run import main

if __name__ == "__main__":
    sys.exit(main())
