"""Reports a person can read (report.md) and a machine can gate on (report.json)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from . import __version__
from .artifact import atomic_dir, clean_stale
from .contract import MANIFEST, REPORT_JSON, REPORT_MD, check_manifest, now, versions
from .integrity import file_records, sha256_file


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


def gates_table(gates: list[dict]) -> str:
    """The gate results (gates.evaluate) as a table: gate, the metric it matched, the value, pass/FAIL."""
    rows = [[g["gate"], g["key"], g["value"], "pass" if g["ok"] else "FAIL"] for g in gates]
    return md_table(["gate", "metric", "measured", ""], rows, 4)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file atomically (temp file + rename in the same folder): readers never see half."""
    path = Path(path)
    clean_stale(path.parent, (f".{path.name}.",))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
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
    j, m = folder / REPORT_JSON, folder / REPORT_MD
    atomic_write_text(j, json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write_text(m, markdown.rstrip() + "\n")
    return j, m


def write_report_folder(out: str | Path, payload: dict, markdown: str, overwrite: bool = False) -> Path:
    """Write report.json + report.md as the folder `out`, atomically (built aside, then renamed),
    with a manifest.json like every folder's (contract.ValidationManifest): stage "validation",
    created, versions, the export read (its path and its manifest's SHA-256), and both files'
    SHA-256 (integrity.py)."""
    inputs = {}
    if payload.get("export") and (Path(payload["export"]) / MANIFEST).is_file():
        inputs["export"] = {"path": payload["export"], "manifest_sha256": sha256_file(Path(payload["export"]) / MANIFEST)}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_report(tmp, payload, markdown)
        manifest = {"stage": "validation", "created": now(),
                    "versions": versions(("onnxruntime", "numpy", "tokenizers", "coremltools"),
                                         {"kvp_validate": __version__}),
                    "inputs": inputs, "files": file_records(tmp)}
        atomic_write_text(tmp / MANIFEST, json.dumps(check_manifest(manifest), indent=2) + "\n")
    return Path(out)
