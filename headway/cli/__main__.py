"""`python -m headway.cli`: the `headway` command (for environments without the script)."""

from headway.cli import main

raise SystemExit(main())
