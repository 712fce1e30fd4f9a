"""`python -m bench ...` is `echolabel bench ...`."""

import sys

from echolabel.cli import main

raise SystemExit(main(["bench", *sys.argv[1:]]))
