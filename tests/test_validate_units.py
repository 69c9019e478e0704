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
