"""Core ML export on the tiny random Llama: the converted modules, both targets, compression, the
Linux checks, the validator's Core ML section, and bad input.

No Core ML runtime exists on Linux: predictions, states and MLComputePlan are macOS-only, so
the validator must report them as unmeasured, never as numbers.
"""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import one_thread, random_ids, tiny_export
from test_cli import kvp, ok, user_error

from kvp_export.errors import KvpError
from kvp_export.export.coreml import checks, stateful
from kvp_export.export.coreml.export import export_coreml
from kvp_export.models import arch
from kvp_export.runtime.pipeline import KVPPipeline
from kvp_validate import coreml as vc
from kvp_validate import mlpackage


@pytest.fixture(scope="module")
def exported(built, assets, tmp_path_factory):
    """Both targets, fp16 and int8 (module-scoped: conversion takes seconds per package)."""
    return tiny_export("coreml", built, assets, tmp_path_factory, context=64, prompt_lengths=[8, 16],
                       targets=["ios18", "ios17"], compress=["fp16", "int8"])


def manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# ---------------------------------------------------------------- the modules that are converted


@pytest.mark.parametrize("input_mode,sink_len", [("hidden", 1), ("kv", 0), ("hidden", 2)])
@pytest.mark.parametrize("is_stateful", [True, False])
def test_converted_modules_match_the_hf_path(assets, tmp_path, input_mode, sink_len, is_stateful):
    """Right-padded prefill + decode steps of the stateful/stateless modules equal prefill_kvp + HF decoding."""
    from kvp_export.derive import derive
    from kvp_export.predictor.fit import fit

    aux = derive(tmp_path / "aux", base=str(assets["llama"]), keep=0.5, heal="none", progress=False)
    pred = fit(aux, tmp_path / "pred", input=input_mode, sink=sink_len, calib=[str(assets["corpus"])],
               calib_tokens=2048, progress=False)
    pipe = KVPPipeline.from_predictor(pred)
    prefill, decode = stateful.build(pipe.base, pipe.aux, pipe.predictor, sink_len, 48, is_stateful)
    ids = torch.randint(3, 100, (1, 11))
    tokens, ref = checks.reference(pipe.base, pipe.aux, pipe.predictor, sink_len, ids, steps=6)
    r = checks.numeric_check(prefill, decode, is_stateful, ids, 16, tokens, ref)
    assert r["float32"]["rel"] < 1e-5 and r["float32"]["top1_agreement"] == 1.0
    assert r["float16"]["ok"] and r["ok"]


@pytest.mark.parametrize("sink_len", [0, 1, 2])
def test_prefill_reads_the_protocols_first_step(base, monkeypatch, sink_len):
    """The base pass of the Core ML prefill reads kvp_validate.protocol's re-fed first step: the
    tokens and positions first_step gives for the same prompt (the sink's, then the last token's),
    of a prompt right-padded into the exported length."""
    from kvp_export.derive.prune import prune
    from kvp_export.predictor.module import KVPredictor
    from kvp_validate.protocol import first_step

    aux = prune(base, [0, 2])
    pred = KVPredictor([0, 0, 1, 1], "hidden", 64, 64, arch.ArchSpec.of(base).kv_dim)
    prefill, _ = stateful.build(base, aux, pred, sink_len, 32, False)
    ids = random_ids(1, 11)
    x = torch.zeros(1, 16, dtype=torch.int32)
    x[0, :11] = ids[0]
    seen = {}
    prefill.base.embed.register_forward_pre_hook(lambda _m, args: seen.update(ids=args[0]))  # None: args unchanged
    rope = prefill.base.rope
    monkeypatch.setattr(prefill.base, "rope", lambda pos: rope(seen.setdefault("pos", pos)))
    with torch.no_grad():
        prefill(x, torch.tensor([10], dtype=torch.int32))
    want_ids, want_pos, _ = first_step(ids, torch.ones_like(ids), sink_len)
    assert seen["ids"].tolist() == want_ids.tolist() and seen["pos"].tolist() == want_pos[0].tolist()


def test_scaled_rmsnorm_is_rmsnorm_and_survives_fp16(built):
    """The sink token's residual reaches ~2.4e4 in SmolLM2; x**2 overflows fp16 (coremltools drops HF's fp32 upcast)."""
    base = KVPPipeline.from_predictor(built["pred"]).base
    hf = base.model.norm
    norm = stateful.ScaledRMSNorm(hf, arch.adapter(base))
    x = torch.randn(3, 64)
    x[0, 5] = 2.4e4
    with torch.no_grad():
        assert torch.allclose(norm(x), hf(x), rtol=1e-4, atol=1e-5)
        plain = x.half() * torch.rsqrt(x.half().pow(2).mean(-1, keepdim=True) + 1e-6)  # no upcast: fp16 squares
        assert not torch.isfinite(x.half().pow(2)).all() and plain[0].abs().max() < 1e-2
        assert torch.allclose(norm.half()(x.half()).float(), hf.float()(x), rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------- the export and its Linux checks


def test_layout_manifest_and_checks(exported):
    m = manifest(exported)
    assert m["stage"] == "coreml" and set(m["variants"]) == {"ios18-fp16", "ios18-int8", "ios17-fp16", "ios17-int8"}
    assert m["model"]["cache_shape"] == [4, 1, 2, 64, 16] and m["model"]["prompt_lengths"] == [8, 16]
    for v in m["variants"].values():
        for p in v["packages"].values():
            assert (exported / p["path"]).is_dir() and p["bytes"] == mlpackage.package_bytes(exported / p["path"])
        assert v["weights"]["ok"] and not v["weights"]["unmatched"] and v["weights"]["compared"] > 10
        assert v["seconds"]["total"] > 0
    assert m["variants"]["ios18-int8"]["bytes"] < m["variants"]["ios18-fp16"]["bytes"]
    assert m["variants"]["ios18-fp16"]["weights"]["max_rel"] < 1e-3 < m["variants"]["ios18-int8"]["weights"]["max_rel"]
    for target in ("ios18", "ios17"):
        num = m["checks"]["numeric"][target]
        assert num["ok"] and num["float32"]["rel"] < 1e-5 and num["padded_to"] == 8
    ref = np.load(exported / "reference.npz")
    assert ref["logits"].shape == (8, m["model"]["vocab"]) and ref["tokens"].shape == (1, 8)
    assert (exported / "tokenizer" / "tokenizer.json").is_file()


def test_stateful_package_is_one_multifunction_model_with_shared_state(exported):
    m = manifest(exported)
    v = m["variants"]["ios18-fp16"]
    assert v["stateful"] and v["multifunction"] and list(v["packages"]) == ["kvp"]
    iface = mlpackage.interface(exported / v["packages"]["kvp"]["path"])
    assert iface["default_function"] == "decode" and set(iface["functions"]) == {"prefill", "decode"}
    pre, dec = iface["functions"]["prefill"], iface["functions"]["decode"]
    assert pre["states"] == dec["states"] and [s["name"] for s in pre["states"]] == ["key_cache", "value_cache"]
    assert all(s["shape"] == [4, 1, 2, 64, 16] and s["dtype"] == "fp16" for s in pre["states"])
    ids = next(x for x in pre["inputs"] if x["name"] == "input_ids")
    assert sorted(ids["enumerated"]) == [[1, 8], [1, 16]]
    assert vc.spec_problems(iface, vc.expected_interface(m["model"], "ios18"), m["model"]["vocab"]) == []
    # The base weights both functions read are stored once.
    pkg = exported / v["packages"]["kvp"]["path"]
    per_function = sum(w.nbytes // 2 for w in mlpackage.weights(mlpackage.program(pkg)).values())  # fp16 bytes
    assert (pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size < 0.7 * per_function


def test_stateless_pair_has_the_cache_as_inputs_and_outputs(exported):
    m = manifest(exported)
    v = m["variants"]["ios17-fp16"]
    assert not v["stateful"] and set(v["packages"]) == {"prefill", "decode"}
    dec = mlpackage.interface(exported / v["packages"]["decode"]["path"])["functions"]["main"]
    assert [x["name"] for x in dec["inputs"]] == ["input_ids", "position", "key_cache", "value_cache"]
    assert [o["name"] for o in dec["outputs"]] == ["logits", "new_keys", "new_values"] and not dec["states"]
    assert m["model"]["cache_shape"] in [x["shape"] for x in dec["inputs"]]


def test_ops_and_neural_engine_lint(exported):
    v = manifest(exported)["variants"]["ios18-int8"]
    pkg = v["packages"]["kvp"]
    assert pkg["ops"]["decode"]["coreml_update_state"] == 2 and pkg["ops"]["prefill"]["read_state"] == 2
    assert pkg["ops"]["decode"]["constexpr_blockwise_shift_scale"] > 10  # int8 weights, dequantized at load
    rules = {(d["rule"], d["function"]) for d in pkg["lint"]}
    assert ("enumerated-shape", "prefill") in rules and ("state-size", "decode") in rules
    assert not [d for d in pkg["lint"] if d["rule"] in ("fp32-compute", "dynamic-shape")]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_lint_flags_fp32_compute_and_ranged_shapes(tmp_path):
    ct = mlpackage.coremltools()
    traced = torch.jit.trace(torch.nn.Linear(16, 20000).eval(), torch.zeros(2, 16))
    shape = ct.Shape(shape=(ct.RangeDim(1, 8), 16))
    model = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=shape)], compute_precision=ct.precision.FLOAT32,
                       minimum_deployment_target=ct.target.iOS17, skip_model_load=True)
    model.save(str(tmp_path / "m.mlpackage"))
    found = mlpackage.lint(mlpackage.program(tmp_path / "m.mlpackage"), mlpackage.interface(tmp_path / "m.mlpackage"))
    assert {"fp32-compute", "dynamic-shape", "wide-layer"} <= {d["rule"] for d in found}


def test_compressed_int4_and_palettized(built, assets, tmp_path):
    with one_thread():
        out = export_coreml(built["pred"], tmp_path / "c", context=32, prompt_lengths=(8,), targets=("ios18",),
                            compress=("int4", "palettize4"), heldout=[str(assets["corpus"])], progress=False)
    m = manifest(out)
    ops = {k: v["packages"]["kvp"]["ops"]["decode"] for k, v in m["variants"].items()}
    assert ops["ios18-int4"].get("constexpr_blockwise_shift_scale") and ops["ios18-palettize4"].get(
        "constexpr_lut_to_dense")
    for v in m["variants"].values():
        assert v["weights"]["ok"] and 0.02 < v["weights"]["max_rel"] < v["weights"]["tolerance"]
    assert m["recipe"]["compressions"]["int4"]["block_size"] == 32


# ---------------------------------------------------------------- the validator's Core ML section


def test_validator_section_reports_linux_checks_and_leaves_macos_unmeasured(exported):
    s = vc.section(exported)
    assert s["ok"] and not s["macos"]["measured"] and "macOS" in s["macos"]["reason"]
    for c in s["linux_checks"].values():
        assert c["ok"] and c["spec"]["ok"] and c["weights"]["ok"] and c["numeric"]["float32"]["ok"]
    for per in s["macos"]["variants"].values():
        assert set(per) == set(vc.COMPUTE_UNITS)
        assert all(val == vc.UNMEASURED for m in per.values() for val in m.values())
    md = vc.markdown(s)
    assert vc.UNMEASURED in md and "ios17-int8" in md and "ms" in md


def test_macos_gate_without_the_runtime(monkeypatch):
    """Even where platform says Darwin, no Core ML runtime means no measurement."""
    assert not vc.runtime_status()[0]
    monkeypatch.setattr(vc.platform, "system", lambda: "Darwin")
    measured, why = vc.runtime_status()
    assert not measured and "runtime" in why


def test_spec_check_catches_a_wrong_interface(exported):
    m = manifest(exported)
    iface = mlpackage.interface(exported / m["variants"]["ios18-fp16"]["packages"]["kvp"]["path"])
    model = m["model"] | {"prompt_lengths": [8, 32], "cache_shape": [4, 1, 2, 128, 16]}
    problems = vc.spec_problems(iface, vc.expected_interface(model, "ios18"), m["model"]["vocab"])
    assert any("input_ids" in p for p in problems) and any("states" in p for p in problems)
    assert vc.spec_problems(iface, vc.expected_interface(m["model"], "ios17"), m["model"]["vocab"])


def test_validate_coreml_cli_and_no_torch(exported, tmp_path):
    text = ok(kvp("validate", exported, "-o", tmp_path / "rep")).stdout
    assert "### Checks on any host" in text and vc.UNMEASURED in text
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["ok"]
    code = ("import sys; sys.modules['torch'] = None\n"  # an import of torch now fails
            "from kvp_validate.coreml import section\n"
            f"s = section({str(exported)!r})\n"
            "assert s['ok'] and 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_leaves_nothing(built, exported, tmp_path):
    pred, out = built["pred"], tmp_path / "out"
    user_error(kvp("export", "coreml", "--predictor", pred, "--target", "ios18", "--target", "ios17", "--compress", "int4",
                   "-o", out), "int4 .* needs iOS 18", out)
    user_error(kvp("export", "coreml", "--predictor", pred, "--target", "ios17", "--compress", "palettize4", "-o", out),
               "palettize4 .* needs iOS 18", out)
    user_error(kvp("export", "coreml", "--predictor", pred, "--context", "512", "--prompt-lengths", "8,16", "-o", out),
               "context 512 is longer than the base supports \\(256\\)", out)
    user_error(kvp("export", "coreml", "--predictor", pred, "--context", "64", "--prompt-lengths", "8,64", "-o", out),
               "leaves no room to generate", out)
    user_error(kvp("export", "coreml", "--predictor", tmp_path / "nope", "-o", out), "no such folder", out)
    user_error(kvp("export", "coreml", "--predictor", pred, "-o", exported), "output folder exists")
    orphan = tmp_path / "orphan"  # a predictor whose aux folder is gone
    shutil.copytree(pred, orphan)
    m = manifest(orphan)
    m["inputs"]["aux"]["path"] = str(tmp_path / "gone")
    (orphan / "manifest.json").write_text(json.dumps(m))
    user_error(kvp("export", "coreml", "--predictor", orphan, "-o", out), "no such file or folder: .*gone", out)

    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    shutil.rmtree(broken / "ios17-int8" / "kvp_decode.mlpackage")
    report = tmp_path / "rep"
    user_error(kvp("validate", broken, "-o", report), "missing Core ML package .*kvp_decode", report)
    user_error(kvp("validate", tmp_path / "nope", "-o", report), "no such export folder", report)
    user_error(kvp("validate", pred, "-o", report), "'predictor' artifact, expected an ONNX or Core ML export", report)


class TorchFunction:
    """A stand-in for one loaded Core ML function, backed by the PyTorch module that was converted:
    it runs the validator's macOS driver (padding, state sharing, the stateless hand-off) on Linux.
    Its outputs are PyTorch's, so no Core ML number comes from it."""

    def __init__(self, module, outputs: list[str]):
        self.module, self.outputs = module, outputs
        self.inputs = list(inspect.signature(module.forward).parameters)

    def make_state(self):
        return {name: torch.zeros_like(getattr(self.module, name)) for name in ("key_cache", "value_cache")}

    def predict(self, feed, state=None):
        args = [torch.from_numpy(np.asarray(feed[name])) for name in self.inputs]
        args = [a.float() if a.is_floating_point() else a for a in args]
        with torch.no_grad():
            if state is not None:
                self.module.key_cache.copy_(state["key_cache"])
                self.module.value_cache.copy_(state["value_cache"])
            out = self.module(*args)
            if state is not None:
                state["key_cache"].copy_(self.module.key_cache)
                state["value_cache"].copy_(self.module.value_cache)
        out = out if isinstance(out, tuple) else (out,)
        return {name: o.numpy() for name, o in zip(self.outputs, out)}


@pytest.mark.parametrize("target", ["ios18", "ios17"])
def test_macos_driver_reproduces_the_reference(exported, built, target):
    """The validator's prefill/decode driver, on the converted modules, gives the stored reference outputs."""
    art = vc.CoremlExport(exported)
    pipe = KVPPipeline.from_predictor(built["pred"])
    modules = stateful.build(pipe.base, pipe.aux, pipe.predictor, pipe.sink_len, art.model["context"],
                             target == "ios18")
    want = vc.expected_interface(art.model, target)
    models = {fn: TorchFunction(m, want[fn]["outputs"]) for fn, m in zip(("prefill", "decode"), modules)}
    rt = vc.CoremlKVP(models, target == "ios18", art.model["cache_shape"], art.model["prompt_lengths"])
    r = vc.parity(rt, art.reference(), tol=1e-4 if target == "ios18" else 1e-3)  # ios17: the host's cache is fp16
    assert r["ok"] and r["top1_agreement"] == 1.0 and r["greedy_agreement"] == 1.0
    assert set(vc.ttft(rt, art.reference(), repeats=1)) == {"8", "16"}
    with pytest.raises(KvpError, match="longer than the longest exported prompt length 16"):
        rt.prefill(np.ones((1, 17), np.int32), rt.session())


def test_export_is_byte_identical(exported, built, assets, tmp_path):
    """The same conversion again, in another process, writes the same bytes: a package's
    Manifest.json names its items by path, not by the random UUIDs coremltools draws, and its model
    spec has its protobuf maps sorted, not in the order of the process's string hashing (the
    manifests' `files` agree; one target and compression of `exported`, which converts each
    target on its own)."""
    import os

    again = tmp_path / "again"
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # another hash order than this process's
    proc = subprocess.run([sys.executable, "-m", "kvp_export.cli", "export", "coreml", "--predictor", str(built["pred"]),
                           "--context", "64", "--prompt-lengths", "8,16", "--target", "ios18", "--compress", "fp16",
                           "--heldout", str(assets["corpus"]), "-o", str(again)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (manifest(d)["files"] for d in (exported, again))
    assert any(rel.endswith("Manifest.json") for rel in b) and set(b) <= set(a)
    assert [rel for rel in b if a[rel] != b[rel]] == []
