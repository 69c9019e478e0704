"""Every supported family, through the whole toolchain on its tiny random model.

derive -> fit -> train (two steps) -> generate (PyTorch KVP) -> ONNX export -> parity -> ONNX generation -> the Core
ML modules' numeric check (what Linux allows: no Core ML prediction here). A family registered
in kvp_export/models/adapters/ without a tiny model (tiny_models.py) fails
`test_every_family_has_a_tiny_model` (optimum's test_all_models_tested pattern).
"""

from __future__ import annotations

import pytest
import torch
from conftest import corpus_folder, tiny_model
from tiny_models import TINY

from kvp_export.models.adapters import ADAPTERS

FAMILIES = sorted(ADAPTERS)
LONG = 40  # tokens: past every tiny model's sliding window


def test_every_family_has_a_tiny_model():
    assert set(TINY) == set(ADAPTERS), "each adapter needs a tiny model in tests/tiny_models.py (and back)"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_folder(tmp_path_factory.mktemp("families") / "corpus", files=4, words=400)


def _hf_logits(model, ids, mask=None):
    from kvp_validate.protocol import positions

    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_runner_matches_hf_layers(tmp_path, family):
    """The adapter's run_layer, composed from the parts it names, gives each of transformers' own
    layers' outputs (healing and importance run layers this way), past the sliding window."""
    from kvp_export.models import arch, load

    model, _ = load(str(tiny_model(tmp_path / "m", family, hidden=32)))
    ids = torch.randint(3, 100, (2, LONG))
    want = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: want.append(out[0] if isinstance(out, tuple) else out))
             for layer in arch.decoder_layers(model)]
    with torch.no_grad():
        model(input_ids=ids)
        got = [out for _, _, out in arch.layer_io(model, ids)]
    for h in hooks:
        h.remove()
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.allclose(g, w, atol=1e-5), (i, (g - w).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_module_matches_hf_past_the_window(tmp_path, family):
    """The export module (prefill, then decode steps on its own cache) equals transformers over a
    left-padded batch longer than any tiny sliding window."""
    from kvp_export.export.modules import Decoder
    from kvp_export.models import load
    from kvp_validate.protocol import positions

    model, _ = load(str(tiny_model(tmp_path / "m", family, hidden=32)))
    ids = torch.randint(3, 100, (2, LONG))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    want = _hf_logits(model, ids, mask)
    pos = positions(mask)
    n = LONG - 4
    with torch.no_grad():
        got = [Decoder(model, with_past=False, last_only=False)(ids[:, :n], mask[:, :n], pos[:, :n])]
        step = Decoder(model, with_past=True, last_only=False)
        past = got[0][1:]
        for t in range(n, LONG):
            out = step(ids[:, t : t + 1], mask[:, : t + 1], pos[:, t : t + 1], *past)
            got.append(out[:1])
            past = out[1:]
    got = torch.cat([g[0] for g in got], dim=1)
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-4), (got[real] - want[real]).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_through_the_toolchain(tmp_path, corpus, family):
    from kvp_export.derive import derive
    from kvp_export.export.coreml import checks, stateful
    from kvp_export.export.onnx_export import export_onnx
    from kvp_export.predictor.fit import fit
    from kvp_export.runtime.pipeline import KVPPipeline
    from kvp_export.train import train
    from kvp_validate.artifact import OnnxArtifact
    from kvp_validate.parity import run_parity
    from kvp_validate.runtime import OnnxKVP

    base = tiny_model(tmp_path / "base", family, hidden=32, context=128)
    calib = [str(corpus)]
    aux = derive(tmp_path / "aux", base=str(base), keep=0.5, heal="bridge", calib=calib, calib_tokens=1024,
                 progress=False)
    pred = fit(aux, tmp_path / "pred", calib=calib, calib_tokens=1024, progress=False)
    trained = train(tmp_path / "trained", predictor=pred, steps=2, data=calib, seq_len=LONG, batch=2, progress=False)
    assert KVPPipeline.from_predictor(trained).aux is not None
    pipe = KVPPipeline.from_predictor(pred)
    words = " ".join(f"w{i % 90}" for i in range(LONG))
    prompts = [words, "w9 w8 ( ) : = w10 w11 w12 w13 w14 w15 w16"]
    want = pipe.generate(prompts, max_new_tokens=6, mode="kvp")

    onnx = export_onnx(pred, tmp_path / "onnx", variants=("fp32",), heldout=calib, eval_n=4, prompt_len=LONG,
                       cont_len=6, crossover=False, progress=False)
    parity = run_parity(OnnxArtifact.open(onnx), "fp32", threads=1)
    assert parity["ok"], parity["checks"]
    rt = OnnxKVP(onnx, "fp32", threads=1)
    assert rt.generate(prompts, max_new_tokens=6, mode="kvp").token_ids == want.token_ids
    pipe.tail = 3  # an exact tail through the same graphs (sliding windows: the sink is settled after it)
    tailed = OnnxKVP(onnx, "fp32", threads=1, tail=3).generate(prompts, max_new_tokens=6, mode="kvp")
    assert tailed.mode == "kvp" and tailed.token_ids == pipe.generate(prompts, max_new_tokens=6, mode="kvp").token_ids
    pipe.tail = 0
    # the exported base decoder against transformers' own greedy generation, past the window
    ids = pipe.tokenizer(words, return_tensors="pt").input_ids[:, :LONG]
    with torch.no_grad():
        hf = pipe.base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                pad_token_id=pipe.tokenizer.eos_token_id)[0, LONG:].tolist()
    assert rt.generate([pipe.tokenizer.decode(ids[0])], max_new_tokens=6, mode="base").token_ids[0][: len(hf)] == hf

    prefill, decode = stateful.build(pipe.base, pipe.aux, pipe.predictor, pipe.sink_len, 64, True)
    tokens, ref = checks.reference(pipe.base, pipe.aux, pipe.predictor, pipe.sink_len, ids, steps=6)
    r = checks.numeric_check(prefill, decode, True, ids, 48, tokens, ref)
    assert r["float32"]["rel"] < 1e-5 and r["float32"]["top1_agreement"] == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_bridge_healing_never_does_worse_than_not_moving(tmp_path, family):
    """The bridge lowers each kept layer's output error or leaves the layer as it was; a family with a
    norm after the MLP (Gemma 3) has that norm's factor refitted too (it sets the branch's size)."""
    from kvp_export.derive.heal import heal
    from kvp_export.derive.prune import prune
    from kvp_export.models import arch, load

    base, _ = load(str(tiny_model(tmp_path / "m", family, hidden=32)))
    n = arch.ArchSpec.of(base).n_layers
    kept = [0, n - 1]
    raw, healed = prune(base, kept), prune(base, kept)
    stats = heal(base, healed, kept, torch.randint(3, 100, (16, LONG)), "bridge", progress=False)
    ad = arch.adapter(base)
    for st, before, after in zip(stats["layers"], ad.layers(raw), ad.layers(healed)):
        assert st["val_error_ratio"] <= 1 or st.get("reverted"), st
        post = ad.mlp_post_norm(after)
        if post is not None and not st.get("reverted"):
            assert not torch.equal(post.weight, ad.mlp_post_norm(before).weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_selection_scores_are_the_loss_of_the_model_without_that_layer(tmp_path, family):
    """`--select loss` scores layer i by the calibration NLL of the base without it: the same as
    transformers' own forward of the pruned copy, past the window; required layers are kept."""
    import torch.nn.functional as F

    from kvp_export.derive.prune import loss_layers, prune
    from kvp_export.models import arch, load

    base, _ = load(str(tiny_model(tmp_path / "m", family, hidden=32)))
    n = arch.ArchSpec.of(base).n_layers
    ids = torch.randint(3, 100, (2, LONG))
    kept, score = loss_layers(base, ids, n_keep=n - 1)
    assert len(kept) == n - 1 and 0 in kept and set(arch.adapter(base).required_layers()) <= set(kept)
    for i in range(n):
        with torch.no_grad():
            logits = prune(base, [j for j in range(n) if j != i])(input_ids=ids).logits[:, :-1]
        want = float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()))
        assert abs(score[i] - want) < 1e-4 * max(1.0, want), (i, score[i], want)
