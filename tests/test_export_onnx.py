"""ONNX export, the onnxruntime runtime and the validator, on the tiny random models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_PAIRS, assert_kvp_module_matches_runtime, assert_one_line_error, assert_parity, tiny_export

from kvp_export.cli import main
from kvp_export.errors import KvpError

DEFAULT_THREADS = torch.get_num_threads()  # what module-scoped fixtures run with (before one_thread)


@pytest.fixture(scope="module")
def exported(built, assets, tmp_path_factory):
    """Every variant, with the crossover measured at the default thread count."""
    return tiny_export("onnx", built, assets, tmp_path_factory, single_thread=False, **TINY_PAIRS)


def copy_export(exported, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(exported, dst)
    return dst


# ---------------------------------------------------------------- the export-friendly modules


# every family's Decoder against transformers (past the sliding window too): tests/test_families.py


@pytest.mark.parametrize("input_mode,sink_len", [("hidden", 1), ("kv", 0), ("hidden", 2)])
def test_kvp_modules_match_the_pytorch_runtime(assets, tmp_path, input_mode, sink_len):
    """kvp_prefill's outputs fed to the decoder as they are give the PyTorch KVP logits (sink included)."""
    from kvp_export.derive import derive
    from kvp_export.predictor.fit import fit
    from kvp_export.runtime.pipeline import KVPPipeline

    calib = [str(assets["corpus"])]
    aux = derive(tmp_path / "aux", base=str(assets["llama"]), keep=0.5, heal="none", progress=False)
    pred = fit(aux, tmp_path / "pred", input=input_mode, sink=sink_len, calib=calib, calib_tokens=2048,
               progress=False)
    assert_kvp_module_matches_runtime(KVPPipeline.from_predictor(pred), sink_len)


# ---------------------------------------------------------------- the export


def test_export_layout_manifest_and_checker(exported):
    import onnx

    m = json.loads((exported / "manifest.json").read_text())
    assert m["stage"] == "onnx" and set(m["variants"]) == {"fp32", "int8", "int4"}
    for graphs in m["variants"].values():
        assert set(graphs) == {"kvp_prefill", "base_decode", "base_prefill", "aux_decode", "aux_prefill"}
        for entry in graphs.values():
            onnx.checker.check_model(str(exported / entry["file"]), full_check=True)
    names = m["io"]["base_decode"]
    assert names["inputs"][:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert names["outputs"][:2] == ["logits", "present.0.key"]
    int4 = onnx.load(str(exported / "int4" / "base_decode.onnx"))
    assert any(n.op_type == "MatMulNBits" for n in int4.graph.node)
    assert m["quantization"]["int4"]["base_decode"]["block_size"] == 32
    assert m["quantization"]["int8"]["base_decode"]["kept_fp32"]  # the down projections
    assert (exported / "fp32" / "config.json").is_file() and (exported / "tokenizer" / "tokenizer.json").is_file()


def test_export_is_byte_identical(exported, built, assets, tmp_path):
    """Exporting the same predictor again writes the same bytes: every graph of every variant, the
    optimised copies and their side files, the reference and eval pairs, the tokenizer and configs
    (the manifests' `files` agree; manifest.json itself differs by its times and crossover timings)."""
    from kvp_export.export.onnx_export import export_onnx

    # the same command: with the thread count `exported` ran with (the PyTorch reference outputs,
    # reference.npz, sum in another order on another count; the graphs do not depend on it)
    torch.set_num_threads(DEFAULT_THREADS)
    again = export_onnx(built["pred"], tmp_path / "again", heldout=[str(assets["corpus"])], eval_n=8, prompt_len=24,
                        cont_len=8, crossover=False, progress=False)
    a, b = (json.loads((d / "manifest.json").read_text())["files"] for d in (exported, again))
    assert sorted(a) == sorted(b) and len(a) > 40
    assert [rel for rel in a if a[rel] != b[rel]] == []


def test_graph_flops_match_the_analytic_count(exported, assets):
    """The exported base prefill does what the analytic model counts (projections, attention, last-token head),
    except that the graph computes the full square of attention scores where the analytic count
    takes the causal half."""
    from kvp_export import flops
    from kvp_export.models import load
    from kvp_export.models.arch import ArchSpec
    from kvp_validate.ttft import poly

    m = json.loads((exported / "manifest.json").read_text())
    base, _ = load(str(assets["llama"]))
    spec = ArchSpec.of(base)
    for n in (16, 100):
        masked_half = 4 * spec.n_heads * spec.head_dim * spec.n_layers * (n * n - n * (n + 1) // 2)
        want = flops.prefill_flops(base, n) + masked_half
        assert poly(m["flops"]["base_prefill"]["coef"], n) == pytest.approx(want, rel=1e-3)
        step = poly(m["flops"]["base_decode"]["step"], n)
        assert step == pytest.approx(flops.prefill_flops(base, 1, past=n), rel=1e-3)  # + RoPE's tiny matmul


def test_large_graphs_keep_weights_as_external_data(built, tmp_path, monkeypatch):
    from kvp_export.export import to_onnx
    from kvp_export.runtime.pipeline import KVPPipeline

    monkeypatch.setattr(to_onnx, "EXTERNAL_DATA_BYTES", 0)
    pipe = KVPPipeline.from_predictor(built["pred"])
    path = tmp_path / "base_decode.onnx"
    to_onnx.export_graph("base_decode", path, pipe.base, pipe.aux, pipe.predictor, 1)
    assert (tmp_path / "base_decode.onnx.data").stat().st_size > path.stat().st_size


# ---------------------------------------------------------------- runtime and parity


def test_parity_fp32_and_quantized_within_tolerance(exported):
    from kvp_validate.artifact import OnnxArtifact
    from kvp_validate.parity import run_parity

    assert_parity(exported)
    art = OnnxArtifact.open(exported)
    # the quantized variants against fp32 on the same pairs (a broken graph is off by a nat or more):
    # int8 within every limit; int4's top-1 on the random model's flat logits sits near its limit
    # (near ties flip with the CPU's int8 kernels), so its KL, NLL and cache limits are the check
    for v in ("int8", "int4"):
        r = run_parity(art, v, threads=1)
        gated = [c for c in r["checks"] if c.get("limit") is not None
                 and not (v == "int4" and c["metric"] == "top1_vs_fp32")]
        assert len(gated) >= 8 and all(c["ok"] for c in gated), (v, gated)


def test_onnx_generation_equals_pytorch_kvp_token_for_token(exported, built):
    from kvp_export.runtime.pipeline import KVPPipeline
    from kvp_validate.runtime import OnnxKVP, Sampling

    prompts = ["w1 w2 w3 w4 w5 w6 the fox def w7", "w9 w8 ( ) : = w10 w11 w12 w13 w14 w15 w16"]
    want = KVPPipeline.from_predictor(built["pred"]).generate(prompts, max_new_tokens=10, mode="kvp")
    rt = OnnxKVP(exported, "fp32", threads=1)
    got = rt.generate(prompts, max_new_tokens=10, mode="kvp", warm_repeats=2)
    assert got.mode == "kvp" and got.token_ids == want.token_ids
    sampled = [rt.generate(prompts, max_new_tokens=6, sampling=Sampling(0.9, 20, 0.9, seed=3), mode="kvp").token_ids
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded
    assert set(got.seconds) == {"kvp_prefill", "base_first_step", "total"}
    # loading is timed apart from TTFT: the first call loaded both graphs, later calls none
    assert set(got.load_seconds) == {"kvp_prefill", "base_decode", "wall"} and got.warm_ttft_seconds > 0
    assert rt.generate(prompts, max_new_tokens=2, mode="kvp").load_seconds == {}


def test_io_binding_gives_the_copying_runtimes_tokens_and_logits(exported):
    """The runtime binds IO by default (the cache stays an OrtValue read in place by the next
    step); the copying path (every output to numpy) must give the same tokens and logits, in
    every mode and through teacher-forced scoring."""
    import onnxruntime as ort

    from kvp_validate.runtime import OnnxKVP

    prompts = ["w1 w2 w3 w4 w5 w6 the fox def w7", "w9 w8 ( ) : = w10 w11 w12 w13 w14 w15 w16"]
    bound, copying = OnnxKVP(exported, "fp32", threads=1), OnnxKVP(exported, "fp32", threads=1, io_binding=False)
    for mode in ("kvp", "base", "aux", "auto"):
        a = bound.generate(prompts, max_new_tokens=8, mode=mode)
        b = copying.generate(prompts, max_new_tokens=8, mode=mode)
        assert a.token_ids == b.token_ids and a.mode == b.mode
    ids, mask = bound.encode(prompts)
    sa, sb = bound.prefill(ids, mask, "kvp"), copying.prefill(ids, mask, "kvp")
    assert all(isinstance(p, ort.OrtValue) for p in sa.past) and all(isinstance(p, np.ndarray) for p in sb.past)
    for x, y in zip(sa.past_arrays(), sb.past_arrays()):
        np.testing.assert_array_equal(x, y)
    cont = np.array([[3, 4, 5], [6, 7, 8]])
    np.testing.assert_array_equal(bound.score(sa, cont), copying.score(sb, cont))


def test_ttft_times_every_path_through_the_runtimes_io_path(exported):
    """measure_point times base, aux and KVP through the same runtime calls (IO binding), so
    kvp_speedup compares graphs, not a bound path against a copying one."""
    from kvp_validate.runtime import OnnxKVP
    from kvp_validate.ttft import measure_point

    rt = OnnxKVP(exported, "fp32", threads=1)
    seen = []
    run = rt.run
    rt.run = lambda name, feeds, *a: seen.append(name) or run(name, feeds, *a)  # records, then runs the real graph
    ms = measure_point(rt, 1, 12, warmup=0, repeats=1)
    assert {"base", "aux", "aux_ctx", "kvp", "base_step"} <= set(ms)
    assert {"base_prefill", "aux_prefill", "kvp_prefill", "base_decode"} <= set(seen)


def test_auto_mode_uses_the_base_below_the_crossover_through_the_decoder(exported):
    """Below the crossover, "auto" runs the base prompt through base_decode with an empty cache
    (no third graph to load): the same logits as base_prefill; from the crossover on, KVP."""
    from kvp_validate.runtime import OnnxKVP

    ids = np.array([[5, 9, 11, 7, 30, 31, 32, 8, 40, 41]])
    rt = OnnxKVP(exported, "fp32", threads=1, crossover=8)
    assert rt.load("auto").keys() == {"kvp_prefill", "base_decode", "wall"}
    assert rt.prefill(ids, None, "auto").mode == "kvp"
    short = rt.prefill(ids[:, :6], None, "auto")
    assert short.mode == "base" and "base_decode" in short.seconds and "base_prefill" not in rt._sessions
    full = rt.prefill(ids[:, :6], None, "base")
    np.testing.assert_allclose(short.logits, full.logits, rtol=1e-4, atol=1e-4)
    assert [a.shape for a in short.past_arrays()] == [a.shape for a in full.past_arrays()]
    # the decoder's LM head covers the last position alone there (`logits_to_keep`), every position by default
    mask, pos = np.ones((1, 6), np.int64), np.arange(6)[None]
    empty = [np.zeros((1, rt.model["kv_heads"], 0, rt.model["head_dim"]), np.float32)] * (2 * rt.model["base_layers"])
    every = rt.step("base", ids[:, :6], mask, pos, empty)[0]
    last = rt.step("base", ids[:, :6], mask, pos, empty, last_only=True)[0]
    assert every.shape[1] == 6 and last.shape[1] == 1
    np.testing.assert_allclose(last[:, 0], every[:, -1], rtol=1e-5, atol=1e-5)
    never = OnnxKVP(exported, "fp32", threads=1, crossover=None)
    assert never.prefill(ids, None, "auto").mode == "base"


def test_a_stale_optimized_graph_is_not_used(exported, tmp_path, capsys):
    """An optimised graph whose source hash or onnxruntime version no longer matches is skipped
    with a one-line warning, and the source graph is loaded instead."""
    import json

    from kvp_validate.artifact import OnnxArtifact
    from kvp_validate.runtime import optimized_graph

    folder = copy_export(exported, tmp_path)
    art = OnnxArtifact.open(folder)
    assert optimized_graph(art, "fp32", "base_decode") is not None
    m = json.loads((folder / "manifest.json").read_text())
    m["optimized"]["fp32"]["base_decode"]["onnxruntime"] = "0.0.1"
    m["optimized"]["fp32"]["kvp_prefill"]["source_sha256"] = {"kvp_prefill.onnx": "0" * 64}
    (folder / "manifest.json").write_text(json.dumps(m))
    art = OnnxArtifact.open(folder)
    assert optimized_graph(art, "fp32", "base_decode") is None
    assert optimized_graph(art, "fp32", "kvp_prefill") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "onnxruntime 0.0.1" in err[0] and "hash differs" in err[1]


def test_short_prompts_fall_back_to_the_base_prefill(exported):
    from kvp_validate.runtime import OnnxKVP

    rt = OnnxKVP(exported, "fp32", threads=1)
    state = rt.prefill(np.array([[5, 6, 7]]), None, "kvp")  # sink 1 needs >= 4 tokens
    assert state.mode == "base"


def test_optimum_generates_from_the_base_decoder(exported, assets):
    """Our base_decode graph is a plain decoder to other ONNX LLM runtimes: optimum's
    ORTModelForCausalLM greedy output equals transformers' on the same base."""
    from optimum.onnxruntime import ORTModelForCausalLM

    from kvp_export.models import load

    ort_model = ORTModelForCausalLM.from_pretrained(exported / "fp32", file_name="base_decode.onnx", use_cache=True,
                                                    use_io_binding=False)
    base, tok = load(str(assets["llama"]))
    ids = tok(["w1 w2 w3 the fox def w4"], return_tensors="pt").input_ids
    want = base.generate(ids, max_new_tokens=8, do_sample=False)
    got = ort_model.generate(ids, max_new_tokens=8, do_sample=False)
    assert got.tolist() == want.tolist()


# ---------------------------------------------------------------- the validator


def test_validate_cli_end_to_end_with_gates(exported, tmp_path):
    args = ["validate", str(exported), "--lengths", "8,12", "--batches", "1,2", "--repeats", "1", "--warmup", "0",
            "--threads", "1", "--variant", "fp32", "--variant", "int8"]
    # a measured KVP metric (the base's agreement with itself would be 1 by construction); the
    # random model's NLL sits near ln(vocab) = 4.7 and fails this only when missing or NaN
    ok = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "r1"), "--gate", "parity.fp32.ok==1",
                                   "--gate", "quality.fp32.kvp.nll<=6"])
    assert ok.exit_code == 0, ok.output
    report = json.loads((tmp_path / "r1" / "report.json").read_text())
    assert report["ok"] and report["results"]["parity"]["fp32"]["ok"]
    assert {p["prompt_len"] for p in report["results"]["ttft"]["fp32"]["points"]} == {8, 12}
    assert "ttft.int8.2x12.kvp_speedup" in report["metrics"]
    assert "## Time to first token" in (tmp_path / "r1" / "report.md").read_text()

    bad = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "r2"), "--check", "parity",
                                    "--gate", "quality.fp32.kvp.nll<=0.001", "--gate", "parity.fp32.ok==1"])
    assert bad.exit_code == 3
    assert "gate failed: quality.fp32.kvp.nll<=0.001" in bad.output and "no such metric" in (tmp_path / "r2" / "report.json").read_text()


def test_validate_humaneval_through_the_runtime(exported, tmp_path):
    """Real problems, real sandboxed execution; the tiny random model passes none."""
    r = CliRunner().invoke(main, ["validate", str(exported), "-o", str(tmp_path / "he"), "--check", "humaneval",
                                  "--humaneval-limit", "2", "--variant", "fp32", "--threads", "1"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "he" / "report.json").read_text())
    for mode in ("base", "aux", "kvp"):
        res = report["results"]["humaneval"]["fp32"]["paths"][mode]
        assert res["problems"] == 2 and res["pass@1"] == 0.0
        # the completions really ran, in the OS sandbox, and failed as programs (a broken
        # execution path would give 0.0 too, with "error" or "forbidden" counts instead)
        counts = res["status_counts"]
        assert counts["failed"] + counts["timeout"] == 2 and counts["error"] == counts["forbidden"] == 0
        assert "bwrap" in res["sandbox"]["layers"]
    assert "humaneval.fp32.kvp.pass@1" in report["metrics"]


def test_validator_imports_no_torch(exported, tmp_path):
    code = ("import sys, kvp_validate.cli, kvp_validate.onnx_report, kvp_validate.runtime; "
            "from kvp_validate.cli import main; sys.argv = ['kvp-validate', sys.argv[1], '-o', sys.argv[2], "
            "'--check', 'parity', '--variant', 'fp32', '--threads', '1']\n"
            "try:\n    main()\nfinally:\n    assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code, str(exported), str(tmp_path / "rep")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "rep" / "report.json").is_file()


# ---------------------------------------------------------------- bad input


def _validate(folder, tmp_path, *extra):
    return CliRunner().invoke(main, ["validate", str(folder), "-o", str(tmp_path / "rep"), "--check", "parity",
                                     "--variant", "fp32", "--threads", "1", *extra])


def test_missing_graph_or_manifest(exported, tmp_path):
    d = copy_export(exported, tmp_path)
    (d / "fp32" / "kvp_prefill.onnx").unlink()
    assert_one_line_error(_validate(d, tmp_path), "missing file")
    (d / "manifest.json").unlink()
    assert_one_line_error(_validate(d, tmp_path), "no manifest.json")
    assert not (tmp_path / "rep").exists()


def test_graph_whose_io_does_not_match_the_manifest(exported, tmp_path):
    d = copy_export(exported, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    # a graph from elsewhere: the aux decoder (2 layers) put where the base decoder (4) belongs,
    # as the source graph and as its optimised copy (which the runtime loads)
    for sub, key in (("fp32", "variants"), ("optimized/fp32", "optimized")):
        shutil.copy(d / sub / "aux_decode.onnx", d / sub / "base_decode.onnx")
        m[key]["fp32"]["base_decode"]["bytes"] = (d / sub / "base_decode.onnx").stat().st_size
    (d / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(_validate(d, tmp_path), "fp32/base_decode.onnx is ")  # its size gives it away
    # and with every size and hash in the manifest rewritten to match, its inputs and outputs still do
    from kvp_validate.artifact import sha256_file
    from kvp_validate.integrity import file_records

    m["variants"]["fp32"]["base_decode"]["sha256"] = {"base_decode.onnx": sha256_file(d / "fp32" / "base_decode.onnx")}
    m["optimized"]["fp32"]["base_decode"]["source_sha256"] = m["variants"]["fp32"]["base_decode"]["sha256"]
    m["files"] = file_records(d)
    (d / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(_validate(d, tmp_path), "do not match the manifest")


def test_tokenizer_that_does_not_match(exported, tmp_path):
    from kvp_validate.artifact import sha256_file

    d = copy_export(exported, tmp_path)
    tok = json.loads((d / "tokenizer" / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzz"] = len(tok["model"]["vocab"])
    (d / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok))
    assert_one_line_error(_validate(d, tmp_path), "tokenizer/tokenizer.json is ")  # the manifest's size for it
    m = json.loads((d / "manifest.json").read_text())  # listed again: the export's own record still refuses it
    m["files"]["tokenizer/tokenizer.json"] = {"bytes": (d / "tokenizer" / "tokenizer.json").stat().st_size,
                                              "sha256": sha256_file(d / "tokenizer" / "tokenizer.json")}
    (d / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(_validate(d, tmp_path), "not the one exported")


def test_prompt_longer_than_the_exported_context(exported):
    from kvp_validate.runtime import OnnxKVP

    rt = OnnxKVP(exported, "fp32", threads=1)
    with pytest.raises(KvpError, match="longer than the exported context"):
        rt.generate([" ".join(["w1"] * 250)], max_new_tokens=10)
    r = CliRunner().invoke(main, ["generate", "--onnx", str(exported), "--max-new-tokens", "300", "w1 w2"])
    assert_one_line_error(r, "longer than the exported context")


def test_generate_cli_prints_load_and_ttft_apart(exported):
    args = ["generate", "--onnx", str(exported), "--threads", "1", "--max-new-tokens", "4", "--mode", "kvp",
            "w1 w2 w3 w4 w5", "w6 w7 w8 w9 w10 w11"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    load = next(ln for ln in lines if ln.startswith("load (onnxruntime fp32, 1 threads): "))
    assert "kvp_prefill" in load and "base_decode" in load
    assert any(ln.startswith("TTFT of the batch of 2, first call after loading: ") and "kvp_prefill" in ln
               for ln in lines)
    assert any(ln.startswith("TTFT warm (median of 3 more calls): ") for ln in lines)
    assert "path: kvp (mode kvp)" in lines
    j = json.loads(CliRunner().invoke(main, [*args, "--json", "--warm-repeats", "1"]).output)
    t = j["timing"]
    assert t["path"] == "kvp" and t["ttft_first_call_ms"] > 0 and t["ttft_warm_ms"] > 0
    assert set(t["load_ms"]) == {"kvp_prefill", "base_decode", "wall"}


def test_export_refuses_bad_options_before_work(built, tmp_path):
    r = CliRunner().invoke(main, ["export", "onnx", "--predictor", str(built["pred"]), "-o", str(tmp_path / "x"),
                                  "--block-size", "48"])
    assert_one_line_error(r, "block size")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- parity catches broken graphs


@pytest.fixture(scope="module")
def parity_fp32(exported):
    from kvp_validate.artifact import OnnxArtifact
    from kvp_validate.parity import run_parity

    return run_parity(OnnxArtifact.open(exported), "fp32", threads=1)


@pytest.mark.parametrize("fault", ["zero_layer", "swap_kv", "rope_base"])
@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_parity_fails_a_deliberately_broken_graph(exported, tmp_path, parity_fp32, variant, fault):
    """A zeroed layer, swapped K/V or a wrong RoPE base fails parity: fp32 against PyTorch, int8
    against the (intact) fp32 graphs; the same int8 graphs unbroken pass."""
    from kvp_validate.artifact import OnnxArtifact
    from kvp_validate.parity import run_parity
    from kvp_validate.selftest import break_export

    broken = OnnxArtifact.open(break_export(exported, tmp_path / "broken", variant, fault))
    r = run_parity(broken, variant, threads=1, fp32=None if variant == "fp32" else parity_fp32)
    failed = [f"{c['graph']}.{c['metric']}={c['value']:.3g}" for c in r["checks"] if not c["ok"]]
    assert failed, r["checks"]
    if variant == "int8":
        ok = run_parity(OnnxArtifact.open(exported), variant, threads=1, fp32=parity_fp32)
        assert ok["ok"], [c for c in ok["checks"] if not c["ok"]]


def test_validate_coldstart_and_default_mode_are_reported_and_gateable(exported, tmp_path):
    """--check coldstart measures each path in a fresh process; the TTFT check reports the default
    mode against the base and the crossover; both are gateable."""
    r = CliRunner().invoke(main, ["validate", str(exported), "-o", str(tmp_path / "rep"), "--variant", "fp32",
                                  "--check", "coldstart", "--check", "ttft", "--threads", "1", "--lengths", "8",
                                  "--batches", "1", "--repeats", "1", "--coldstart-lengths", "12", "--coldstart-runs", "2",
                                  "--gate", "coldstart.fp32.1x12.kvp.first_token_ms>0",
                                  "--gate", "ttft.fp32.auto.worst_vs_base>0"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "rep" / "report.json").read_text())["metrics"]
    for path in ("base", "aux", "kvp", "auto"):
        p = f"coldstart.fp32.1x12.{path}."
        assert m[p + "first_token_ms"] >= m[p + "load_ms"] > 0 and m[p + "warm_ms"] > 0
    assert m["coldstart.fp32.1x12.kvp.load_kvp_prefill_ms"] > 0 and "coldstart.fp32.1x12.auto_vs_base" in m
    points = json.loads((tmp_path / "rep" / "report.json").read_text())["results"]["coldstart"]["fp32"]["points"]
    assert {p["runs"] for p in points} == {2}  # each figure a median over two fresh processes
    assert m["ttft.fp32.auto.worst_vs_base"] > 0
    cross = json.loads((exported / "manifest.json").read_text())["crossover"]["fp32"]
    # measured from the longest length below the context down to the first where KVP does not win
    lens = [p["prompt_len"] for p in cross["points"]]
    assert lens[-1] == 192 and lens == sorted(lens) and set(lens) <= {8, 16, 24, 32, 48, 64, 96, 128, 192}
    first = cross["points"][0]
    assert (first["kvp_ms"] > cross["margin"] * first["base_decoder_ms"]) or lens[0] == 8
    assert cross["prompt_len"] in (None, *lens)
    assert m.get("crossover.fp32.export") == cross["prompt_len"]
    assert "## Cold start" in r.output and "## Default mode (auto)" in r.output


def test_the_spin_policy_reaches_every_session(exported):
    """The runtime's sessions carry the policy it was given (the default stops spinning when a
    run returns), and the tokens do not depend on it."""
    from kvp_validate.runtime import OnnxKVP

    prompt = ["w1 w2 w3 w4 w5 w6 the fox def w7"]
    tokens = {}
    for spin, key, want in (("run", "session.force_spinning_stop", "1"), ("off", "session.intra_op.allow_spinning", "0")):
        rt = OnnxKVP(exported, "fp32", threads=1, spin=spin)
        tokens[spin] = rt.generate(prompt, max_new_tokens=4, mode="kvp").token_ids
        for name in ("kvp_prefill", "base_decode"):
            assert rt.session(name).get_session_options().get_session_config_entry(key) == want
    assert tokens["run"] == tokens["off"]
