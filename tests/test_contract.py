"""The artifact contract (kvp_validate.contract) and the metric keys (kvp_validate.metrics): what
the writers write is what the readers parse, a manifest that breaks it is refused in one line
naming the field, validation reports carry a manifest like every folder."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import reseal

from kvp_export.artifacts import read_contract, write_manifest
from kvp_validate.artifact import OnnxArtifact
from kvp_validate.contract import MANIFEST, REPORT_JSON, OnnxManifest, ValidationManifest, read_report
from kvp_validate.errors import KvpError
from kvp_validate.integrity import sha256_file
from kvp_validate.metrics import AUTO, DELTA_NLL_VS_FP32, NLL_VS_FP32, WORST_VS_BASE, metric_key, report_metrics
from kvp_validate.parity import tolerances_for
from kvp_validate.report import write_report_folder


def test_an_export_is_read_as_its_typed_manifest(fp32_export):
    art = OnnxArtifact.open(fp32_export)
    assert isinstance(art.manifest, OnnxManifest)
    assert art.variants == ["fp32"] and art.manifest.eval.n == 8 and art.manifest.model.sink_len >= 0
    assert set(art.manifest.io) == set(art.manifest.variants["fp32"])
    prompts, conts = art.eval_pairs(3)
    assert prompts.shape == (3, 24) and conts.shape == (3, 8)


@pytest.mark.parametrize("edit, field", [(lambda m: m.pop("eval"), "eval"),
                                         (lambda m: m["model"].update(vocab="many"), "model.vocab")])
def test_a_manifest_that_breaks_the_contract_is_refused_naming_the_field(fp32_export, tmp_path, edit, field):
    copy = tmp_path / "export"
    shutil.copytree(fp32_export, copy)
    m = json.loads((copy / MANIFEST).read_text())
    edit(m)
    (copy / MANIFEST).write_text(json.dumps(m))
    reseal(copy)
    with pytest.raises(KvpError, match=rf"breaks the 'onnx' contract at '{field}'"):
        OnnxArtifact.open(copy)


def test_a_writer_cannot_write_a_manifest_its_readers_would_refuse(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(AssertionError, match="layer_map"):
        write_manifest(tmp_path, "aux", inputs={})  # an aux without its layer map
    assert not (tmp_path / MANIFEST).exists()
    write_manifest(tmp_path, "aux", inputs={}, layer_map={"kind": "lp", "map": [0, 0]})
    assert read_contract(tmp_path, "aux").layer_map.map == [0, 0]


def test_a_validation_report_has_a_manifest_naming_its_export(fp32_export, tmp_path):
    payload = {"export": str(fp32_export), "created": "now", "machine": {}, "variants": [], "model": {},
               "results": {}, "metrics": {}, "gates": [], "ok": True}
    out = write_report_folder(tmp_path / "report", payload, "# report")
    m = read_contract(out, "validation")  # every file checked against its manifest
    assert isinstance(m, ValidationManifest) and set(m.files) == {"report.json", "report.md"}
    assert m.inputs["export"]["manifest_sha256"] == sha256_file(fp32_export / MANIFEST)
    assert m.created and "kvp_validate" in m.versions and "onnxruntime" in m.versions
    assert read_report(out).ok is True
    (out / REPORT_JSON).write_text(json.dumps({"ok": True}))
    with pytest.raises(KvpError, match="is not a validation report"):
        read_report(out)


def test_metric_keys_and_names(capsys):
    assert metric_key("ttft", "int8", AUTO, WORST_VS_BASE) == "ttft.int8.auto.worst_vs_base"
    results = {"parity": {"int8": {"ok": True, "checks": [
        {"graph": "kvp_prefill + base_decode", "metric": NLL_VS_FP32, "value": 0.01}]},
        "int4": {"ok": False, "checks": []}}}
    assert report_metrics(results) == {"parity.int8.ok": 1.0, "parity.int4.ok": 0.0,
                                       "parity.int8.kvp_prefill_+_base_decode.nll_vs_fp32": 0.01}
    # the parity limit's old names (before 0.3.1, and quality's) still set it, with a deprecation line
    for old in ("nll_delta_vs_fp32", DELTA_NLL_VS_FP32):
        assert tolerances_for("int8", {old: 0.2})[NLL_VS_FP32] == 0.2
        assert f"deprecated: parity tolerance 'int8.{old}' is now 'int8.nll_vs_fp32'" in capsys.readouterr().err
