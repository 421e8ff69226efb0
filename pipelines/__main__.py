"""`python -m pipelines ...`: the command line."""

from pipelines.cli import main

raise SystemExit(main())
