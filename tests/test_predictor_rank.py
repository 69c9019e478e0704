"""The reduced-rank predictor (`kvp fit --rank`): the closed form, persistence, the KVP prefill module and
its ONNX export, on the tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_kvp_module_matches_runtime, random_ids

from kvp_export import flops
from kvp_export.derive.prune import prune
from kvp_export.errors import KvpError
from kvp_export.predictor.layermap import lp_map
from kvp_export.predictor.module import KVPredictor
from kvp_export.predictor.ridge import fit_ridge, reduce_rank

KEPT = [0, 2]


def seqs(n=24, length=32, vocab=100, seed=0):
    return random_ids(n, length, vocab, seed)


def fit_rank(base, rank):
    return fit_ridge(base, prune(base, KEPT), seqs(), lp_map(KEPT, 4), kept=KEPT, rank=rank, progress=False)


def test_reduce_rank_is_exact_at_full_rank_and_keeps_the_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, 6, generator=g, dtype=torch.float64) + 3, torch.ones(200, 1, dtype=torch.float64)],
                  dim=1)
    ws = [torch.randn(7, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    xtx = x.T @ x
    down, outs, full = reduce_rank(ws, xtx, 6)  # the input's rank: nothing to lose
    for w, f, (weight, bias) in zip(ws, full, outs):
        assert torch.allclose(x @ f, x @ w, atol=1e-8)
        assert torch.allclose(x[:, :-1] @ down.T @ weight.T + bias, x @ w, atol=1e-8)
    _, _, low = reduce_rank(ws, xtx, 2)
    for w, f in zip(ws, low):  # a rank-2 map still predicts the mean exactly
        assert torch.allclose((x @ f).mean(0), (x @ w).mean(0), atol=1e-8)


def test_lower_rank_costs_accuracy_and_flops(base):
    full, rep_full = fit_rank(base, None)
    errs, costs = [], []
    for rank in (2, 8, 64):
        pred, rep = fit_rank(base, rank)
        assert pred.rank == rank and len(pred.down) == 4
        errs.append(sum(rep["val_rel_err_k"] + rep["val_rel_err_v"]))
        costs.append(flops.predictor_flops(pred, 10))
    assert errs[0] > errs[1] > errs[2] - 1e-6
    # rank 64 >= the input width: the same held-out error as the full map
    assert errs[2] == pytest.approx(sum(rep_full["val_rel_err_k"] + rep_full["val_rel_err_v"]), rel=1e-4)
    assert costs[0] < costs[1] < flops.predictor_flops(full, 10)


def test_rank_roundtrip_and_bad_rank(tmp_path):
    p = KVPredictor([0, 0, 1], "hidden", 8, 8, 4, sources=[[0], [0, 1], [1]], rank=3)
    torch.nn.init.normal_(p.down[1].weight)
    p.save(tmp_path)
    q = KVPredictor.load(tmp_path)
    assert q.rank == 3 and torch.equal(q.down[1].weight, p.down[1].weight) and q.down[1].in_features == 16
    assert "rank" not in KVPredictor([0], "hidden", 8, 8, 4).config()  # full-rank files are unchanged
    with pytest.raises(KvpError, match="hidden input"):
        KVPredictor([0], "kv", 8, 8, 4, rank=2)


def test_fit_refuses_a_rank_with_the_kv_input(built, tmp_path):
    from kvp_export.predictor.fit import fit

    with pytest.raises(KvpError, match="a reduced-rank predictor .--rank. needs the hidden predictor --input"):
        fit(built["aux"], tmp_path / "p", input="kv", rank=4, progress=False)
    assert not (tmp_path / "p").exists()


@pytest.fixture(scope="module")
def rank_pred(built, assets, tmp_path_factory):
    from kvp_export.predictor.fit import fit

    return fit(built["aux"], tmp_path_factory.mktemp("rank") / "pred", rank=4, calib=[str(assets["corpus"])],
               calib_tokens=2048, progress=False)


def test_kvp_module_with_a_rank_matches_the_pytorch_runtime(rank_pred):
    from kvp_export.runtime.pipeline import KVPPipeline

    pipe = KVPPipeline.from_predictor(rank_pred)
    assert pipe.predictor.rank == 4
    assert_kvp_module_matches_runtime(pipe, 1)


def test_onnx_export_of_a_rank_predictor_passes_fp32_parity(rank_pred, assets, tmp_path):
    from kvp_export.export.onnx_export import export_onnx
    from kvp_validate.artifact import OnnxArtifact
    from kvp_validate.parity import run_parity

    out = export_onnx(rank_pred, tmp_path / "export", variants=("fp32",), heldout=[str(assets["corpus"])], eval_n=8,
                      prompt_len=24, cont_len=8, crossover=False, progress=False)
    r = run_parity(OnnxArtifact.open(out), "fp32", threads=1)
    assert r["ok"], r["checks"]
