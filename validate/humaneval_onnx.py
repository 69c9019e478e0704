"""HumanEval through the onnxruntime runtime: base, aux alone and KVP on the same problems.

Greedy raw completion of each prompt (the prompt as given, no chat template), stopped early
once every row of a batch has reached a stop string, then truncated and executed in the
sandbox (humaneval.py). Prompts are sorted by length before batching, so little padding.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from .artifact import OnnxArtifact
from .humaneval import STOP_STRINGS, run_humaneval
from .options import DEFAULTS
from .protocol import PATHS
from .runtime import OnnxKVP


def run_humaneval_onnx(art: OnnxArtifact, variant: str, *, limit: int | None = None, max_new_tokens: int = 256,
                       batch: int = 8, threads: int = DEFAULTS["threads"], progress: bool = False,
                       allow_unsafe: bool = False) -> dict:
    rt = OnnxKVP(art, variant, threads)
    out = {"variant": variant, "max_new_tokens": max_new_tokens, "paths": {}}
    for mode in PATHS:
        def generate(prompts: list[str], n: int, mode=mode) -> list[list[str]]:
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            done: dict[int, str] = {}
            for s in tqdm(range(0, len(order), batch), desc=f"humaneval {variant} {mode}", disable=not progress):
                idx = order[s : s + batch]
                texts = [prompts[i] for i in idx]
                g = rt.generate(texts, max_new_tokens=_room(rt, texts, max_new_tokens), mode=mode,
                                stop_strings=STOP_STRINGS)
                done |= dict(zip(idx, g.completions))
            return [[done[i]] * n for i in range(len(prompts))]

        rep = run_humaneval(generate, limit=limit, progress=progress, allow_unsafe=allow_unsafe)
        out["paths"][mode] = {"pass@1": rep["pass_at_k"]["pass@1"], "problems": rep["n_problems"],
                              "passed": rep["problems_passed"], "status_counts": rep["status_counts"],
                              "seconds": rep["seconds"], "sandbox": rep["sandbox"]}
    return out


def _room(rt: OnnxKVP, prompts: list[str], want: int) -> int:
    """New tokens that fit the exported context after the longest prompt (at most `want`)."""
    context = rt.model.get("context") or 0
    if not context:
        return want
    longest = max(len(e.ids) for e in rt.tokenizer.encode_batch(prompts))
    return max(1, min(want, context - longest))
