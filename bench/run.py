"""Benchmark sysmail-relay against a Postfix null client.

Run from the repository root with the relay's virtualenv:

    /tmp/v/bin/python bench/run.py [--quick] [--rounds N] [--out bench/results]

See bench/README.md for what each figure means.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _main() -> int:
    # bench.* and tests.peers.* are imported from the repository, not installed.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.cli import main

    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(_main())
