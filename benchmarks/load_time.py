"""Session load time of an ONNX export: what `kvp generate` and an app pay before the first token.

    python benchmarks/load_time.py EXPORT [--repeats 3] [--threads 2] [--out OUT.json]

Per variant and graph, each in a fresh process (so nothing is shared but the OS page cache,
which the first, discarded, round warms): session creation from the source graph with all
graph optimisations (what the runtime did before optimised copies), and from the export's
optimised copy with only the basic passes (what it does now). Then per variant the two graphs
of KVP (kvp_prefill + base_decode) loaded one after the other and concurrently. Medians of
`repeats`; the machine's CPU and ISA flags are recorded beside them.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from _bench import load_average, parser, write_result

CHILD = r"""
import json, sys, time
import onnxruntime as ort
from kvp_validate.runtime import OnnxKVP, session_options
folder, variant, what, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if what.startswith("graph:"):
    _, name, how = what.split(":")
    rt = OnnxKVP(folder, variant, threads, use_optimized=(how == "optimized"))
    rt.session(name)
    print(json.dumps({"s": rt.load_seconds[name]}))
else:
    rt = OnnxKVP(folder, variant, threads)
    t = rt.load("kvp", concurrent=(what == "kvp:concurrent"))
    print(json.dumps({"s": t["wall"]}))
"""


def child(folder: Path, variant: str, what: str, threads: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), variant, what, str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["s"]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("export", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="fp32,int8,int4")
    a = ap.parse_args()
    rows = []
    load_start = load_average()
    points = [(v, f"graph:{g}:{how}") for v in a.variants.split(",") for g in ("kvp_prefill", "base_decode")
              for how in ("source", "optimized")]
    points += [(v, w) for v in a.variants.split(",") for w in ("kvp:sequential", "kvp:concurrent")]
    for v, what in points:
        child(a.export, v, what, a.threads)  # warms the page cache; discarded
        times = [child(a.export, v, what, a.threads) for _ in range(a.repeats)]
        rows.append({"variant": v, "what": what, "median_s": statistics.median(times), "all_s": times})
        print(json.dumps(rows[-1]), flush=True)
    write_result(a.out, {"threads": a.threads, "repeats": a.repeats, "rows": rows}, load_start=load_start)


if __name__ == "__main__":
    main()
