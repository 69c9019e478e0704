"""KVP's exact tail in the exported path: the ONNX runtime against PyTorch's `prefill_kvp(tail=W)` (tiny models)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_parity, tiny_export

from kvp_export.cli import main
from kvp_export.errors import KvpError

TAIL = 4
PROMPTS = ["w1 w2 w3 w4 w5 w6 the fox def w7 w8 w9 w10", "w9 w8 ( ) : = w10 w11 w12 w13 w14 w15 w16 w1 w2 w3 w4"]


@pytest.fixture(scope="module")
def tailed(built, assets, tmp_path_factory):
    """An fp32 export with tail TAIL (the same graphs as without one)."""
    return tiny_export("onnx", built, assets, tmp_path_factory, variants=["fp32"], eval_n=8, prompt_len=40,
                       cont_len=8, tail=TAIL, crossover=False)


@pytest.fixture(scope="module")
def pipe(built):
    from kvp_export.runtime.pipeline import KVPPipeline

    return KVPPipeline.from_predictor(built["pred"])


def _torch_kvp(pipe, ids, mask, tail):
    from kvp_export.runtime.kvp import prefill_kvp

    return prefill_kvp(pipe.base, pipe.aux, pipe.predictor, torch.from_numpy(ids), torch.from_numpy(mask),
                       sink_len=pipe.sink_len, tail=tail).logits.numpy()


def test_the_tail_is_recorded_and_the_graphs_are_the_same(tailed, fp32_export):
    m, plain = (json.loads((f / "manifest.json").read_text()) for f in (tailed, fp32_export))
    assert m["model"]["tail"] == TAIL and m["recipe"]["tail"] == TAIL and plain["model"]["tail"] == 0
    sha = {f: {n: g["sha256"] for n, g in man["variants"]["fp32"].items()} for f, man in (("t", m), ("p", plain))}
    assert sha["t"] == sha["p"]  # byte-identical graphs: the tail is the runtime's


@pytest.mark.parametrize("tail", [0, 2, TAIL, 9])
def test_onnx_tail_logits_equal_pytorch(tailed, pipe, tail):
    """KVP through onnxruntime with tail W (the export's, or overridden) gives PyTorch's
    prefill_kvp(tail=W) logits, on a left-padded batch."""
    from kvp_validate.runtime import OnnxKVP

    rt = OnnxKVP(tailed, "fp32", threads=1, tail=None if tail == TAIL else tail)
    assert rt.tail == tail
    ids, mask = rt.encode(PROMPTS)
    assert mask.sum(-1).min() < ids.shape[1]  # the batch is padded
    state = rt.prefill(ids, mask, "kvp")
    assert state.mode == "kvp"
    want = _torch_kvp(pipe, ids, mask, tail)
    np.testing.assert_allclose(state.logits, want, rtol=1e-4, atol=1e-4)
    if tail:  # the tail changes the computation (so the test above is not vacuous)
        assert not np.allclose(want, _torch_kvp(pipe, ids, mask, 0), atol=1e-3)


def test_onnx_tail_greedy_tokens_equal_pytorch(tailed, built):
    from kvp_export.runtime.pipeline import KVPPipeline
    from kvp_validate.runtime import OnnxKVP

    want = KVPPipeline.from_predictor(built["pred"], tail=TAIL).generate(PROMPTS, max_new_tokens=10, mode="kvp")
    got = OnnxKVP(tailed, "fp32", threads=1).generate(PROMPTS, max_new_tokens=10, mode="kvp")
    assert got.mode == "kvp" and got.token_ids == want.token_ids
    assert set(got.seconds) == {"kvp_prefill", "base_first_step", "total"}


def test_the_validator_runs_parity_and_ttft_with_the_tail(tailed):
    """Parity's reference is PyTorch with the export's tail; TTFT times the tailed path."""
    from kvp_validate.artifact import OnnxArtifact
    from kvp_validate.ttft import run_ttft

    assert_parity(tailed)
    art = OnnxArtifact.open(tailed)
    r = run_ttft(art, "fp32", lengths=(16,), batches=(1,), threads=1, warmup=0, repeats=1, sweep=())
    assert r["tail"] == TAIL and r["points"][0]["ms"]["kvp"] > 0
    with pytest.raises(KvpError, match="tail 4"):  # 2s + 2 + W
        run_ttft(art, "fp32", lengths=(7,), batches=(1,), threads=1, warmup=0, repeats=1, sweep=())


def test_kvp_first_step_flops_count_the_tail(tailed, fp32_export, assets):
    """The manifest's first-step count is the first step as run: the sink, the tail and the last token."""
    from kvp_export.models import load
    from kvp_validate.artifact import OnnxArtifact
    from kvp_validate.ttft import graph_flops, poly

    base, _ = load(str(assets["llama"]))
    t, p = (OnnxArtifact.open(f).manifest.flops["base_decode"] for f in (tailed, fp32_export))
    extra = poly(t.first_step, 20) - poly(p.first_step, 20)
    assert extra == pytest.approx(sum(poly(p.step, 20 + 1 + 1 + i) for i in range(TAIL)), rel=0.05)
    fl = graph_flops(OnnxArtifact.open(tailed), 1, 64)
    assert fl["kvp"] > graph_flops(OnnxArtifact.open(fp32_export), 1, 64)["kvp"]


def test_bad_tails_are_one_line_errors(tailed, fp32_export, built, tmp_path):
    from kvp_export.export.onnx_export import export_onnx
    from kvp_validate.runtime import OnnxKVP

    with pytest.raises(KvpError, match="tail must be >= 0"):
        OnnxKVP(tailed, "fp32", threads=1, tail=-1)
    rt = OnnxKVP(tailed, "fp32", threads=1, tail=6)
    with pytest.raises(KvpError, match="tail 6 needs prompts of more than 6 tokens"):
        rt.prefill(np.array([[5, 6, 7, 8, 9, 10]]), None, "kvp")
    # longer than the tail, shorter than KVP's minimum with it: the base, as any short prompt
    assert rt.prefill(np.arange(5, 14)[None], None, "kvp").mode == "base"
    assert rt.prefill(np.arange(5, 14)[None], None, "auto").mode == "base"
    with pytest.raises(KvpError, match="too short for a tail of 40"):
        export_onnx(built["pred"], tmp_path / "x", variants=("fp32",), prompt_len=40, tail=40, progress=False)
    assert not (tmp_path / "x").exists()
    r = CliRunner().invoke(main, ["generate", "--onnx", str(tailed), "--variant", "fp32", "--mode", "kvp",
                                  "--tail", "50", "--max-new-tokens", "2", "w1 w2 w3"])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith("error: tail 50 needs"), r.output
    r = CliRunner().invoke(main, ["generate", "--onnx", str(fp32_export), "--runtime", "genai", "--tail", "2", "w1"])
    assert r.exit_code == 1 and "takes no --tail" in r.output.strip().splitlines()[-1], r.output
    r = CliRunner().invoke(main, ["export", "genai-kvp", str(tailed)])
    assert r.exit_code == 1 and "no exact tail" in r.output.strip().splitlines()[-1], r.output


def test_generate_cli_with_a_tail(tailed):
    r = CliRunner().invoke(main, ["generate", "--onnx", str(tailed), "--variant", "fp32", "--mode", "kvp",
                                  "--threads", "1", "--max-new-tokens", "3", "--warm-repeats", "0", "--json", PROMPTS[0]])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["timing"]["tail"] == TAIL
