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
from .config import MIX, SEQ_LEN, check_mix
from .errors import KvpError
from .models import ZOO, load, resolve
from .models.arch import context_length


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


@contextlib.contextmanager
def compute_device(name: str = "cpu") -> Iterator[torch.device]:
    """Where a closed-form stage (derive, fit, eval) computes: "cpu" (the default) changes
    nothing; "cuda" (or "auto" where a GPU is visible) also makes that device the default for
    tensors created inside the block, so the stage's own buffers (moments, targets, masks)
    live beside the models. Move the models and token ids there yourself, and read the
    calibration tokens before entering (they come from numpy, on the CPU)."""
    from .distributed import resolve_device

    dev = resolve_device(name)
    if dev.type == "cpu":
        yield dev
        return
    with torch.device(dev):
        yield dev


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_all(seed: int) -> None:
    """Stages are deterministic given their inputs and seed."""
    torch.manual_seed(seed)


def check_paths(paths: list[str] | tuple[str, ...] | None, what: str) -> None:
    """Fail on a missing input path before any model is loaded (a named corpus is no path)."""
    if data.named_corpus(paths):
        return
    for p in paths or ():
        if not Path(p).exists():
            raise KvpError(f"no such {what} file or folder: {p}")


def model_ref(spec: str | Path, folder: Path) -> dict:
    """How a stage names a model it read: the spec given, the folder it resolved to, hashes."""
    return {
        "spec": str(spec),
        "path": str(Path(folder).resolve()),
        "config_sha256": sha256_file(Path(folder) / "config.json"),
        "weights_sha256": sha256_dir(folder, "*.safetensors"),
    }


def load_model(spec: str | Path, **kw) -> tuple:
    """(model, tokenizer, its `model_ref`) for any model spec `models.resolve` accepts; `kw` as
    for `models.load`."""
    folder = resolve(spec)
    model, tok = load(folder, **kw)
    return model, tok, model_ref(spec, folder)


def ref_spec(ref: dict) -> str:
    """The spec to load a recorded model by: its zoo name (portable), else its folder."""
    return ref["spec"] if ref["spec"] in ZOO else ref["path"]



def sequences(tokenizer, model, paths: list[str] | None, n_tokens: int, *, split: str = "calib",
              seq_len: int = SEQ_LEN, mix: str = MIX, stream: bool = False) -> tuple[torch.Tensor, dict]:
    """Sequences [n, seq_len] of one split of a corpus, and their description (corpus, hashes, counts).

    Sequences are `seq_len` tokens, or the model's context if that is shorter. A named
    corpus (`pypi-code`) is read from its cached token shards; with `stream` its rows stay
    there and are read on demand (a `corpus.shards.Rows`, indexable like the tensor).
    """
    seq_len = min(seq_len, context_length(model) or seq_len)
    name = data.named_corpus(paths)
    if name is not None:
        from . import corpus

        check_mix(paths, mix)
        rows, description = corpus.sequences(name, tokenizer, split, seq_len, n_tokens)
        seqs, digest = (rows if stream else rows.tensor()), rows.sha256()
    else:
        source = data.corpus_from_spec(list(paths) if paths else None, split, mix)
        seqs, description = data.token_sequences(tokenizer, source, seq_len, n_tokens), source.description
        digest = sha256_bytes(seqs.numpy().astype("int64").tobytes())
    return seqs, {
        "corpus": description,
        "seq_len": seq_len,
        "sequences": len(seqs),
        "tokens": int(seqs.numel()),
        "tokens_requested": n_tokens,
        "tokens_sha256": digest,
    }


def calibration(tokenizer, model, paths: list[str] | None, n_tokens: int, *, seq_len: int = SEQ_LEN,
                mix: str = MIX, stream: bool = False) -> tuple[torch.Tensor, dict]:
    """Calibration (or training) sequences: the "calib" split (see `sequences`)."""
    return sequences(tokenizer, model, paths, n_tokens, seq_len=seq_len, mix=mix, stream=stream)
