"""Gates: conditions on a report's metrics that decide the exit code (for CI).

A report flattens its numbers into `metrics`, a dict of dotted keys (listed in report.json),
e.g. `parity.int8.ok`, `quality.fp32.kvp.first_token_agreement`,
`ttft.fp32.1x512.kvp_speedup`. A gate is `KEY OP VALUE` with OP one of >= <= > < ==;
a key may end in `*` to gate every key with that prefix (`parity.*.ok==1`).
"""

from __future__ import annotations

import fnmatch
import operator
import re
from dataclasses import dataclass

from .errors import KvpError

GATE_FAILED = 3  # the exit code of kvp validate / kvp run when a gate fails

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_GATE = re.compile(r"^\s*([A-Za-z0-9_.@*\-]+)\s*(>=|<=|==|>|<)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")


@dataclass(frozen=True)
class Gate:
    key: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value:g}"

    @classmethod
    def parse(cls, text: str) -> Gate:
        m = _GATE.match(text)
        if not m:
            raise KvpError(f"invalid gate '{text}' (expected KEY OP VALUE, e.g. ttft.fp32.1x512.kvp_speedup>=1.5)")
        return cls(m.group(1), m.group(2), float(m.group(3)))


def flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    """Numbers and booleans of a nested dict as dotted keys (booleans as 1/0)."""
    out: dict[str, float] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        elif isinstance(v, bool) or isinstance(v, int | float):
            out[key] = float(v)
    return out


def evaluate(gates: list[Gate], metrics: dict[str, float]) -> list[dict]:
    """One result per gate and matching key; a gate whose key matches nothing fails (a typo must not pass)."""
    results = []
    for g in gates:
        keys = sorted(k for k in metrics if fnmatch.fnmatchcase(k, g.key))
        if not keys:
            results.append({"gate": str(g), "key": g.key, "value": None, "ok": False,
                            "reason": "no such metric in this report"})
        for k in keys:
            ok = OPS[g.op](metrics[k], g.value)
            results.append({"gate": str(g), "key": k, "value": metrics[k], "ok": bool(ok)})
    return results
