"""Tamper evidence (every artifact folder lists its files' SHA-256; every consumer checks what it
reads) and determinism (the same command on the same inputs writes the same bytes), on the tiny models."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from test_cli import kvp, user_error

from kvp_export.errors import KvpError
from kvp_validate import integrity


def flip_byte(path: Path, offset: int = -100) -> None:
    """Change one byte in place: same size, another hash."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- what every manifest lists


def test_every_stage_folder_lists_every_file(built, fp32_export):
    for folder in (built["aux"], built["pred"], fp32_export):
        m = manifest(folder)
        on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert sorted(m["files"]) == [f for f in on_disk if f != "manifest.json"]
        for rel, rec in m["files"].items():
            assert rec["bytes"] == (folder / rel).stat().st_size and len(rec["sha256"]) == 64
    assert any(rel.startswith("optimized/fp32/") for rel in manifest(fp32_export)["files"])


def test_hash_cache_hashes_a_file_once_and_again_when_changed(tmp_path):
    (tmp_path / "partial").mkdir()
    f = tmp_path / "partial" / "x.bin"
    f.write_bytes(b"a" * 1000)
    first = integrity.sha256_file(f)
    n = integrity.STATS["files_hashed"]
    assert integrity.sha256_file(f) == first and integrity.STATS["files_hashed"] == n  # cached
    (tmp_path / "partial").rename(tmp_path / "moved")  # a folder renamed into place keeps its digests
    moved = tmp_path / "moved" / "x.bin"
    assert integrity.sha256_file(moved) == first and integrity.STATS["files_hashed"] == n
    time.sleep(0.01)
    st = moved.stat()
    moved.write_bytes(b"b" * 1000)  # same size, mtime set back: the ctime still changes
    import os

    os.utime(moved, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert integrity.sha256_file(moved) != first and integrity.STATS["files_hashed"] == n + 1


# ---------------------------------------------------------------- every consumer refuses a changed folder


@pytest.mark.usefixtures("isolated_cache")
class TestTampered:
    def test_fit_refuses_changed_aux_weights(self, built, assets, tmp_path):
        aux = copy(built["aux"], tmp_path / "aux")
        flip_byte(aux / "model.safetensors")
        out = tmp_path / "pred"
        user_error(kvp("fit", "--aux", aux, "--calib", assets["corpus"], "-o", out),
                   r"file .*aux/model\.safetensors does not match the SHA-256", out)

    def test_fit_refuses_missing_and_extra_large_and_unlisted_files(self, built, assets, tmp_path):
        out = tmp_path / "pred"
        aux = copy(built["aux"], tmp_path / "aux")
        (aux / "tokenizer.json").unlink()
        user_error(kvp("fit", "--aux", aux, "-o", out), r"missing file .*aux/tokenizer\.json", out)
        aux = copy(built["aux"], tmp_path / "aux2")
        with open(aux / "model.safetensors", "ab") as f:  # an extra-large file: refused by its size, unhashed
            f.write(b"\0" * 4096)
        before = integrity.STATS["files_hashed"]
        user_error(kvp("fit", "--aux", aux, "-o", out), r"model\.safetensors is \d+ bytes, .* says \d+", out)
        assert integrity.STATS["files_hashed"] == before
        aux = copy(built["aux"], tmp_path / "aux3")
        shutil.copy(aux / "model.safetensors", aux / "model-00002-of-00002.safetensors")
        user_error(kvp("fit", "--aux", aux, "-o", out), r"model-00002-of-00002\.safetensors is not listed", out)

    def test_generate_eval_train_export_refuse_a_changed_predictor(self, built, assets, tmp_path):
        pred = copy(built["pred"], tmp_path / "pred")
        flip_byte(pred / "predictor.safetensors")
        want = r"predictor\.safetensors does not match the SHA-256"
        user_error(kvp("generate", "--predictor", pred, "w1 w2 w3"), want)
        user_error(kvp("eval", "--predictor", pred, "-o", tmp_path / "rep"), want, tmp_path / "rep")
        user_error(kvp("train", "--predictor", pred, "--steps", "1", "-o", tmp_path / "t"), want, tmp_path / "t")
        user_error(kvp("export", "onnx", "--predictor", pred, "-o", tmp_path / "x"), want, tmp_path / "x")

    def test_generate_refuses_a_changed_aux_named_by_the_predictor(self, built, tmp_path):
        aux = copy(built["aux"], tmp_path / "aux")
        pred = copy(built["pred"], tmp_path / "pred")
        m = manifest(pred)
        m["inputs"]["aux"]["path"] = str(aux)
        (pred / "manifest.json").write_text(json.dumps(m))  # the manifest itself is not in its own list
        flip_byte(aux / "config.json", 5)
        user_error(kvp("generate", "--predictor", pred, "w1 w2 w3"), r"aux/config\.json does not match")

    def test_a_manifest_without_file_hashes_is_refused(self, built, tmp_path):
        pred = copy(built["pred"], tmp_path / "pred")
        m = manifest(pred)
        del m["files"]
        (pred / "manifest.json").write_text(json.dumps(m))
        user_error(kvp("generate", "--predictor", pred, "w1 w2"), "lists no file hashes")


class TestValidatorRefusesChangedGraphs:
    """The validator never runs a graph whose hash differs: refused before any check, no report."""

    @pytest.mark.parametrize("rel", ["fp32/base_decode.onnx", "optimized/fp32/kvp_prefill.onnx",
                                     "reference.npz"])
    def test_changed_file(self, fp32_export, tmp_path, rel):
        d = copy(fp32_export, tmp_path / "export")
        flip_byte(d / rel)
        rep = tmp_path / "rep"
        user_error(kvp("validate", d, "-o", rep, "--check", "parity", "--threads", "1"),
                   f"{rel} does not match the SHA-256", rep)

    def test_parity_never_runs_a_graph_whose_hash_differs(self, fp32_export, tmp_path, monkeypatch):
        from kvp_validate import runtime
        from kvp_validate.artifact import OnnxArtifact
        from kvp_validate.parity import run_parity

        d = copy(fp32_export, tmp_path / "export")
        art = OnnxArtifact.open(d)  # opened while intact, changed afterwards
        flip_byte(d / "optimized" / "fp32" / "base_decode.onnx.data")
        created = []
        monkeypatch.setattr(runtime.ort, "InferenceSession", lambda *a, **k: created.append(a) or 1 / 0)
        with pytest.raises(KvpError, match="does not match the SHA-256"):
            run_parity(art, "fp32", threads=1)
        assert not created

    def test_generate_onnx_refuses_a_changed_graph(self, fp32_export, tmp_path):
        d = copy(fp32_export, tmp_path / "export")
        flip_byte(d / "optimized" / "fp32" / "kvp_prefill.onnx")
        user_error(kvp("generate", "--onnx", d, "--mode", "kvp", "--threads", "1", "w1 w2 w3 w4 w5"),
                   "kvp_prefill.onnx does not match the SHA-256")

    def test_hashing_is_outside_the_timed_load(self, fp32_export, monkeypatch):
        """Session load times never include hashing: every file is hashed before the first session's
        creation starts (OnnxKVP.load verifies, then starts its timer), none while one is created."""
        from kvp_validate import runtime
        from kvp_validate.runtime import OnnxKVP

        monkeypatch.setattr(integrity, "_cache", {})
        monkeypatch.delenv(integrity.ENV, raising=False)
        events: list[tuple[str, float, float]] = []
        clock = time.perf_counter
        slow_disk = [0.0]  # each graph hash moves the clock load() reads by 1000 s: timed, it would show
        monkeypatch.setattr(time, "perf_counter", lambda: clock() + slow_disk[0])

        def spy(kind, fn):
            def wrapped(*a, **k):
                t0 = clock()
                if kind == "hash" and str(getattr(a[0], "name", "")).endswith((".onnx", ".onnx.data")):
                    slow_disk[0] += 1000
                try:
                    return fn(*a, **k)
                finally:
                    events.append((kind, t0, clock()))
            return wrapped

        monkeypatch.setattr(integrity.hashlib, "file_digest", spy("hash", integrity.hashlib.file_digest))
        monkeypatch.setattr(runtime.ort, "InferenceSession", spy("session", runtime.ort.InferenceSession))
        rt = OnnxKVP(fp32_export, "fp32", threads=1)
        load = rt.load("auto")
        assert slow_disk[0] >= 2000 and load["wall"] < 1000 and all(s < 1000 for s in load.values())
        hashes = [e for e in events if e[0] == "hash"]
        sessions = [e for e in events if e[0] == "session"]
        assert len(hashes) >= 2 and len(sessions) == 2  # both graphs (and side files) hashed here
        assert max(end for _, _, end in hashes) <= min(t0 for _, t0, _ in sessions)  # load()'s timer starts later


class TestGenaiKvpFolder:
    """`kvp export genai-kvp` checks the graphs it reads and writes a folder that lists its own files;
    its reader (kvp_validate.genai.kvp_folder, before genai loads anything) checks them all."""

    def test_lists_every_file_and_is_checked_by_its_reader(self, fp32_export, tmp_path):
        from kvp_validate.genai import kvp_folder

        d = copy(fp32_export, tmp_path / "export")
        r = kvp("export", "genai-kvp", d)
        assert r.exit_code == 0, r.output
        folder = d / "fp32" / "genai-kvp"
        m = manifest(folder)
        assert m["stage"] == "genai-kvp" and sorted(m["files"]) == sorted(
            p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
        assert m["inputs"]["base_decode"] == manifest(d)["variants"]["fp32"]["base_decode"]["sha256"]
        assert kvp_folder(d, "fp32") == folder and not [p for p in (d / "fp32").iterdir() if ".partial-" in p.name]
        assert kvp("export", "genai-kvp", d).exit_code == 0 and manifest(folder)["files"] == m["files"]  # same bytes
        flip_byte(folder / "kvp_prompt.onnx")
        with pytest.raises(KvpError, match=r"genai-kvp/kvp_prompt\.onnx does not match the SHA-256"):
            kvp_folder(d, "fp32")
        (folder / "extra.onnx").write_bytes(b"x")
        with pytest.raises(KvpError, match=r"genai-kvp/extra\.onnx is not listed"):
            kvp_folder(d, "fp32")
        (folder / "manifest.json").unlink()
        with pytest.raises(KvpError, match="no manifest.json in .*rebuild it: kvp export genai-kvp"):
            kvp_folder(d, "fp32")

    def test_writer_refuses_a_changed_source_graph_and_leaves_the_old_folder(self, fp32_export, tmp_path):
        d = copy(fp32_export, tmp_path / "export")
        assert kvp("export", "genai-kvp", d).exit_code == 0
        before = integrity.file_records(d / "fp32" / "genai-kvp")
        flip_byte(d / "fp32" / "kvp_prefill.onnx")
        user_error(kvp("export", "genai-kvp", d), r"fp32/kvp_prefill\.onnx does not match the SHA-256")
        assert integrity.file_records(d / "fp32" / "genai-kvp") == before
        assert [p.name for p in (d / "fp32").iterdir() if p.name.startswith(".genai-kvp.")] == []

    def test_a_killed_writers_partial_folder_does_not_break_the_export(self, fp32_export, tmp_path):
        """What a SIGKILL of `kvp export genai-kvp` leaves (`.genai-kvp.partial-PID-*`) is not a file
        of the export: readers of the export pass it by; the next writer removes it."""
        from kvp_validate.artifact import OnnxArtifact

        d = copy(fp32_export, tmp_path / "export")
        dead = d / "fp32" / ".genai-kvp.partial-999999999-x"
        dead.mkdir()
        (dead / "kvp_prompt.onnx").write_bytes(b"half")
        OnnxArtifact.open(d)
        assert kvp("export", "genai-kvp", d).exit_code == 0 and not dead.exists()
