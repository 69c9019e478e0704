"""The one logger, `logging.getLogger("kvp")`: progress and warnings on stderr, so stdout stays
machine-readable. A part names a child (`kvp.run`, `kvp.data`), shown as `kvp run: ...`.

The handler writes to whatever `sys.stderr` is at the time (click's test runner swaps it).
Silence it with `logging.getLogger("kvp").setLevel(logging.WARNING)`.
"""

from __future__ import annotations

import logging
import sys

ROOT = "kvp"


class _Stderr(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.name.replace('.', ' ')}: {record.getMessage()}"


def get_logger(part: str | None = None) -> logging.Logger:
    """`kvp`, or its child `kvp.<part>`."""
    return logging.getLogger(f"{ROOT}.{part}" if part else ROOT)


_root = logging.getLogger(ROOT)
if not _root.handlers:
    _handler = _Stderr()
    _handler.setFormatter(_Format())
    _root.addHandler(_handler)
    _root.setLevel(logging.INFO)
    _root.propagate = False
