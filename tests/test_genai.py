"""onnxruntime-genai runs each variant folder's base decoder (genai_config.json), on the tiny model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ["ORT_DISABLE_TELEMETRY"] = "1"  # before onnxruntime_genai is imported anywhere
og = pytest.importorskip("onnxruntime_genai")

from conftest import TINY_PAIRS, assert_one_line_error, tiny_export  # noqa: E402

from kvp_export.errors import KvpError  # noqa: E402


@pytest.fixture(scope="module")
def exported(built, assets, tmp_path_factory):
    return tiny_export("onnx", built, assets, tmp_path_factory, single_thread=False, variants=["fp32", "int8"],
                       crossover=False, **TINY_PAIRS)


PROMPTS = ["w1 w2 w3 the fox def w4", "w9 w8 ( ) : = w10 w11 w12 w13 w14 w15 w16", "return w5"]


def test_every_variant_folder_is_a_genai_model_folder(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    from kvp_validate.artifact import sha256_file

    for variant in ("fp32", "int8"):
        entry = manifest["genai"][variant]
        assert entry["config"] == f"{variant}/genai_config.json" and entry["decoder"] == f"{variant}/base_decode.onnx"
        assert sha256_file(exported / entry["config"]) == entry["sha256"]
        cfg = json.loads((exported / entry["config"]).read_text())
        dec = cfg["model"]["decoder"]
        assert dec["filename"] == "base_decode.onnx" and cfg["search"]["past_present_share_buffer"] is False
        assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]) == (4, 2, 16)
        # the names genai binds are the graph's, as the manifest records them
        io = manifest["io"]["base_decode"]
        assert [dec["inputs"][k] for k in ("input_ids", "attention_mask", "position_ids")] == io["inputs"][:3]
        assert dec["inputs"]["past_key_names"] % 0 == io["inputs"][3] and dec["outputs"]["logits"] == io["outputs"][0]
        assert dec["outputs"]["present_key_names"] % 3 == io["outputs"][-2]
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (exported / variant / name).is_file()
        og.Model(str(exported / variant))  # genai's own parser accepts it (unknown keys would throw)


def test_genai_greedy_equals_our_runtime_and_transformers(exported, assets):
    from kvp_export.models import load
    from kvp_validate.genai import GenaiBase
    from kvp_validate.runtime import OnnxKVP

    base, tok = load(str(assets["llama"]))
    rt = OnnxKVP(exported, "fp32", threads=1)
    genai = GenaiBase(exported, "fp32")
    n = 12
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        ours = rt.generate([prompt], max_new_tokens=n, mode="base").token_ids[0]
        hf = base.generate(tok(prompt, return_tensors="pt").input_ids, max_new_tokens=n, do_sample=False)[0]
        hf = hf[len(ids):].tolist()
        hf = next((hf[:i] for i, t in enumerate(hf) if t in genai.eos_ids()), hf)
        got = genai.greedy(ids, n)
        assert got == ours == hf, prompt
        assert len(got) == n or got == hf


def test_genai_feeds_the_mask_over_past_and_new_and_positions(exported):
    """What genai binds at the first token step: attention_mask [B, past+1] of ones and
    position_ids [B, 1] = the prompt length, past_key_values.* = the prompt's present.*."""
    model = og.Model(str(exported / "fp32"))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=10)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([[10, 20, 30, 40, 5]], np.int32))
    gen.generate_next_token()  # the prompt
    gen.generate_next_token()  # the first token step's inputs are now bound
    assert np.asarray(gen.get_input("attention_mask")).tolist() == [[1] * 6]
    assert np.asarray(gen.get_input("position_ids")).tolist() == [[5]]
    assert np.asarray(gen.get_input("past_key_values.0.key")).shape == (1, 2, 5, 16)


def test_quantized_variant_generates_through_genai(exported):
    from kvp_validate.genai import GenaiBase
    from kvp_validate.runtime import OnnxKVP

    ids = [10, 20, 30, 40, 5, 6]
    got = GenaiBase(exported, "int8").greedy(ids, 6)
    rt = OnnxKVP(exported, "int8", threads=1)
    state = rt.prefill(np.array([ids]), None, "base")
    want = rt.decode(state, 6)[0].tolist()
    assert got == want[: len(got)] and len(got) >= 1


def test_bad_genai_folders_are_one_line_errors(exported, tmp_path):
    import shutil

    from kvp_validate.genai import GenaiBase

    d = tmp_path / "copy"
    shutil.copytree(exported / "fp32", d / "fp32")
    (d / "fp32" / "base_decode.onnx").unlink()
    with pytest.raises(KvpError, match="names a missing graph"):
        GenaiBase(d, "fp32")
    (d / "fp32" / "genai_config.json").unlink()
    with pytest.raises(KvpError, match="no genai_config.json"):
        GenaiBase(d, "fp32")


def gguf_style_bpe(folder, corpus):
    """A byte-level BPE saved the way transformers converts one from GGUF: class LlamaTokenizerFast,
    decoder ByteFallback/Fuse/Replace('▁')/ByteLevel (onnxruntime-extensions then encodes spaces as -1)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(byte_fallback=True))
    tk.normalizer = normalizers.Sequence([])
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train([str(p) for p in sorted(corpus.glob("*.txt"))], trainer)
    tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " "),
                                    decoders.ByteLevel()])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": False, "add_eos_token": False, "model_max_length": 256}))
    return tk


def test_gguf_converted_byte_level_tokenizer_gets_a_genai_copy(exported, assets, tmp_path):
    import shutil

    from tokenizers import Tokenizer

    from kvp_export.export.genai import GENAI_TOKENIZER, needs_genai_tokenizer, write_genai_tokenizer

    d = tmp_path / "fp32"
    shutil.copytree(exported / "fp32", d)
    assert write_genai_tokenizer(d) is None  # the word-level tokenizer: nothing to correct
    (d / "special_tokens_map.json").unlink()
    tk = gguf_style_bpe(d, assets["corpus"])
    texts = ["w1 w2  the fox\n    def w3(x):\treturn x", "héllo wörld 你好 🙂", "(w4)  =  w5\n\n"]
    cfg = json.loads((d / "genai_config.json").read_text())
    broken = og.Tokenizer(og.Model(str(d)))
    assert any(-1 in broken.encode(t).tolist() for t in texts)  # what genai does with the files as they are
    assert write_genai_tokenizer(d) == GENAI_TOKENIZER
    cfg["model"]["tokenizer_dir"] = GENAI_TOKENIZER
    (d / "genai_config.json").write_text(json.dumps(cfg))
    fixed = og.Tokenizer(og.Model(str(d)))
    copy = Tokenizer.from_file(str(d / GENAI_TOKENIZER / "tokenizer.json"))
    for t in texts:
        ids = tk.encode(t).ids
        assert fixed.encode(t).tolist() == ids and fixed.decode(ids) == t == tk.decode(ids) == copy.decode(ids)
    assert not needs_genai_tokenizer(json.loads(copy.to_str()),
                                     json.loads((d / GENAI_TOKENIZER / "tokenizer_config.json").read_text()))


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_kvp_through_a_genai_decoder_pipeline_equals_our_kvp(exported, variant):
    """genai 0.18's decoder-pipeline: the prompt stage is KVP (kvp_prefill + the base's first
    step), the token stage base_decode; first token and greedy continuation equal our runtime's
    KVP path (and differ from the base's, so the prompt stage really ran)."""
    from kvp_export.export.genai_kvp import write_genai_kvp
    from kvp_validate.genai_check import greedy
    from kvp_validate.runtime import OnnxKVP

    folder = write_genai_kvp(exported, variant)
    cfg = json.loads((folder / "genai_config.json").read_text())
    assert cfg["model"]["type"] == "decoder-pipeline"
    model = og.Model(str(folder))
    rt = OnnxKVP(exported, variant, threads=1)
    n, differs = 12, 0
    for ids in ([10, 20, 30, 40, 5, 6, 7, 8], [3, 9, 27, 81, 50, 60, 70, 80, 90, 100, 11, 12, 13], [4, 5, 6, 7]):
        state = rt.prefill(np.array([ids]), None, "kvp")
        assert state.mode == "kvp"
        want = rt.decode(state, n)[0].tolist()
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + n)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([ids], np.int32))
        got = greedy(gen, n)
        assert got == want[: len(got)] and (len(got) == n or got[-1] in (2,)), (ids, got, want)
        base = rt.decode(rt.prefill(np.array([ids]), None, "base"), n)[0].tolist()
        differs += base != want
    assert differs >= 1


def test_generate_cli_with_the_genai_runtime(exported, tmp_path):
    """`kvp generate --onnx ... --runtime genai`: the same greedy tokens as our onnxruntime loop,
    base and KVP (after `kvp export genai-kvp`); bad input is one line."""
    import shutil

    from click.testing import CliRunner

    from kvp_export.cli import main

    d = tmp_path / "export"
    shutil.copytree(exported, d, ignore=shutil.ignore_patterns("genai-kvp"))
    prompts = ["w1 w2 w3 the fox def w4", "w9 w8 ( ) : = w10 w11 w12"]

    def gen(*extra):
        r = CliRunner().invoke(main, ["generate", "--onnx", str(d), "--threads", "1", "--max-new-tokens", "8",
                                      "--warm-repeats", "0", "--json", *extra, *prompts])
        return r

    for mode in ("base", "kvp"):
        if mode == "kvp":
            bad = gen("--runtime", "genai", "--mode", "kvp")
            assert_one_line_error(bad, "no genai-kvp/ in")
            r = CliRunner().invoke(main, ["export", "genai-kvp", str(d), "--variant", "fp32"])
            assert r.exit_code == 0, r.output
        ours = json.loads(gen("--mode", mode).output)
        r = gen("--runtime", "genai", "--mode", mode)
        assert r.exit_code == 0, r.output
        got = json.loads(r.output)
        assert got["mode"] == mode and got["token_ids"] == ours["token_ids"] and got["completions"] == ours["completions"]
        assert got["timing"]["runtime"].startswith("onnxruntime-genai")
    for cross, path in ((1000, "base"), (4, "kvp")):  # "auto" follows the crossover as our runtime does
        got = json.loads(gen("--runtime", "genai", "--crossover", str(cross)).output)
        ours = json.loads(gen("--crossover", str(cross)).output)
        assert got["timing"]["path"] == path and got["token_ids"] == ours["token_ids"]
    (d / "fp32" / "genai_config.json").unlink()
    assert_one_line_error(gen("--runtime", "genai", "--mode", "base"), "missing file")  # the manifest lists it
    reseal(d)  # as if exported without it: genai's own check
    r = gen("--runtime", "genai", "--mode", "base")
    assert_one_line_error(r, "no genai_config.json in")
    assert_one_line_error(gen("--runtime", "genai", "--mode", "aux"), "not the aux")


def reseal(folder):
    from conftest import reseal as _reseal

    return _reseal(folder)


@pytest.fixture(scope="module")
def genai_export(exported, tmp_path_factory):
    """A copy of the export with genai-kvp/ for both variants (the validator reads, never writes, it)."""
    import shutil

    from kvp_export.export.genai_kvp import write_genai_kvp

    d = tmp_path_factory.mktemp("genai-validate") / "export"
    shutil.copytree(exported, d, ignore=shutil.ignore_patterns("genai-kvp"))
    for variant in ("fp32", "int8"):
        write_genai_kvp(d, variant)
    return d


def test_validate_genai_check_beside_our_runtime(genai_export, tmp_path):
    """`kvp validate --check genai`: quality and TTFT of KVP and the base through genai beside our
    runtime, as flat gateable metrics and a report section; KVP through genai is our KVP, token
    for token and (fp32) logit for logit; a failing gate exits 3."""
    from click.testing import CliRunner

    from kvp_validate.cli import validate_cmd
    from kvp_validate.onnx_report import validate_onnx

    p = validate_onnx(genai_export, tmp_path / "r", checks=("genai",), threads=1, warmup=0, repeats=2,
                      quality_n=1, genai_pairs=4, greedy_tokens=8, genai_lengths=(16, 32),
                      gates=["genai.*.1x*.kvp_vs_ours<=100", "genai.*.kvp.first_token_vs_ours==1"])
    m = p["metrics"]
    assert p["ok"] and len(p["gates"]) == 6
    for v in ("fp32", "int8"):
        for n in (16, 32):
            pt = f"genai.{v}.1x{n}"
            assert m[f"{pt}.kvp_vs_ours"] == pytest.approx(m[f"{pt}.ms_genai_kvp"] / m[f"{pt}.ms_ours_kvp"])
            assert m[f"{pt}.base_vs_ours"] > 0 and m[f"{pt}.kvp_speedup_genai"] > 0
            assert 0 < m[f"{pt}.ms_genai_kvp_new_generator"] < m[f"{pt}.ms_genai_kvp"]
        # the same graphs on the same calls (batch 1, one token per step): the same tokens
        assert m[f"genai.{v}.kvp.first_token_vs_ours"] == m[f"genai.{v}.kvp.greedy8_exact_vs_ours"] == 1
        assert m[f"genai.{v}.base.greedy8_vs_ours"] == 1
        # genai's first step computes the sink's logits too; ours keeps the last position's alone
        # (logits_to_keep), so int8's dynamic per-tensor quantization of the LM head's input sees other rows
        tol = {"fp32": (1e-5, 1e-4), "int8": (1e-3, 5e-2)}[v]
        assert abs(m[f"genai.{v}.kvp.nll_vs_ours"]) < tol[0], (v, m[f"genai.{v}.kvp.nll_vs_ours"])
        assert m[f"genai.{v}.kvp.logits_max_abs_diff_vs_ours"] < tol[1], (v, m[f"genai.{v}.kvp.logits_max_abs_diff_vs_ours"])
        assert m[f"genai.{v}.kvp.delta_nll"] == pytest.approx(m[f"genai.{v}.kvp.nll"] - m[f"genai.{v}.base.nll"])
    assert m["genai.fp32.base.logits_max_abs_diff_vs_ours"] < 1e-4
    pt = p["results"]["genai"]["int8"]["points"][1]
    assert pt["prompt_len"] == 32 and all(len(v) == 2 for v in pt["rounds_ms"].values())  # every round, as measured
    q = p["results"]["genai"]["fp32"]["quality"]
    assert (q["sequences"], q["greedy_tokens"]) == (4, 8)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## onnxruntime-genai beside our runtime (batch 1)" in md and "| fp32 | 1x32 |" in md
    assert not any(k.startswith(("ttft.", "quality.", "parity.")) for k in m)

    r = CliRunner().invoke(validate_cmd, [str(genai_export), "-o", str(tmp_path / "r2"), "--check", "genai",
                                          "--variant", "fp32", "--threads", "1", "--warmup", "0", "--repeats", "1",
                                          "--genai-pairs", "0", "--genai-lengths", "16",
                                          "--gate", "genai.fp32.1x16.kvp_vs_ours<=0.000001"])
    assert r.exit_code == 3, r.output
    assert "genai.fp32.1x16.kvp_vs_ours" in r.output
    r2 = json.loads((tmp_path / "r2" / "report.json").read_text())  # --genai-pairs 0: TTFT only
    assert "quality" not in r2["results"]["genai"]["fp32"] and not any(".kvp." in k for k in r2["metrics"])


def test_validate_genai_bad_input_is_one_line_before_any_work(genai_export, exported, tmp_path, monkeypatch):
    import shutil
    import sys

    from click.testing import CliRunner

    from kvp_export.cli import main

    def run(export, *extra):
        return CliRunner().invoke(main, ["validate", str(export), "-o", str(tmp_path / "r"), "--check", "genai",
                                         "--variant", "fp32", "--threads", "1", "--repeats", "1", "--genai-pairs", "1",
                                         *extra])

    d = tmp_path / "export"
    shutil.copytree(exported, d, ignore=shutil.ignore_patterns("genai-kvp"))
    assert_one_line_error(run(d), "no genai-kvp/ in")
    shutil.copytree(genai_export / "int8" / "genai-kvp", d / "fp32" / "genai-kvp")  # another variant's
    assert_one_line_error(run(d), "was not built from this export's fp32 kvp_prefill (a stale genai-kvp/?")
    manifest = d / "fp32" / "genai-kvp" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "inputs": {"export": str(d)}}))
    assert_one_line_error(run(d), "breaks the 'genai-kvp' contract at 'inputs.variant': field required")  # the typed GenaiKvpManifest
    shutil.rmtree(d / "fp32" / "genai-kvp")
    shutil.copytree(genai_export / "fp32" / "genai-kvp", d / "fp32" / "genai-kvp")
    (d / "fp32" / "genai-kvp" / "base_decode.onnx").unlink()
    shutil.copy(d / "fp32" / "aux_decode.onnx", d / "fp32" / "genai-kvp" / "base_decode.onnx")
    assert_one_line_error(run(d), "genai-kvp/base_decode.onnx is ")  # its size differs from genai-kvp/manifest.json's
    shutil.copy(genai_export / "fp32" / "genai-kvp" / "base_decode.onnx", d / "fp32" / "genai-kvp" / "base_decode.onnx")
    flip = d / "fp32" / "genai-kvp" / "kvp_prompt.onnx"
    flip.write_bytes(flip.read_bytes()[:-1] + bytes([flip.read_bytes()[-1] ^ 0xFF]))
    assert_one_line_error(run(d), "genai-kvp/kvp_prompt.onnx does not match the SHA-256")
    assert_one_line_error(run(genai_export, "--genai-lengths", "3"), "too short for KVP")
    assert_one_line_error(run(genai_export, "--genai-lengths", "4096"), "longer than the exported context")
    bad = run(genai_export, "--genai-pairs", "-1")  # the options table's bound: click's usage error
    assert bad.exit_code == 2 and "--genai-pairs" in bad.output and "x>=0" in bad.output
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # as where the [genai] extra is not installed
    assert_one_line_error(run(genai_export), "onnxruntime-genai is not installed")
    assert not (tmp_path / "r").exists()
