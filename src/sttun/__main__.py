"""``python -m sttun`` runs the command-line interface."""

from sttun.cli import main

raise SystemExit(main())
