"""Where fetched models, corpora and converted weights live.

`KVP_CACHE_DIR` overrides; the default follows XDG (`~/.cache/kvp-export`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import KvpError


def cache_dir(sub: str | None = None) -> Path:
    root = os.environ.get("KVP_CACHE_DIR")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kvp-export"
    path = base / sub if sub else base
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, a read-only file system
        raise KvpError(f"cannot use the cache folder {path} ({e.strerror}; set KVP_CACHE_DIR to a writable folder)") from None
    return path
