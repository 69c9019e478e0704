"""What the LM head over every prompt position costs when base_decode runs a prompt.

    python benchmarks/logits_to_keep.py MODEL WORKDIR [--lengths 5,16,32,64,128] [--rounds 15] [--out OUT.json]

Below the crossover the default mode runs the base prompt through `base_decode` with an empty
cache (no third graph to load). Without `logits_to_keep` the decoder's LM head covers every
prompt position, where `base_prefill` covers the last one. This script exports the base's fp32
`base_decode` and `base_prefill` of MODEL (a zoo name or a folder) into WORKDIR once, then times,
interleaved in one process (batch 1, 2 threads, the runtime's session options), `base_prefill`,
`base_decode` with the default (every position) and `base_decode` with `logits_to_keep` 1, and
prints each decoder time as a ratio of `base_prefill`'s (medians, the first two rounds dropped).
The machine's CPU and ISA flags are recorded beside the figures.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kvp_validate.runtime import session_options

from _bench import parser, write_result

GRAPHS = ("base_decode", "base_prefill")


def export(model: str, work: Path) -> None:
    from kvp_export.export.to_onnx import export_graph
    from kvp_export.models import load

    work.mkdir(parents=True, exist_ok=True)
    if all((work / f"{g}.onnx").exists() for g in GRAPHS):
        return
    base, _ = load(model)
    for g in GRAPHS:
        export_graph(g, work / f"{g}.onnx", base, base, None, 1)


def time_lengths(work: Path, lengths: list[int], rounds: int) -> dict:
    sess = {g: ort.InferenceSession(str(work / f"{g}.onnx"), session_options(2), providers=["CPUExecutionProvider"])
            for g in GRAPHS}
    past = [i for i in sess["base_decode"].get_inputs() if i.name.startswith("past_key_values.")]
    empty = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past}
    rng = np.random.default_rng(0)
    out = {}
    for n in lengths:
        feeds = {"input_ids": rng.integers(100, 1000, (1, n)), "attention_mask": np.ones((1, n), np.int64),
                 "position_ids": np.arange(n)[None]}
        calls = {"base_prefill": ("base_prefill", feeds),
                 "decode_every_position": ("base_decode", feeds | empty),
                 "decode_logits_to_keep_1": ("base_decode", feeds | empty | {"logits_to_keep": np.array(1)})}
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(rounds):
            for k, (g, f) in calls.items():
                t0 = time.perf_counter()
                sess[g].run(["logits"], f)
                times[k].append(time.perf_counter() - t0)
        ms = {k: statistics.median(v[2:]) * 1e3 for k, v in times.items()}
        out[n] = {"ms": ms, "vs_base_prefill": {k: ms[k] / ms["base_prefill"] for k in calls}}
        print(f"{n:5d} tokens: base_prefill {ms['base_prefill']:7.1f} ms; base_decode / base_prefill: every position "
              f"{out[n]['vs_base_prefill']['decode_every_position']:.3f}, logits_to_keep 1 "
              f"{out[n]['vs_base_prefill']['decode_logits_to_keep_1']:.3f}", flush=True)
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("model")
    ap.add_argument("work", type=Path)
    ap.add_argument("--lengths", default="5,16,32,64,128")
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    export(a.model, a.work)
    write_result(a.out, {"model": a.model, "rounds": a.rounds,
                         "points": time_lengths(a.work, [int(x) for x in a.lengths.split(",")], a.rounds)})


if __name__ == "__main__":
    main()
