"""`python -m echolabel.cli ...` is `echolabel ...` (the demo and the tests start it so)."""

from echolabel.cli import main

raise SystemExit(main())
