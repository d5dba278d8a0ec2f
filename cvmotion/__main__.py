"""``python -m cvmotion`` runs the CLI."""

from __future__ import annotations

from cvmotion.cli.main import main

raise SystemExit(main())
