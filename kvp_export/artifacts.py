"""Artifact folders: atomic writes, hashes and manifests.

Each pipeline stage writes one folder. It is built under a temporary sibling and
renamed into place at the end, so an interrupted or failed stage leaves nothing
half-written behind. Every folder carries `manifest.json`, whose `files` section lists every
other file of the folder with its size and SHA-256; `read_manifest` checks them
(kvp_validate.integrity) before a stage reads the folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kvp_validate.artifact import atomic_dir, check_output_dir, load_manifest  # noqa: F401  (re-exported)
from kvp_validate.contract import MANIFEST, Manifest, check_manifest, now, parse_manifest
from kvp_validate.contract import versions as contract_versions
from kvp_validate.integrity import file_records, sha256_file, verify  # noqa: F401  (re-exported for the stages)
from kvp_validate.report import atomic_write_text as write_text

from .errors import KvpError

__all__ = ["MANIFEST", "atomic_dir", "check_output_dir", "read_contract", "read_manifest", "sha256_bytes", "sha256_dir", "sha256_file",
           "versions", "write_json", "write_manifest", "write_text"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_dir(path: str | Path, pattern: str = "*") -> str:
    """Hash of a folder's files (names and contents), independent of mtimes."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob(pattern) if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename in the same folder)."""
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "model_dump"):
        return o.model_dump()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def versions() -> dict[str, str]:
    """Versions of the stack, recorded in every manifest (kvp_validate.contract.versions)."""
    from . import __version__

    return contract_versions(("torch", "transformers", "tokenizers", "numpy", "onnx", "onnxruntime", "coremltools"),
                             {"kvp_export": __version__})


def write_manifest(folder: str | Path, stage: str, inputs: dict[str, Any], **fields: Any) -> dict:
    """Write the folder's manifest.json; call it last, when every other file is in place (it lists
    them all with their SHA-256). What it writes is checked against the stage's model
    (kvp_validate.contract), the contract its readers parse."""
    manifest = {
        "stage": stage,
        "created": now(),
        "versions": versions(),
        "inputs": inputs,
        **fields,
        "files": file_records(folder),
    }
    check_manifest(json.loads(json.dumps(manifest, default=_json_default)))  # as the readers will see it
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest


# Model cache folders written before kvp-export 0.3 list no files; their weights are pinned by the
# GGUF's hash and recorded by every stage that reads them (stage.model_ref), so they stay readable.
UNSEALED_OK = ("model",)


def read_manifest(folder: str | Path, stage: str | None = None, *, check: bool = True) -> dict:
    """A folder's manifest, of `stage` if given, after checking every file the folder holds against
    it (`check`; hashed once per process); one-line errors naming the file otherwise."""
    manifest = load_manifest(folder)
    if stage and manifest.get("stage") != stage:
        raise KvpError(f"{folder} is a '{manifest.get('stage')}' artifact, expected '{stage}'")
    if check and not ("files" not in manifest and manifest.get("stage") in UNSEALED_OK):
        verify(folder, manifest)
    parse_manifest(manifest, folder)  # the contract: a one-line error naming a missing or mistyped field
    return manifest


def read_contract(folder: str | Path, stage: str | None = None, *, check: bool = True) -> Manifest:
    """`read_manifest`, as the typed model of its stage (kvp_validate.contract)."""
    return parse_manifest(read_manifest(folder, stage, check=check), folder)


def check_folder(folder: str | Path) -> dict:
    """An artifact folder of any stage, checked (read_manifest); for `kvp run`'s cache."""
    return read_manifest(folder)
