"""`kvp`: the pipeline's verbs, thin over the stage functions.

A user error (KvpError) prints `error: <one line>` on stderr and exits 1, without a
traceback; click's own usage errors keep exit code 2. Results go to stdout, progress to
stderr.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import time
from pathlib import Path

import click

from kvp_validate.contract import REPORT_MD
from kvp_validate.options import DEFAULTS as VALIDATE_DEFAULTS
from kvp_validate.protocol import MODES
from kvp_validate.sampling import MAX_NEW_TOKENS
from kvp_validate.sampling import Sampling as SamplingParams

from . import __version__
from .cliopts import options
from .compare import METRICS
from .config import Config, CoremlConfig, DataConfig, DeriveConfig, EvalConfig, FitConfig, OnnxConfig, Seed, TrainConfig
from .distributed import launched_as_main
from .errors import KvpError
from .limits import check_limits
from .models import DEFAULT_MODEL


class KvpGroup(click.Group):
    """Turns a KvpError raised by any verb into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KvpError as e:
            lines = str(e).strip().splitlines()
            click.echo(f"error: {lines[0] if lines else type(e).__name__}", err=True)
            ctx.exit(e.exit_code)


def _progress() -> bool:
    return sys.stderr.isatty()


def output_options(f):
    f = click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (refused otherwise).")(f)
    f = click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder.")(f)
    return f


def stage_options(cls: type[Config], *, data: tuple[str, ...] = ()):
    """A stage verb's options: its config's fields (config.py), the DataConfig fields it reads,
    --seed, -o/--out and --overwrite."""
    def decorate(f):
        f = options(Seed)(output_options(f))
        f = options(DataConfig, only=data)(f) if data else f
        return options(cls, exclude=("enabled",))(f)

    return decorate


@click.group(cls=KvpGroup)
@click.version_option(__version__, prog_name="kvp")
def main():
    """KV Prediction: derive an auxiliary model, fit a KV predictor, train them, generate, evaluate."""


# --------------------------------------------------------------------------- models


@main.group()
def models():
    """The model zoo (weights shipped as PyPI wheels, cached under KVP_CACHE_DIR)."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_list(as_json: bool):
    """List zoo models and whether they are cached."""
    from .models import list_models

    rows = list_models()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        mark = "*" if r["default"] else " "
        state = "cached" if r["cached"] else "not cached"
        click.echo(f"{mark} {r['name']:<20} {r['arch']:<11} {r['layers']:>3} layers  {r['size']:>7}  "
                   f"{r['license']:<11} {state}")
    click.echo("(* default)")


@models.command("pull")
@click.argument("name")
@click.option("--force", is_flag=True, help="Rebuild the converted folder.")
def models_pull(name: str, force: bool):
    """Fetch, verify and convert zoo model NAME; print its license (on stderr) and its cache folder."""
    from .models import pull
    from .models.zoo import entry

    folder = pull(name, force=force)  # a refusal (unknown name, bad cache, hash) prints its one line alone
    click.echo(f"{name}: license {entry(name).license}; see LICENSE-NOTICE.txt in its folder", err=True)
    click.echo(folder)


# --------------------------------------------------------------------------- data


@main.group("data")
def data_group():
    """Named corpora from pinned PyPI sdists (`pypi-code`), cached under KVP_CACHE_DIR."""


def _corpus_option(f):
    return click.option("--corpus", "name", default="pypi-code", show_default=True,
                        help="The named corpus (stages take it as --calib/--heldout/--data NAME).")(f)


@data_group.command("build")
@_corpus_option
@click.option("--tokenizer", default=DEFAULT_MODEL, show_default=True,
              help="Model (zoo name, GGUF file or HF folder) whose tokenizer the shards are for.")
@click.option("--force", is_flag=True, help="Filter and tokenise again (cached sdists are reused while their "
              "hashes hold).")
def data_build(name, tokenizer, force):
    """Download, filter, decontaminate and split the corpus, and tokenise it into cached shards."""
    from . import corpus
    from .models import load_tokenizer

    corpus.corpus_spec(name)  # an unknown name is refused before the tokenizer's model is fetched
    built = corpus.build_corpus(name, load_tokenizer(tokenizer), force=force, progress=_progress())
    click.echo(corpus.render(corpus.info(name)), nl=False)
    click.echo(f"shards: {built['shards']}")


@data_group.command("info")
@_corpus_option
@click.option("--json", "as_json", is_flag=True, help="The whole description, machine-readable.")
def data_info(name, as_json):
    """Describe the corpus as built: projects, filter and decontamination counts, splits, shards."""
    from . import corpus

    info = corpus.info(name)
    click.echo(json.dumps(info, indent=2) if as_json else corpus.render(info).rstrip("\n"))


# --------------------------------------------------------------------------- stages


@main.command()
@click.option("--base", default=DEFAULT_MODEL, show_default=True, help="Zoo name, GGUF file or HF folder.")
@stage_options(DeriveConfig, data=("calib", "calib_tokens"))
def derive(base, out, overwrite, **kw):
    """Derive the auxiliary model folder OUT from the base."""
    from .derive import derive as run

    click.echo(run(out, base=base, overwrite=overwrite, progress=_progress(), **kw))


@main.command()
@click.option("--aux", required=True, type=click.Path(path_type=Path), help="A derive output folder.")
@click.option("--base", help="Base model (default: the one the aux manifest records).")
@stage_options(FitConfig, data=("calib", "calib_tokens"))
def fit(aux, base, out, overwrite, **kw):
    """Fit the KV predictor folder OUT for an aux folder (closed-form ridge)."""
    from .predictor.fit import fit as run

    folder = run(aux, out, base=base, overwrite=overwrite, progress=_progress(), **kw)
    if launched_as_main():
        click.echo(folder)


def predictor_option(f, required: bool = True):
    return click.option("--predictor", required=required, type=click.Path(path_type=Path), help="A fit output folder.")(f)


def model_overrides(f, required: bool = True):
    f = click.option("--base", help="Override the base the predictor manifest names.")(f)
    f = click.option("--aux", help="Override the aux folder the predictor manifest names.")(f)
    return predictor_option(f, required)


def optional_model_overrides(f):
    return model_overrides(f, required=False)


def sampling_options(f):
    """--temperature, --top-k, --top-p and --seed: the fields of the runtimes' Sampling, with its
    defaults and help."""
    for fld in reversed(dataclasses.fields(SamplingParams)):
        f = click.option("--" + fld.name.replace("_", "-"), default=fld.default, show_default=True,
                         help=fld.metadata["help"])(f)
    return f


@main.command()
@optional_model_overrides
@click.option("--onnx", "onnx_dir", type=click.Path(path_type=Path),
              help="Generate with an ONNX export folder on onnxruntime instead of PyTorch.")
@click.option("--variant", default="fp32", show_default=True, help="With --onnx: fp32, int8 or int4.")
@click.option("--threads", default=VALIDATE_DEFAULTS["threads"], show_default=True,
              help="With --onnx: onnxruntime intra-op threads.")
@click.option("--runtime", type=click.Choice(["onnxruntime", "genai"]), default="onnxruntime", show_default=True,
              help="With --onnx: our onnxruntime loop, or onnxruntime-genai (greedy; --mode base: the variant "
                   "folder's genai_config.json; kvp/auto: its genai-kvp/ pipeline, from `kvp export genai-kvp`).")
@click.option("--mode", type=click.Choice(MODES), default=MODES[0], show_default=True,
              help="auto: KVP from the crossover prompt length on (measured at export for --onnx; measured once "
                   "and cached for PyTorch), the base prefill below it; kvp / base force either; aux (--onnx "
                   "only): the aux alone.")
@click.option("--crossover", type=int, default=None,
              help="With --mode auto: use KVP from this prompt length on, instead of the measured crossover.")
@click.option("--tail", type=click.IntRange(min=0), default=None,
              help="KVP's exact tail: the base reads the prompt's last TAIL tokens (and the last one) over the "
              "predicted cache (default: the ONNX export's `model.tail`; 0 on the PyTorch path).")
@click.option("--aux-only", is_flag=True, help="Same as --mode aux.")
@click.option("--no-kvp", is_flag=True, help="Same as --mode base.")
@click.option("--warm-repeats", default=3, show_default=True,
              help="Prefill the batch this many more times and report the median as the warm TTFT (0: skip).")
@click.option("--max-new-tokens", default=MAX_NEW_TOKENS, show_default=True, help="Tokens to generate at most.")
@sampling_options
@click.option("--prompts-file", type=click.Path(path_type=Path),
              help="Prompts, one per line, or JSONL (a string or {\"prompt\": ...} per line).")
@click.option("--prefix", help="A fixed system/template text put before every prompt; the base computes its "
              "KV exactly, once (an extended sink).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("prompt", nargs=-1)
def generate(predictor, aux, base, onnx_dir, variant, threads, runtime, mode, crossover, tail, aux_only, no_kvp,
             warm_repeats, max_new_tokens, temperature, top_k, top_p, seed, prompts_file, prefix, as_json, prompt):
    """Generate from PROMPT(s); print completions, the load time and the time to first token.

    Loading (models or onnxruntime sessions) is timed apart from TTFT; TTFT is given for this
    first call after loading and warm (the median of --warm-repeats more prefills)."""
    from .runtime.decode import Sampling
    from .runtime.pipeline import KVPPipeline, read_prompts

    prompts = list(prompt) + (read_prompts(prompts_file) if prompts_file else [])
    if not prompts:
        raise KvpError("no prompts given (pass PROMPT arguments or --prompts-file)")
    if (predictor is None) == (onnx_dir is None):
        raise KvpError("pass exactly one of --predictor (PyTorch) or --onnx (an ONNX export folder)")
    if runtime == "genai" and onnx_dir is None:
        raise KvpError("--runtime genai needs --onnx (an ONNX export folder)")
    if aux_only and no_kvp:
        raise KvpError("pass at most one of --aux-only and --no-kvp")
    mode = "aux" if aux_only else "base" if no_kvp else mode
    check_limits(threads=threads, crossover=crossover, tail=tail)  # absurd numbers (limits.py)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    sampling.check_call(max_new_tokens, warm_repeats)  # before loading anything
    if onnx_dir is not None:
        if prefix or aux or base:
            raise KvpError("--prefix, --aux and --base apply to the PyTorch path only")
        if runtime == "genai":
            if tail:
                raise KvpError("--runtime genai takes no --tail (onnxruntime-genai's KVP pipeline has no exact tail)")
            _generate_genai(onnx_dir, variant, threads, mode, crossover, prompts, max_new_tokens, sampling, as_json)
            return
        _generate_onnx(onnx_dir, variant, threads, mode, crossover, prompts, max_new_tokens, sampling, warm_repeats,
                       as_json, tail)
        return
    if mode == "aux":
        raise KvpError("--mode aux needs --onnx (the PyTorch path generates with the base)")
    t0 = time.perf_counter()
    pipe = KVPPipeline.from_predictor(predictor, aux=aux, base=base, tail=tail or 0)
    load = {"models": time.perf_counter() - t0}
    g = pipe.generate(prompts, max_new_tokens=max_new_tokens, sampling=sampling, mode=mode, prefix=prefix,
                      warm_repeats=warm_repeats, crossover=-1 if crossover is None else crossover)
    timing = {"runtime": "PyTorch", "path": "kvp" if g.kvp else "base", "mode": mode, "tail": pipe.tail, "crossover": g.crossover,
              "load_ms": {k: v * 1e3 for k, v in load.items()}, "ttft_first_call_ms": g.prefill_seconds * 1e3,
              "ttft_warm_ms": None if g.warm_prefill_seconds is None else g.warm_prefill_seconds * 1e3,
              "warm_repeats": warm_repeats,
              **({"crossover_calibration_ms": g.seconds["crossover_calibration"] * 1e3}
                 if "crossover_calibration" in g.seconds else {})}
    _print_generation(g, as_json, timing)


def _print_generation(g, as_json: bool, timing: dict) -> None:
    """Completions (or the whole generation and its timing as JSON), then the timing lines."""
    if as_json:
        click.echo(json.dumps({**dataclasses.asdict(g), "timing": timing}, indent=2, ensure_ascii=False))
        return
    for i, (p, c, n_p, ids) in enumerate(zip(g.prompts, g.completions, g.prompt_tokens, g.token_ids), 1):
        click.echo(f"--- [{i}] prompt {n_p} tokens, completion {len(ids)} tokens ---")
        click.echo(p + c)
    for line in timing_lines(timing, len(g.prompts)):
        click.echo(line)


def timing_lines(t: dict, batch: int) -> list[str]:
    """Load time, first-call TTFT and warm TTFT as separate, labelled lines."""
    def ms(x: float) -> str:
        return f"{x:.1f} ms"

    def parts(d: dict) -> str:
        inner = ", ".join(f"{k} {ms(v)}" for k, v in d.items() if k not in ("total", "wall"))
        return f" ({inner})" if inner else ""

    load = t["load_ms"]
    total = load.get("wall", sum(load.values()))
    lines = [f"load ({t['runtime']}): {ms(total)}{parts(load)}" if load else f"load ({t['runtime']}): already loaded"]
    if "crossover_calibration_ms" in t:
        lines.append(f"crossover calibration (once, then cached): {ms(t['crossover_calibration_ms'])}")
    why = f"mode {t['mode']}"
    if t["mode"] == "auto":
        why += f", KVP from {t['crossover']} tokens on" if t["crossover"] is not None else ", KVP never pays here"
    lines.append(f"path: {t['path']} ({why})")
    lines.append(f"TTFT of the batch of {batch}, first call after loading: {ms(t['ttft_first_call_ms'])}"
                 f"{parts(t.get('first_call_parts_ms', {}))}")
    if t["ttft_warm_ms"] is not None:
        lines.append(f"TTFT warm (median of {t['warm_repeats']} more calls): {ms(t['ttft_warm_ms'])}"
                     f"{parts(t.get('warm_parts_ms', {}))}")
    return lines


def _generate_onnx(folder, variant, threads, mode, crossover, prompts, max_new_tokens, sampling, warm_repeats,
                   as_json, tail=None):
    from kvp_validate.runtime import OnnxKVP

    rt = OnnxKVP(folder, variant, threads, tail=tail, **({"crossover": crossover} if crossover is not None else {}))
    g = rt.generate(prompts, max_new_tokens=max_new_tokens, mode=mode, warm_repeats=warm_repeats,
                    sampling=sampling)  # the PyTorch Sampling is the validator's, plus torch processors
    timing = {"runtime": f"onnxruntime {variant}, {threads} threads", "path": g.mode, "mode": mode, "tail": rt.tail,
              "crossover": g.crossover, "load_ms": {k: v * 1e3 for k, v in g.load_seconds.items()},
              "ttft_first_call_ms": g.ttft_seconds * 1e3,
              "first_call_parts_ms": {k: v * 1e3 for k, v in g.seconds.items()},
              "ttft_warm_ms": None if g.warm_ttft_seconds is None else g.warm_ttft_seconds * 1e3,
              "warm_parts_ms": {k: v * 1e3 for k, v in g.warm_seconds.items()}, "warm_repeats": warm_repeats}
    _print_generation(g, as_json, timing)


def _generate_genai(folder, variant, threads, mode, crossover, prompts, max_new_tokens, sampling, as_json):
    """One genai generator per prompt (genai 0.18 does not mask a padded batch); greedy only. "auto"
    picks one path for the batch as our runtime does: KVP from the crossover (the export's, or
    `crossover`) on, by the padded length."""
    from kvp_validate.genai import GenaiBase
    from kvp_validate.runtime import Generation, OnnxKVP

    if mode == "aux":
        raise KvpError("--runtime genai runs the base (--mode base) or KVP (--mode kvp / auto), not the aux")
    if sampling.temperature > 0:
        raise KvpError("--runtime genai is greedy here (--temperature 0)")
    # the export's checks, tokenizer, context and crossover
    rt = OnnxKVP(folder, variant, threads, crossover=-1 if crossover is None else crossover)
    ids, mask = rt.encode(prompts, extra=max_new_tokens)
    rows = [r[m.astype(bool)].tolist() for r, m in zip(ids, mask)]
    path = "kvp" if rt.resolve(mode, ids, mask) == "kvp" else "base"
    if mode == "kvp" and path == "base":
        raise KvpError(f"a prompt is shorter than KVP's minimum of {rt.min_kvp_len} tokens (use --mode base)")
    if path == "base":  # genai loads the variant's own base_decode (genai-kvp/ is checked by GenaiBase)
        rt.art.verify_graph(variant, "base_decode")
    model = GenaiBase(folder, variant, kvp=path == "kvp", threads=threads)
    runs = [model.run(r, max_new_tokens) for r in rows]
    tokens = [t for t, _ in runs]
    texts = [rt.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    ttft = sum(s for _, s in runs)
    g = Generation(list(prompts), texts, tokens, [len(r) for r in rows], ttft, {"genai": ttft, "total": ttft}, path,
                   {"genai_model": model.load_seconds}, None, {}, None)
    timing = {"runtime": f"onnxruntime-genai {variant}, {threads} threads", "path": path, "mode": mode,
              "crossover": rt.crossover if mode == "auto" else None, "load_ms": {"genai_model": model.load_seconds * 1e3},
              "ttft_first_call_ms": ttft * 1e3, "first_call_parts_ms": {f"prompt {i + 1}": s * 1e3
                                                                        for i, (_, s) in enumerate(runs)},
              "ttft_warm_ms": None, "warm_repeats": 0}
    _print_generation(g, as_json, timing)


@main.command("eval")
@model_overrides
@stage_options(EvalConfig, data=("heldout",))
def eval_(predictor, aux, base, out, overwrite, **kw):
    """Evaluate a predictor against the base, the aux alone and trivial baselines; write a report."""
    from .evaluate import run_eval

    folder = run_eval(predictor, out, aux=aux, base=base, overwrite=overwrite, progress=_progress(), **kw)
    click.echo((folder / REPORT_MD).read_text(), nl=False)
    click.echo(f"kvp: report written to {folder}", err=True)


# --------------------------------------------------------------------------- export and validate


@main.group()
def export():
    """Export base + aux + predictor as deployable graphs."""


def _export_verb(name: str, cls: type[Config], stage: str, doc: str):
    """`kvp export NAME`: the stage function `stage` ("module:function" in this package, imported
    when the verb runs) over a predictor folder, with its config's options."""

    @export.command(name, help=doc)
    @predictor_option
    @stage_options(cls, data=("heldout",))
    def verb(predictor, out, overwrite, **kw):
        module, fn = stage.split(":")
        run = getattr(importlib.import_module(module, __package__), fn)
        click.echo(run(predictor, out, overwrite=overwrite, progress=_progress(), **kw))

    return verb


export_onnx_cmd = _export_verb("onnx", OnnxConfig, ".export.onnx_export:export_onnx",
                               "Export kvp_prefill, base_decode, base_prefill and the aux graphs to OUT (fp32, int8, int4).")
export_coreml_cmd = _export_verb("coreml", CoremlConfig, ".export.coreml.export:export_coreml",
                                 "Convert base + aux + predictor into Core ML packages in OUT (float16 and compressed "
                                 "variants).")


@export.command("genai-kvp")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--variant", "variants", multiple=True, help="Variants (default: all in the export).")
def export_genai_kvp_cmd(export_dir, variants):
    """KVP under onnxruntime-genai: write <variant>/genai-kvp/ (a decoder-pipeline: KVP's prompt stage, then
    base_decode) into an ONNX export folder."""
    from kvp_validate.artifact import OnnxArtifact

    from .export.genai_kvp import write_genai_kvp

    for v in variants or OnnxArtifact.open(export_dir).variants:
        click.echo(write_genai_kvp(export_dir, v))


from kvp_validate.cli import validate_cmd  # noqa: E402 - torch-free; shared with `kvp-validate`

main.add_command(validate_cmd, "validate")


@main.command()
@click.option("--predictor", type=click.Path(path_type=Path),
              help="A fit folder: training starts from its aux and ridge predictor.")
@click.option("--aux", type=click.Path(path_type=Path),
              help="Override the aux the predictor names; with --baseline, the aux (derive folder) to fine-tune.")
@click.option("--base", help="Override the base the manifests name.")
@click.option("--baseline", is_flag=True,
              help="Fine-tune the aux alone with plain CE on the same budget (the paper's OE-LP baseline).")
@click.option("--data", multiple=True, metavar="PATH",
              help="Training text: files, folders or JSONL, or a named corpus (pypi-code); repeatable (default: "
              "the calibration split of stdlib + Shakespeare, as for fit). Held-out loss: its held-out split.")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), help="Where checkpoints go (default: OUT.ckpt).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint, if there is one.")
@click.option("--stop-after", type=int, help="Checkpoint and stop after this many steps in this call.")
@click.option("--max-minutes", type=float, help="Checkpoint and stop once this call has run this long.")
@click.option("--finish-after", type=float, help="A time budget in minutes: once this call has run this long, end "
              "the run as if its last step were done (held-out evaluation, OUT written with the best weights).")
@stage_options(TrainConfig)
def train(data, out, **kw):
    """Train the aux and predictor of a fit folder end to end through the frozen base; write OUT.

    Runs the same under `torchrun --nproc_per_node N` (DDP or FSDP). Prints OUT when done;
    when stopped early it prints nothing and a later call with --resume continues.
    """
    from .train import train as run

    result = run(out, data=list(data), progress=_progress(), **kw)
    if result is not None and launched_as_main():
        click.echo(result)


# --------------------------------------------------------------------------- recipes


@main.command("run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field, e.g. --set fit.sink=2 --set export.onnx.variants=[fp32,int8] "
              "(the value is YAML; validated like the file).")
@click.option("-o", "--out", type=click.Path(path_type=Path),
              help="Run folder (default: runs/<recipe name>). A rerun reuses its finished stages.")
@click.option("--junit", type=click.Path(path_type=Path), metavar="PATH",
              help="Also write JUnit XML: one test case per stage, gate and parity check.")
@click.option("--force", is_flag=True, help="Run every stage again, even those already in the run folder.")
@click.option("--dry-run", is_flag=True, help="Check the recipe, print it with defaults filled in, run nothing.")
@click.option("--allow-unsafe-execution", is_flag=True,
              help="validate.checks humaneval: execute generated code even where no OS sandbox (bubblewrap) is "
                   "available (docs/sandbox.md).")
def run_cmd(recipe, overrides, out, junit, force, dry_run, allow_unsafe_execution):
    """Run RECIPE: derive -> fit (or train) -> export -> validate, each stage cached; exit 3 if a gate fails."""
    import yaml

    from kvp_validate.gates import GATE_FAILED

    from .recipe import load_recipe
    from .run import default_run_dir, run_recipe

    r = load_recipe(recipe, overrides)
    if r.name is None:
        r.name = r.label(recipe)
    if dry_run:
        click.echo(yaml.safe_dump(r.dump(), sort_keys=False), nl=False)
        click.echo("gates: " + (", ".join(r.onnx_gates()) or "none"), err=True)
        return
    run_dir = out or default_run_dir(r, recipe)
    res = run_recipe(r, run_dir, progress=_progress(), force=force, junit=junit,
                     allow_unsafe_execution=allow_unsafe_execution)
    for s in res.stages:
        click.echo(f"{s.name:<16} {s.status:<7} {s.seconds:>8.1f} s  {s.folder}")
    passed = sum(g["ok"] for g in res.gates)
    verdict = f"{passed}/{len(res.gates)} passed" if res.gates else "none (validation off or no gates set)"
    click.echo(f"gates: {verdict}; {res.seconds:.1f} s; report: {run_dir / 'report.md'}")
    for g in res.failed_gates:
        why = g.get("reason") or f"measured {g['key']} = {g['value']:g}"
        click.echo(f"gate failed: {g['gate']} ({why})", err=True)
    if junit:
        click.echo(f"kvp: JUnit XML written to {junit}", err=True)
    if res.failed_gates:
        sys.exit(GATE_FAILED)


@main.command("compare")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Folder for compare.md, compare.json and pareto.png.")
@click.option("--at", help="TTFT point (BATCHxLENGTH, e.g. 1x512) for the plot (default: batch 1, longest common).")
@click.option("--metric", type=click.Choice(list(METRICS)), default=next(iter(METRICS)), show_default=True,
              help="Quality on the plot's y axis.")
@click.option("--title", default="KVP variants compared", show_default=True)
def compare_cmd(inputs, out, at, metric, title):
    """Compare runs (run folders) or validation reports: one table and a Pareto plot of quality vs TTFT."""
    from .compare import collect, render

    payload = render(collect(list(inputs)), out, at=at, metric=metric, title=title)
    click.echo((Path(out) / "compare.md").read_text(), nl=False)
    click.echo(f"kvp: {len(payload['rows'])} rows; compare.md, compare.json"
               f"{', pareto.png' if payload['pareto']['png'] else ''} in {out}", err=True)


if __name__ == "__main__":  # `python -m kvp_export.cli`, for older torchrun lines: last, after every verb
    main()
