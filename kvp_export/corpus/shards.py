"""Token shards: each split of a built corpus, tokenised once per tokenizer, read by memory map.

Folder `tokens-<tokenizer sha256[:16]>/` inside the corpus folder, written atomically:
- `<split>.tokens`: the split's token stream as raw uint16 (vocabularies up to 65536) or
  uint32, laid out exactly as `data.token_sequences` packs documents: each document's ids
  (no special tokens), with EOS between documents;
- `<split>.index.npy`: int64 [documents, 2], each document's start and length in the stream;
- `meta.json`: the tokenizer's SHA-256, dtype, EOS id, the corpus content SHA-256, and per
  split the token count and the SHA-256 and size of both files.
Opening a split checks all of it, so a truncated, corrupt or foreign shard is refused with
one line saying how to rebuild it. Training and calibration then read only the rows they
use: `Rows` cuts the stream into [n, seq_len] sequences (BOS first when the tokenizer adds
one) on demand, equal to what `token_sequences` makes from the same documents in memory.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..artifacts import atomic_dir, sha256_file, write_json
from ..data import packing
from ..errors import KvpError
from .build import read_description, read_documents
from .fetch import remove_partials
from .spec import SPLITS

META = "meta.json"
BATCH = 64  # documents per call of the (Rust, multi-threaded) tokenizer


def tokenizer_sha256(tokenizer) -> str:
    """Identity of a tokenizer as far as ids go: its serialised fast tokenizer, size and EOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise KvpError(f"token shards need a fast (Rust) tokenizer; {type(tokenizer).__name__} is not one")
    blob = json.dumps({"tokenizer": backend.to_str(), "size": len(tokenizer), "eos": tokenizer.eos_token_id},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def shard_dir(store: Path, tokenizer) -> Path:
    return store / f"tokens-{tokenizer_sha256(tokenizer)[:16]}"


def _dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)


def build_shards(store: Path, tokenizer, *, progress: bool = True, force: bool = False) -> Path:
    """Tokenise every split of the corpus folder `store` (once per tokenizer)."""
    folder = shard_dir(store, tokenizer)
    if (folder / META).is_file() and not force:
        return folder
    remove_partials(store)
    desc = read_description(store)
    dtype, eos = _dtype(tokenizer), tokenizer.eos_token_id
    total = sum(desc["splits"][s]["chars"] for s in SPLITS)
    splits = {}
    with atomic_dir(folder, overwrite=True) as tmp, \
            tqdm(total=total, unit="char", unit_scale=True, desc="tokenizing corpus", file=sys.stderr,
                 disable=None if progress else True) as bar:
        for split in SPLITS:
            splits[split] = _write_split(tmp, split, read_documents(store, split), tokenizer, dtype, eos, bar)
        write_json(tmp / META, {"tokenizer_sha256": tokenizer_sha256(tokenizer), "vocab": len(tokenizer),
                                "eos_token_id": eos, "dtype": dtype.name, "corpus_sha256": desc["sha256"],
                                "layout": "per split: document ids (no special tokens), EOS between documents",
                                "splits": splits})
    return folder


def _write_split(folder: Path, split: str, docs, tokenizer, dtype: np.dtype, eos: int | None, bar) -> dict:
    h, pos, index = hashlib.sha256(), 0, []
    with open(folder / f"{split}.tokens", "wb") as f:
        for b in range(0, len(docs), BATCH):
            batch = docs[b:b + BATCH]
            encoded = tokenizer([d.text for d in batch], add_special_tokens=False, verbose=False).input_ids
            for i, ids in enumerate(encoded):
                if b + i and eos is not None:
                    chunk = np.asarray([eos], dtype=dtype).tobytes()
                    f.write(chunk)
                    h.update(chunk)
                    pos += 1
                index.append((pos, len(ids)))
                chunk = np.asarray(ids, dtype=dtype).tobytes()
                f.write(chunk)
                h.update(chunk)
                pos += len(ids)
            bar.update(sum(len(d.text) for d in batch))
    np.save(folder / f"{split}.index.npy", np.asarray(index, dtype=np.int64).reshape(-1, 2))
    return {"documents": len(docs), "tokens": pos, "tokens_file": f"{split}.tokens",
            "tokens_bytes": pos * dtype.itemsize, "tokens_sha256": h.hexdigest(),
            "index_sha256": sha256_file(folder / f"{split}.index.npy")}


@dataclass
class Shard:
    """One split's token stream (memory-mapped) and document index."""

    stream: np.ndarray
    index: np.ndarray
    meta: dict


def _check_file(path: Path, size: int | None, sha256: str, rebuild: str) -> None:
    if not path.is_file():
        raise KvpError(f"token shard {path} is missing: {rebuild}")
    st = path.stat()
    if size is not None and st.st_size != size:
        raise KvpError(f"token shard {path} is truncated or overwritten ({st.st_size} bytes, expected {size}): "
                       f"{rebuild}")
    if sha256_file(path) != sha256:  # about a second per GB, once per stage
        raise KvpError(f"token shard {path} does not match the SHA-256 recorded when it was written: {rebuild}")


def open_split(folder: Path, tokenizer, split: str, corpus_sha256: str) -> Shard:
    """A verified split of the shard folder `folder` for `tokenizer` (made for it, intact, of this corpus)."""
    rebuild = "rebuild the shards with `kvp data build --force`"
    try:
        meta = json.loads((folder / META).read_text())
        info = meta["splits"][split]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KvpError(f"token shards in {folder} are incomplete ({type(e).__name__} reading {META}): {rebuild}") from None
    if meta.get("tokenizer_sha256") != tokenizer_sha256(tokenizer):
        raise KvpError(f"token shards in {folder} were built with another tokenizer (SHA-256 "
                       f"{str(meta.get('tokenizer_sha256'))[:16]}...): {rebuild}")
    if meta.get("corpus_sha256") != corpus_sha256:
        raise KvpError(f"token shards in {folder} were built from another corpus text: {rebuild}")
    tokens, index = folder / info["tokens_file"], folder / f"{split}.index.npy"
    _check_file(tokens, info["tokens_bytes"], info["tokens_sha256"], rebuild)
    _check_file(index, None, info["index_sha256"], rebuild)
    stream = np.memmap(tokens, dtype=np.dtype(meta["dtype"]), mode="r") if info["tokens"] else np.empty(0, np.uint16)
    return Shard(stream, np.load(index, allow_pickle=False), meta)


class Rows:
    """[n, seq_len] LongTensor rows cut from a token stream on demand: row i is BOS (if any)
    followed by stream[i * body : (i + 1) * body]. Indexable by an int, a slice, a list or a
    tensor of row indices, as `train.batches.Batches` and the calibration code index tensors."""

    def __init__(self, stream: np.ndarray, n: int, body: int, bos: int | None):
        self.stream, self.n, self.body, self.bos = stream, n, body, bos

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.body + (self.bos is not None))

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(self.n))
        one = np.ndim(idx) == 0
        rows = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        if len(rows) and (rows.min() < -self.n or rows.max() >= self.n):
            raise IndexError(f"row index out of range for {self.n} rows")
        rows %= max(self.n, 1)
        ids = torch.from_numpy(self.stream[rows[:, None] * self.body + np.arange(self.body)].astype(np.int64))
        if self.bos is not None:
            ids = torch.cat([torch.full((len(rows), 1), self.bos, dtype=torch.long), ids], dim=1)
        return ids[0] if one else ids

    def tensor(self) -> torch.Tensor:
        return self[:]

    def sha256(self, chunk: int = 4096) -> str:
        """SHA-256 of the rows as int64 bytes: equal to hashing `tensor()`, without holding it."""
        h = hashlib.sha256()
        for s in range(0, self.n, chunk):
            h.update(self[s:s + chunk].numpy().tobytes())
        return h.hexdigest()


def rows(tokenizer, shard: Shard, seq_len: int, max_tokens: int, *, add_bos: bool | None = None) -> Rows:
    """The rows `data.token_sequences` would pack from the split's documents, read from the shard."""
    bos, body = packing(tokenizer, seq_len, max_tokens, add_bos)
    n = min((max_tokens // seq_len) * body, len(shard.stream)) // body
    if not n:
        raise KvpError(f"not enough text for one sequence of {seq_len} tokens: the corpus split gives "
                       f"{len(shard.stream)} tokens from {len(shard.index)} documents")
    return Rows(shard.stream, n, body, bos)
