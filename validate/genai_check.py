"""`--check genai`: KVP and the base through onnxruntime-genai beside our runtime (issue 13).

For each variant, on the same machine, threads and prompts as our runtime (`OnnxKVP`):
- **quality**: on the first `quality_n` held-out pairs stored at export (eval_pairs.npz, as
  `quality`; `--genai-pairs`, 16 by default: batch 1 and a call per token is slow; 0 skips it), one genai
  generator per pair and path: the continuation's NLL teacher-forced through genai (the prompt
  stage, then one single-token `append_tokens` per continuation token, reading genai's `logits`
  output), the largest logit difference against our runtime's on the same positions, and the
  first token and greedy-N continuation from genai's own search (`generate_next_token`, which
  stops at EOS) against our runtime's (the same EOS rule);
- **TTFT**, batch 1 (genai runs one prompt per generator): random prompts of each length,
  warm-up, then interleaved rounds in which each path runs once (ours KVP, genai KVP, ours
  base, genai base), medians and their ratios from the same run. A path's TTFT is prompt ids
  in, first token id out: ours = `prefill` + argmax; genai = a new generator (one per prompt;
  reported apart as `ms_genai_*_new_generator`) + `append_tokens` + `generate_next_token`.
  `kvp_vs_ours` = genai KVP / our KVP is the issue's goal (<= 1.10 at 1x512 and 1x1024).

Paths under genai: "kvp" is `<variant>/genai-kvp/` (`kvp export genai-kvp`: the prompt stage
is kvp_prefill + the base's first step, the token stage base_decode); "base" is the variant
folder itself (base_decode over the prompt with an empty past, all positions' logits), which
our runtime's "base" (base_prefill, last-position logits) does not quite match in work.
Threads: genai's decoder-level `session_options.intra_op_num_threads`, which pipeline stages
without their own options use (onnxruntime-genai, src/models/model.cpp, Model::GetSessionOptions).

onnxruntime-genai is an optional extra: without it, asking for this check is a one-line error
before anything runs, as is a variant without `genai-kvp/`, one built from other graphs than the
export's, or one with a file that differs from its manifest (genai.kvp_folder).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from tqdm.auto import tqdm

from .artifact import OnnxArtifact
from .gates import flatten
from .genai import KVP_FOLDER, GenaiBase, import_genai, kvp_folder
from .metrics import DELTA_NLL, NLL, metric_key, point
from .options import DEFAULTS as D
from .options import check
from .quality import log_softmax
from .report import md_table
from .runtime import OnnxKVP
from .ttft import check_lengths

PATHS = ("kvp", "base")


def check_ready(art: OnnxArtifact, variants: list[str]) -> None:
    """Fail before any measurement: genai installed, each variant a genai folder with a genai-kvp/
    pipeline built from this export's graphs, every file as its manifest lists it (genai.kvp_folder)."""
    import_genai()
    for v in variants:
        kvp_folder(art, v)


def _generator(g: GenaiBase, max_length: int):
    params = g.og.GeneratorParams(g.model)
    params.set_search_options(do_sample=False, max_length=max_length)
    return g.og.Generator(g.model, params)


def _after_eos(toks: list[int] | np.ndarray, eos: set[int], n: int) -> np.ndarray:
    """Tokens up to and including the first EOS, then -1, as n columns."""
    out = np.full(n, -1, np.int64)
    for i, t in enumerate(list(toks)[:n]):
        out[i] = t
        if int(t) in eos:
            break
    return out


def greedy(gen, n: int) -> list[int]:
    """Up to n greedy tokens from a genai generator that holds its prompt (fewer where it stops at EOS)."""
    toks = []
    while not gen.is_done() and len(toks) < n:
        gen.generate_next_token()
        toks.append(int(gen.get_next_tokens()[0]))
    return toks


def genai_pair(g: GenaiBase, prompt: np.ndarray, cont: np.ndarray, greedy_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(teacher-forced logits [T, V] of the continuation, genai's greedy tokens) for one pair."""
    ids = np.asarray(prompt, np.int32)[None]
    gen = _generator(g, len(prompt) + len(cont))
    gen.append_tokens(ids)
    logits = [np.asarray(gen.get_output("logits"))[0, -1]]
    for t in cont[:-1]:
        gen.append_tokens(np.array([[t]], np.int32))
        logits.append(np.asarray(gen.get_output("logits"))[0, -1])
    gen = _generator(g, len(prompt) + greedy_tokens)
    gen.append_tokens(ids)
    return np.stack(logits), np.asarray(greedy(gen, greedy_tokens), np.int64)


def ours_pair(rt: OnnxKVP, path: str, prompt: np.ndarray, cont: np.ndarray, greedy_tokens: int,
              eos: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """The same through our runtime, on the same calls as genai's: batch 1, one token per step
    (int8's dynamic quantization scales activations per tensor, so a batch of prompts or a
    multi-token continuation would not be the same computation)."""
    state = rt.prefill(np.asarray(prompt)[None], None, path)
    logits, past, mask, pos = [state.logits[0]], state.past, state.mask, state.next_pos[:, None]
    for t in cont[:-1]:
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        res = rt.step("base", np.array([[t]], np.int64), mask, pos, past)
        logits.append(res[0][0, -1])
        past, pos = res[1:], pos + 1
    toks = rt.decode(state, greedy_tokens, eos_ids=eos, pad_id=int(rt.model["pad_token_id"] or 0))[0]
    return np.stack(logits), toks


def run_genai_quality(art: OnnxArtifact, rt: OnnxKVP, models: dict[str, GenaiBase], *, n: int | None,
                      greedy_tokens: int, progress: bool = False) -> dict:
    prompts, conts = art.eval_pairs(n)
    rt.check_context(prompts.shape[1], max(conts.shape[1], greedy_tokens))
    eos = set(int(e) for e in art.model["eos_token_ids"])
    g = greedy_tokens
    acc = {p: {"nll": 0.0, "nll_ours": 0.0, "diff": 0.0, "first": [], "first_ours": [], "greedy": [],
               "greedy_ours": []} for p in PATHS}
    bar = tqdm(total=len(prompts) * len(PATHS), desc=f"genai quality {rt.variant}", unit="seq", disable=not progress)
    for p, c in zip(prompts, conts):
        for path in PATHS:
            a = acc[path]
            ours, toks_ours = ours_pair(rt, path, p, c, g, eos)
            logits, toks = genai_pair(models[path], p, c, g)
            a["diff"] = max(a["diff"], float(np.abs(logits - ours).max()))
            for key, lg in (("nll", logits), ("nll_ours", ours)):
                a[key] += float(-log_softmax(lg)[np.arange(len(c)), c].sum())
            a["first"].append(int(toks[0]) if len(toks) else -1)
            a["first_ours"].append(int(toks_ours[0]))
            a["greedy"].append(_after_eos(toks, eos, g))
            a["greedy_ours"].append(_after_eos(toks_ours, eos, g))
            bar.update()
    bar.close()
    out = {}
    base_first, base_greedy = np.array(acc["base"]["first"]), np.stack(acc["base"]["greedy"])
    for path in PATHS:
        a = acc[path]
        first, first_ours = np.array(a["first"]), np.array(a["first_ours"])
        greedy, greedy_ours = np.stack(a["greedy"]), np.stack(a["greedy_ours"])
        match = greedy == greedy_ours
        out[path] = {
            "nll": a["nll"] / conts.size,
            "nll_ours": a["nll_ours"] / conts.size,
            "nll_vs_ours": (a["nll"] - a["nll_ours"]) / conts.size,
            "logits_max_abs_diff_vs_ours": a["diff"],
            "first_token_vs_ours": float((first == first_ours).mean()),
            f"greedy{g}_vs_ours": float(match.mean()),
            f"greedy{g}_exact_vs_ours": float(match.all(1).mean()),
            "first_token_agreement": float((first == base_first).mean()),  # against genai's base, as `quality`
            f"greedy{g}_agreement": float((greedy == base_greedy).mean()),
        }
    for path in PATHS:
        out[path][DELTA_NLL] = out[path][NLL] - out["base"][NLL]
    return {"sequences": len(prompts), "prompt_len": int(prompts.shape[1]), "cont_len": int(conts.shape[1]),
            "greedy_tokens": g, "paths": out}


def _timed_genai(g: GenaiBase, ids32: np.ndarray, parts: dict) -> None:
    t0 = time.perf_counter()
    gen = _generator(g, ids32.shape[1] + 1)
    t1 = time.perf_counter()
    gen.append_tokens(ids32)
    gen.generate_next_token()
    int(gen.get_next_tokens()[0])
    parts["new_generator"] = t1 - t0


def measure_point(rt: OnnxKVP, models: dict[str, GenaiBase], n: int, *, warmup: int, repeats: int,
                  seed: int = 0) -> dict:
    """(median ms per path, every round's ms per path) at batch 1 x n tokens (interleaved rounds,
    as ttft.measure_point; the rounds show how noisy the machine was)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, rt.model["vocab"], size=(1, n), dtype=np.int64)
    ids32 = ids.astype(np.int32)
    mask = np.ones_like(ids)
    parts: dict[str, dict] = {"genai_kvp": {}, "genai_base": {}}
    paths = {
        "ours_kvp": lambda: int(rt.prefill(ids, mask, "kvp").logits[0].argmax()),
        "genai_kvp": lambda: _timed_genai(models["kvp"], ids32, parts["genai_kvp"]),
        "ours_base": lambda: int(rt.prefill(ids, mask, "base").logits[0].argmax()),
        "genai_base": lambda: _timed_genai(models["base"], ids32, parts["genai_base"]),
    }
    times: dict[str, list[float]] = {k: [] for k in [*paths, "genai_kvp_new_generator", "genai_base_new_generator"]}
    for r in range(warmup + repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
                if name in parts:
                    times[f"{name}_new_generator"].append(parts[name]["new_generator"])
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}, {k: [t * 1e3 for t in v] for k, v in times.items()}


def run_genai(art: OnnxArtifact, variant: str, *, lengths: tuple[int, ...] = D["genai_lengths"],
              threads: int = D["threads"], warmup: int = D["warmup"], repeats: int = D["repeats"],
              quality_n: int | None = None, greedy_tokens: int = D["greedy_tokens"],
              progress: bool = False) -> dict:
    """Quality and TTFT of KVP and the base through onnxruntime-genai beside our runtime (module docstring)."""
    check(genai_lengths=lengths, warmup=warmup, repeats=repeats, genai_pairs=quality_n)
    check_ready(art, [variant])
    og = import_genai()
    rt = OnnxKVP(art, variant, threads)
    check_lengths(rt, lengths, "genai TTFT")
    rt.load("kvp")
    rt.load("base")
    models = {"kvp": GenaiBase(art.folder, variant, kvp=True, threads=threads),
              "base": GenaiBase(art.folder, variant, threads=threads)}
    out: dict = {"variant": variant, "threads": threads, "warmup": warmup, "repeats": repeats,
                 "onnxruntime_genai": getattr(og, "__version__", None),
                 "folders": {p: str(m.folder) for p, m in models.items()},
                 "load_ms": {p: m.load_seconds * 1e3 for p, m in models.items()}}
    if quality_n is None or quality_n > 0:
        out["quality"] = run_genai_quality(art, rt, models, n=quality_n, greedy_tokens=greedy_tokens,
                                           progress=progress)
    points = []
    for n in tqdm(lengths, desc=f"genai ttft {variant}", unit="point", disable=not progress):
        ms, rounds = measure_point(rt, models, n, warmup=warmup, repeats=repeats)
        points.append({"batch": 1, "prompt_len": n, "ms": ms, "rounds_ms": rounds,
                       "kvp_vs_ours": ms["genai_kvp"] / ms["ours_kvp"],
                       "base_vs_ours": ms["genai_base"] / ms["ours_base"],
                       "kvp_speedup_genai": ms["genai_base"] / ms["genai_kvp"],
                       "kvp_speedup_ours": ms["ours_base"] / ms["ours_kvp"]})
    out["points"] = points
    return out


def genai_metrics(results: dict) -> dict[str, float]:
    """The genai check's flat metrics: `genai.VARIANT.1x512.kvp_vs_ours`, `genai.VARIANT.kvp.nll`..."""
    m: dict[str, float] = {}
    for v, r in results.get("genai", {}).items():
        per: dict = {}
        for p in r["points"]:
            per[point(p["batch"], p["prompt_len"])] = {
                k: p[k] for k in ("kvp_vs_ours", "base_vs_ours", "kvp_speedup_genai", "kvp_speedup_ours")
            } | {f"ms_{k}": val for k, val in p["ms"].items()}
        for path, vals in r.get("quality", {}).get("paths", {}).items():
            per[path] = dict(vals)
        m |= flatten(per, metric_key("genai", v) + ".")
    return m


def genai_markdown(results: dict) -> list[str]:
    res = results.get("genai")
    if not res:
        return []
    r0 = next(iter(res.values()))
    lines = ["## onnxruntime-genai beside our runtime (batch 1)", "",
             f"onnxruntime-genai {r0['onnxruntime_genai']}; KVP = the variant's `{KVP_FOLDER}/` pipeline (prompt "
             "stage kvp_prefill + the base's first step, token stage base_decode), base = the variant folder "
             "(base_decode over the prompt). One generator per prompt.", ""]
    q = {v: r["quality"] for v, r in res.items() if r.get("quality")}
    if q:
        q0 = next(iter(q.values()))
        g = q0["greedy_tokens"]
        lines += [f"Quality: {q0['sequences']} held-out pairs, prompt {q0['prompt_len']} + continuation "
                  f"{q0['cont_len']} tokens, teacher-forced through genai; first token and greedy-{g} from genai's "
                  "search (stops at EOS) against our runtime's on the same path.", ""]
        rows = [[v, path, r["nll"], r["nll_ours"], r["nll_vs_ours"], r["logits_max_abs_diff_vs_ours"],
                 r["first_token_vs_ours"], r[f"greedy{g}_vs_ours"], r[f"greedy{g}_exact_vs_ours"]]
                for v, qq in q.items() for path, r in qq["paths"].items()]
        lines += [md_table(["variant", "path", "genai NLL", "our NLL", "genai - ours", "max |logit diff|",
                            "first token = ours", f"greedy-{g} = ours", f"greedy-{g} exact = ours"], rows, 4), ""]
    lines += [f"TTFT: {r0['threads']} threads in both runtimes, {r0['warmup']} warm-up, median of {r0['repeats']} "
              "interleaved rounds; prompt ids in, first token id out (genai: a new generator, append_tokens, "
              "generate_next_token).", ""]
    rows = [[v, f"1x{p['prompt_len']}", p["ms"]["ours_kvp"], p["ms"]["genai_kvp"], p["kvp_vs_ours"],
             p["ms"]["ours_base"], p["ms"]["genai_base"], p["base_vs_ours"], p["kvp_speedup_ours"],
             p["kvp_speedup_genai"], p["ms"]["genai_kvp_new_generator"]]
            for v, r in res.items() for p in r["points"]]
    lines += [md_table(["variant", "BxN", "ours KVP ms", "genai KVP ms", "genai / ours (KVP)", "ours base ms",
                        "genai base ms", "genai / ours (base)", "KVP speedup (ours)", "KVP speedup (genai)",
                        "genai new generator ms"], rows, 2), ""]
    return lines

