"""cli layer: where cvmotion keeps per-user state by default ($CVMOTION_HOME, else ~/.cvmotion)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_home"]


def default_home() -> Path:
    return Path(os.environ.get("CVMOTION_HOME") or Path.home() / ".cvmotion")
