"""`python -m tests.echolabel_cli ARGS`: echolabel's CLI in a process of its own, with the tests'
tiny encoders registered (tests/helpers.py), so that a real `echolabel serve` starts in seconds.
"""

from __future__ import annotations

import sys

import tests.helpers  # noqa: F401 - registers the tiny encoders
from echolabel.cli import main

TEST_CLI = (sys.executable, "-m", "tests.echolabel_cli")

if __name__ == "__main__":
    raise SystemExit(main())
