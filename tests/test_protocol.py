"""The KVP protocol (kvp_validate.protocol) and the paths that follow it, on the tiny random Llama:
its two first-step layouts (the sink re-fed, as the exported graphs and Core ML do; the sink in
place, as the PyTorch runtime does) are the same computation, and the PyTorch prefill gives the
re-fed layout's logits, so a path whose split, sink or tail drifts from the protocol fails here.
Core ML's first step is held to the protocol in tests/test_coreml.py."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids

from kvp_export.derive.prune import prune
from kvp_export.export.modules import Decoder
from kvp_export.models import arch
from kvp_export.predictor.module import KVPredictor
from kvp_export.runtime.kvp import predict_kv, prefill_kvp
from kvp_validate.protocol import context_len, first_step, min_kvp_len, positions


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, of 14 and 10 tokens, left-padded."""
    ids = random_ids(2, 14, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def flat(kv) -> list[torch.Tensor]:
    return [t for pair in kv for t in pair]


@pytest.mark.parametrize("refeed", [True, False])
@pytest.mark.parametrize("sink_len,tail", [(0, 0), (2, 0), (1, 3)])
def test_both_layouts_over_the_exact_context_give_the_base_logits(base, sink_len, tail, refeed):
    """With the base's own KV for the first context_len columns, either first-step layout fed to
    the export's decoder module gives the base's next-token logits; numpy lays it out as torch."""
    ids, mask = left_padded()
    c = context_len(ids.shape[1], tail)
    pos = positions(mask)
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        ctx = Decoder(base, with_past=False, last_only=False)(ids[:, :c], mask[:, :c], pos[:, :c])[1:]
        step = first_step(ids, mask, sink_len, tail=tail, refeed=refeed)
        for got, np_got in zip(step, first_step(ids.numpy(), mask.numpy(), sink_len, tail=tail, refeed=refeed)):
            assert (got.numpy() == np_got).all()
        next_ids, next_pos, next_mask = step
        assert next_ids.shape[1] == (sink_len if refeed else 0) + 1 + tail
        assert next_mask.shape[1] == c + next_ids.shape[1]
        got = Decoder(base, with_past=True, last_only=True)(next_ids, next_mask, next_pos, *ctx)[0][:, -1]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("sink_len,tail", [(0, 0), (1, 0), (2, 0), (1, 3), (2, 3)])
def test_pytorch_prefill_is_the_protocols_first_step(base, sink_len, tail):
    """prefill_kvp (the exact sink written into the predicted cache, the base over the last W + 1
    tokens) gives the logits of the protocol's re-fed first step over the same predicted cache, the
    exported graphs' layout, on a left-padded batch. An untrained predictor keeps the predicted KV
    far from the base's, so a sink or tail in the wrong columns changes the logits."""
    torch.manual_seed(0)
    aux = prune(base, [0, 2])
    pred = KVPredictor([0, 0, 1, 1], "hidden", 64, 64, arch.ArchSpec.of(base).kv_dim)
    ids, mask = left_padded()
    assert int(mask.sum(-1).min()) >= min_kvp_len(sink_len, tail)
    c = context_len(ids.shape[1], tail)
    with torch.no_grad():
        want = prefill_kvp(base, aux, pred, ids, mask, sink_len=sink_len, tail=tail)
        kv = predict_kv(base, aux, pred, ids[:, :c], mask[:, :c], positions(mask[:, :c]))
        next_ids, next_pos, next_mask = first_step(ids, mask, sink_len, tail=tail)
        got = Decoder(base, with_past=True, last_only=True)(next_ids, next_mask, next_pos, *flat(kv))[0][:, -1]
        assert torch.allclose(got, want.logits, atol=1e-4), (got - want.logits).abs().max()
        assert torch.equal(want.next_pos, next_pos[:, -1] + 1)
        if sink_len:  # the sink matters here: the test would see it misplaced
            assert not torch.allclose(want.logits, prefill_kvp(base, aux, pred, ids, mask, sink_len=0, tail=tail).logits,
                                      atol=1e-3)


def test_context_len_clamps_the_tail_to_one_predicted_column():
    assert [context_len(10, w) for w in (0, 3, 8, 100)] == [9, 6, 1, 1]
    assert context_len(2, 5) == 1 and context_len(1) == 0  # one token: nothing to predict
    assert context_len(min_kvp_len(2, 3), 3) == 2 * 2 + 1  # the shortest KVP prompt: s + s predicted
