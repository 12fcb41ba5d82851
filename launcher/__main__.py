"""`python -m launcher`: the same as the `baton` command."""

from launcher.cli import main

raise SystemExit(main())
