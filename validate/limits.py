"""Upper bounds on the numbers a user gives (options, recipe fields), far beyond any real run.

A recipe or option with an absurd number (10^12 distillation epochs, 10^30 calibration tokens,
a 10^11-token TTFT length) would otherwise run for ever or allocate until the machine gives out,
hours into a run; it is refused in one line before any work. The bounds are generous: each is
orders of magnitude above what any measured run used (BENCHMARKS.md). Torch-free: the validator's
options (`kvp-validate`) are checked here too; kvp_export.limits re-exports this module.
"""

from __future__ import annotations

from typing import Any

from .errors import KvpError

TOKENS = 10**12  # corpora, budgets
LENGTH = 1 << 20  # sequence, prompt and context lengths, sinks
COUNT = 10**6  # pairs, sequences, problems, steps between events
REPEAT = 10**4  # epochs, repeats, warm-ups, fresh processes, workers

LIMITS: dict[str, int] = {
    **dict.fromkeys(("calib_tokens", "tokens", "eval_tokens"), TOKENS),
    **dict.fromkeys(("seq_len", "prompt_len", "cont_len", "context", "sink", "sink_len", "lengths", "prompt_lengths",
                     "coldstart_lengths", "genai_lengths", "block_size", "group_size", "crossover", "tail"), LENGTH),
    **dict.fromkeys(("n", "eval_n", "quality_n", "greedy_tokens", "humaneval_limit", "genai_pairs", "batch", "batches",
                     "accum",
                     "checkpoint_every", "eval_every", "stop_after", "patience", "warmup_steps", "max_new_tokens"),
                    COUNT),
    "steps": 10**9,
    **dict.fromkeys(("distill_epochs", "repeats", "warmup", "coldstart_runs", "threads", "workers", "warm_repeats"),
                    REPEAT),
    **dict.fromkeys(("max_minutes", "finish_after"), 10**6),
}
DEFAULT = 10**15  # any other number


def check_limits(where: str = "", **values: Any) -> None:
    """Refuse a value (or any item of a list value) above its bound, naming the option."""
    for name, v in values.items():
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            limit = LIMITS.get(name, DEFAULT)
            if x > limit:
                label = f"{where}{name}" if where else name.replace("_", "-")
                raise KvpError(f"{label} = {x:.4g} is beyond any real run (at most {limit:.4g})")


def check_tree(tree: Any, where: str, path: str = "") -> None:
    """check_limits over every field of a nested dict (a recipe's dump), named by its dotted path."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if isinstance(v, dict):
                check_tree(v, where, f"{path}{k}.")
            else:
                try:
                    check_limits(**{str(k): v})
                except KvpError:
                    limit = LIMITS.get(str(k), DEFAULT)
                    bad = max(x for x in (v if isinstance(v, (list, tuple)) else [v])
                              if isinstance(x, (int, float)) and not isinstance(x, bool))
                    raise KvpError(f"invalid recipe: {where}: {path}{k}: {bad:.4g} is beyond any real run "
                                   f"(at most {limit:.4g})") from None
