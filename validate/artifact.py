"""An ONNX export folder, opened and checked before anything runs.

Checks, each a one-line error: the manifest exists and is an ONNX export; every file of the
folder is listed in the manifest's `files` with its size (integrity.py), and every file but the
graphs is hashed at open; a graph's files are hashed before its session is created
(`verify_graph`, before any timer starts; once per process); every graph the manifest lists
is on disk with the size it recorded; no path the manifest names leaves the folder; a session's input and output names
match the manifest (a graph swapped from another export fails here); the tokenizer file
is the one exported (SHA-256) and covers the graphs' vocabulary.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .contract import OnnxManifest, parse_manifest, read_json
from .errors import KvpError
from .integrity import MANIFEST, inside, listed, sha256_file, verify  # noqa: F401  (sha256_file: re-exported)

OPTIMIZED_DIR = "optimized"  # optimized/<variant>/<graph>.onnx: graphs onnxruntime has already optimised
GRAPH_SUFFIXES = (".onnx", ".onnx.data")


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless asked to replace it (before any work starts)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise KvpError(f"output folder exists: {out} (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise KvpError(f"output path exists and is not a folder: {out}")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(parent: Path, patterns: tuple[str, ...]) -> None:
    """Remove what a killed writer left in `parent`: temporary folders and files matching `patterns`
    (names hold the writer's PID after the prefix: `.OUT.partial-PID-*`); a live writer's are kept."""
    for pattern in patterns:
        for p in parent.glob(pattern + "*"):
            pid = re.match(r"(\d+)[-.]", p.name[len(pattern):])
            if pid and _alive(int(pid.group(1))):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def partial_dir(out: Path, kind: str = "partial") -> Path:
    """A temporary sibling of `out` (`.OUT.partial-PID-*`), after removing those of killed writers."""
    clean_stale(out.parent, (f".{out.name}.partial-", f".{out.name}.old-"))
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{kind}-{os.getpid()}-"))


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder `.NAME.partial-PID-*` that becomes `out` only if the block
    succeeds: an interrupted or failed writer leaves nothing half-written at `out`. Every
    artifact folder (stages, reports, checkpoints, caches) is written through this."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(out)  # a killed writer's partial folder (its PID gone) is removed here
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-{os.getpid()}-"))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_manifest(folder: str | Path, label: str = "") -> dict:
    """A folder's manifest.json, with one-line errors for a missing folder, manifest or bad JSON.

    Shared by every reader of artifact folders (kvp_export's stages too); `label` names the kind
    of folder in the messages ("export": "no such export folder")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KvpError(f"no such {label + ' ' if label else ''}folder: {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        raise KvpError(f"not an {label or 'artifact'} folder (no {MANIFEST}): {folder}")
    return read_json(path, "manifest")


def check_sections(manifest: dict, folder: Path, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key not in manifest:
            raise KvpError(f"manifest {Path(folder) / MANIFEST} has no '{key}' section")


@dataclass
class OnnxArtifact:
    folder: Path
    manifest: OnnxManifest  # the typed contract (contract.py)
    raw: dict  # the same manifest as read, for the integrity checks

    @classmethod
    def open(cls, folder: str | Path) -> OnnxArtifact:
        folder = Path(folder)
        raw = load_manifest(folder, "export")
        if raw.get("stage") != "onnx":
            raise KvpError(f"{folder} is a '{raw.get('stage')}' artifact, expected an ONNX or Core ML export")
        check_sections(raw, folder, ("variants", "io", "model", "tokenizer"))
        verify(folder, raw, hash_files=False)  # sizes, missing, unlisted, links: nothing read yet
        verify(folder, raw, [rel for rel in listed(folder, raw) if not rel.endswith(GRAPH_SUFFIXES)])
        art = cls(folder, parse_manifest(raw, folder, "onnx"), raw)
        for variant, graphs in art.manifest.variants.items():
            for name in graphs:
                art.check_files(variant, name)
        return art

    def path(self, rel: str, what: str = "file") -> Path:
        """A file the manifest names, inside the folder (a one-line error otherwise)."""
        return inside(self.folder, rel, what)

    def graph_files(self, variant: str, name: str, optimized: bool = False) -> list[str]:
        """The relative paths of a graph's files (the source graph's, or its optimised copy's)."""
        if optimized:
            stem = f"{OPTIMIZED_DIR}/{variant}/{name}.onnx"
            return [rel for rel in listed(self.folder, self.raw) if rel in (stem, stem + ".data")]
        return [f"{variant}/{fname}" for fname in self.manifest.variants[variant][name].sha256]

    def verify_graph(self, variant: str, name: str, optimized: bool = False) -> None:
        """Hash a graph's files against the manifest (once per process; call it before timing a load)."""
        rels = self.graph_files(variant, name, optimized)
        if not rels:
            raise KvpError(f"graph {variant}/{name}{' (optimised)' if optimized else ''} has no files listed in "
                           f"{self.folder / MANIFEST}")
        verify(self.folder, self.raw, rels)

    @property
    def model(self) -> dict:
        """The model facts as a dict (report payloads embed it); typed: `manifest.model`."""
        return self.manifest.model.model_dump()

    @property
    def variants(self) -> list[str]:
        return list(self.manifest.variants)

    def check_variant(self, variant: str) -> None:
        if variant not in self.manifest.variants:
            raise KvpError(f"variant '{variant}' not in this export (has {', '.join(self.variants)})")

    def variant_bytes(self, variant: str) -> int:
        """The size of a variant's graphs (what its sessions hold in memory, before packing)."""
        return sum(entry.bytes for entry in self.manifest.variants[variant].values())

    def graph(self, variant: str, name: str) -> Path:
        self.check_variant(variant)
        if name not in self.manifest.variants[variant]:
            raise KvpError(f"graph '{name}' not listed for variant {variant} in {self.folder / MANIFEST}")
        return self.path(self.manifest.variants[variant][name].file, "graph")

    def check_files(self, variant: str, name: str) -> None:
        """Every file of the graph on disk, with the size the manifest recorded (its hash is checked
        by `verify_graph` before the graph is loaded, not at every open)."""
        entry = self.manifest.variants[variant][name]
        files = listed(self.folder, self.raw)
        for fname, digest in entry.sha256.items():
            path = self.path(f"{variant}/{fname}", "graph file")
            if not path.is_file():
                raise KvpError(f"missing graph file {path} (listed in the manifest)")
            if files.get(f"{variant}/{fname}", {}).get("sha256") != digest:
                raise KvpError(f"graph file {path}: the manifest's graph and file hashes disagree (edited manifest)")
        size = sum((self.folder / variant / f).stat().st_size for f in entry.sha256)
        if size != entry.bytes:
            raise KvpError(f"graph {variant}/{name} is {size} bytes, the manifest says {entry.bytes}")

    def check_session_io(self, sess, variant: str, name: str) -> None:
        want = self.manifest.io[name]
        got_in = [i.name for i in sess.get_inputs()]
        got_out = [o.name for o in sess.get_outputs()]
        got_opt = [i.name for i in sess.get_overridable_initializers()]
        for what, got, exp in (("inputs", got_in, want.inputs), ("outputs", got_out, want.outputs),
                               ("inputs with a default", [n for n in want.optional if n in got_opt], want.optional)):
            if got != exp:
                missing = [n for n in exp if n not in got] or [n for n in got if n not in exp] or got[:1]
                raise KvpError(f"graph {variant}/{name} {what} do not match the manifest (first difference: {missing[0]})")
        is_base = name.startswith(("base", "kvp"))
        m = self.manifest.model
        layers = m.base_layers if is_base else m.aux_layers
        kv = [t for t in sess.get_inputs() + sess.get_outputs() if t.name.startswith(("past_key_values.", "present."))]
        for t in kv:
            dims = t.shape
            if len(dims) != 4 or (is_base and (dims[1], dims[3]) != (m.kv_heads, m.head_dim)):
                raise KvpError(f"graph {variant}/{name}: {t.name} has shape {dims}, the manifest's base has "
                               f"{m.kv_heads} KV heads of size {m.head_dim}")
        if sum(t.name.startswith("present.") for t in kv) != 2 * layers:
            raise KvpError(f"graph {variant}/{name} does not output {2 * layers} cache tensors")
        logits = [o for o in sess.get_outputs() if o.name == "logits"]
        if logits and isinstance(logits[0].shape[-1], int) and logits[0].shape[-1] != m.vocab:
            raise KvpError(f"graph {variant}/{name} has {logits[0].shape[-1]} logits, the manifest says {m.vocab}")

    def eval_pairs(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The export's held-out (prompts, continuations), the first `n` of them when given."""
        pairs = np.load(self.path(self.manifest.eval.file), allow_pickle=False)
        prompts, conts = pairs["prompts"], pairs["continuations"]
        return (prompts, conts) if n is None else (prompts[:n], conts[:n])

    def tokenizer(self):
        """The exported tokenizer, checked against the manifest's hash and vocabulary."""
        from tokenizers import Tokenizer

        info = self.manifest.tokenizer
        path = self.path(f"{info.folder}/tokenizer.json", "tokenizer")
        if not path.is_file():
            raise KvpError(f"missing tokenizer file {path}")
        if sha256_file(path) != info.sha256:
            raise KvpError(f"tokenizer {path} is not the one exported with these graphs (SHA-256 differs)")
        tok = Tokenizer.from_file(str(path))
        if tok.get_vocab_size() > self.manifest.model.vocab:
            raise KvpError(f"tokenizer has {tok.get_vocab_size()} tokens, the graphs only {self.manifest.model.vocab}")
        return tok
