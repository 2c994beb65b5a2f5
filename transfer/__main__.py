"""``python -m transfer`` runs the command-line interface."""

from transfer.cli import main

raise SystemExit(main())
