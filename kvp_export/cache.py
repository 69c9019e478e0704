"""Where fetched models, corpora and converted weights live.

`KVP_CACHE_DIR` overrides; the default follows XDG (`~/.cache/kvp-export`).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(sub: str | None = None) -> Path:
    root = os.environ.get("KVP_CACHE_DIR")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kvp-export"
    path = base / sub if sub else base
    path.mkdir(parents=True, exist_ok=True)
    return path
