"""What every pipeline stage shares: timing, describing its inputs, calibration tokens.

Each stage (derive, fit, eval) records in its manifest how long it took, which models
it read (spec, folder, hashes) and exactly which calibration tokens it used, so a
later stage or another machine can tell what it is building on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from . import data
from .artifacts import sha256_bytes, sha256_dir, sha256_file
from .errors import KvpError
from .models import ZOO

SEQ_LEN = 256
CALIB_TOKENS = 100_000  # 30k -> 90k tokens moved KVP NLL 2.90 -> 2.71 here (keep 0.5)


class Clock:
    """Wall time of a stage and of its steps, for the manifest."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.steps[name] = round(time.perf_counter() - t0, 3)

    def record(self) -> dict:
        return {"wall_seconds": round(time.perf_counter() - self.start, 3), "step_seconds": dict(self.steps)}


def seed_all(seed: int) -> None:
    """Stages are deterministic given their inputs and seed."""
    torch.manual_seed(seed)


def check_paths(paths: list[str] | tuple[str, ...] | None, what: str) -> None:
    """Fail on a missing input path before any model is loaded."""
    for p in paths or ():
        if not Path(p).exists():
            raise KvpError(f"no such {what} file or folder: {p}")


def check_positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise KvpError(f"{name.replace('_', '-')} must be >= 1, got {v}")


def model_ref(spec: str | Path, folder: Path) -> dict:
    """How a stage names a model it read: the spec given, the folder it resolved to, hashes."""
    return {
        "spec": str(spec),
        "path": str(Path(folder).resolve()),
        "config_sha256": sha256_file(Path(folder) / "config.json"),
        "weights_sha256": sha256_dir(folder, "*.safetensors"),
    }


def ref_spec(ref: dict) -> str:
    """The spec to load a recorded model by: its zoo name (portable), else its folder."""
    return ref["spec"] if ref["spec"] in ZOO else ref["path"]


def context_len(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def calibration(tokenizer, model, paths: list[str] | None, n_tokens: int, *, seq_len: int = SEQ_LEN,
                mix: str = "default") -> tuple[torch.Tensor, dict]:
    """Calibration (or training) sequences [n, seq_len] and their description (corpus, hashes, counts).

    Sequences are `seq_len` tokens, or the model's context if that is shorter.
    """
    corpus = data.corpus_from_spec(list(paths) if paths else None, "calib", mix)
    seq_len = min(seq_len, context_len(model) or seq_len)
    seqs = data.token_sequences(tokenizer, corpus, seq_len, n_tokens)
    return seqs, {
        "corpus": corpus.description,
        "seq_len": seq_len,
        "sequences": len(seqs),
        "tokens": int(seqs.numel()),
        "tokens_requested": n_tokens,
        "tokens_sha256": sha256_bytes(seqs.numpy().astype("int64").tobytes()),
    }
