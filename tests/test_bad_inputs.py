"""Bad and hostile inputs across every verb: each refused with one line (`error: ...`), exit 1, no
output folder (nor a partial one) left behind, and an existing output folder never touched.

Complements the bad-input tests beside each feature (test_cli.py, test_train.py, test_recipes.py,
test_models.py, test_data.py, test_export_onnx.py, test_coreml.py, test_genai.py): the cases here
are the ones a hostile user crafts (manifests naming paths outside their folder, GGUF and config
headers describing absurd sizes, recipes and options with huge numbers, a JSONL of ten million
empty records, a tokenizer.json from another model) and the verbs those files did not cover.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
from conftest import WORDS, reseal, word_tokenizer
from test_cli import kvp, user_error
from test_models import tiny_gguf

from kvp_validate.integrity import file_records

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "ci.yaml"


# ---------------------------------------------------------------- crafting hostile files


def gguf_with(path: Path, *, dim: int | None = None, key: str | None = None, value: int | None = None) -> Path:
    """The tiny GGUF with one tensor dimension, or one integer header field, set to `dim` / `value`."""
    data = bytearray(tiny_gguf(path.with_suffix(".src.gguf")).read_bytes())
    if dim is not None:
        j = data.index(b"token_embd.weight") + len(b"token_embd.weight")
        struct.pack_into("<Q", data, j + 4, dim)  # n_dims (u32), then the first dimension (u64)
    if key is not None:
        j = data.index(key.encode()) + len(key)
        typ = struct.unpack_from("<I", data, j)[0]
        struct.pack_into("<I" if typ == 4 else "<Q", data, j + 4, value)  # u32 or u64 field
    path.write_bytes(bytes(data))
    return path


def hf_with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def foreign_tokenizer(folder: Path) -> None:
    """Overwrite a model folder's tokenizer files with those of a model with 50 more words."""
    word_tokenizer(WORDS + [f"x{i}" for i in range(50)]).save_pretrained(folder)


def with_manifest(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m = edit(m) or m
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def ten_million_empty_records(path: Path, record: bytes = b'{"text": ""}\n') -> Path:
    with open(path, "wb") as f:
        chunk = record * 100_000
        for _ in range(100):
            f.write(chunk)
    return path


def recipe(tmp: Path, llama: Path, body: str) -> Path:
    p = tmp / "hostile.yaml"
    p.write_text(f"base: {llama}\n" + body)
    return p


# ---------------------------------------------------------------- the table
# Each case: (id, build(ctx) -> (argv, pattern)). ctx: tmp, out, assets, built, export. `out` is where
# the verb would write; every case asserts nothing is there afterwards.

def _ctx_files(c):
    return c["assets"], c["built"], c["tmp"], c["out"]


CASES = {
    # --- derive: model headers describing absurd sizes, configs, tokenizers, corpora, numbers
    "derive/gguf-tensor-2^40": lambda c: (["derive", "--base", gguf_with(c["tmp"] / "t.gguf", dim=2**40), "-o", c["out"]],
                                          "not a valid GGUF file"),
    "derive/gguf-1e9-layers": lambda c: (["derive", "--base", gguf_with(c["tmp"] / "l.gguf", key="llama.block_count",
                                                                         value=10**9), "-o", c["out"]],
                                         r"describes 3\.\d+e\+13 parameters \(1000000000 layers"),
    "derive/gguf-2^20-hidden": lambda c: (["derive", "--base", gguf_with(c["tmp"] / "h.gguf", key="llama.embedding_length",
                                                                          value=2**20), "-o", c["out"]],
                                          "describes .* parameters .*hidden 1048576"),
    "derive/gguf-2^31-ffn": lambda c: (["derive", "--base", gguf_with(c["tmp"] / "f.gguf", key="llama.feed_forward_length",
                                                                       value=2**31 - 1), "-o", c["out"]],
                                       "describes .* parameters"),
    "derive/gguf-empty-file": lambda c: (["derive", "--base", _write(c["tmp"] / "e.gguf", b""), "-o", c["out"]],
                                         "not a valid GGUF file"),
    "derive/config-hidden-2^30": lambda c: (["derive", "--base", hf_with_config(c["assets"]["llama"], c["tmp"] / "m",
                                                                                hidden_size=2**30), "-o", c["out"]],
                                            "describes .* parameters"),
    "derive/config-negative-layers": lambda c: (["derive", "--base", hf_with_config(c["assets"]["llama"], c["tmp"] / "m",
                                                                                    num_hidden_layers=-1), "-o", c["out"]],
                                                "num_hidden_layers is -1"),
    "derive/config-vocab-string": lambda c: (["derive", "--base", hf_with_config(c["assets"]["llama"], c["tmp"] / "m",
                                                                                 vocab_size="many"), "-o", c["out"]],
                                             "vocab_size is 'many'"),
    "derive/config-not-json": lambda c: (["derive", "--base", _broken_config(c), "-o", c["out"]],
                                         "unreadable config.json"),
    "derive/tokenizer-of-another-model": lambda c: (["derive", "--base", _foreign_base(c), "-o", c["out"]],
                                                    r"tokenizer has 157 tokens, the model's vocabulary 107"),
    "derive/jsonl-10M-empty-records": lambda c: (["derive", "--base", c["assets"]["llama"], "--calib",
                                                  ten_million_empty_records(c["tmp"] / "empty.jsonl"), "-o", c["out"]],
                                                 "calibration corpus is empty"),
    # --- fit: hostile aux folders
    "fit/manifest-file-outside": lambda c: (["fit", "--aux", with_manifest(c["built"]["aux"], c["tmp"] / "a", lambda m: m[
        "files"].update({"../../../../etc/hostname": {"bytes": 1, "sha256": "0" * 64}})), "-o", c["out"]],
                                            "names a file outside its folder: '../../../../etc/hostname'"),
    "fit/manifest-absolute-path": lambda c: (["fit", "--aux", with_manifest(c["built"]["aux"], c["tmp"] / "a", lambda m: m[
        "files"].update({"/etc/hostname": {"bytes": 1, "sha256": "0" * 64}})), "-o", c["out"]],
                                             "names a file outside its folder: '/etc/hostname'"),
    "fit/symlink-to-host-file": lambda c: (["fit", "--aux", _symlinked(c), "-o", c["out"]], "outside its folder.*resolves to /etc/hostname"),
    "fit/manifest-a-json-list": lambda c: (["fit", "--aux", _manifest_text(c, "[1, 2]"), "-o", c["out"]],
                                           "a JSON object expected, got list"),
    "fit/manifest-not-json": lambda c: (["fit", "--aux", _manifest_text(c, "{nope"), "-o", c["out"]],
                                        "unreadable manifest"),
    "fit/malformed-file-list": lambda c: (["fit", "--aux", with_manifest(c["built"]["aux"], c["tmp"] / "a", lambda m: m[
        "files"].update({"config.json": {"bytes": "1", "sha256": 5}})), "-o", c["out"]], "lists no file hashes"),
    "fit/predictor-given-as-aux": lambda c: (["fit", "--aux", c["built"]["pred"], "-o", c["out"]],
                                             "'predictor' artifact, expected 'aux'"),
    "fit/foreign-tokenizer-in-aux": lambda c: (["fit", "--aux", _foreign_aux(c, sealed=False), "-o", c["out"]],
                                               r"(tokenizer\S*|special_tokens_map)\.json (is \d+ bytes|does not match)"),
    "fit/foreign-tokenizer-resealed": lambda c: (["fit", "--aux", _foreign_aux(c, sealed=True), "--calib",
                                                  c["assets"]["corpus"], "-o", c["out"]], "tokenizers differ"),
    # --- train
    "train/aux-path-outside-to-etc": lambda c: (["train", "--predictor", with_manifest(c["built"]["pred"], c["tmp"] / "p",
                                                 lambda m: m["inputs"]["aux"].update(path="/etc")), "-o", c["out"]],
                                                r"not an artifact folder \(no manifest.json\): /etc"),
    "train/unlisted-file-in-predictor": lambda c: (["train", "--predictor", _unlisted(c), "-o", c["out"]],
                                                   "extra.safetensors is not listed"),
    # --- generate (PyTorch and onnxruntime)
    "generate/jsonl-10M-empty-prompts": lambda c: (["generate", "--predictor", c["built"]["pred"], "--prompts-file",
                                                    ten_million_empty_records(c["tmp"] / "p.jsonl", b'""\n')],
                                                   r"p\.jsonl:1: empty prompt"),
    "generate/5000-prompts": lambda c: (["generate", "--predictor", c["built"]["pred"], "--prompts-file",
                                         _write(c["tmp"] / "p.txt", b"w1 w2\n" * 5000)],
                                        r"p\.txt:4097: more than 4096 prompts"),
    "generate/predictor-missing-weights": lambda c: (["generate", "--predictor", _without(c, "predictor.safetensors"),
                                                      "w1"], r"missing file .*predictor\.safetensors"),
    "generate/onnx-graph-outside": lambda c: (["generate", "--onnx", with_manifest(c["export"], c["tmp"] / "x", lambda m: m[
        "variants"]["fp32"]["kvp_prefill"].update(file="../../../etc/hostname")), "w1"], "names a graph outside"),
    "generate/onnx-foreign-tokenizer": lambda c: (["generate", "--onnx", _foreign_export_tokenizer(c), "w1 w2"],
                                                  "not the one exported"),
    "generate/onnx-given-a-predictor": lambda c: (["generate", "--onnx", c["built"]["pred"], "w1"],
                                                  "'predictor' artifact, expected an ONNX"),
    # --- eval
    "eval/prompt-len-under-kvp-minimum": lambda c: (["eval", "--predictor", c["built"]["pred"], "--prompt-len", 3, "-o",
                                                     c["out"]], "prompt-len must be >= 4 for KVP with a 1-token sink"),
    # --- export onnx
    "export-onnx/predictor-file-outside": lambda c: (["export", "onnx", "--predictor", with_manifest(
        c["built"]["pred"], c["tmp"] / "p", lambda m: m["files"].update({"../aux/model.safetensors": {
            "bytes": 1, "sha256": "0" * 64}})), "-o", c["out"]], "names a file outside its folder"),
    # --- validate
    "validate/tokenizer-folder-outside": lambda c: (["validate", with_manifest(c["export"], c["tmp"] / "x", lambda m: m[
        "tokenizer"].update(folder="../../..")), "-o", c["out"]], "names a tokenizer outside its folder"),
    "validate/sparse-10GB-graph": lambda c: (["validate", _sparse_graph(c), "-o", c["out"]],
                                             r"base_decode\.onnx is 10000000000 bytes"),
    "validate/graph-path-absolute": lambda c: (["validate", with_manifest(c["export"], c["tmp"] / "x", lambda m: m[
        "variants"]["fp32"]["base_decode"].update(file="/etc/hostname")), "-o", c["out"], "--check", "parity"],
                                               "names a graph outside its folder: '/etc/hostname'"),
    "validate/an-aux-folder": lambda c: (["validate", c["built"]["aux"], "-o", c["out"]], "'aux' artifact, expected an ONNX"),
    "run/yaml-billion-laughs": lambda c: (["run", _laughs(c), "-o", c["out"]], r"laughs.yaml:3: YAML aliases \(\*a0\) are not allowed"),
    "run/override-with-aliases": lambda c: (["run", TINY, "--set", "validate.lengths=[&a 8, *a, *a]", "-o", c["out"]],
                                            r"--set validate.lengths=.*YAML aliases \(\*a\) are not allowed"),
    "validate/manifest-file-outside": lambda c: (["validate", with_manifest(c["export"], c["tmp"] / "x", lambda m: m[
        "files"].update({"../../../etc/passwd": {"bytes": 1, "sha256": "0" * 64}})), "-o", c["out"]],
                                                 "names a file outside its folder: '../../../etc/passwd'"),
    "validate/foreign-tokenizer": lambda c: (["validate", _foreign_export_tokenizer(c), "-o", c["out"]],
                                             "not the one exported"),
    # --- generate: options that ran for ever
    # --- export coreml
    "export-coreml/prompt-longer-than-context": lambda c: (["export", "coreml", "--predictor", c["built"]["pred"],
                                                            "--prompt-lengths", "100000", "-o", c["out"]],
                                                           "prompt length 100000 leaves no room"),
    "export-coreml/prompt-under-kvp-minimum": lambda c: (["export", "coreml", "--predictor", c["built"]["pred"],
                                                          "--context", "64", "--prompt-lengths", "3,8", "-o", c["out"]],
                                                         "prompt length 3 is too short: KVP with a 1-token sink needs "
                                                         "at least 4 tokens"),
    "export-coreml/predictor-file-outside": lambda c: (["export", "coreml", "--predictor", with_manifest(
        c["built"]["pred"], c["tmp"] / "p", lambda m: m["files"].update({"/etc/passwd": {"bytes": 1, "sha256": "0" * 64}})),
        "-o", c["out"]], "names a file outside its folder: '/etc/passwd'"),
    "export-coreml/jsonl-10M-empty-heldout": lambda c: (["export", "coreml", "--predictor", c["built"]["pred"],
                                                         "--heldout", ten_million_empty_records(c["tmp"] / "e.jsonl"),
                                                         "--context", "64", "--prompt-lengths", "8", "-o", c["out"]],
                                                        "corpus is empty"),
    # --- export genai-kvp (writes into an export: `out` here is the genai-kvp/ folder it would write)
    "export-genai-kvp/an-aux-folder": lambda c: (["export", "genai-kvp", c["built"]["aux"]],
                                                 "'aux' artifact, expected an ONNX"),
    "export-genai-kvp/changed-graph": lambda c: _genai_kvp(c, lambda d: _flip(d / "fp32" / "kvp_prefill.onnx"),
                                                           r"fp32/kvp_prefill\.onnx does not match the SHA-256"),
    "export-genai-kvp/manifest-file-outside": lambda c: _genai_kvp(
        c, lambda d: _edit(d, lambda m: m["files"].update({"../../etc/passwd": {"bytes": 1, "sha256": "0" * 64}})),
        "names a file outside its folder: '../../etc/passwd'"),
    "export-genai-kvp/unknown-variant": lambda c: _genai_kvp(c, lambda d: None, "variant 'int4' not in this export",
                                                             "--variant", "int4"),
    # --- train, eval: 10 million empty records
    "train/jsonl-10M-empty-records": lambda c: (["train", "--predictor", c["built"]["pred"], "--data",
                                                 ten_million_empty_records(c["tmp"] / "e.jsonl"), "-o", c["out"]],
                                                "corpus is empty"),
    "eval/jsonl-10M-empty-records": lambda c: (["eval", "--predictor", c["built"]["pred"], "--heldout",
                                                ten_million_empty_records(c["tmp"] / "e.jsonl"), "-o", c["out"]],
                                               "corpus is empty"),
    # --- compare, data, models
    "compare/report-json-a-list": lambda c: (["compare", _report(c, "[]"), "-o", c["out"]],
                                             r"report\.json: a JSON object expected, got list"),
    "compare/report-json-not-json": lambda c: (["compare", _report(c, "{"), "-o", c["out"]], r"unreadable .*report\.json"),
    "compare/report-changed-after-validation": lambda c: (["compare", _changed_report(c), "-o", c["out"]],
                                                          r"report\.json does not match the SHA-256"),
    "data-build/tokenizer-missing": lambda c: (["data", "build", "--tokenizer", c["tmp"] / "nope"],
                                               "no such file or folder"),
    "models-pull/a-path": lambda c: (["models", "pull", "../../../etc/passwd"], "unknown zoo model"),
    "models-list/cache-is-a-file": lambda c: (_cache_in(c, _write(c["tmp"] / "f", b"x")) or ["models", "list"],
                                              r"cannot use the cache folder .*/f/models \(Not a directory"),
    "models-pull/cache-is-a-file": lambda c: (_cache_in(c, _write(c["tmp"] / "f", b"x")) or ["models", "pull", "smollm2-135m"],
                                              r"cannot use the cache folder .*/f/"),
    "data-info/a-path": lambda c: (["data", "info", "--corpus", "../../etc/passwd"], "unknown corpus '../../etc/passwd'"),
    "data-build/a-path": lambda c: (["data", "build", "--corpus", "/etc", "--tokenizer", "smollm2-135m"],
                                    "unknown corpus '/etc'"),
}


# An option far beyond any real run (validate/limits.py), on each verb's usual input: refused
# naming the option, before any work.
_ON = {  # verb -> (its arguments before the option, those after it)
    "derive": lambda c: (["derive"], ["-o", c["out"]]),
    "fit": lambda c: (["fit", "--aux", c["built"]["aux"]], ["-o", c["out"]]),
    **{verb: lambda c, argv=argv: ([*argv, "--predictor", c["built"]["pred"]], ["-o", c["out"]])
       for verb, argv in (("train", ["train"]), ("eval", ["eval"]), ("export-onnx", ["export", "onnx"]),
                          ("export-coreml", ["export", "coreml"]))},
    "generate": lambda c: (["generate", "--predictor", c["built"]["pred"]], ["w1"]),
    "generate-onnx": lambda c: (["generate", "--onnx", c["export"]], ["w1"]),
    "validate": lambda c: (["validate", c["export"]], ["-o", c["out"]]),
}
BEYOND = [  # (verb, option, value, any option it needs)
    ("derive", "--calib-tokens", 10**13), ("derive", "--distill-epochs", 10**12, "--heal", "distill"),
    ("fit", "--sink", 2**21), ("fit", "--calib-tokens", 10**13),
    ("train", "--tokens", 10**13), ("train", "--steps", 10**10), ("train", "--batch", 10**7),
    ("generate", "--max-new-tokens", 10**7), ("generate-onnx", "--threads", 10**5),
    ("generate-onnx", "--warm-repeats", 10**8),
    ("eval", "--n", 10**7), ("eval", "--prompt-len", 10**8), ("export-onnx", "--eval-n", 10**7),
    ("export-coreml", "--context", 10**9),
    ("validate", "--repeats", 10**11), ("validate", "--batches", 10**8, "--lengths", "8"),
    ("validate", "--coldstart-runs", 10**8, "--check", "coldstart"), ("validate", "--threads", 10**5),
]

RUN_BEYOND = [  # the same in a recipe (refused before the run folder exists): its text after `base`, the field
    (f"data:\n  calib_tokens: {10**30}\n", "data.calib_tokens", 10**30),
    (f"aux:\n  heal: distill\n  distill_epochs: {10**12}\n", "aux.distill_epochs", 10**12),
    (f"validate:\n  repeats: {10**12}\n", "validate.repeats", 10**12),
    (f"validate:\n  lengths: [{10**11}]\n", "validate.lengths", 10**11),
    (f"export:\n  onnx:\n    eval_n: {10**12}\n", "export.onnx.eval_n", 10**12),
    (f"predictor:\n  method: train\ntrain:\n  tokens: {10**20}\n", "train.tokens", 10**20),
]


def _beyond(verb: str, flag: str, value: int, *extra: str):
    def case(c):
        head, tail = _ON[verb](c)
        return [*head, *extra, flag, value, *tail], re.escape(f"{flag[2:]} = {value:.4g} is beyond any real run")
    return case


CASES |= {f"{verb}/{flag[2:]}-{value:.0e}".replace("+", ""): _beyond(verb, flag, value, *extra)
          for verb, flag, value, *extra in BEYOND}
CASES |= {f"run/{field}-{value:.0e}".replace("+", ""): lambda c, text=text, field=field, value=value: (
    ["run", recipe(c["tmp"], c["assets"]["llama"], text), "-o", c["out"]],
    re.escape(f"{field}: {value:.4g} is beyond any real run"))
    for text, field, value in RUN_BEYOND}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit(folder: Path, edit) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def _spoiled(c, what: str, spoil) -> Path:
    """A copy of one of the session's folders (the tiny `llama` base, the built `aux` or `pred`, the
    fp32 `export`), spoiled in place by `spoil(copy)`."""
    src = {"llama": c["assets"]["llama"], "aux": c["built"]["aux"], "pred": c["built"]["pred"], "export": c["export"]}
    d = c["tmp"] / what
    shutil.copytree(src[what], d)
    spoil(d)
    return d


def _genai_kvp(c, spoil, pattern: str, *extra):
    """`kvp export genai-kvp` on a spoiled copy of the export; `out` becomes the folder it would write."""
    d = _spoiled(c, "export", spoil)
    c["out"] = d / "fp32" / "genai-kvp"
    return ["export", "genai-kvp", d, *extra], pattern


def _cache_in(c, path: Path) -> None:
    c["env"].setenv("KVP_CACHE_DIR", str(path))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _broken_config(c) -> Path:
    return _spoiled(c, "llama", lambda d: (d / "config.json").write_text("{not json"))


def _foreign_base(c) -> Path:
    return _spoiled(c, "llama", foreign_tokenizer)


def _symlinked(c) -> Path:
    def spoil(d: Path) -> None:
        (d / "generation_config.json").unlink()
        os.symlink("/etc/hostname", d / "generation_config.json")

    return _spoiled(c, "aux", spoil)


def _manifest_text(c, text: str) -> Path:
    return _spoiled(c, "aux", lambda d: (d / "manifest.json").write_text(text))


def _foreign_aux(c, sealed: bool) -> Path:
    d = _spoiled(c, "aux", lambda d: word_tokenizer(WORDS[::-1]).save_pretrained(d))  # same size, other ids
    return reseal(d) if sealed else d


def _unlisted(c) -> Path:
    return _spoiled(c, "pred", lambda d: shutil.copy(d / "predictor.safetensors", d / "extra.safetensors"))


def _without(c, name: str) -> Path:
    return _spoiled(c, "pred", lambda d: (d / name).unlink())


def _foreign_export_tokenizer(c) -> Path:
    # every file listed again: the export's own tokenizer record still refuses it
    return reseal(_spoiled(c, "export", lambda d: foreign_tokenizer(d / "tokenizer")))


def _sparse_graph(c) -> Path:
    # sparse: 10 GB claimed, nothing written or hashed
    return _spoiled(c, "export", lambda d: os.truncate(d / "fp32" / "base_decode.onnx", 10**10))


def _laughs(c) -> Path:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    p = c["tmp"] / "laughs.yaml"
    p.write_text(f"base: {c['assets']['llama']}\n" + "\n".join(lines) + "\n")
    return p


def _changed_report(c) -> Path:
    from kvp_validate.report import write_report_folder

    d = write_report_folder(c["tmp"] / "rep", {"variants": ["fp32"], "metrics": {"parity.fp32.ok": 1}}, "# report")
    (d / "report.json").write_text((d / "report.json").read_text().replace('"parity.fp32.ok": 1', '"parity.fp32.ok": 7'))
    return d


def _report(c, text: str) -> Path:
    d = c["tmp"] / "rep"
    d.mkdir()
    (d / "report.json").write_text(text)
    return d


@pytest.fixture
def ctx(assets, built, fp32_export, tmp_path, monkeypatch):
    monkeypatch.setenv("KVP_CACHE_DIR", str(tmp_path / "cache"))
    return {"assets": assets, "built": built, "export": fp32_export, "tmp": tmp_path, "out": tmp_path / "out",
            "env": monkeypatch}


def test_there_are_at_least_40_hostile_cases_and_every_verb_has_some():
    import click

    from kvp_export.cli import main

    verbs = {f"{name}-{sub}" if isinstance(cmd, click.Group) else name
             for name, cmd in main.commands.items() for sub in getattr(cmd, "commands", [None])}
    covered = {case.split("/")[0] for case in CASES}
    assert len(CASES) >= 40 and len(verbs) == 15 and verbs <= covered, sorted(verbs - covered)


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line_with_nothing_written(ctx, case):
    argv, pattern = CASES[case](ctx)
    user_error(kvp(*argv), pattern, ctx["out"])


# ---------------------------------------------------------------- an existing output folder is never touched

OVERWRITE = {
    "derive": lambda c: ["derive", "--base", gguf_with(c["tmp"] / "l.gguf", key="llama.block_count", value=10**9)],
    "fit": lambda c: ["fit", "--aux", _foreign_aux(c, sealed=True), "--calib", c["assets"]["corpus"]],
    "train": lambda c: ["train", "--predictor", _unlisted(c)],
    "eval": lambda c: ["eval", "--predictor", _without(c, "predictor.safetensors")],
    "export-onnx": lambda c: ["export", "onnx", "--predictor", _without(c, "predictor.safetensors")],
    "export-coreml": lambda c: ["export", "coreml", "--predictor", _without(c, "predictor.safetensors")],
    "validate": lambda c: ["validate", _sparse_graph(c)],
}


def _occupied(ctx) -> tuple[Path, dict]:
    """The output folder, holding a file of the user's; and its records, to compare afterwards."""
    out = ctx["out"]
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return out, file_records(out)


@pytest.mark.parametrize("verb", list(OVERWRITE))
def test_existing_output_untouched_when_refused_even_with_overwrite(ctx, verb):
    """With --overwrite the old folder goes only when the new one is complete: a refused command
    leaves it as it was (and without --overwrite it is refused before any work)."""
    out, before = _occupied(ctx)
    argv = OVERWRITE[verb](ctx)
    user_error(kvp(*argv, "-o", out), "output folder exists")
    r = kvp(*argv, "-o", out, "--overwrite")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert file_records(out) == before and sorted(p.name for p in out.parent.iterdir()
                                                  if p.name.startswith(".out.")) == []


def test_run_with_a_base_of_another_models_tokenizer_stops_before_writing_a_stage(ctx):
    """`kvp run` finds the base's tokenizer wrong when its derive stage loads it: one error line
    (after the stage's progress line), exit 1, no stage folder nor partial one. The run folder
    keeps its recipe.yaml (a run folder is where a rerun resumes)."""
    out = ctx["out"]
    r = kvp("run", recipe(ctx["tmp"], _foreign_base(ctx), ""), "-o", out)
    errors = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert r.exit_code == 1 and "Traceback" not in r.output and len(errors) == 1, r.output
    assert "tokenizer has 157 tokens, the model's vocabulary 107" in errors[0]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["recipe.yaml", "stages"]


@pytest.mark.parametrize("verb", ["run", "compare", "export-genai-kvp"])
def test_existing_folder_untouched_when_refused_by_the_verbs_that_write_into_one(ctx, verb):
    """`kvp run` resumes in its folder, `kvp compare` writes into one, `kvp export genai-kvp` replaces
    genai-kvp/ inside an export: a refused command leaves what was there as it was."""
    if verb == "export-genai-kvp":
        d = ctx["tmp"] / "x"
        shutil.copytree(ctx["export"], d)
        assert kvp("export", "genai-kvp", d).exit_code == 0
        out, argv = d / "fp32" / "genai-kvp", ["export", "genai-kvp", d]
        _flip(d / "fp32" / "base_decode.onnx")  # the hard link in genai-kvp/ changes with it: listed, so refused too
        before = {rel: rec for rel, rec in file_records(out).items() if rel != "base_decode.onnx"}
        pattern = r"base_decode\.onnx does not match the SHA-256"
    else:
        out, before = _occupied(ctx)
        argv, pattern = {
            "run": (["run", recipe(ctx["tmp"], ctx["assets"]["llama"], "data:\n  calib_tokens: " + "1" + "0" * 30 + "\n"),
                     "-o", out], "calib_tokens: 1e\\+30 is beyond"),
            "compare": (["compare", _changed_report(ctx), "-o", out], r"report\.json does not match the SHA-256"),
        }[verb]
    user_error(kvp(*argv), pattern)
    after = file_records(out)
    if verb == "export-genai-kvp":
        after.pop("base_decode.onnx")
    assert after == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []
