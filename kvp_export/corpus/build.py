"""The filtered text of a corpus spec: read the verified sdists, filter, dedup, decontaminate, split.

The result is a folder in the cache, `KVP_CACHE_DIR/corpora/<name>-<key>/`, written atomically:
- `calib.jsonl`, `heldout.jsonl`: one document per line ({"name", "project", "license", "text"}),
  ordered by the SHA-256 of the name, so any prefix mixes all projects of the split;
- `dropped.jsonl`: every file not kept, with its rule (and HumanEval task ids for `humaneval`);
- `corpus.json`: the description recorded in manifests (pins with hashes, per-project and
  per-rule counts, the decontamination report, one content SHA-256), identical on every machine;
- `build.json`: wall time and versions of this build (machine-dependent, kept apart).
The key hashes the pins and FILTERS_VERSION, so a changed list or rule builds a new folder.
Files are visited in a fixed order (held-out projects first, then the pins' order, then
paths), so exact and near duplicates across splits are always dropped from calibration.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from ..artifacts import atomic_dir, versions, write_json
from ..cache import cache_dir
from ..data import Document, content_sha256
from ..errors import KvpError
from ..log import get_logger
from . import filters
from .decontam import HumanEvalIndex
from .fetch import fetch_all, remove_partials
from .spec import SPLITS, CorpusSpec, Project

log = get_logger("data")

FILTERS_VERSION = 1  # bump when a rule changes: the corpus key changes with it
DESCRIPTION, BUILD = "corpus.json", "build.json"
ORDER = "within a split, documents sorted by the SHA-256 of their name (projects interleaved)"
SPLIT_RULE = "by project, as pinned (--split=heldout); a held-out project never calibrates or trains"


def store_dir(spec: CorpusSpec) -> Path:
    key = hashlib.sha256(f"{spec.key()}:{FILTERS_VERSION}".encode()).hexdigest()[:16]
    return cache_dir("corpora") / f"{spec.name}-{key}"


def is_built(folder: Path) -> bool:
    return (folder / DESCRIPTION).is_file()


def _files(sdist: Path, wanted: Callable[[str], bool],
           read: Callable[[str, int], bool]) -> Iterator[tuple[str, int, bytes | None]]:
    """(path inside the project, size, content) of each regular file whose path is `wanted`, in
    archive order (one pass: a .tar.gz cannot seek back cheaply); content only if `read` says so."""
    if tarfile.is_tarfile(sdist):
        with tarfile.open(sdist) as tar:
            for m in tar:
                path = m.name.split("/", 1)[-1]
                if m.isfile() and wanted(path):
                    yield path, m.size, tar.extractfile(m).read() if read(path, m.size) else None
    elif zipfile.is_zipfile(sdist):
        with zipfile.ZipFile(sdist) as zf:
            for info in zf.infolist():
                path = info.filename.split("/", 1)[-1]
                if not info.is_dir() and wanted(path):
                    yield path, info.file_size, zf.read(info) if read(path, info.file_size) else None
    else:
        raise KvpError(f"{sdist.name} is neither a tar nor a zip archive")


def _pkg_info(sdist: Path) -> str:
    for _, _, raw in _files(sdist, lambda path: path == "PKG-INFO", lambda *_: True):
        return raw.decode("utf-8", "replace")
    return ""


def _order(spec: CorpusSpec) -> list[Project]:
    return [p for p in spec.projects if p.split == "heldout"] + [p for p in spec.projects if p.split != "heldout"]


class _Filter:
    """Applies the rules in order to one file at a time, across the whole corpus."""

    def __init__(self, humaneval: HumanEvalIndex):
        self.humaneval = humaneval
        self.hashes: set[str] = set()
        self.near = filters.NearDuplicates()

    def reason(self, path: str, raw: bytes) -> tuple[str | None, list[str]]:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            return "not_utf8", []
        why = filters.text_reason(path, text)
        if why:
            return why, []
        tasks = self.humaneval.matches(text)
        if tasks:
            return "humaneval", tasks
        key = filters.content_key(text)
        if key in self.hashes:
            return "exact_duplicate", []
        self.hashes.add(key)
        if self.near.seen(text):
            return "near_duplicate", []
        return None, []


def build_store(spec: CorpusSpec, *, progress: bool = True, force: bool = False) -> Path:
    """The spec's filtered text folder: built on first use (downloads included), then reused."""
    folder = store_dir(spec)
    if is_built(folder) and not force:
        return folder
    t0 = time.perf_counter()
    remove_partials(folder.parent)
    remove_partials(cache_dir("sdists"))
    sdists = fetch_all(spec)
    humaneval = HumanEvalIndex()
    filt = _Filter(humaneval)
    kept: dict[str, list[dict]] = {s: [] for s in SPLITS}
    dropped: list[dict] = []
    projects = []
    for p in _order(spec):
        declared = filters.license_of(_pkg_info(sdists[p.name]))
        lic = p.license or declared
        ok = filters.is_permissive(lic)
        counts: Counter = Counter()
        chars = 0
        members = sorted(_files(sdists[p.name], lambda path: path.endswith(".py"),
                                lambda path, size, ok=ok: ok and filters.path_reason(path, size) is None),
                         key=lambda m: m[0])
        for path, size, raw in tqdm(members, desc=f"filtering {p.name}", unit="file", file=sys.stderr,
                                     disable=None if progress else True, leave=False):
            name = f"{p.name}/{path}"
            why, tasks = ("license", []) if not ok else (filters.path_reason(path, size), [])
            if why is None:
                why, tasks = filt.reason(path, raw)
            counts[why or "kept"] += 1
            if why:
                dropped.append({"name": name, "project": p.name, "reason": why, **({"tasks": tasks} if tasks else {})})
                continue
            text = raw.decode("utf-8-sig")
            chars += len(text)
            kept[p.split].append({"name": name, "project": p.name, "license": lic, "text": text})
        projects.append({"name": p.name, "version": p.version, "sha256": p.sha256, "split": p.split,
                         "license": lic, "license_source": "pin" if p.license else "PKG-INFO", "permissive": ok,
                         "py_files": len(members), "kept": counts.pop("kept", 0), "chars": chars,
                         "dropped": dict(sorted(counts.items()))})
    for split, docs in kept.items():
        if not docs:
            names = [p.name for p in spec.projects if p.split == split]
            raise KvpError(f"corpus '{spec.name}': the {split} split is empty after filtering "
                           f"(projects: {', '.join(names) or 'none pinned'})")
        docs.sort(key=lambda d: hashlib.sha256(d["name"].encode()).hexdigest())
    description = _describe(spec, projects, kept, dropped, humaneval)
    with atomic_dir(folder, overwrite=True) as tmp:
        for split, docs in kept.items():
            _write_jsonl(tmp / f"{split}.jsonl", docs)
        _write_jsonl(tmp / "dropped.jsonl", dropped)
        write_json(tmp / DESCRIPTION, description)
        write_json(tmp / BUILD, {"seconds": round(time.perf_counter() - t0, 1), "versions": versions()})
    return folder


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _describe(spec: CorpusSpec, projects: list[dict], kept: dict[str, list[dict]], dropped: list[dict],
              humaneval: HumanEvalIndex) -> dict:
    def docs(split: str) -> list[Document]:
        return [Document(d["name"], d["text"]) for d in kept[split]]

    contaminated = [d for d in dropped if d["reason"] == "humaneval"]
    return {
        "name": spec.name,
        "pins": spec.pins(),
        "projects": projects,
        "filters": {**filters.FILTER_RULES, "humaneval": humaneval.describe()["rule"]},
        "filters_version": FILTERS_VERSION,
        "dropped": dict(sorted(Counter(d["reason"] for d in dropped).items())),
        "decontamination": {**humaneval.describe(), "dropped": len(contaminated),
                            "files": [{"name": d["name"], "tasks": d["tasks"]} for d in contaminated]},
        "split_rule": SPLIT_RULE,
        "order": ORDER,
        "splits": {s: {"projects": [p["name"] for p in projects if p["split"] == s], "documents": len(kept[s]),
                       "chars": sum(len(d["text"]) for d in kept[s]), "sha256": content_sha256(docs(s))}
                   for s in SPLITS},
        "sha256": content_sha256(docs("calib") + docs("heldout")),
    }


def read_description(folder: Path) -> dict:
    try:
        return json.loads((folder / DESCRIPTION).read_text())
    except (OSError, ValueError) as e:
        raise KvpError(f"unreadable corpus description {folder / DESCRIPTION}: {e}") from None


def read_documents(folder: Path, split: str) -> list[Document]:
    path = folder / f"{split}.jsonl"
    try:
        with open(path, encoding="utf-8") as f:
            return [Document(r["name"], r["text"]) for r in map(json.loads, f)]
    except (OSError, ValueError, KeyError) as e:
        raise KvpError(f"corpus file {path} is missing or unreadable ({type(e).__name__}): rebuild it with "
                       "`kvp data build --force`") from None
