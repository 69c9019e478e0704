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

from .options import DEFAULTS

# Batch 1, powers of two and the midpoints between them up to where KVP wins on every model here.
LENGTHS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def measure_paths(time_ms: Callable[[str, int], float], lengths: tuple[int, ...], paths: tuple[str, ...], *,
                  repeats: int = 3, warmup: int = DEFAULTS["warmup"]) -> list[dict]:
    """Per length, the median ms of each path (`time_ms(path, prompt_len)`), interleaved across
    paths and lengths so that drift on a noisy machine hits them alike, the paths' order rotated
    from round to round so that none is always first; warm-up rounds first."""
    times: dict[tuple[str, int], list[float]] = {}
    for r in range(warmup + repeats):
        for n in lengths:
            # each round starts with the next path, so that no path is always timed first (at
            # 5-16-token prompts, 25-50 ms, timings of one computation still differ by up to
            # 1.5x on a 2-core machine: BENCHMARKS.md, "The default recipe, second pass")
            k = r % len(paths)
            for path in paths[k:] + paths[:k]:
                t = time_ms(path, n)
                if r >= warmup:
                    times.setdefault((path, n), []).append(t)
    return [{"prompt_len": n, **{f"{p}_ms": statistics.median(times[(p, n)]) for p in paths}} for n in lengths]


# KVP must beat the alternative by this factor to count as faster. Near the crossover the two
# paths differ by less than this machine's run-to-run noise (5-10% between runs of the same
# graph), so a bare "faster" picked KVP where a later run found it 8% slower than the base;
# with the margin the default mode switches where KVP clearly pays and keeps the base's
# speed where it would be a wash (the speedup given up there is under 10% by construction).
MARGIN = 0.9


def crossover_from(points: list[dict], base: str = "base", margin: float = MARGIN) -> int | None:
    """The smallest measured length from which KVP takes at most `margin` x `base`'s time at
    every longer one (None when it never does). Between two measured lengths the base is kept
    until the next length where KVP won, so the default mode is not slower than the base at a
    measured length, with the margin as the room for noise."""
    cross = None
    for p in reversed(points):
        if p["kvp_ms"] > margin * p[f"{base}_ms"]:
            break
        cross = p["prompt_len"]
    return cross


def find_crossover(time_ms: Callable[[str, int], float], lengths: tuple[int, ...] = LENGTHS, *,
                   base: str = "base", repeats: int = 3, warmup: int = DEFAULTS["warmup"], margin: float = MARGIN) -> dict:
    """Measure `base` and "kvp" (batch 1) from the longest length down, stopping at the first
    length where KVP does not win by the margin: the crossover depends only on the run of wins
    at the long end, so the shorter lengths (where KVP loses on every model measured) cost
    nothing. Returns the crossover with the measured points."""
    points: list[dict] = []
    for n in sorted(lengths, reverse=True):
        point = measure_paths(time_ms, (n,), (base, "kvp"), repeats=repeats, warmup=warmup)[0]
        points.insert(0, point)
        if point["kvp_ms"] > margin * point[f"{base}_ms"]:
            break
    return {"prompt_len": crossover_from(points, base, margin), "against": base, "margin": margin, "batch": 1,
            "repeats": repeats, "points": points}


def lengths_for(min_len: int, context: int | None, lengths: tuple[int, ...] = LENGTHS) -> tuple[int, ...]:
    """The measured lengths a model can take: KVP's minimum prompt and below the context."""
    return tuple(n for n in lengths if n >= min_len and (not context or n < context))


def use_kvp(prompt_len: int, crossover: int | None) -> bool:
    """The default mode's choice: KVP from the crossover on (never, when there is none)."""
    return crossover is not None and prompt_len >= crossover
