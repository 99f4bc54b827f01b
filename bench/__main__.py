"""python -m bench: toot's end-to-end benchmark; see bench/__init__.py and --help."""

from __future__ import annotations

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
