"""export coreml: a predictor folder (with its aux and base) -> a Core ML artifact folder.

Layout (all of it described by manifest.json, which the validator reads):
  ios18-<compression>/kvp.mlpackage    stateful multifunction package: prefill + decode (default),
                                       sharing weights and the key_cache / value_cache states;
  ios17-<compression>/kvp_prefill.mlpackage, kvp_decode.mlpackage
                                       the stateless pair (the cache as inputs and outputs);
  tokenizer/                           the tokenizer the validator encodes with;
  reference.npz                        a held-out prompt, the HF path's greedy tokens and logits
                                       (parity on a Mac).
Batch 1 throughout: the Neural Engine serves one sequence at a time well, and a batch
would multiply the cache state. Float16 compute, weights float16 or compressed.

Linux checks recorded in the manifest: the converted PyTorch modules against the HF path
(checks.numeric_check), each package's interface, op inventory and Neural Engine lint
(kvp_validate.mlpackage), and its weights read back against the source (checks.weights_check).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from kvp_validate import mlpackage
from kvp_validate.protocol import min_kvp_len

from ... import data
from ...artifacts import atomic_dir, check_output_dir, sha256_dir, sha256_file, write_manifest
from ...config import SEED, CoremlConfig, configure
from ...errors import KvpError
from ...models.arch import ArchSpec, context_length
from ...stage import Clock, check_paths
from ..source import load_source, source_inputs
from . import checks, compress, convert
from .stateful import build

REFERENCE = "reference.npz"
REFERENCE_STEPS = 8  # greedy tokens in the reference (the prefill's and 7 decode steps)


def check_shapes(context: int, prompt_lengths, sink_len: int, limits: dict[str, int]) -> tuple[int, ...]:
    """Refuse a context the models cannot hold and prompt lengths that do not fit it."""
    for name, limit in limits.items():
        if limit and context > limit:
            raise KvpError(f"context {context} is longer than the {name} supports ({limit})")
    lengths = tuple(sorted(set(int(n) for n in prompt_lengths)))  # the config refused an empty list, or no room
    if lengths[0] < min_kvp_len(sink_len):
        raise KvpError(f"prompt length {lengths[0]} is too short: KVP with a {sink_len}-token sink needs at least "
                       f"{min_kvp_len(sink_len)} tokens")
    return lengths


def export_coreml(predictor: str | Path, out: str | Path, config: CoremlConfig | None = None, *,
                  heldout: list[str] | None = None, overwrite: bool = False, seed: int = SEED, progress: bool = True,
                  **options) -> Path:
    """Convert `predictor` (a fit folder) into Core ML packages, one per target x compression, in `out`.

    `config` (or `options`, its fields by name, e.g. targets=["ios17"]) says which."""
    clock = Clock()
    out = check_output_dir(out, overwrite)
    (cfg,) = configure(options, (CoremlConfig, config))
    targets, compressions = tuple(dict.fromkeys(cfg.targets)), tuple(dict.fromkeys(cfg.compress))
    context, block_size, group_size = cfg.context, cfg.block_size, cfg.group_size
    check_paths(heldout, "held-out")
    pipe = load_source(predictor, seed, clock)
    base, aux, pred, tok = pipe.base, pipe.aux, pipe.predictor, pipe.tokenizer
    limits = {name: context_length(m) or 0 for name, m in (("base", base), ("aux", aux))}
    lengths = check_shapes(context, cfg.prompt_lengths, pipe.sink_len, limits)
    shapes = convert.shapes_for(base, context, lengths)
    spec = ArchSpec.of(base)
    with clock.step("data"):
        n_ref = min(24, lengths[0] - 1)
        prompt, _ = data.eval_pairs(tok, data.corpus_from_spec(list(heldout) if heldout else None, "heldout"),
                                    1, n_ref, REFERENCE_STEPS)
    with clock.step("reference"):
        ref_tokens, ref_logits = checks.reference(base, aux, pred, pipe.sink_len, prompt, REFERENCE_STEPS)

    variants: dict[str, dict] = {}
    numeric: dict[str, dict] = {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        bar = tqdm(total=len(targets) * len(compressions), desc="export coreml", unit="package", disable=not progress)
        for target in targets:
            stateful = target == "ios18"
            modules = dict(zip(("prefill", "decode"), build(base, aux, pred, pipe.sink_len, context, stateful)))
            with clock.step(f"check_{target}"):
                numeric[target] = checks.numeric_check(modules["prefill"], modules["decode"], stateful, prompt,
                                                       lengths[0], ref_tokens, ref_logits)
            if not numeric[target]["ok"]:
                raise KvpError(f"the {target} modules do not match the PyTorch KVP path before conversion: "
                               f"{_numeric_summary(numeric[target])}")
            t0 = time.perf_counter()
            models = convert.convert_models(base, aux, pred, pipe.sink_len, shapes, target)
            convert_s = time.perf_counter() - t0
            clock.steps[f"convert_{target}"] = round(convert_s, 3)
            for name in compressions:
                key = f"{target}-{name}"
                bar.set_postfix_str(key)
                t0 = time.perf_counter()
                with np.errstate(divide="ignore", invalid="ignore"):  # all-zero rows quantize to scale 0
                    packed = {role: compress.compress(m, name, block_size, group_size) for role, m in models.items()}
                compress_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                paths = convert.save_target(packed, target, tmp / key)
                save_s = time.perf_counter() - t0
                with clock.step(f"inspect_{key}"):
                    variants[key] = describe_variant(tmp, target, name, paths, modules)
                total = convert_s + compress_s + save_s
                variants[key]["seconds"] = {"convert": round(convert_s, 2), "compress": round(compress_s, 2),
                                            "save": round(save_s, 2), "total": round(total, 2)}
                clock.steps[f"compress_save_{key}"] = round(compress_s + save_s, 3)
                bar.update()
        bar.close()
        np.savez(tmp / REFERENCE, input_ids=prompt.numpy().astype(np.int32), tokens=ref_tokens.numpy().astype(np.int32),
                 logits=ref_logits.numpy().astype(np.float32))
        tok.save_pretrained(tmp / "tokenizer")
        failed = [(k, v["weights"]) for k, v in variants.items() if not v["weights"]["ok"]]
        if failed:
            k, w = failed[0]
            what = (f"no source for {w['unmatched'][0]}" if w["unmatched"] else
                    f"{w['worst']} differs by {w['max_rel']:.3g} (> {w['tolerance']})")
            raise KvpError(f"weights read back from {k} do not match the source: {what}")
        write_manifest(tmp, "coreml", inputs=source_inputs(pipe, predictor), recipe={"context": context, "prompt_lengths": list(lengths), "targets": list(targets),
                   "compressions": {c: compress.describe(c, block_size, group_size) for c in compressions},
                   "compute_precision": "float16", "batch": 1, "seed": seed},
            model={"model_type": spec.model_type, "base_layers": spec.n_layers, "aux_layers": ArchSpec.of(aux).n_layers,
                   "kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim, "vocab": spec.vocab, "context": context,
                   "prompt_lengths": list(lengths), "cache_shape": list(shapes.cache), "sink_len": pipe.sink_len,
                   "eos_token_ids": sorted(pipe.eos_ids), "pad_token_id": tok.pad_token_id},
            tokenizer={"folder": "tokenizer", "sha256": sha256_file(tmp / "tokenizer" / "tokenizer.json")},
            variants=variants,
            checks={"numeric": numeric},
            reference={"file": REFERENCE, "steps": REFERENCE_STEPS, "prompt_tokens": int(prompt.shape[1]),
                       "source": "HF base/aux/predictor path (runtime/kvp.py), float32"},
            **clock.record())
    return out


def describe_variant(root: Path, target: str, compression: str, paths: dict[str, Path], modules: dict) -> dict:
    """Files, interface, ops, lint and weights read back of one saved variant."""
    packages, programs = {}, {}
    for role, path in paths.items():
        programs[role] = prog = mlpackage.program(path)
        iface = mlpackage.interface(path)
        packages[role] = {"path": str(path.relative_to(root)), "bytes": mlpackage.package_bytes(path),
                          "sha256": sha256_dir(path), "interface": iface, "ops": mlpackage.ops(prog),
                          "lint": mlpackage.lint(prog, iface)}
    return {"target": target, "compression": compression, "stateful": target == "ios18",
            "multifunction": target == "ios18", "packages": packages,
            "bytes": sum(p["bytes"] for p in packages.values()),
            "weights": checks.weights_check(programs, modules, compression)}


def _numeric_summary(r: dict) -> str:
    return "; ".join(f"{p}: max |diff| {r[p]['max_abs_diff']:.3g} (rel {r[p]['rel']:.3g} > {r[p]['tolerance']})"
                     for p in ("float32", "float16") if not r[p]["ok"])
