"""Named corpora built from pinned PyPI sdists (the `pypi-code` corpus of permissive Python).

A stage takes one wherever it takes text: `--calib pypi-code`, `--heldout pypi-code`,
`--data pypi-code`, or `data: {calib: [pypi-code], heldout: [pypi-code]}` in a recipe. The
first use downloads and filters the sdists (spec.py, fetch.py, filters.py, decontam.py,
build.py) and tokenises the result once for the tokenizer at hand (shards.py); both are
cached. `kvp data build` does the same ahead of time and `kvp data info` describes it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data import Corpus, _check_split
from ..log import get_logger
from . import shards
from .build import SPLIT_RULE, build_store, is_built, read_description, read_documents, store_dir
from .spec import CORPORA, SPLITS, CorpusSpec, corpus_spec, register

log = get_logger("data")

__all__ = ["CORPORA", "CorpusSpec", "build_corpus", "corpus", "describe", "info", "register", "sequences"]


def corpus(name: str, split: str, *, progress: bool = True) -> Corpus:
    """The split's documents (in corpus order) and the corpus description, as other corpora give them."""
    _check_split(split)
    store = build_store(corpus_spec(name), progress=progress)
    return Corpus(read_documents(store, split), _with_split(read_description(store), split))


def _with_split(desc: dict, split: str) -> dict:
    return {"source": desc["name"], **desc, "split": {"name": split, "rule": SPLIT_RULE}}


def _shards(name: str, tokenizer, progress: bool) -> tuple[Path, Path, dict]:
    store = build_store(corpus_spec(name), progress=progress)
    folder = shards.shard_dir(store, tokenizer)
    if not folder.exists():
        log.info(f"tokenizing the {name} corpus for this tokenizer (once; cached in {folder})")
        shards.build_shards(store, tokenizer, progress=progress)
    return store, folder, read_description(store)


def describe(desc: dict, meta: dict | None, split: str) -> dict:
    """The description recorded in manifests: the corpus's, the split, and tokens per split."""
    out = _with_split(desc, split)
    if meta is not None:
        out["tokenizer_sha256"] = meta["tokenizer_sha256"]
        out["tokens"] = {s: meta["splits"][s]["tokens"] for s in SPLITS}
    return out


def sequences(name: str, tokenizer, split: str, seq_len: int, max_tokens: int, *,
              progress: bool = True) -> tuple[shards.Rows, dict]:
    """Rows [n, seq_len] of the split read from the cached shards, and their description."""
    _check_split(split)
    _, folder, desc = _shards(name, tokenizer, progress)
    shard = shards.open_split(folder, tokenizer, split, desc["sha256"])
    return shards.rows(tokenizer, shard, seq_len, max_tokens), describe(desc, shard.meta, split)


def build_corpus(name: str, tokenizer=None, *, force: bool = False, progress: bool = True) -> dict:
    """Build (or rebuild with `force`) the corpus text and, given a tokenizer, its shards."""
    store = build_store(corpus_spec(name), progress=progress, force=force)
    out = {"corpus": str(store)}
    if tokenizer is not None:
        folder = shards.build_shards(store, tokenizer, progress=progress, force=force)
        desc = read_description(store)
        for s in SPLITS:  # read back what was written, as a stage would
            shards.open_split(folder, tokenizer, s, desc["sha256"])
        out["shards"] = str(folder)
    return out


def info(name: str) -> dict:
    """What is built for corpus `name`: the description and the token shards present (builds nothing)."""
    spec = corpus_spec(name)
    store = store_dir(spec)
    if not is_built(store):
        return {"name": name, "built": False, "folder": str(store), "pins": spec.pins()}
    desc = read_description(store)
    tokens = {}
    for meta_file in sorted(store.glob(f"tokens-*/{shards.META}")):
        meta = json.loads(meta_file.read_text())
        tokens[meta_file.parent.name] = {"tokenizer_sha256": meta["tokenizer_sha256"], "dtype": meta["dtype"],
                                         **{s: meta["splits"][s]["tokens"] for s in SPLITS}}
    return {"built": True, "folder": str(store), **desc, "shards": tokens}


def render(info: dict) -> str:
    """`kvp data info` as text: per project, per rule, decontamination, splits and shards."""
    if not info["built"]:
        return (f"{info['name']}: not built ({len(info['pins'])} projects pinned); "
                f"`kvp data build --corpus {info['name']}` builds it in {info['folder']}\n")
    rules = sorted({r for p in info["projects"] for r in p["dropped"]})
    lines = [f"{info['name']}: {info['folder']}", f"content SHA-256 {info['sha256']}", "",
             "| project | version | split | license | .py files | kept | chars kept | " + " | ".join(rules) + " |",
             "|---|---|---|---|---:|---:|---:|" + "---:|" * len(rules)]
    for p in info["projects"]:
        lines.append(f"| {p['name']} | {p['version']} | {p['split']} | {p['license']} | {p['py_files']} | {p['kept']} | "
                     f"{p['chars']:,} | " + " | ".join(str(p["dropped"].get(r, 0)) for r in rules) + " |")
    lines += ["", "dropped: " + ", ".join(f"{k} {v}" for k, v in info["dropped"].items())]
    d = info["decontamination"]
    lines.append(f"humaneval: {d['dropped']} files dropped ({d['rule']})")
    lines += [f"  {f['name']}: {', '.join(f['tasks'])}" for f in d["files"]]
    for s, v in info["splits"].items():
        lines.append(f"{s}: {v['documents']} documents, {v['chars']:,} chars, projects {', '.join(v['projects'])}")
    for folder, t in info["shards"].items():
        lines.append(f"shards {folder} ({t['dtype']}): " + ", ".join(f"{s} {t[s]:,} tokens" for s in SPLITS))
    return "\n".join(lines) + "\n"
