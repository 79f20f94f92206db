"""`python -m muxd` is the `muxd` command."""

from muxd.cli import main

raise SystemExit(main())
