"""The stages through the Python API: derive -> fit -> generate -> eval on tiny models, and
the exactness acceptance test (aux = base + identity predictor => KVP == base)."""

from __future__ import annotations

import json

import pytest
import torch

from kvp_export.artifacts import read_manifest
from kvp_export.derive import derive
from kvp_export.derive.prune import prune
from kvp_export.errors import KvpError
from kvp_export.evaluate import run_eval
from kvp_export.models import load
from kvp_export.predictor.fit import fit
from kvp_export.predictor.module import KVPredictor
from kvp_export.runtime.decode import Sampling
from kvp_export.runtime.pipeline import KVPPipeline, read_prompts

pytestmark = pytest.mark.usefixtures("isolated_cache")

PROMPTS = ["w1 w2 w3 def ( w4 ) : return w5 w6 w7 the fox", "the fox w9 w8"]


def calib_kw(assets) -> dict:
    return {"calib": [str(assets["corpus"])], "calib_tokens": 2048, "progress": False}


# --------------------------------------------------------------------------- end to end


def test_fit_from_healing_activations_equals_a_fit_that_runs_the_models(assets, tmp_path, built):
    """`kvp run` hands healing's passes over the calibration text to the fit (predictor/shared.py):
    the aux is the one a plain derive heals, and the predictor the one a plain fit finds."""
    from safetensors.torch import load_file

    from kvp_export.predictor import shared

    aux = derive(tmp_path / "aux", base=str(assets["llama"]), keep=0.5, heal="bridge", share=True, **calib_kw(assets))
    assert shared.pending()
    pred = fit(aux, tmp_path / "pred", **calib_kw(assets))
    assert not shared.pending()  # taken, and the store freed
    for name, folder in (("model.safetensors", "aux"), ("predictor.safetensors", "pred")):
        got, want = load_file(tmp_path / folder / name), load_file(built[folder] / name)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    report = read_manifest(pred, "predictor")["fit_report"]
    assert report["activations"] == {"base": "from derive", "aux": "from derive"}
    assert read_manifest(built["pred"], "predictor")["fit_report"]["activations"] == {"base": "computed",
                                                                                     "aux": "computed"}


def test_device_option_computes_the_same_and_refuses_a_missing_gpu(assets, tmp_path, built):
    """derive / fit / eval take `device` (the GPU run uses cuda). Where it resolves to the CPU the
    stages compute what the default does; the block changes the default device only off the CPU;
    cuda without a GPU is one line before any model loads."""
    from safetensors.torch import load_file

    from kvp_export.stage import compute_device

    with compute_device("cpu") as dev:
        assert dev.type == "cpu" and torch.zeros(1).device.type == "cpu"
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU: 'auto' would not be the CPU")
    with pytest.raises(KvpError, match="no CUDA device"):
        derive(tmp_path / "never", base=str(assets["llama"]), keep=0.5, device="cuda", **calib_kw(assets))
    assert not (tmp_path / "never").exists()
    aux = derive(tmp_path / "aux", base=str(assets["llama"]), keep=0.5, heal="bridge", device="auto",
                 **calib_kw(assets))
    pred = fit(aux, tmp_path / "pred", device="auto", **calib_kw(assets))
    for name, folder, ours in (("model.safetensors", "aux", aux), ("predictor.safetensors", "pred", pred)):
        got, want = load_file(ours / name), load_file(built[folder] / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    assert read_manifest(aux, "aux")["recipe"]["device"] == "auto"
    assert "device" not in read_manifest(built["aux"], "aux")["recipe"]  # the CPU default records nothing new
    kw = {"n": 4, "prompt_len": 24, "cont_len": 8, "greedy_tokens": 4, "heldout": [str(assets["corpus"])],
          "progress": False}
    reports = [json.loads((run_eval(built["pred"], tmp_path / f"report-{d}", device=d, **kw) / "report.json")
                          .read_text())["results"] for d in ("cpu", "auto")]
    untimed = [{p: {k: v for k, v in r.items() if k != "prefill_seconds_total"} for p, r in rep["paths"].items()}
               for rep in reports]
    assert untimed[0] == untimed[1] and reports[0]["kv_rel_error"] == reports[1]["kv_rel_error"]


def test_derive_fit_generate_eval(assets, built, tmp_path):
    """conftest's `built` (derive keep 0.5 + bridge, fit with a 1-token sink, on the tiny llama;
    every family end to end: tests/test_families.py), then generate and eval."""
    from transformers import AutoModelForCausalLM

    aux, pred, family = built["aux"], built["pred"], "llama"
    m = read_manifest(aux, "aux")
    assert m["kept_layers"] == [0, 2] and m["layer_map"] == {"kind": "lp", "map": [0, 0, 1, 1]}
    assert m["healing"]["method"] == "bridge" and len(m["healing"]["layers"]) == 2
    assert m["inputs"]["base"]["spec"] == str(assets[family]) and len(m["inputs"]["base"]["config_sha256"]) == 64
    calib = m["inputs"]["calibration"]
    assert calib["tokens"] == m["calib_tokens"] == 2048 and len(calib["tokens_sha256"]) == 64
    assert calib["corpus"]["sha256"] and calib["seq_len"] == 256
    assert m["wall_seconds"] > 0 and "heal" in m["step_seconds"]
    reloaded = AutoModelForCausalLM.from_pretrained(aux)
    assert reloaded.config.num_hidden_layers == 2 and reloaded.config.model_type == family

    pm = read_manifest(pred, "predictor")
    assert pm["layer_map"]["map"] == [0, 0, 1, 1] and pm["input_mode"] == "hidden" and pm["sink_len"] == 1
    assert len(pm["fit_report"]["alpha_k"]) == 4 and pm["calib_tokens"] == 2048 and pm["wall_seconds"] > 0
    assert pm["inputs"]["aux"]["path"] == str(aux.resolve()) and pm["inputs"]["base"]["weights_sha256"]

    pipe = KVPPipeline.from_predictor(pred)
    g = pipe.generate(PROMPTS, max_new_tokens=6, mode="kvp")
    assert g.kvp and len(g.completions) == 2 and g.prefill_seconds > 0
    assert g.prompt_tokens == [14, 4] and all(len(ids) <= 6 for ids in g.token_ids)

    rep = run_eval(pred, tmp_path / "report", n=4, prompt_len=24, cont_len=8, greedy_tokens=4,
                   heldout=[str(assets["corpus"])], progress=False)
    report = json.loads((rep / "report.json").read_text())
    paths = report["results"]["paths"]
    assert set(paths) == {"base", "aux", "kvp", "no_prompt", "mean_kv"}
    assert paths["base"]["first_token_agreement"] == 1.0 and paths["kvp"]["flops_ratio_vs_base"] > 1
    assert len(report["results"]["kv_rel_error"]["k"]) == 4 and report["sink_len"] == 1
    assert report["stages"]["derive"]["calib_tokens"] == 2048 and report["stages"]["fit"]["wall_seconds"] > 0
    md = (rep / "report.md").read_text()
    for text in ("| KVP |", "| mean KV |", "| no prompt |", "| aux alone |", "ΔNLL vs base", "greedy-4 exact",
                 "prefill GFLOPs", "FLOPs ratio", "K rel. error", "Sink length: 1", "Stage wall times"):
        assert text in md
    assert read_manifest(rep, "report")["wall_seconds"] > 0


def test_eval_uses_the_text_given_whole_unless_told_to_split(built, assets, tmp_path):
    """Files given to eval are all evaluated; --heldout-split heldout (stated in --help) takes the
    documents the calibration split of the same files leaves out."""
    from click.testing import CliRunner

    from kvp_export.cli import main

    kw = dict(n=2, prompt_len=24, cont_len=8, greedy_tokens=2, heldout=[str(assets["corpus"])], progress=False)
    whole = json.loads((run_eval(built["pred"], tmp_path / "whole", **kw) / "report.json").read_text())
    assert whole["data"]["heldout"]["split"]["name"] == "whole" and whole["data"]["heldout"]["documents"] == 10
    part = run_eval(built["pred"], tmp_path / "part", heldout_split="heldout", **kw)
    held = json.loads((part / "report.json").read_text())["data"]["heldout"]
    assert held["split"]["name"] == "heldout" and 1 <= held["documents"] < 10
    assert read_manifest(part, "report")["recipe"]["heldout_split"] == "heldout"
    help_text = " ".join(CliRunner().invoke(main, ["eval", "--help"]).output.split())
    assert "--heldout-split [whole|heldout]" in help_text and "[default: whole]" in help_text
    # --tail: only KVP's path changes; its FLOPs count the base's extra tail tokens; the manifest says so
    tail = run_eval(built["pred"], tmp_path / "tail", tail=4, **kw)
    tailed = json.loads((tail / "report.json").read_text())["results"]
    assert tailed["tail"] == 4 and read_manifest(tail, "report")["recipe"]["tail"] == 4
    assert tailed["paths"]["base"]["nll"] == whole["results"]["paths"]["base"]["nll"]
    assert tailed["paths"]["kvp"]["prefill_flops"] > whole["results"]["paths"]["kvp"]["prefill_flops"]


@pytest.mark.parametrize(("kw", "kept"), [
    ({"keep": 0.5, "heal": "distill"}, [0, 2]),
    ({"layers": [0, 3], "heal": "bridge"}, [0, 3]),
    ({"keep": 0.75, "select": "importance", "heal": "bridge"}, None),
    ({"keep": 0.75, "select": "loss", "heal": "none"}, None),
])
def test_derive_variants(assets, tmp_path, kw, kept):
    aux = derive(tmp_path / "aux", base=str(assets["llama"]), **kw, **calib_kw(assets))
    m = read_manifest(aux, "aux")
    assert m["healing"]["method"] == kw["heal"]
    if kept is None:  # importance or loss: 3 of 4 layers, layer 0 always kept, scores recorded
        assert len(m["kept_layers"]) == 3 and m["kept_layers"][0] == 0 and len(m["importance"]) == 4
    else:
        assert m["kept_layers"] == kept
    assert load(str(aux))[0].config.num_hidden_layers == len(m["kept_layers"])


def test_unhealed_aux_needs_no_calibration_and_reloads_exactly(assets, tmp_path):
    # no calib given: reading the default corpus would fail here (empty cache, no download)
    aux = derive(tmp_path / "aux", base=str(assets["llama"]), layers=[0, 1, 3], heal="none", progress=False)
    m = read_manifest(aux, "aux")
    assert m["calib_tokens"] == 0 and "calibration" not in m["inputs"]
    base, tok = load(str(assets["llama"]))
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        want = prune(base, [0, 1, 3])(ids).logits
        got = load(str(aux))[0](ids).logits
    assert torch.equal(want, got)


def test_derive_is_deterministic(assets, tmp_path):
    a = derive(tmp_path / "a", base=str(assets["llama"]), **calib_kw(assets))
    b = derive(tmp_path / "b", base=str(assets["llama"]), **calib_kw(assets))
    ha, hb = (read_manifest(x, "aux") for x in (a, b))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert ha["inputs"]["calibration"]["tokens_sha256"] == hb["inputs"]["calibration"]["tokens_sha256"]


def test_sibling_aux_uses_chunked_layer_map(assets, tmp_path):
    aux = derive(tmp_path / "aux", base=str(assets["llama"]), sibling=str(assets["sibling"]), progress=False)
    m = read_manifest(aux, "aux")
    assert m["family"] == "c" and m["layer_map"] == {"kind": "c", "map": [0, 0, 1, 1]}
    assert m["inputs"]["sibling"]["spec"] == str(assets["sibling"])
    pred = fit(aux, tmp_path / "pred", input="kv", **calib_kw(assets))
    assert KVPredictor.load(pred).dims == {"in_k": 16, "in_v": 16, "out": 32}
    g = KVPPipeline.from_predictor(pred).generate(PROMPTS, max_new_tokens=3, mode="kvp")
    assert len(g.token_ids) == 2


def test_fit_kv_input_and_sink(built, assets, tmp_path):
    pred = fit(built["aux"], tmp_path / "pred", input="kv", sink=2, **calib_kw(assets))
    p = KVPredictor.load(pred)
    assert p.input_mode == "kv" and p.dims["in_k"] == 32
    assert read_manifest(pred, "predictor")["sink_len"] == 2


def test_generation_sampling_is_seeded(built):
    pipe = KVPPipeline.from_predictor(built["pred"])
    s = Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=3)
    a, b = (pipe.generate(PROMPTS, max_new_tokens=8, sampling=s, mode="kvp") for _ in range(2))
    assert a.token_ids == b.token_ids
    base = pipe.generate(PROMPTS, max_new_tokens=4, mode="base")
    assert not base.kvp


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\n  second\n")
    assert read_prompts(tmp_path / "p.txt") == ["first prompt", "  second"]
    (tmp_path / "p.jsonl").write_text('"a\\nb"\n{"prompt": "c"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a\nb", "c"]
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(KvpError, match=r"bad\.jsonl:1: expected"):
        read_prompts(tmp_path / "bad.jsonl")


def test_predictor_must_fit_the_models(built, assets):
    with pytest.raises(KvpError, match="does not fit these models: base layers 2 != 4; base KV width") as e:
        KVPPipeline.from_predictor(built["pred"], base=str(assets["sibling"]), aux=str(assets["sibling"]))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- exactness (acceptance)


def assert_kvp_equals_base(pipe: KVPPipeline, prompts: list[str], tokens: int = 16) -> None:
    """Same first-step logits (1e-4) and the same greedy tokens, batched with left padding."""
    ids, mask = pipe.encode(prompts, extra=tokens)
    assert len(set(mask.sum(-1).tolist())) == len(prompts) > 1  # different lengths: padding is exercised
    kvp = pipe.prefill(ids, mask, use_kvp=True).logits
    full = pipe.prefill(ids, mask, use_kvp=False).logits
    assert (kvp - full).abs().max().item() < 1e-4
    a = pipe.generate(prompts, max_new_tokens=tokens, mode="kvp")
    b = pipe.generate(prompts, max_new_tokens=tokens, mode="base")
    assert a.token_ids == b.token_ids and a.completions == b.completions


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("sink_len", [0, 1])
def test_exactness_identity_predictor_tiny(assets, tmp_path, family, sink_len):
    aux_dir = derive(tmp_path / "aux", base=str(assets[family]), keep=1.0, heal="none", progress=False)
    base, tok = load(str(assets[family]))
    aux, _ = load(str(aux_dir))
    n, kv_dim = base.config.num_hidden_layers, 2 * (64 // 4)
    pipe = KVPPipeline(base, aux, KVPredictor.identity(n, kv_dim), tok, sink_len=sink_len)
    assert_kvp_equals_base(pipe, PROMPTS)


@pytest.mark.integration
def test_exactness_identity_predictor_smollm2():
    base, tok = load("smollm2-135m")
    n = base.config.num_hidden_layers
    aux = prune(base, list(range(n)))  # what derive --keep 1.0 --heal none writes
    kv_dim = base.config.num_key_value_heads * base.config.head_dim
    pipe = KVPPipeline(base, aux, KVPredictor.identity(n, kv_dim), tok, sink_len=1)
    assert_kvp_equals_base(pipe, ["def fibonacci(n):\n    if n < 2:\n        return n\n", "The capital of France is"])


def test_auto_mode_measures_the_crossover_once_and_caches_it(built):
    """mode "auto": the crossover is measured on first use (kvp_validate.crossover), cached on
    disk for this predictor, device, dtype, threads and CPU, and decides the path per call."""
    pipe = KVPPipeline.from_predictor(built["pred"])
    g = pipe.generate(PROMPTS, max_new_tokens=2)
    assert g.seconds["crossover_calibration"] > 0 and g.kvp == (g.crossover is not None and 14 >= g.crossover)
    again = KVPPipeline.from_predictor(built["pred"]).generate(PROMPTS, max_new_tokens=2)
    assert "crossover_calibration" not in again.seconds and again.crossover == g.crossover  # from the cache
    assert pipe.generate(PROMPTS, max_new_tokens=2, crossover=2).kvp
    assert not pipe.generate(PROMPTS, max_new_tokens=2, crossover=None).kvp
    timed = pipe.generate(PROMPTS, max_new_tokens=2, mode="kvp", warm_repeats=2)
    assert timed.warm_prefill_seconds > 0 and timed.prefill_seconds > 0
    with pytest.raises(KvpError, match="unknown mode"):
        pipe.generate(PROMPTS, mode="aux")


def test_fixed_prefix_is_an_exact_cached_sink(built):
    """A template prefix is computed by the base once and reused; its KV equals the base's own."""
    pipe = KVPPipeline.from_predictor(built["pred"])
    prefix = "def return the fox"
    g = pipe.generate(PROMPTS, max_new_tokens=4, prefix=prefix, mode="kvp")
    assert len(pipe.sinks._memo) == 1
    pipe.generate(PROMPTS[:1], max_new_tokens=2, prefix=prefix, mode="kvp")
    assert len(pipe.sinks._memo) == 1
    ids, mask = pipe.encode(PROMPTS, prefix=prefix)
    n_prefix = len(pipe.tokenizer(prefix).input_ids)
    pre = pipe.prefill(ids, mask, sink_len=n_prefix)
    full = pipe.prefill(ids, mask, use_kvp=False)
    start = int((mask[1] == 0).sum())  # row 1 is left-padded
    k_kvp = pre.cache.layers[0].keys[1, :, start : start + n_prefix]
    k_base = full.cache.layers[0].keys[1, :, start : start + n_prefix]
    assert torch.allclose(k_kvp, k_base, atol=1e-5)
    assert len(g.completions) == len(PROMPTS)


def test_stop_callback_ends_rows_early(built):
    """decode's `stop` marks rows finished (HumanEval's early stop); a bf16 pipeline still runs."""
    pipe = KVPPipeline.from_predictor(built["pred"])
    full = pipe.generate(PROMPTS, max_new_tokens=16, mode="kvp")
    calls = []

    def stop(rows):
        calls.append(len(rows[0]))
        return [True] * len(rows)

    short = pipe.generate(PROMPTS, max_new_tokens=16, stop=stop, mode="kvp")
    assert calls == [8]  # checked every 8 steps, and every row was finished at the first check
    assert all(s == f[: len(s)] and len(s) <= 8 for s, f in zip(short.token_ids, full.token_ids))
    bf16 = KVPPipeline.from_predictor(built["pred"], dtype=torch.bfloat16)
    assert len(bf16.generate(PROMPTS, max_new_tokens=4, mode="kvp").completions) == len(PROMPTS)
