"""The algorithms under the stages, on tiny random models: layer choice and maps, RoPE,
capture, ridge, healing, the predictor file, the runtime's padding and sink handling."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids

from kvp_export.derive.heal import heal, targets_depths
from kvp_export.derive.prune import check_layers, prune, regular_layers
from kvp_export.errors import KvpError
from kvp_export.models import arch
from kvp_export.predictor.features import capture
from kvp_export.predictor.layermap import c_map, lp_map
from kvp_export.predictor.module import KVPredictor, two_sided_sources
from kvp_export.predictor.ridge import fit_ridge
from kvp_export.runtime.decode import decode
from kvp_export.runtime.kvp import SinkCache, prefill_full, prefill_kvp

seqs = random_ids


def test_required_layers_are_kept_within_the_same_count():
    """Gemma 3 270M's global layers (5, 11, 17) at keep 0.5: the plain pattern keeps none of them."""
    assert regular_layers(18, 0.5) == list(range(0, 18, 2))
    assert regular_layers(18, 0.5, [5, 11, 17]) == [0, 2, 5, 6, 8, 11, 12, 14, 17]
    assert regular_layers(18, 0.25, [5, 11, 17]) == [0, 5, 8, 11, 17]
    assert regular_layers(30, 0.5, [0, 2]) == regular_layers(30, 0.5)  # already kept: unchanged


def test_regular_pattern_matches_the_paper():
    assert regular_layers(28, 0.25) == [0, 4, 8, 12, 16, 20, 24]
    assert regular_layers(30, 0.5) == list(range(0, 30, 2))
    kept = regular_layers(28, 0.75)
    assert sorted(set(range(28)) - set(kept)) == list(range(3, 28, 4))
    assert regular_layers(30, 1.0) == list(range(30))
    for bad in (0.0, -1.0, 1.5):
        with pytest.raises(KvpError):
            regular_layers(30, bad)
    with pytest.raises(KvpError, match="out of range"):
        check_layers([0, 30], 30)


def test_layer_maps():
    # LP: a pruned layer reads the kept layer just before it
    assert lp_map([0, 4, 8], 10) == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    # C: contiguous chunks, larger first
    assert c_map(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert two_sided_sources([0, 0, 1, 1], [True, False, True, False], 2) == [[0], [0, 1], [1], [1, 2]]
    assert targets_depths([0, 2, 3], 6) == [1, 2, 5]


def test_capture_matches_the_cache(base):
    """Pre-RoPE keys from the k_proj hook, rotated, equal what transformers caches."""
    ids = seqs(2, 10)
    with capture(base) as got:
        out = base(input_ids=ids, use_cache=True)
    spec = arch.ArchSpec.of(base)
    for i, (cos, sin) in enumerate(arch.layer_rope(base, arch.positions(2, 10), torch.float32)):
        k = arch.apply_rope(arch.split_heads(got.keys[i], spec.n_kv_heads), cos, sin)
        assert torch.allclose(k, out.past_key_values.layers[i].keys, atol=1e-5)
        assert torch.allclose(arch.split_heads(got.values[i], spec.n_kv_heads), out.past_key_values.layers[i].values)
    assert got.hidden[spec.n_layers] is not None  # the final normed state, for two-sided sources


def test_ridge_recovers_kv_of_an_unpruned_aux(base):
    """With the aux equal to the base and K/V input, the best linear map is the identity."""
    aux = prune(base, list(range(4)))
    pred, report = fit_ridge(base, aux, seqs(24, 32), list(range(4)), input="kv", sink=1, progress=False)
    assert max(report["val_rel_err_k"] + report["val_rel_err_v"]) < 1e-3
    eye = torch.eye(pred.dims["out"])
    assert all(torch.allclose(lin.weight, eye, atol=1e-2) for lin in [*pred.k, *pred.v])


def test_two_sided_predictor_fits_better_than_one_sided(base):
    kept = [0, 2]
    aux = prune(base, kept)
    lmap = lp_map(kept, 4)
    data = seqs(24, 32)
    _, one = fit_ridge(base, aux, data, lmap, progress=False)
    _, two = fit_ridge(base, aux, data, lmap, kept=kept, progress=False)
    skipped = [1, 3]
    assert sum(two["val_rel_err_v"][i] for i in skipped) < sum(one["val_rel_err_v"][i] for i in skipped)


def test_bridge_healing_reduces_drift(base):
    kept = [0, 2]
    data = seqs(16, 32)
    raw, healed = prune(base, kept), prune(base, kept)
    stats = heal(base, healed, kept, data, "bridge", progress=False)
    assert [s["layer"] for s in stats["layers"]] == kept

    def drift(aux):
        with torch.no_grad():
            a = aux.model(input_ids=data, output_hidden_states=True).hidden_states
            b = base.model(input_ids=data, output_hidden_states=True).hidden_states
        return float(((a[1] - b[2]).norm(dim=-1) / b[2].norm(dim=-1))[:, 1:].mean())

    assert drift(healed) < drift(raw)
    # healing changes only down_proj
    for name, p in healed.named_parameters():
        if "down_proj" not in name:
            assert torch.equal(p, dict(raw.named_parameters())[name])


def test_predictor_roundtrip(tmp_path):
    p = KVPredictor([0, 0, 1], "hidden", 8, 8, 4, sources=[[0], [0, 1], [1]])
    torch.nn.init.normal_(p.k[1].weight)
    p.save(tmp_path)
    q = KVPredictor.load(tmp_path)
    assert q.sources == p.sources and q.layer_map == p.layer_map
    assert torch.equal(q.k[1].weight, p.k[1].weight)
    (tmp_path / "predictor.safetensors").write_bytes(b"garbage")
    with pytest.raises(KvpError, match="unreadable predictor"):
        KVPredictor.load(tmp_path)


def test_left_padded_batch_equals_single_prompts(base):
    """Prompts of different lengths in one batch give the same KVP logits and tokens as alone."""
    aux = prune(base, [0, 2])
    pred, _ = fit_ridge(base, aux, seqs(16, 32), lp_map([0, 2], 4), kept=[0, 2], progress=False)
    a, b = seqs(1, 12, seed=1)[0], seqs(1, 7, seed=2)[0]
    ids = torch.stack([a, torch.cat([torch.zeros(5, dtype=torch.long), b])])
    mask = torch.tensor([[1] * 12, [0] * 5 + [1] * 7])
    batched = prefill_kvp(base, aux, pred, ids, mask)
    for row, single in enumerate((a, b)):
        alone = prefill_kvp(base, aux, pred, single[None])
        assert torch.allclose(batched.logits[row], alone.logits[0], atol=1e-4)
    toks = decode(base, batched, 6)
    assert torch.equal(toks[1], decode(base, prefill_kvp(base, aux, pred, b[None]), 6)[0])


def untrained_kvp(base) -> tuple:
    """An aux of base layers 0 and 2 with an untrained predictor: the cache's shapes and sources, not values."""
    return prune(base, [0, 2]), KVPredictor([0, 0, 1, 1], "hidden", 64, 64, arch.ArchSpec.of(base).kv_dim)


def test_exact_sink_is_the_base_kv_and_memoised(base):
    aux, pred = untrained_kvp(base)
    ids = seqs(2, 9)
    ids[:, :2] = 5  # the same sink prefix in both rows
    sinks = SinkCache(base)
    pre = prefill_kvp(base, aux, pred, ids, sink_len=2, sinks=sinks)
    full = prefill_full(base, ids)
    for i in range(4):
        assert torch.allclose(pre.cache.layers[i].keys[:, :, :2], full.cache.layers[i].keys[:, :, :2], atol=1e-5)
    assert len(sinks._memo) == 1


def test_kv_sources_and_short_prompts(base):
    aux, pred = untrained_kvp(base)
    ids = seqs(1, 8)
    none = prefill_kvp(base, aux, pred, ids, kv_source="none")
    assert none.mask[0].tolist() == [1] + [0] * 6 + [1]  # only the sink and the last token
    torch.nn.init.normal_(pred.mean_v)
    spec = arch.ArchSpec.of(base)
    mean = arch.split_heads(pred.mean_v[0].clone().view(1, 1, -1), spec.n_kv_heads)[0, :, 0]
    for sink in (1, 3):
        # the mean KV is broadcast from the predictor's buffer: writing the exact sink into it
        # must not alias onto the other positions, nor into the buffer (it once did, silently)
        pre = prefill_kvp(base, aux, pred, ids, kv_source="mean", sink_len=sink)
        v = pre.cache.layers[0].values[0, :, sink:-1]  # positions after the sink, before the last token
        assert torch.allclose(v, mean[:, None].expand_as(v))
    one = prefill_kvp(base, aux, pred, ids[:, :1])  # nothing to predict: a plain prefill
    assert torch.allclose(one.logits, prefill_full(base, ids[:, :1]).logits)
    with pytest.raises(KvpError):
        prefill_kvp(base, aux, pred, ids, kv_source="bogus")


def test_tail_gives_the_last_tokens_exact_kv(base):
    """With a tail the base recomputes the prompt's last tokens over the predicted cache: their KV
    is the base's own given that cache, the positions before stay predicted, and a tail covering
    everything after the sink is the plain prefill; left padding keeps rows as they are alone."""
    aux, pred = untrained_kvp(base)
    torch.nn.init.normal_(pred.mean_v)  # an untrained predictor: far from the base's KV
    ids = seqs(1, 10)
    zero, three = prefill_kvp(base, aux, pred, ids), prefill_kvp(base, aux, pred, ids, tail=3)
    keys = [p.cache.layers[1].keys[0] for p in (zero, three)]
    assert torch.allclose(keys[0][:, :6], keys[1][:, :6])  # sink + predicted: the same
    assert not torch.allclose(keys[0][:, 6:9], keys[1][:, 6:9])  # the tail: the base's
    whole = prefill_kvp(base, aux, pred, ids, tail=100)  # clamped: only the sink is "predicted"
    assert torch.allclose(whole.logits, prefill_full(base, ids).logits, atol=1e-4)
    b = seqs(1, 7, seed=2)[0]
    padded = torch.stack([ids[0], torch.cat([torch.zeros(3, dtype=torch.long), b])])
    mask = torch.tensor([[1] * 10, [0] * 3 + [1] * 7])
    batched = prefill_kvp(base, aux, pred, padded, mask, tail=3)
    assert torch.allclose(batched.logits[1], prefill_kvp(base, aux, pred, b[None], tail=3).logits[0], atol=1e-4)
    with pytest.raises(KvpError):
        prefill_kvp(base, aux, pred, ids, tail=-1)


def test_pickle_weights_are_refused(tmp_path, assets):
    """A folder with only pytorch_model.bin (pickle) is refused; weights load from safetensors only."""
    from transformers import AutoModelForCausalLM

    from kvp_export.models import load

    model = AutoModelForCausalLM.from_pretrained(assets["llama"])
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(KvpError, match="cannot load model"):
        load(str(tmp_path / "bin"))
