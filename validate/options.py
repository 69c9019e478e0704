"""The validator's measurement options, in one table: each option's name, kind, default, lower
bound and help. `kvp-validate` (and `kvp validate`) generate their options from it,
`validate_onnx` takes its argument defaults from it, and a recipe's `validate` section
(kvp_export/recipe.py) generates its fields from it. Torch-, onnxruntime- and pydantic-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import KvpError

CHECKS = ("parity", "quality", "ttft", "coldstart", "humaneval", "genai")  # genai: the [genai] extra
DEFAULT_CHECKS = ("parity", "quality", "ttft", "coldstart")


@dataclass(frozen=True)
class Option:
    name: str
    kind: type  # int, or tuple: a comma-separated list of ints
    default: Any
    minimum: int  # of the value, or of every item of a list (which may not be empty)
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS = (
    Option("threads", int, 2, 1, "onnxruntime intra-op threads (fixed for TTFT)."),
    Option("quality_n", int, None, 1, "Use only the first N held-out pairs (default: all exported)."),
    Option("greedy_tokens", int, 16, 1, "Greedy tokens compared with the base's (quality)."),
    Option("lengths", tuple, (128, 512, 1024), 1, "TTFT prompt lengths."),
    Option("batches", tuple, (1,), 1, "TTFT batch sizes."),
    Option("warmup", int, 1, 0, "Untimed calls before each TTFT point."),
    Option("repeats", int, 5, 1, "Timed calls per TTFT point (their median)."),
    Option("humaneval_limit", int, None, 1, "HumanEval: only the first N problems (quick runs)."),
    Option("coldstart_lengths", tuple, (128, 512), 1, "Cold start: prompt lengths (batch 1), each path and "
           "length in a fresh process."),
    Option("coldstart_runs", int, 1, 1, "Cold start: fresh processes per point (median); one process's load "
           "time varies with the page cache."),
    Option("genai_lengths", tuple, (512, 1024), 1, "--check genai: TTFT prompt lengths (batch 1), genai beside our "
           "runtime."),
    Option("genai_pairs", int, 16, 0, "--check genai: held-out pairs run through genai and our runtime one at a "
           "time (0: TTFT only)."),
)
DEFAULTS = {o.name: o.default for o in OPTIONS}
BY_NAME = {o.name: o for o in OPTIONS}


def problem(name: str, value: Any) -> str | None:
    """What is wrong with `value` for option `name`, or None: the option's bound, the one rule
    behind both CLIs, the recipe and the functions (a list must have items, each >= the bound)."""
    o = BY_NAME[name]
    if o.kind is tuple:
        items = list(value)
        if not items or min(items) < o.minimum:
            return f"expected a non-empty list of integers >= {o.minimum}, got {value}"
    elif value is not None and value < o.minimum:
        return f"must be >= {o.minimum}, got {value}"
    return None


def check(**values: Any) -> None:
    """Refuse any value `problem` finds wrong, in one line naming the option as the CLIs spell it."""
    for name, value in values.items():
        why = problem(name, value)
        if why is not None:
            raise KvpError(f"{name.replace('_', '-')}{':' if BY_NAME[name].kind is tuple else ''} {why}")
