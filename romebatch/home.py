"""The cache home: where romebatch keeps what it computes once (converted models, statistics)."""

from __future__ import annotations

import os
from pathlib import Path


def romebatch_home() -> Path:
    """Where caches live: $ROMEBATCH_HOME, else the user cache dir."""
    if os.environ.get("ROMEBATCH_HOME"):
        return Path(os.environ["ROMEBATCH_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "romebatch"
