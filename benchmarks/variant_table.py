"""One BENCHMARKS.md table, before and after, in one process: TTFT and decode step per variant.

Given one or more ONNX export folders (e.g. the same predictor exported by the code before and
after a change), times, round by round so that a noisy machine's drift hits every export alike
(the export order alternates each round; medians; ratios from the same run):
- TTFT at each prompt length x batch, for the base (base_prefill), KVP (kvp_prefill + the base's
  first step) and the aux alone (aux_prefill), through the project's runtime (kvp_validate.runtime);
- one base decode step after 128 / 512 / 1024 past tokens (the runtime's own step);
- optimum's export of the base (`--optimum DIR` holding optimum-cli's model.onnx, as
  benchmarks/optimum_reference.py makes it): its decode step at the same past lengths, beside fp32's;
and reports each variant's graph sizes from the manifests.
Memory: one export's sessions of one variant and one path at a time (a session keeps the arena it grew
at the largest shape it ran: KVP's two fp32 graphs hold about 3 GB after batch 8 x 1024). Each round
opens each export's (variant, path) in turn, runs its grid (a warm-up call, then a timed one, per
point) and closes it before the next export; the order alternates from round to round. So exports
are compared round by round, but base, KVP and aux of one point run minutes apart: their ratios
need a quiet machine. The peak RSS is printed and recorded.
Usage: python benchmarks/variant_table.py LABEL=EXPORT_DIR [LABEL=EXPORT_DIR ...] [--variants fp32,int8,int4]
       [--lengths 128,512,1024] [--batches 1,4,8] [--past 128,512,1024] [--rounds 5] [--optimum DIR] [--out FILE]
Prints markdown tables; --out writes the raw medians as JSON. Run it on a quiet machine.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kvp_validate.artifact import OnnxArtifact
from kvp_validate.report import md_table
from kvp_validate.runtime import OnnxKVP, session_options

from _bench import grid_args, parser, write_result

GRAPHS = ("kvp_prefill", "base_decode", "base_prefill", "aux_prefill")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def timed_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# The graphs each timed path opens (the decode step makes its cache through base_decode too).
PATH_GRAPHS = {"base": ("base_prefill",), "kvp": ("kvp_prefill", "base_decode"), "aux": ("aux_prefill",),
               "step": ("base_decode",)}


def opened(art: OnnxArtifact, variant: str, path: str, threads: int) -> OnnxKVP:
    """A runtime of `variant` with only the sessions `path` needs (PATH_GRAPHS) open."""
    rt = OnnxKVP(art, variant, threads, crossover=None)
    for name in PATH_GRAPHS[path]:
        rt.session(name)
    return rt


def ttft_job(rt: OnnxKVP, path: str, ids: np.ndarray):
    mask = np.ones_like(ids)
    return lambda: timed_ms(lambda: rt.prefill(ids, mask, path))


def step_job(rt: OnnxKVP, ids: np.ndarray):
    """One base decode step after ids' tokens (cache from the base's prompt through the decoder)."""
    state = rt.prefill_with_decoder(ids, np.ones_like(ids))
    mask = np.ones((1, ids.shape[1] + 1), np.int64)
    return repeated(lambda: rt.step("base", ids[:, -1:], mask, state.next_pos[:, None], state.past))


STEP_CALLS = 5  # a decode step takes tens of ms: time several per round, report the fastest


def repeated(fn):
    return lambda: min(timed_ms(fn) for _ in range(STEP_CALLS))


def optimum_job(sess: ort.InferenceSession, past: int, kv_heads: int, head_dim: int, rng):
    names = {i.name for i in sess.get_inputs()}
    feeds = {"input_ids": rng.integers(0, 1000, (1, 1), dtype=np.int64), "attention_mask": np.ones((1, past + 1), np.int64),
             "position_ids": np.array([[past]], np.int64)}
    feeds |= {n: rng.standard_normal((1, kv_heads, past, head_dim)).astype(np.float32)
              for n in names if n.startswith("past_key_values")}
    feeds = {k: v for k, v in feeds.items() if k in names}
    return repeated(lambda: sess.run(None, feeds))


def interleaved(jobs: dict, rounds: int) -> dict:
    """Median ms per job (each a function returning the ms it measured); each round runs every
    job once (after one warm-up round), in an order that alternates from round to round."""
    keys = list(jobs)
    times = {k: [] for k in keys}
    for r in range(rounds + 1):
        for k in keys if r % 2 else keys[::-1]:
            dt = jobs[k]()
            if r:
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def one_at_a_time(openers: dict, points: list, rounds: int) -> dict:
    """Median ms per (label, point), with one label's sessions in memory at a time: each round opens
    each label in turn (`openers[label]()` returns point -> job, a function returning the ms it
    measured), runs every point once after a warm-up call (a fresh session's first call at a shape
    allocates its memory) and drops them before the next label; the label order alternates from
    round to round, so a noisy machine's drift hits every label alike."""
    labels, times = list(openers), {}
    for r in range(rounds):
        for label in labels if r % 2 == 0 else labels[::-1]:
            job_of = openers[label]()
            for point in points:
                job = job_of(point)
                job()
                times.setdefault((label, point), []).append(job())
            job_of = job = None  # closes the sessions (and the arenas they grew) before the next label
    return {k: statistics.median(v) for k, v in times.items()}


def ttft_opener(art: OnnxArtifact, variant: str, path: str, threads: int, prompts: dict):
    def open_sessions():
        rt = opened(art, variant, path, threads)
        return lambda point: ttft_job(rt, path, prompts[point])
    return open_sessions


def step_opener(art: OnnxArtifact, variant: str, threads: int, pasts: dict):
    def open_sessions():
        rt = opened(art, variant, "step", threads)
        return lambda past: step_job(rt, pasts[past])
    return open_sessions


def optimum_opener(folder: Path, threads: int, kv_heads: int, head_dim: int, rng):
    def open_sessions():
        sess = ort.InferenceSession(str(folder / "model.onnx"), session_options(threads),
                                    providers=["CPUExecutionProvider"])
        return lambda past: optimum_job(sess, past, kv_heads, head_dim, rng)
    return open_sessions


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("exports", nargs="+", help="LABEL=EXPORT_DIR")
    grid_args(ap, variants="fp32,int8,int4", lengths="128,512,1024", rounds=5, threads=2)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--past", default="128,512,1024")
    ap.add_argument("--optimum", type=Path, default=None, help="folder with optimum-cli's model.onnx of the base")
    args = ap.parse_args()
    exports = dict(e.split("=", 1) for e in args.exports)
    rng = np.random.default_rng(0)
    arts = {label: OnnxArtifact.open(folder) for label, folder in exports.items()}
    # (label, variant) pairs, in the order asked for; each export times the variants it has
    units = [(label, v) for v in args.variants.split(",") for label, art in arts.items() if v in art.variants]
    result = {"exports": exports, "threads": args.threads, "rounds": args.rounds, "cpu": _cpu(),
              "onnxruntime": ort.__version__, "ttft": [], "step": [], "sizes": {},
              "note": "one export's (variant, path) in memory at a time; exports alternate round by round, paths do not"}
    for label, v in units:
        result["sizes"][f"{label}/{v}"] = {g: arts[label].manifest.variants[v][g].bytes for g in GRAPHS}
    grid = [(n, b) for n in ints(args.lengths) for b in ints(args.batches)]
    prompts = {(n, b): rng.integers(0, 1000, size=(b, n), dtype=np.int64) for n, b in grid}  # the same each round
    pasts = {p: rng.integers(0, 1000, size=(1, p), dtype=np.int64) for p in ints(args.past)}
    for v in dict.fromkeys(v for _, v in units):
        labels = [label for label, uv in units if uv == v]
        for path in ("base", "kvp", "aux"):
            openers = {label: ttft_opener(arts[label], v, path, args.threads, prompts) for label in labels}
            result["ttft"] += [{"export": label, "variant": v, "path": path, "batch": b, "prompt_len": n, "ms": ms}
                               for (label, (n, b)), ms in one_at_a_time(openers, grid, args.rounds).items()]
        openers = {label: step_opener(arts[label], v, args.threads, pasts) for label in labels}
        if args.optimum and v == "fp32":  # optimum's fp32 step beside the exports' fp32 steps
            m = arts[labels[0]].model
            openers["optimum"] = optimum_opener(args.optimum, args.threads, m["kv_heads"], m["head_dim"], rng)
        result["step"] += [{"export": label, "variant": "fp32" if label == "optimum" else v, "past": p, "ms": ms}
                           for (label, p), ms in one_at_a_time(openers, list(pasts), args.rounds).items()]
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    render(result)
    write_result(args.out, result)


def _cpu() -> str:
    from kvp_validate.machine import machine

    m = machine()
    return f"{m['cpu']} ({', '.join(m['isa'])})" if isinstance(m.get("isa"), list) else str(m.get("cpu"))


def render(r: dict) -> None:
    print(f"CPU: {r['cpu']}; onnxruntime {r['onnxruntime']}, {r['threads']} threads; medians of {r['rounds']} "
          f"interleaved rounds ({r['note']}); peak RSS {r['peak_rss_gib']:.2f} GiB.\n")
    ttft = {(t["export"], t["variant"], t["batch"], t["prompt_len"], t["path"]): t["ms"] for t in r["ttft"]}
    rows = []
    for (e, v, b, n, path), ms in ttft.items():
        if path == "base":
            kvp, aux = ttft[(e, v, b, n, "kvp")], ttft[(e, v, b, n, "aux")]
            fp32 = ttft.get((e, "fp32", b, n, "kvp"))
            rows.append([e, v, f"{b}x{n}", ms, kvp, aux, ms / kvp, kvp / aux, fp32 / kvp if fp32 else ""])
    print("TTFT (ms):\n")
    print(md_table(["export", "variant", "BxN", "base", "KVP", "aux alone", "base / KVP", "KVP / aux",
                    "fp32 KVP / this KVP"], rows, 2) + "\n")
    step = {(s["export"], s["variant"], s["past"]): s["ms"] for s in r["step"]}
    rows = []
    for (e, v, p), ms in step.items():
        fp32, optimum = step.get((e, "fp32", p)), step.get(("optimum", "fp32", p))
        rows.append([e, v, p, ms, fp32 / ms if fp32 and e != "optimum" else "", ms / optimum if optimum else ""])
    print("Base decode step (ms, one token, batch 1):\n")
    print(md_table(["export", "variant", "past", "step", "fp32 / this", "this / optimum"], rows, 2) + "\n")
    rows = [[k, *[b / 1e6 for b in sizes.values()]] for k, sizes in r["sizes"].items()]
    print("Graph sizes (MB):\n")
    print(md_table(["export/variant", *GRAPHS], rows, 1))


if __name__ == "__main__":
    main()
