"""Small pieces of the validator: gates, sampling, tolerances (no models)."""

from __future__ import annotations

import numpy as np
import pytest

from kvp_validate.errors import KvpError
from kvp_validate.gates import Gate, evaluate, flatten
from kvp_validate.runtime import Sampling


def test_gate_parsing_and_evaluation():
    metrics = flatten({"parity": {"fp32": {"ok": True}, "int4": {"ok": False}}, "ttft": {"fp32": {"1x512": {"kvp_speedup": 1.7}}}})
    assert metrics == {"parity.fp32.ok": 1.0, "parity.int4.ok": 0.0, "ttft.fp32.1x512.kvp_speedup": 1.7}
    gates = [Gate.parse("parity.*.ok==1"), Gate.parse(" ttft.fp32.1x512.kvp_speedup >= 1.5 "), Gate.parse("ttft.x.y<2")]
    res = evaluate(gates, metrics)
    assert [(r["key"], r["ok"]) for r in res] == [("parity.fp32.ok", True), ("parity.int4.ok", False),
                                                   ("ttft.fp32.1x512.kvp_speedup", True), ("ttft.x.y", False)]
    assert res[-1]["reason"] == "no such metric in this report"  # a typo never passes
    for bad in ("speedup", "a.b => 1", "a.b >= x"):
        with pytest.raises(KvpError, match="invalid gate"):
            Gate.parse(bad)


def test_sampling_is_seeded_and_respects_top_k_top_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    greedy = Sampling().pick(logits[:2], np.random.default_rng(0))
    assert greedy.tolist() == [0, 0]
    top2 = Sampling(temperature=1.0, top_k=2).pick(logits, np.random.default_rng(0))
    assert set(top2.tolist()) == {0, 1}
    nucleus = Sampling(temperature=1.0, top_p=0.7).pick(logits, np.random.default_rng(0))
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 + 0.3 >= 0.7
    a = Sampling(temperature=0.8, seed=1).pick(logits, np.random.default_rng(1))
    b = Sampling(temperature=0.8, seed=1).pick(logits, np.random.default_rng(1))
    assert (a == b).all()
    with pytest.raises(KvpError, match="top-p"):
        Sampling(temperature=1.0, top_p=0).check()


def test_crossover_needs_kvp_to_win_by_the_margin_at_every_longer_length():
    from kvp_validate.crossover import MARGIN, crossover_from

    def pts(ratios):  # kvp_ms / base_ms at lengths 8, 16, 32, ...
        return [{"prompt_len": 8 << i, "base_ms": 100.0, "kvp_ms": 100.0 * r} for i, r in enumerate(ratios)]

    assert crossover_from(pts([1.5, 0.8, 0.7])) == 16
    # a win inside the noise (0.95) does not count: the default mode keeps the base there
    assert crossover_from(pts([1.5, 0.95, 0.8])) == 32
    # a loss at a longer length moves the crossover past it
    assert crossover_from(pts([0.5, 1.2, 0.8])) == 32
    assert crossover_from(pts([1.2, 1.1])) is None
    assert crossover_from(pts([1.0, 1.0]), margin=1.0) == 8 and MARGIN < 1


def test_spin_policies_map_to_onnxruntime_config_entries():
    from kvp_validate.runtime import session_options

    run = session_options(2)  # the default: spin only while a Run() is active
    assert run.get_session_config_entry("session.force_spinning_stop") == "1"
    off = session_options(2, spin="off")
    assert off.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    always = session_options(2, spin="always")
    with pytest.raises(RuntimeError, match="does not have configuration"):  # onnxruntime's own default
        always.get_session_config_entry("session.force_spinning_stop")
    with pytest.raises(KvpError, match="unknown spin policy 'busy'"):
        session_options(2, spin="busy")


def test_first_step_layout_gives_the_base_prefills_logits(tmp_path):
    """protocol.first_step: with the base's exact KV in the context, base_decode's module fed the
    first step (the sink re-fed at positions 0..s-1 with the context's sink slots masked, then the
    last token) gives the base's own next-token logits, for left-padded prompts; numpy and torch
    lay it out alike."""
    import torch
    from conftest import tiny_model

    from kvp_export.export.modules import Decoder
    from kvp_export.models import load
    from kvp_validate.protocol import first_step, positions

    base, _ = load(str(tiny_model(tmp_path / "m", layers=2, hidden=32)))
    ids = torch.randint(3, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pos = positions(mask)
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        ctx = Decoder(base, with_past=False, last_only=False)(ids[:, :-1], mask[:, :-1], pos[:, :-1])[1:]
        step = Decoder(base, with_past=True, last_only=True)
        for sink in (0, 1, 2):
            next_ids, next_pos, next_mask = first_step(ids, mask, sink)
            for got, np_got in zip((next_ids, next_pos, next_mask), first_step(ids.numpy(), mask.numpy(), sink)):
                assert (got.numpy() == np_got).all()
            logits = step(next_ids, next_mask, next_pos, *ctx)[0]
            assert torch.allclose(logits[:, -1], want, atol=1e-5), (sink, (logits[:, -1] - want).abs().max())
            assert next_pos[1].tolist() == [*range(sink), 8]  # 9 real tokens: the last sits at 8
