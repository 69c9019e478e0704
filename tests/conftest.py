"""Tiny models, tokenizer and corpus for the pipeline tests (built in tmp dirs, no network).

The models are random decoders of each supported family (hidden 64, 4 layers, 4 heads / 2 KV
heads; family fields in tiny_models.py) over a word-level tokenizer; the corpus is pseudo-text
over the same words.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from pathlib import Path

import pytest
import torch

WORDS = [f"w{i}" for i in range(96)] + ["def", "return", "the", "fox", "(", ")", ":", "="]
SPECIALS = ["<unk>", "<s>", "</s>"]


def word_tokenizer(words: list[str] = WORDS):
    """One token per whitespace-separated word; EOS </s>, no BOS added by default."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + list(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_model(path: Path, family: str = "llama", *, layers: int = 4, hidden: int = 64, context: int = 256,
               tokenizer=None, seed: int = 0, tied: bool = False) -> Path:
    """Save a random tiny decoder and its tokenizer with save_pretrained; return the folder."""
    from tiny_models import TINY
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tokenizer or word_tokenizer()
    cfg = AutoConfig.for_model(family, **{
        "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": hidden // 4, "vocab_size": len(tok), "max_position_embeddings": context,
        "rope_theta": 10000.0, "initializer_range": 0.1, "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id, "pad_token_id": tok.eos_token_id, "tie_word_embeddings": tied,
        **TINY[family]})
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def random_ids(n: int = 12, length: int = 32, vocab: int = 100, seed: int = 0) -> torch.Tensor:
    """[n, length] token ids in [3, vocab), seeded (ids below 3 are the tiny tokenizer's specials)."""
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def assert_kvp_module_matches_runtime(pipe, sink_len: int) -> None:
    """kvp_prefill's outputs fed to the decoder as they are give the PyTorch runtime's KVP logits,
    on a left-padded batch (the sink included)."""
    from kvp_export.export.modules import Decoder, KVPPrefill
    from kvp_export.runtime.kvp import prefill_kvp

    ids = random_ids(2, 14)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        want = prefill_kvp(pipe.base, pipe.aux, pipe.predictor, ids, mask, sink_len=sink_len).logits
        out = KVPPrefill(pipe.base, pipe.aux, pipe.predictor, sink_len)(ids, mask)
        got = Decoder(pipe.base, with_past=True, last_only=False)(out[-3], out[-1], out[-2], *out[:-3])[0][:, -1]
    assert torch.allclose(got, want, atol=1e-4)


def assert_one_line_error(result, needle: str) -> None:
    """A click result that failed with exit 1 and one `error: ` line holding `needle` last."""
    assert result.exit_code == 1, result.output
    err = result.output.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1], result.output


def pseudo_text(n_words: int, seed: int) -> str:
    """Word salad with some repetition, so the tiny models see recurring contexts."""
    rng = random.Random(seed)
    phrases = [[rng.choice(WORDS) for _ in range(rng.randint(3, 8))] for _ in range(12)]
    out: list[str] = []
    while len(out) < n_words:
        out += rng.choice(phrases) if rng.random() < 0.6 else [rng.choice(WORDS)]
    lines = [" ".join(out[i : i + 12]) for i in range(0, n_words, 12)]
    return "\n".join(lines) + "\n"


def corpus_folder(path: Path, files: int = 10, words: int = 500) -> Path:
    path.mkdir(parents=True)
    for i in range(files):
        (path / f"doc{i:02d}.txt").write_text(pseudo_text(words, seed=i))
    return path


def reseal(folder: Path) -> Path:
    """List a folder's files in its manifest again, after a test changed one on purpose (as a
    stage that wrote it would have): the integrity checks then pass and what the test targets runs."""
    import json

    from kvp_validate.integrity import file_records

    m = json.loads((Path(folder) / "manifest.json").read_text())
    m["files"] = file_records(folder)
    (Path(folder) / "manifest.json").write_text(json.dumps(m, indent=2))
    return Path(folder)


def one_thread():
    """Tiny models run far faster on one thread, and stay fast when other processes load the
    cores (OpenMP threads spin on a busy core)."""
    from kvp_export.stage import torch_threads

    return torch_threads(1)



def lingering(match, wait_s: float) -> list[int]:
    """The processes `match(pid)` picks out, after waiting up to wait_s for them to go: killed
    processes leave /proc asynchronously. A process gone while it is read is not counted."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if match(pid):
                    found.append(int(pid))
            except (OSError, IndexError):
                pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def proc_uid(pid: str) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split()[0])


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """The real model (integration tests) keeps every thread."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    with one_thread():
        yield


@pytest.fixture
def isolated_cache(monkeypatch, tmp_path):
    """Unit tests never read or write the real model cache."""
    monkeypatch.setenv("KVP_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Tiny base models of both families, a sibling, a mismatched sibling, a corpus (built once)."""
    root = tmp_path_factory.mktemp("assets")
    reversed_words = word_tokenizer(WORDS[::-1])
    return {
        "llama": tiny_model(root / "llama"),
        "qwen2": tiny_model(root / "qwen2", "qwen2"),
        "sibling": tiny_model(root / "sibling", layers=2, hidden=32, seed=1),
        "foreign": tiny_model(root / "foreign", layers=2, tokenizer=reversed_words, seed=2),
        "short": tiny_model(root / "short", context=64),
        "corpus": corpus_folder(root / "corpus"),
    }


@pytest.fixture(scope="module")
def base(assets):
    """The tiny random Llama base, loaded once per test module."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(assets["llama"]).eval()


@pytest.fixture(scope="session")
def built(assets, tmp_path_factory) -> dict[str, Path]:
    """One derive + fit on the tiny Llama (keep 0.5, bridge, hidden input), shared by read-only tests."""
    from kvp_export.derive import derive
    from kvp_export.predictor.fit import fit

    root = tmp_path_factory.mktemp("built")
    calib = [str(assets["corpus"])]
    with one_thread():
        aux = derive(root / "aux", base=str(assets["llama"]), keep=0.5, heal="bridge", calib=calib,
                     calib_tokens=2048, progress=False)
        pred = fit(aux, root / "pred", calib=calib, calib_tokens=2048, progress=False)
    return {"aux": aux, "pred": pred}


TINY_PAIRS = {"eval_n": 8, "prompt_len": 24, "cont_len": 8}  # the held-out pairs a tiny ONNX export stores


def tiny_export(kind: str, built, assets, tmp_path_factory, *, single_thread: bool = True, **options) -> Path:
    """An export (kind "onnx" or "coreml") of `built` into a fresh folder, the tiny corpus held
    out, no progress bar: what the export fixtures of several modules share. `options`: the
    export's config fields (and export_onnx's crossover=False)."""
    if kind == "onnx":
        from kvp_export.export.onnx_export import export_onnx as make
    else:
        from kvp_export.export.coreml.export import export_coreml as make
    out = tmp_path_factory.mktemp(kind) / "export"
    with one_thread() if single_thread else contextlib.nullcontext():
        return make(built["pred"], out, heldout=[str(assets["corpus"])], progress=False, **options)


def assert_parity(folder: Path, variant: str = "fp32") -> dict:
    """The validator's parity check of an ONNX export's variant, which must pass; its result."""
    from kvp_validate.artifact import OnnxArtifact
    from kvp_validate.parity import run_parity

    r = run_parity(OnnxArtifact.open(folder), variant, threads=1)
    assert r["ok"], r["checks"]
    return r


@pytest.fixture(scope="session")
def fp32_export(built, assets, tmp_path_factory):
    """An fp32-only ONNX export of `built` (no crossover measurement): for tests of what
    consumes an export (the standalone validator, the CI examples)."""
    return tiny_export("onnx", built, assets, tmp_path_factory, variants=["fp32"], crossover=False, **TINY_PAIRS)
