"""export onnx: a predictor folder (with its aux and base) -> an ONNX artifact folder.

Layout of the folder (all of it described by manifest.json, which the validator checks):
  fp32/ int8/ int4/     the five graphs of each variant (to_onnx.GRAPHS), plus config.json,
                        generation_config.json and the tokenizer files, so each variant folder is
                        also an optimum folder: ORTModelForCausalLM.from_pretrained(dir,
                        file_name="base_decode.onnx") generates from it as a plain base model;
                        and genai_config.json (genai.py), so onnxruntime-genai's og.Model(dir)
                        generates from base_decode.onnx the same way;
  optimized/<variant>/   the same graphs after onnxruntime's graph optimisations (optimize.py):
                        what the project's runtime loads, so sessions skip that work;
  tokenizer/            the tokenizer (tokenizers' tokenizer.json) the validator encodes with;
  reference.npz         PyTorch outputs on fixed inputs (parity);
  eval_pairs.npz        held-out (prompt, continuation) token ids (quality through the runtime).
The manifest's `model.tail` is KVP's exact tail W (default 0): the runtimes run KVP with it (the
prediction graph reads the prompt without its last W tokens, base_decode's first step reads them;
kvp_validate.runtime), the reference and the crossover are computed with it. The graphs do not
depend on it. The manifest also records, per variant, the crossover: the prompt length from which KVP's first
token comes sooner than the base's on the exporting machine (kvp_validate.crossover), which the
runtime's default mode uses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from kvp_validate.integrity import remember
from kvp_validate.options import DEFAULTS
from kvp_validate.protocol import min_kvp_len

from .. import data
from ..artifacts import atomic_dir, check_output_dir, sha256_file, write_manifest
from ..config import SEED, OnnxConfig, configure
from ..errors import KvpError
from ..models import arch
from ..models.arch import ArchSpec
from ..stage import Clock
from .genai import write_genai_config
from .graph_jobs import flops_job, run_graph_jobs, variant_graph, worker_count
from .reference import REFERENCE_PAD, build_reference, reference_inputs, reference_length, save_reference
from .source import load_source, source_inputs
from .to_onnx import GRAPHS, OPSET, export_graph, kv_names

EVAL_PAIRS = "eval_pairs.npz"
MODEL_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_onnx(predictor: str | Path, out: str | Path, config: OnnxConfig | None = None, *,
                heldout: list[str] | None = None, threads: int = DEFAULTS["threads"], crossover: bool = True,
                workers: int | None = None, overwrite: bool = False, seed: int = SEED, progress: bool = True,
                **options) -> Path:
    """Export the five graphs of `predictor` (a fit folder) in each variant into folder `out`.

    `config` (or `options`, its fields by name, e.g. variants=["fp32", "int8"], tail=32) says
    which variants and how. `threads`: onnxruntime threads for the crossover measurement
    (`crossover=False` skips it; the runtime's default mode then always uses KVP where it
    applies). `workers`: processes for the per-graph work (graph_jobs.py; default: as many as
    cores and memory allow)."""
    (cfg,) = configure(options, (OnnxConfig, config))
    variants, tail, eval_n, prompt_len, cont_len = cfg.all_variants(), cfg.tail, cfg.eval_n, cfg.prompt_len, cfg.cont_len
    clock = Clock()
    out = check_output_dir(out, overwrite)
    pipe = load_source(predictor, seed, clock)
    base, aux, pred, tok = pipe.base, pipe.aux, pipe.predictor, pipe.tokenizer
    spec, aux_spec = ArchSpec.of(base), ArchSpec.of(aux)
    context = arch.context_length(base) or 0
    if prompt_len + cont_len > context > 0:
        raise KvpError(f"evaluation pairs of {prompt_len}+{cont_len} tokens exceed the context ({context})")
    ref_len = min(reference_length(tail), prompt_len)
    if tail and ref_len - REFERENCE_PAD < min_kvp_len(pipe.sink_len, tail):  # the padded reference row takes KVP
        raise KvpError(f"prompt-len {prompt_len} is too short for a tail of {tail}: use >= "
                       f"{min_kvp_len(pipe.sink_len, tail) + REFERENCE_PAD}")
    with clock.step("data"):
        corpus = data.corpus_from_spec(list(heldout) if heldout else None, "heldout")
        prompts, conts = data.eval_pairs(tok, corpus, eval_n, prompt_len, cont_len)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        bar = tqdm(total=len(GRAPHS), desc="export onnx fp32", unit="graph", disable=not progress)
        io = {}
        with clock.step("export_fp32"):
            (tmp / "fp32").mkdir()
            for name in GRAPHS:
                bar.set_postfix_str(name)
                io[name] = graph_io(export_graph(name, tmp / "fp32" / f"{name}.onnx", base, aux, pred, pipe.sink_len))
                bar.update()
        bar.close()
        with clock.step("reference"):
            ids, mask = reference_inputs(prompts, length=ref_len)
            save_reference(tmp, build_reference(base, aux, pred, pipe.sink_len, ids, mask, tok.pad_token_id, tail))
            np.savez(tmp / EVAL_PAIRS, prompts=prompts.numpy(), continuations=conts.numpy())
        # every graph's own work (FLOPs, quantization, hashes, optimised copy) in parallel workers
        qopts = {"keep_fp32": arch.adapter(base).int8_keep_fp32,
                 **cfg.model_dump(include={"block_size", "accuracy_level", "int8_method", "int4_method"})}
        jobs = flops_jobs(tmp / "fp32", spec, aux_spec, pipe.sink_len, tail)
        jobs |= {(v, name): (variant_graph, (tmp, v, name, qopts)) for v in variants for name in GRAPHS}
        largest = max((tmp / "fp32" / f"{name}.onnx").stat().st_size for name in GRAPHS)
        n_workers = workers or worker_count(largest, len(jobs))
        with clock.step("graphs"):
            done = run_graph_jobs(jobs, n_workers, progress)
        for result in done.values():  # the workers' digests: write_manifest hashes no graph again
            if isinstance(result, dict) and "digests" in result:
                remember(result.pop("digests"))
        flops = {name: done[("flops", name)] for name in GRAPHS}
        quant = {v: {name: done[(v, name)]["quantization"] for name in GRAPHS} for v in variants[1:]}
        files = {v: {name: done[(v, name)]["files"] for name in GRAPHS} for v in variants}
        optimized = {v: {name: done[(v, name)]["optimized"] for name in GRAPHS} for v in variants}
        tok.save_pretrained(tmp / "tokenizer")
        base_dir = Path(pipe.manifest["inputs"]["base"]["path"])
        genai = {}
        for variant in variants:
            copy_model_files(base_dir, tmp / "tokenizer", tmp / variant)
            genai[variant] = genai_files(tmp, variant, write_genai_config(
                tmp / variant, spec, context=context, bos_token_id=tok.bos_token_id,
                eos_token_ids=sorted(pipe.eos_ids), pad_token_id=tok.pad_token_id))
        manifest_fields = {
            "model": {
                "model_type": spec.model_type, "base_layers": spec.n_layers, "aux_layers": aux_spec.n_layers,
                "kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim, "vocab": spec.vocab, "context": context,
                "sink_len": pipe.sink_len, "eos_token_ids": sorted(pipe.eos_ids), "pad_token_id": tok.pad_token_id,
                # per base layer, its sliding window (None: full attention); runtimes settle the
                # sink after KVP's first step only where a window is (kvp_validate.runtime.settle_sinks)
                "windows": [arch.adapter(base).window(i) for i in range(spec.n_layers)],
                "tail": tail,
            },
            "tokenizer": {"folder": "tokenizer", "sha256": sha256_file(tmp / "tokenizer" / "tokenizer.json"),
                          "vocab_size": len(tok)},
            "io": io,
            "variants": files,
            "optimized": optimized,
            "genai": genai,
            "quantization": quant,
            "flops": flops,
            "reference": {"file": "reference.npz", "greedy_tokens": 8},
            "eval": {"file": EVAL_PAIRS, "n": eval_n, "prompt_len": prompt_len, "cont_len": cont_len,
                     "heldout": corpus.description},
        }
        inputs = source_inputs(pipe, predictor)
        recipe = {"variants": variants, **cfg.model_dump(include={"block_size", "accuracy_level", "int8_method",
                                                                   "int4_method"}),
                  "opset": OPSET, "seed": seed, "tail": tail}
        write_manifest(tmp, "onnx", inputs=inputs, recipe=recipe, **manifest_fields)
        if crossover:  # measured on the graphs as written, through the runtime that will use it
            with clock.step("crossover"):
                manifest_fields["crossover"] = measure_crossovers(tmp, variants, threads)
        write_manifest(tmp, "onnx", inputs=inputs, recipe=recipe, **manifest_fields, **clock.record())
    return out


def measure_crossovers(folder: Path, variants: list[str], threads: int) -> dict:
    """Per variant, the prompt length from which KVP beats the base (kvp_validate.crossover)."""
    from kvp_validate.crossover import find_crossover, lengths_for
    from kvp_validate.machine import machine
    from kvp_validate.runtime import OnnxKVP
    from kvp_validate.ttft import prefill_timer

    out = {}
    for v in variants:
        rt = OnnxKVP(folder, v, threads, crossover=None)
        rt.load("auto")
        # against the path the default mode takes below the crossover: the base through its decoder
        found = find_crossover(prefill_timer(rt), lengths_for(rt.min_kvp_len, rt.model.get("context")),
                               base="base_decoder")
        out[v] = {**found, "threads": threads, "cpu": machine()["cpu"], "isa": machine()["isa"]}
    return out


def graph_io(io) -> dict:
    return {"inputs": io.inputs, "outputs": io.outputs, "optional": io.optional}


def genai_files(root: Path, variant: str, config: Path) -> dict:
    """The manifest's entry for a variant's onnxruntime-genai folder (genai.py)."""
    entry = {"config": f"{variant}/{config.name}", "sha256": sha256_file(config), "decoder": f"{variant}/base_decode.onnx"}
    tokenizer_dir = json.loads(config.read_text())["model"].get("tokenizer_dir")
    if tokenizer_dir:  # genai's corrected copy of a GGUF-converted byte-level tokenizer (genai.py)
        entry["tokenizer_dir"] = f"{variant}/{tokenizer_dir}"
        entry["tokenizer_sha256"] = sha256_file(root / variant / tokenizer_dir / "tokenizer.json")
    return entry


def copy_model_files(base_dir: Path, tokenizer_dir: Path, dst: Path) -> None:
    """config + tokenizer beside the graphs: what optimum needs to load a variant folder."""
    for name in MODEL_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, dst / name)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, dst / name)


def _feeds_prefill(n: int, with_pos: bool) -> dict[str, np.ndarray]:
    feeds = {"input_ids": np.ones((1, n), np.int64), "attention_mask": np.ones((1, n), np.int64)}
    if with_pos:
        feeds["position_ids"] = np.arange(n, dtype=np.int64)[None]
    return feeds


def _feeds_decode(spec: ArchSpec, past: int, new: int) -> dict[str, np.ndarray]:
    kv = np.zeros((1, spec.n_kv_heads, past, spec.head_dim), np.float32)
    feeds = {"input_ids": np.ones((1, new), np.int64), "attention_mask": np.ones((1, past + new), np.int64),
             "position_ids": np.arange(past, past + new, dtype=np.int64)[None],
             "logits_to_keep": np.array(1, np.int64)}  # as the runtime runs KVP's first step
    return feeds | dict.fromkeys(kv_names("past_key_values", spec.n_layers), kv)


def flops_jobs(folder: Path, base: ArchSpec, aux: ArchSpec, sink_len: int, tail: int = 0) -> dict:
    """graph_jobs jobs that count each fp32 graph's FLOPs per sequence, as polynomial
    coefficients (lowest degree first). Prefill graphs: in the prompt length N. Decoders: in
    the past length P, for one new token ("step") and, for the base, for KVP's first step (the
    sink tokens + the last one, + the tail's W tokens where the export has a tail)."""
    lengths, pasts = [8, 16, 32], [8, 16]
    jobs = {}
    for name in ("kvp_prefill", "base_prefill", "aux_prefill"):
        series = {"coef": (lengths, [_feeds_prefill(n, name != "kvp_prefill") for n in lengths])}
        jobs[("flops", name)] = (flops_job, (folder / f"{name}.onnx", "prompt_len", series))
    for name, spec in (("base_decode", base), ("aux_decode", aux)):
        news = {"step": 1, "first_step": sink_len + 1 + tail} if name == "base_decode" else {"step": 1}
        series = {key: (pasts, [_feeds_decode(spec, p, new) for p in pasts]) for key, new in news.items()}
        jobs[("flops", name)] = (flops_job, (folder / f"{name}.onnx", "past_len", series))
    return jobs
