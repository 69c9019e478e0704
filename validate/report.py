"""Reports a person can read (report.md) and a machine can gate on (report.json)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.{digits}g}"
        return f"{x:.{digits}f}"
    return str(x)


def md_table(headers: list[str], rows: list[list[Any]], digits: int = 3) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c, digits) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(folder: str | Path, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Write report.json and report.md into an existing folder."""
    folder = Path(folder)
    j, m = folder / "report.json", folder / "report.md"
    _atomic_write(j, json.dumps(payload, indent=2, default=str) + "\n")
    _atomic_write(m, markdown.rstrip() + "\n")
    return j, m
