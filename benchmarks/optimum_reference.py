"""Our base graphs against optimum's export of the same base, on onnxruntime (CPU), one run.

optimum-cli exports the base as `model.onnx` (text-generation-with-past): what a user would pick
instead of kvp-export. We time, interleaved, with fixed threads and medians:
- prefill at B x N: optimum's model.onnx with an empty past (it computes logits for every
  position) vs our base_prefill.onnx (last position only);
- one decode step after N tokens: optimum's model.onnx vs our base_decode.onnx.
Usage: python benchmarks/optimum_reference.py EXPORT_DIR [--base smollm2-135m] [--out DIR]
Prints one JSON line (and writes it to DIR/optimum_reference.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kvp_validate.contract import MANIFEST


def session(path: Path, threads: int) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def feeds(sess, ids, past_len, kv_heads, head_dim, rng):
    b, n = ids.shape
    f = {"input_ids": ids, "attention_mask": np.ones((b, past_len + n), np.int64),
         "position_ids": np.arange(past_len, past_len + n, dtype=np.int64)[None].repeat(b, 0)}
    names = {i.name for i in sess.get_inputs()}
    for name in names:
        if name.startswith("past_key_values"):
            f[name] = rng.standard_normal((b, kv_heads, past_len, head_dim)).astype(np.float32)
    return {k: v for k, v in f.items() if k in names}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="128,512")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    manifest = json.loads((args.export_dir / MANIFEST).read_text())
    base_dir = Path(manifest["inputs"]["base"]["path"])
    out = args.out or args.export_dir.parent / "optimum"
    if not (out / "model.onnx").is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "optimum.exporters.onnx", "--model", str(base_dir), "--task",
                        "text-generation-with-past", str(out)], check=True)
        export_s = time.perf_counter() - t0
    else:
        export_s = None
    m = manifest["model"]
    rng = np.random.default_rng(0)
    sess = {"optimum": session(out / "model.onnx", args.threads),
            "ours_prefill": session(args.export_dir / "fp32" / "base_prefill.onnx", args.threads),
            "ours_decode": session(args.export_dir / "fp32" / "base_decode.onnx", args.threads)}
    results = []
    for n in (int(x) for x in args.lengths.split(",")):
        ids = rng.integers(0, m["vocab"], (1, n), dtype=np.int64)
        tok = ids[:, -1:]
        runs = {
            "prefill_optimum": (sess["optimum"], feeds(sess["optimum"], ids, 0, m["kv_heads"], m["head_dim"], rng)),
            "prefill_ours": (sess["ours_prefill"], feeds(sess["ours_prefill"], ids, 0, m["kv_heads"], m["head_dim"], rng)),
            "decode_optimum": (sess["optimum"], feeds(sess["optimum"], tok, n, m["kv_heads"], m["head_dim"], rng)),
            "decode_ours": (sess["ours_decode"], feeds(sess["ours_decode"], tok, n, m["kv_heads"], m["head_dim"], rng)),
        }
        times = {k: [] for k in runs}
        for r in range(args.repeats + 1):
            for k, (s, f) in runs.items():
                t0 = time.perf_counter()
                s.run(None, f)
                if r:
                    times[k].append(time.perf_counter() - t0)
        med = {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}
        results.append({"prompt_len": n, "ms": med,
                        "prefill_ours_over_optimum": med["prefill_ours"] / med["prefill_optimum"],
                        "decode_ours_over_optimum": med["decode_ours"] / med["decode_optimum"]})
    payload = {"threads": args.threads, "repeats": args.repeats, "optimum_export_seconds": export_s,
               "optimum_bytes": sum(p.stat().st_size for p in out.glob("model.onnx*")), "points": results}
    (out / "optimum_reference.json").write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
