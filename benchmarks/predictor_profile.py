"""Where KVP's time over the aux alone goes: onnxruntime's per-node profile of the KVP prefill graph,
the aux prefill and the base's first step over the predicted cache (issue 12).

    python benchmarks/predictor_profile.py EXPORT [--variants fp32,int8] [--lengths 128,512] [--runs 10]
        [--kvp NAME=KVP_PREFILL.onnx,...] [--no-profile]

EXPORT is an `kvp export onnx` folder. For each variant and prompt length N (batch 1) it times, interleaved
in one process: aux_prefill over the N prompt tokens (what "aux alone" runs), kvp_prefill over the same
prompt and base_decode's first KVP step (the sink token and the last prompt token over the predicted
cache of N-1 positions, last-position logits), cache outputs kept as OrtValues (no copy out, as the
runtime's IO binding does). Then it profiles each graph (`enable_profiling`) and splits kvp_prefill's node
time into: the aux layers' q/k/v projection with the fused predictor columns (`/layers.J/qkv/`: its
excess over the same node in aux_prefill is the predictor's first matmuls), the rest of the aux layers,
the final norm's predictor columns (`/final/`), and what follows the layers (summing the partial
predictions, the base RoPE on predicted keys, reshapes and transposes of the cache outputs, the next
step's inputs). Prints medians (ms, and shares of the aux alone's time); a ratio is publishable only as
"measured in one process" on a shared machine. `--kvp` adds other kvp_prefill graphs of the same base and
aux (e.g. of reduced-rank predictors, `benchmarks/predictor_rank.py --export-kvp`) to the interleaved
timing: each one's (kvp_prefill + first step) / aux_prefill is printed beside the export's own.
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kvp_validate.runtime import session_options

from _bench import export_parser, load_average, write_result


def session(path: Path, threads: int, profile_dir: str | None = None) -> ort.InferenceSession:
    opts = session_options(threads)
    if profile_dir:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(profile_dir) / path.stem)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def feeds(n: int, sink: int, n_layers: int, kv_heads: int, head_dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 1000, (1, n), dtype=np.int64)
    aux = {"input_ids": ids, "attention_mask": np.ones((1, n), np.int64), "position_ids": np.arange(n)[None]}
    kvp = {"input_ids": ids, "attention_mask": np.ones((1, n), np.int64)}
    past = n - 1
    step = {"input_ids": ids[:, : sink + 1], "attention_mask": np.ones((1, past + sink + 1), np.int64),
            "position_ids": np.array([[*range(sink), n - 1]], np.int64), "logits_to_keep": np.array(1, np.int64)}
    for i in range(n_layers):
        for kind in ("key", "value"):
            step[f"past_key_values.{i}.{kind}"] = rng.standard_normal((1, kv_heads, past, head_dim), np.float32)
    return aux, kvp, step


def bound_run(sess: ort.InferenceSession, feed: dict) -> float:
    """One call with inputs and outputs as OrtValues (no copy out, as the runtime); seconds."""
    vals = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()}
    names = [o.name for o in sess.get_outputs()]
    t = time.perf_counter()
    sess.run_with_ort_values(names, vals)
    return time.perf_counter() - t


def node_times(profile_file: str, skip_runs: int) -> tuple[dict[str, float], dict[str, str]]:
    """Per node name, the median over the profiled runs (after the first `skip_runs`) of its microseconds
    in that run; and each node's operator type."""
    events = json.load(open(profile_file))
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[skip_runs:]
    per_run: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(runs))
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        ops[name] = e.get("args", {}).get("op_name", "?")
        for r, (t0, t1) in enumerate(runs):
            if t0 <= e["ts"] <= t1:
                per_run[name][r] += e["dur"]
                break
    return {k: statistics.median(v) for k, v in per_run.items()}, ops


def split(nodes: dict[str, float], kvp: bool) -> dict[str, float]:
    """Node time by part of the graph (kvp: kvp_prefill's names, else aux_prefill's)."""
    parts: dict[str, float] = defaultdict(float)
    for name, us in nodes.items():
        if re.search(r"/layers\.\d+/qkv/", name):
            parts["aux qkv (+ fused predictor)" if kvp else "aux qkv"] += us
        elif "/layers." in name:
            parts["aux layers, rest"] += us
        elif kvp and (name.startswith("/final") or "final_norm" in name):
            parts["final norm + its predictor columns"] += us
        else:
            parts["after the layers (sums, RoPE, cache outputs, next inputs)" if kvp
                  else "embedding, final norm, LM head (last position)"] += us
    return parts


def by_op(nodes: dict[str, float], ops: dict[str, str]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for name, us in nodes.items():
        out[ops.get(name, "?")] += us
    return out


def main() -> None:
    ap = export_parser(__doc__, variants="fp32,int8", lengths="128,512", threads=2)
    ap.add_argument("--runs", type=int, default=10, help="interleaved timing rounds (and profiled runs)")
    ap.add_argument("--kvp", default="", help="NAME=PATH,... more kvp_prefill graphs to time (first variant only)")
    ap.add_argument("--no-profile", action="store_true", help="interleaved timing only")
    a = ap.parse_args()
    load_start = load_average()
    extra = dict(item.split("=", 1) for item in a.kvp.split(",") if item)
    cfg = json.loads((a.export / "fp32" / "config.json").read_text())
    man = json.loads((a.export / "manifest.json").read_text())
    sink = int(man.get("sink_len", 1))
    n_layers, kv_heads = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    report = {}
    for variant in a.variants.split(","):
        with tempfile.TemporaryDirectory() as prof:
            names = ("aux_prefill", "kvp_prefill", "base_decode")
            more = extra if variant == a.variants.split(",")[0] else {}
            timed = {name: session(Path(path), a.threads) for name, path in more.items()}
            for n in map(int, a.lengths.split(",")):
                # the three graphs profiled in the timed rounds themselves (contention hits all alike)
                timed.update({g: session(a.export / variant / f"{g}.onnx", a.threads, None if a.no_profile else prof)
                              for g in names})
                aux, kvp, step = feeds(n, sink, n_layers, kv_heads, head_dim)
                fd = {"aux_prefill": aux, "base_decode": step}
                fd.update({g: kvp for g in timed if g not in fd})
                order = list(timed)
                t: dict[str, list[float]] = defaultdict(list)
                for g in order:
                    bound_run(timed[g], fd[g])  # warm-up
                for r in range(a.runs):
                    for g in (order if r % 2 == 0 else order[::-1]):
                        t[g].append(bound_run(timed[g], fd[g]))
                med = {g: statistics.median(v) * 1e3 for g, v in t.items()}
                point = {"wall_ms": med,
                         "kvp_over_aux": (med["kvp_prefill"] + med["base_decode"]) / med["aux_prefill"],
                         "kvp_prefill_over_aux": med["kvp_prefill"] / med["aux_prefill"],
                         "first_step_over_aux": med["base_decode"] / med["aux_prefill"],
                         **{f"{name}_kvp_over_aux": (med[name] + med["base_decode"]) / med["aux_prefill"]
                            for name in more}}
                if a.no_profile:
                    report[f"{variant} 1x{n}"] = point
                    print(f"{variant} 1x{n}", json.dumps(point, indent=1), flush=True)
                    continue
                prof_nodes = {}
                for g in names:
                    prof_nodes[g] = node_times(timed[g].end_profiling(), 1)
                aux_nodes, kvp_nodes = prof_nodes["aux_prefill"][0], prof_nodes["kvp_prefill"][0]
                aux_total = sum(aux_nodes.values())
                qkv_excess = sum(kvp_nodes.get(k, 0) - v for k, v in aux_nodes.items() if re.search(r"/qkv/", k))
                point["node_ms"] = {
                    "aux_prefill": {k: v / 1e3 for k, v in split(aux_nodes, False).items()},
                    "kvp_prefill": {k: v / 1e3 for k, v in split(kvp_nodes, True).items()},
                    "kvp_prefill_qkv_excess_over_aux": qkv_excess / 1e3,
                    "base_decode_by_op": {k: v / 1e3 for k, v in sorted(
                        by_op(*prof_nodes["base_decode"]).items(), key=lambda kv: -kv[1])[:6]},
                    "kvp_prefill_by_op": {k: v / 1e3 for k, v in sorted(
                        by_op(*prof_nodes["kvp_prefill"]).items(), key=lambda kv: -kv[1])[:8]},
                    "aux_prefill_by_op": {k: v / 1e3 for k, v in sorted(
                        by_op(*prof_nodes["aux_prefill"]).items(), key=lambda kv: -kv[1])[:8]},
                    "totals": {g: sum(v[0].values()) / 1e3 for g, v in prof_nodes.items()},
                }
                point["node_share_of_aux"] = {
                    "predictor qkv columns": qkv_excess / aux_total,
                    "kvp after the layers + final": (sum(split(kvp_nodes, True).values())
                                                     - kvp_nodes_layers(kvp_nodes)) / aux_total,
                    "base first step": sum(prof_nodes["base_decode"][0].values()) / aux_total,
                }
                report[f"{variant} 1x{n}"] = point
                print(f"{variant} 1x{n}", json.dumps(point, indent=1), flush=True)
            del timed
    print(json.dumps(write_result(a.out, {"threads": a.threads, "runs": a.runs, "points": report},
                                  load_start=load_start)))


def kvp_nodes_layers(nodes: dict[str, float]) -> float:
    return sum(us for name, us in nodes.items() if "/layers." in name)


if __name__ == "__main__":
    main()
