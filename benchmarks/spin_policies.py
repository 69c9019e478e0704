"""How onnxruntime's worker threads wait between runs, and what it does to KVP's TTFT.

    python benchmarks/spin_policies.py EXPORT [--variants int8] [--lengths 5,16,32,64,128,512]
                                              [--rounds 9] [--processes 3] [--out OUT.json]

KVP's first token runs two sessions back to back (kvp_prefill, then base_decode's first step),
each with its own pool of worker threads. Per spin policy (`kvp_validate.runtime.SPIN_POLICIES`)
a fresh process opens the three graphs with that policy only (a spinning session would disturb
the others in one process) and times, in rounds that rotate the order, the prefill of the base
(`base_prefill`), of the default mode (`auto`) and of KVP, at each prompt length (batch 1), plus
one base decode step after a 128-token past. The policies' processes alternate, `processes` times
each; figures are medians over all rounds of a policy, with the spread (p90 - p10) / median.
The machine's CPU and ISA flags and the load average are recorded beside them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from _bench import export_parser, write_result

CHILD = r"""
import json, sys, time
import numpy as np
from kvp_validate.runtime import OnnxKVP
folder, variant, spin, lengths, rounds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
rt = OnnxKVP(folder, variant, 2, spin=spin)
for name in ("base_prefill", "base_decode", "kvp_prefill"):
    rt.session(name)
rng = np.random.default_rng(0)
out = {}
for n in map(int, lengths.split(",")):
    ids = rng.integers(100, 20000, (1, n)).astype(np.int64)
    mask = np.ones_like(ids)
    modes = ["base", "auto", "kvp"] if rt.kvp_applies(mask) else ["base", "auto"]
    t = {m: [] for m in modes}
    rt.prefill(ids, mask, "kvp" if "kvp" in modes else "base")  # first calls allocate
    for r in range(rounds):
        for m in modes[r % len(modes):] + modes[:r % len(modes)]:
            t0 = time.perf_counter(); rt.prefill(ids, mask, m); t[m].append(time.perf_counter() - t0)
    out[str(n)] = t
state = rt.prefill(rng.integers(100, 20000, (1, 128)).astype(np.int64), None, "base")
tok = state.logits.argmax(-1)[:, None].astype(np.int64)
mask = np.ones((1, 129), np.int64)
pos = np.full((1, 1), 128, np.int64)
steps = []
for _ in range(3 * rounds):
    t0 = time.perf_counter(); rt.step("base", tok, mask, pos, state.past); steps.append(time.perf_counter() - t0)
out["decode_step_128"] = {"base": steps}
print(json.dumps(out))
"""


def run_child(folder: Path, variant: str, spin: str, lengths: str, rounds: int) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(folder), variant, spin, lengths, str(rounds)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    from kvp_validate.runtime import SPIN_POLICIES

    ap = export_parser(__doc__, variants="int8", lengths="5,16,32,64,128,512", rounds=9)
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--policies", default=",".join(SPIN_POLICIES))
    a = ap.parse_args()
    policies = a.policies.split(",")
    load = [os.getloadavg()[0]]
    result = {"policies": {}}
    for variant in a.variants.split(","):
        times: dict[str, dict[str, dict[str, list[float]]]] = {p: {} for p in policies}
        for i in range(a.processes):
            for spin in policies[i % len(policies):] + policies[:i % len(policies)]:
                for point, paths in run_child(a.export, variant, spin, a.lengths, a.rounds).items():
                    for path, ts in paths.items():
                        times[spin].setdefault(point, {}).setdefault(path, []).extend(ts)
                load.append(os.getloadavg()[0])
        table = {}
        for spin, points in times.items():
            for point, paths in points.items():
                for path, ts in paths.items():
                    med = float(np.median(ts))
                    spread = float((np.percentile(ts, 90) - np.percentile(ts, 10)) / med)
                    table.setdefault(spin, {}).setdefault(point, {})[path] = {"ms": round(1000 * med, 2),
                                                                              "spread": round(spread, 3),
                                                                              "n": len(ts)}
        result["policies"][variant] = table
        print(f"\n{variant}: median ms (spread) per policy; ratios to the base's prefill")
        for point in next(iter(table.values())):
            cells = []
            for spin in policies:
                row = table[spin][point]
                base = row["base"]["ms"]
                parts = [f"{p} {r['ms']:.1f} ({r['spread']:.2f})" for p, r in row.items()]
                ratios = [f"{p}/base {row[p]['ms'] / base:.2f}" for p in ("auto", "kvp") if p in row]
                cells.append(f"[{spin}] " + ", ".join(parts + ratios))
            print(f"  {point}: " + " | ".join(cells))
    result["loadavg_1min"] = {"min": min(load), "max": max(load)}
    print(f"\nload average (1 min) during the run: {min(load):.2f}-{max(load):.2f}")
    write_result(a.out, result)


if __name__ == "__main__":
    main()
