"""Tamper evidence: every file an artifact folder holds, with its size and SHA-256, in its manifest.

`file_records(folder)` lists a folder's files (the manifest's `files` section: relative POSIX
path -> {"bytes", "sha256"}); `verify(folder, manifest, ...)` checks them before a consumer
reads them and refuses, in one line naming the file, one that is missing, of another size (an
extra-large file is refused by its size, before any of it is hashed), with another SHA-256, not
listed, a symbolic link, or a listed path outside the folder.

Hashing the ONNX graphs of an export (0.4-0.65 GB each, tens of them) costs seconds, so every
file is hashed at most once per process: `sha256_file` caches digests by (device, inode, size,
mtime_ns, ctime_ns). Writing to a file changes its ctime, which a user cannot set back, so a
changed file is hashed again; renaming its folder (atomic_dir) keeps the entry. A process that
has checked an export hands its digests to the processes it starts (cold start, quality
workers) through the environment (`share_verified`), so a run hashes each file once, and
timed code (session creation) only ever finds the digest cached: it is checked before the timer.
This module imports no torch (it is part of kvp_validate).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from .errors import KvpError

MANIFEST = "manifest.json"
ENV = "KVP_VERIFIED_SHA256"  # digests a parent process has computed, for its children
# Folders a later command adds inside an export (kvp export genai-kvp), with their own manifest,
# checked by their readers (kvp_validate.genai.kvp_folder); also their writer's temporary siblings
# (`.genai-kvp.partial-PID-*`, removed by its next run), which nothing reads.
UNLISTED_OK = ("genai-kvp",)

_cache: dict[tuple, str] = {}
_env_seen: str | None = None
STATS = {"files_hashed": 0, "bytes_hashed": 0, "hash_seconds": 0.0, "cache_hits": 0}


def _key(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _key_text(key: tuple) -> str:
    return ":".join(map(str, key))


def _from_env() -> None:
    global _env_seen
    text = os.environ.get(ENV)
    if not text or text == _env_seen:
        return
    _env_seen = text
    try:
        for k, digest in json.loads(text).items():
            _cache.setdefault(tuple(int(x) for x in k.split(":")), digest)
    except (ValueError, AttributeError):  # not ours: ignore it, hash again
        pass


def sha256_file(path: str | Path) -> str:
    """The file's SHA-256, hashed at most once per process while the file stays unchanged."""
    _from_env()
    with open(path, "rb") as f:
        key = _key(os.fstat(f.fileno()))
        if key in _cache:
            STATS["cache_hits"] += 1
            return _cache[key]
        t0 = time.perf_counter()
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        STATS["hash_seconds"] += time.perf_counter() - t0
        STATS["files_hashed"] += 1
        STATS["bytes_hashed"] += key[2]
        if _key(os.fstat(f.fileno())) == key:  # not written to while it was read
            _cache[key] = digest
    return digest


def remember(digests: dict[str, str]) -> None:
    """Take digests computed by another process (`known()` there) into this one's cache."""
    for k, digest in digests.items():
        _cache.setdefault(tuple(int(x) for x in k.split(":")), digest)


def known() -> dict[str, str]:
    """This process's digests, to hand to another process (`remember`, or the environment)."""
    _from_env()
    return {_key_text(k): v for k, v in _cache.items()}


def share_verified(folder: str | Path) -> None:
    """Put this process's digests of the files under `folder` in the environment, for the processes
    it starts from now on (only those: an environment string holds at most 128 KiB)."""
    _from_env()
    mine = {}
    for p in Path(folder).rglob("*"):
        if p.is_file() and not p.is_symlink():
            key = _key(p.stat())
            if key in _cache:
                mine[_key_text(key)] = _cache[key]
    os.environ[ENV] = json.dumps(mine)


def file_records(folder: str | Path) -> dict[str, dict]:
    """The manifest's `files` section: every file under `folder` but manifests. A nested folder's
    manifest (train's aux/) lists its own files and is checked when that folder is read; it holds
    its creation time and wall seconds, which would make the outer list differ run to run."""
    root = Path(folder)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise KvpError(f"{p} is a symbolic link; an artifact folder holds plain files only")
        if p.is_file():
            if p.name != MANIFEST:
                out[p.relative_to(root).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def inside(folder: str | Path, rel: str, what: str = "file") -> Path:
    """`folder/rel`, refused in one line when `rel` is absolute or leaves the folder (.., links)."""
    folder = Path(folder)
    pure = PurePosixPath(str(rel))
    if not str(rel) or pure.is_absolute() or ".." in pure.parts or "\\" in str(rel) or Path(rel).is_absolute():
        raise KvpError(f"manifest {folder / MANIFEST} names a {what} outside its folder: {rel!r}")
    path = folder / pure
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        raise KvpError(f"manifest {folder / MANIFEST} names a {what} outside its folder: {rel!r} "
                       f"(resolves to {path.resolve()})") from None
    return path


def listed(folder: str | Path, manifest: dict) -> dict[str, dict]:
    """The manifest's `files`, refused in one line when absent or malformed."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get("bytes"), int)
                                              and isinstance(v.get("sha256"), str) for v in files.values()):
        raise KvpError(f"manifest {Path(folder) / MANIFEST} lists no file hashes (written by kvp-export < 0.3, or "
                       "edited): run the stage that made it again")
    return files


def _own_folder(part: str) -> bool:
    return part in UNLISTED_OK or any(part.startswith(f".{name}.") for name in UNLISTED_OK)


def verify(folder: str | Path, manifest: dict, only: Iterable[str] | None = None, *,
           hash_files: bool = True, unlisted: bool = True) -> None:
    """Check the folder's files against its manifest (see the module docstring); `only` limits the
    check to those relative paths (each must be listed); `hash_files=False` checks sizes only."""
    folder = Path(folder)
    files = listed(folder, manifest)
    names = list(files) if only is None else list(only)
    for rel in names:
        if rel not in files:
            raise KvpError(f"{folder / rel} is not listed in {folder / MANIFEST}")
    checks = [(rel, inside(folder, rel)) for rel in names]
    for rel, path in checks:  # every size first: a missing or extra-large file costs no hashing
        if path.is_symlink():
            raise KvpError(f"{path} is a symbolic link; an artifact folder holds plain files only")
        if not path.is_file():
            raise KvpError(f"missing file {path} (listed in {folder / MANIFEST})")
        size = path.stat().st_size
        if size != files[rel]["bytes"]:
            raise KvpError(f"file {path} is {size} bytes, {folder / MANIFEST} says {files[rel]['bytes']} "
                           "(changed or replaced)")
    if unlisted and only is None:
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder).as_posix()
            if p.name == MANIFEST or rel in files or any(_own_folder(part) for part in p.relative_to(folder).parts):
                continue
            if p.is_symlink() or p.is_file():
                raise KvpError(f"file {p} is not listed in {folder / MANIFEST} (added after the stage wrote it)")
    if hash_files:
        for rel, path in checks:
            if sha256_file(path) != files[rel]["sha256"]:
                raise KvpError(f"file {path} does not match the SHA-256 in {folder / MANIFEST} (changed after "
                               "the stage wrote it)")
