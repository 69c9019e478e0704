"""Where KVP starts to pay: the prompt length from which KVP's first token comes sooner than the base's.

KVP runs the aux over the prompt and then one base step (the sink and the last token). On a
short prompt both the base prefill and that base step are bound by reading the base's weights
once, so KVP adds the aux's weight read and loses; on a long prompt compute dominates and KVP
wins by up to the FLOPs ratio. The runtimes' default mode ("auto") therefore uses the base
prefill below the crossover and KVP from it on. The export measures it on its machine and
records it in the manifest; the validator measures it again on its own machine and reports it.
Both use `find_crossover` with the runtime's own timing function, so the rule is written once.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

# Batch 1, powers of two and the midpoints between them up to where KVP wins on every model here.
LENGTHS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def measure_paths(time_ms: Callable[[str, int], float], lengths: tuple[int, ...], paths: tuple[str, ...], *,
                  repeats: int = 3, warmup: int = 1) -> list[dict]:
    """Per length, the median ms of each path (`time_ms(path, prompt_len)`), interleaved across
    paths and lengths so that drift on a noisy machine hits them alike; warm-up rounds first."""
    times: dict[tuple[str, int], list[float]] = {}
    for r in range(warmup + repeats):
        for n in lengths:
            for path in paths:
                t = time_ms(path, n)
                if r >= warmup:
                    times.setdefault((path, n), []).append(t)
    return [{"prompt_len": n, **{f"{p}_ms": statistics.median(times[(p, n)]) for p in paths}} for n in lengths]


def crossover_from(points: list[dict], base: str = "base") -> int | None:
    """The smallest measured length from which KVP is faster than `base` at every longer one
    (None when it never is). Between two measured lengths the base is kept until the next
    length where KVP won, so the default mode is never slower than the base at a measured length."""
    cross = None
    for p in reversed(points):
        if p["kvp_ms"] >= p[f"{base}_ms"]:
            break
        cross = p["prompt_len"]
    return cross


def find_crossover(time_ms: Callable[[str, int], float], lengths: tuple[int, ...] = LENGTHS, *,
                   base: str = "base", repeats: int = 3, warmup: int = 1) -> dict:
    """Measure `base` and "kvp" at each length (batch 1) and return the crossover with the points."""
    points = measure_paths(time_ms, lengths, (base, "kvp"), repeats=repeats, warmup=warmup)
    return {"prompt_len": crossover_from(points, base), "against": base, "batch": 1, "repeats": repeats,
            "points": points}


def lengths_for(min_len: int, context: int | None, lengths: tuple[int, ...] = LENGTHS) -> tuple[int, ...]:
    """The measured lengths a model can take: KVP's minimum prompt and below the context."""
    return tuple(n for n in lengths if n >= min_len and (not context or n < context))


def use_kvp(prompt_len: int, crossover: int | None) -> bool:
    """The default mode's choice: KVP from the crossover on (never, when there is none)."""
    return crossover is not None and prompt_len >= crossover
