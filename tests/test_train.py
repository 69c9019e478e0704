"""`kvp train` on tiny random models: the KVP forward with predicted KV (exact when the predictor
is the identity), gradients, the loss going down, resume after a stop or a kill, 2 gloo
processes (DDP and FSDP) matching one, `kvp fit` under torchrun, and bad input."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import kvp, ok, user_error

from kvp_export import data
from kvp_export.artifacts import read_manifest
from kvp_export.derive import derive
from kvp_export.derive.prune import prune
from kvp_export.distributed import World
from kvp_export.errors import KvpError
from kvp_export.models import load
from kvp_export.models.adapters import ADAPTERS
from kvp_export.predictor.fit import fit
from kvp_export.predictor.module import KVPredictor
from kvp_export.runtime.pipeline import KVPPipeline
from kvp_export.stage import ref_spec, sequences
from kvp_export.train import train
from kvp_export.train.batches import Batches
from kvp_export.train.loop import freeze, wrap
from kvp_export.train.loss import Objective, PredictedKV, Trainee
from kvp_export.train.plan import TrainPlan

pytestmark = pytest.mark.usefixtures("isolated_cache")


def plan(**kw) -> TrainPlan:
    base = dict(mode="kvp", steps=4, batch=2, accum=1, seq_len=32, world_size=1, lr=1e-3, predictor_lr=1e-3,
                weight_decay=0.0, warmup_steps=1, min_lr_ratio=0.1, clip=1.0, lambda_c=0.25, z_loss=0.0, kl=0.0,
                sink_len=1, precision="fp32", activation_checkpointing=False, strategy="ddp", data=(), mix="default",
                seed=0)
    return TrainPlan(**{**base, **kw})


def ids(n=2, length=24, seed=0) -> torch.Tensor:
    return torch.randint(3, 100, (n, length), generator=torch.Generator().manual_seed(seed))


def small(assets, **kw) -> dict:
    """A tiny training run: 32-token sequences of the test corpus, quiet."""
    return {"data": [str(assets["corpus"])], "seq_len": 32, "batch": 2, "lr": 2e-3, "progress": False, **kw}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny random model of a family (tiny_models.py), built on first use."""
    from conftest import tiny_model

    root, made = tmp_path_factory.mktemp("tiny"), {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = tiny_model(root / family, family)
        return made[family]

    return get


# --------------------------------------------------------------------------- the KVP forward


@pytest.mark.parametrize("family", sorted(ADAPTERS))
def test_base_with_identity_predicted_kv_is_the_base(tiny, family):
    """aux = base and the identity predictor: the base reading predicted KV is the plain base
    (on qk-norm families this checks the key is injected after the key norm, before RoPE; on
    Gemma 3 the 24-token sequences pass the tiny model's 8-token window)."""
    base, _ = load(tiny(family))
    spec_kv = base.config.num_key_value_heads * (base.config.hidden_size // base.config.num_attention_heads)
    trainee = Trainee(prune(base, list(range(4))), KVPredictor.identity(4, spec_kv))
    x = ids()
    with torch.no_grad():
        want = base(input_ids=x).logits
        _, kv = trainee(x)
        inject = PredictedKV(base)
        inject.kv = kv
        got = base(input_ids=x).logits
        inject.kv = [(k + 0.5, v) for k, v in kv]  # the hooks do act
        moved = base(input_ids=x).logits
        inject.remove()
    assert (got - want).abs().max().item() < 1e-5
    assert (moved - want).abs().max().item() > 1e-2
    obj = Objective(trainee, base, plan(sink_len=1), contextlib.nullcontext)
    base.requires_grad_(False)
    terms = obj.step(x, 1.0)
    assert terms["l1"].item() < 1e-6
    assert abs(terms["ce_base"].item() - torch.nn.functional.cross_entropy(want[:, :-1].flatten(0, 1),
                                                                          x[:, 1:].flatten()).item()) < 1e-5


def _grads(built, checkpointing: bool, kl: float = 0.0) -> tuple[dict, dict]:
    m = read_manifest(built["pred"], "predictor")
    base, _ = load(ref_spec(m["inputs"]["base"]))
    aux, _ = load(built["aux"])
    trainee = Trainee(aux, KVPredictor.load(built["pred"]))
    r = plan(activation_checkpointing=checkpointing, kl=kl, z_loss=1e-3 if kl else 0.0)
    freeze(base, r)
    model = wrap(trainee, r, World(), torch.device("cpu"))
    terms = Objective(model, base, r, contextlib.nullcontext).step(ids(), 1.0)
    assert all(p.grad is None for p in base.parameters())
    return {n: p.grad.clone() for n, p in trainee.named_parameters()}, terms


def test_gradients_reach_aux_and_predictor_and_checkpointing_changes_nothing(built):
    plain, terms = _grads(built, False)
    assert set(terms) == {"loss", "ce_base", "ce_aux", "l1"}
    assert plain["predictor.k.1.weight"].abs().sum() > 0
    assert plain["aux.model.layers.0.mlp.up_proj.weight"].abs().sum() > 0
    ckpt, _ = _grads(built, True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=1e-5), name
    _, terms = _grads(built, False, kl=0.5)
    assert terms["kl"] > 0 and terms["z"] > 0


def test_batches_are_shared_out_as_one_process_would_read_them():
    seqs = torch.arange(10).unsqueeze(1).expand(10, 3)
    one = Batches(seqs, plan(batch=4), 0)
    two = [Batches(seqs, plan(batch=2, world_size=2), r) for r in (0, 1)]
    accum = Batches(seqs, plan(batch=1, accum=2, world_size=2), 1)
    for step in range(4):  # crosses epoch boundaries (10 sequences, 4 per step)
        whole = one.micro_batches(step)[0]
        assert torch.equal(torch.cat([b.micro_batches(step)[0] for b in two]), whole)
        assert torch.equal(torch.cat(accum.micro_batches(step)), whole[2:])
    seen = torch.cat([one.micro_batches(s)[0] for s in range(5)])[:, 0]
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))


def test_schedule_warms_up_then_decays():
    r = plan(steps=10, warmup_steps=2, min_lr_ratio=0.1)
    scales = [r.lr_scale(s) for s in range(10)]
    assert scales[:3] == [0.5, 1.0, 1.0] and scales == sorted(scales[:2]) + sorted(scales[2:], reverse=True)
    assert abs(r.lr_scale(10) - 0.1) < 1e-9


# --------------------------------------------------------------------------- training runs


def test_training_reduces_the_loss_and_writes_loadable_folders(built, assets, tmp_path):
    m = read_manifest(built["pred"], "predictor")
    base, tok = load(ref_spec(m["inputs"]["base"]))
    fixed = data.token_sequences(tok, data.load_corpus([str(assets["corpus"])]), 32, 32 * 8)

    def loss(aux_dir, pred_dir) -> dict:
        trainee = Trainee(load(aux_dir)[0], KVPredictor.load(pred_dir))
        base.requires_grad_(False)
        return Objective(trainee, base, plan(), contextlib.nullcontext).step(fixed, 1.0)

    out = train(tmp_path / "out", predictor=built["pred"], steps=16, **small(assets))
    before, after = loss(built["aux"], built["pred"]), loss(out / "aux", out)
    assert after["loss"] < before["loss"] - 0.2 and after["ce_base"] < before["ce_base"], (before, after)

    pm, am = read_manifest(out, "predictor"), read_manifest(out / "aux", "aux")
    assert pm["inputs"]["aux"]["path"] == str((out / "aux").resolve()) and pm["sink_len"] == m["sink_len"]
    assert pm["layer_map"] == m["layer_map"] and am["kept_layers"] == [0, 2] and am["layer_map"] == m["layer_map"]
    t = pm["training"]
    assert t["steps"] == 16 and t["tokens"] == 16 * 2 * 32 and t["device"] == "cpu" and t["train_seconds"] > 0
    assert pm["recipe"]["lambda_c"] == 0.25 and pm["recipe"]["method"] == "kvp-train"
    assert set(t["loss"]) == {"loss", "ce_base", "ce_aux", "l1", "grad_norm"}
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == list(range(1, 17))
    assert not (tmp_path / "out.ckpt").exists()  # removed once the output is written
    g = KVPPipeline.from_predictor(out).generate(["w1 w2 w3 the fox", "def ( w4 )"], max_new_tokens=3, mode="kvp")
    assert len(g.token_ids) == 2


def _heldout_ce_base(out: Path, base, tok, assets) -> float:
    """The held-out loss of a trained folder, computed afresh as the loop computes it."""
    seqs, _ = sequences(tok, base, [str(assets["corpus"])], 16_384, split="heldout", seq_len=32)
    trainee = Trainee(load(out / "aux")[0], KVPredictor.load(out))
    obj = Objective(trainee, base, plan(), contextlib.nullcontext)
    total = sum(float(obj.evaluate(seqs[s:s + 2])["ce_base"]) * len(seqs[s:s + 2]) for s in range(0, len(seqs), 2))
    obj.close()
    return total / len(seqs)


def test_heldout_loss_is_logged_and_the_best_step_kept(built, assets, tmp_path):
    m = read_manifest(built["pred"], "predictor")
    base, tok = load(ref_spec(m["inputs"]["base"]))
    out = train(tmp_path / "out", predictor=built["pred"], steps=6, eval_every=2, **small(assets))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    held = {h["step"]: h for h in log if "heldout_ce_base" in h}
    assert sorted(held) == [2, 4, 6] and {"heldout_loss", "heldout_ce_aux", "heldout_best"} <= set(held[2])
    t = read_manifest(out, "predictor")["training"]
    best = min(held, key=lambda s: held[s]["heldout_ce_base"])
    assert t["heldout"]["best_step"] == best and t["heldout"]["evaluations"] == 3 and not t["heldout"]["stopped_early"]
    assert t["heldout"]["best_loss"] == held[best]["heldout_ce_base"] and t["heldout"]["metric"] == "ce_base"
    assert abs(_heldout_ce_base(out, base, tok, assets) - t["heldout"]["best_loss"]) < 1e-4
    assert t["unique_tokens"] >= 6 * 2 * 32 and t["epochs"] == pytest.approx(6 * 2 * 32 / t["unique_tokens"])
    assert read_manifest(out, "predictor")["inputs"]["data"]["heldout"]["corpus"]["split"]["name"] == "heldout"


def test_early_stopping_returns_the_best_weights(built, assets, tmp_path, monkeypatch):
    """Held-out losses made worse by 1 per step: step 1 is the best, patience 2 stops after step 3,
    and the output holds step 1's weights (its held-out loss, computed afresh, is the logged one)."""
    from kvp_export.train import loop

    m = read_manifest(built["pred"], "predictor")
    base, tok = load(ref_spec(m["inputs"]["base"]))
    now = {"offset": 0.0}
    evaluate, held_evaluate = Objective.evaluate, loop.Heldout.evaluate

    def shifted(self, x):
        terms = evaluate(self, x)
        return {**terms, "ce_base": terms["ce_base"] + now["offset"]}

    def at_step(self, model, objective, trainee, done, device, world):
        now["offset"] = float(done)
        return held_evaluate(self, model, objective, trainee, done, device, world)

    monkeypatch.setattr(Objective, "evaluate", shifted)
    monkeypatch.setattr(loop.Heldout, "evaluate", at_step)
    out = train(tmp_path / "out", predictor=built["pred"], steps=10, eval_every=1, patience=2,
                **small(assets, checkpoint_every=2))
    t = read_manifest(out, "predictor")["training"]
    assert t["steps"] == 3 and t["tokens"] == 3 * 2 * 32 and t["heldout"]["stopped_early"]
    assert t["heldout"]["best_step"] == 1 and t["heldout"]["evaluations"] == 3 and t["heldout"]["patience"] == 2
    monkeypatch.undo()
    assert abs(_heldout_ce_base(out, base, tok, assets) - (t["heldout"]["best_loss"] - 1.0)) < 1e-4
    with pytest.raises(KvpError, match="--patience .* needs held-out evaluations"):
        train(tmp_path / "x", predictor=built["pred"], steps=2, eval_every=0, patience=1, **small(assets))
    with pytest.raises(KvpError, match=r"eval-tokens \(8\) is less than one sequence of 32"):
        train(tmp_path / "x", predictor=built["pred"], steps=2, eval_tokens=8, **small(assets))


def test_finish_after_is_a_time_budget_that_writes_the_output(built, assets, tmp_path):
    """--finish-after: once the time is spent the run ends as if finished (a held-out evaluation at
    that step, OUT written with the best weights), unlike --max-minutes, which only checkpoints."""
    out = train(tmp_path / "out", predictor=built["pred"], steps=10, eval_every=4, finish_after=1e-9,
                **small(assets))
    t = read_manifest(out, "predictor")["training"]
    assert t["steps"] == 1 and t["planned_steps"] == 10 and t["stopped"] == "time" and t["tokens"] == 2 * 32
    assert t["heldout"]["evaluations"] == 1 and t["heldout"]["best_step"] == 1 and t["heldout"]["stopped_early"]
    full = train(tmp_path / "full", predictor=built["pred"], steps=2, eval_every=0, **small(assets))
    assert read_manifest(full, "predictor")["training"]["stopped"] is None
    with pytest.raises(KvpError, match="finish-after must be > 0"):
        train(tmp_path / "x", predictor=built["pred"], steps=2, finish_after=0, **small(assets))


def test_cli_train_then_eval_and_the_baseline(built, assets, tmp_path):
    common = ["--data", assets["corpus"], "--seq-len", "32", "--batch", "2", "--lr", "1e-3"]
    out = tmp_path / "trained"
    assert ok(kvp("train", "--predictor", built["pred"], "--steps", "3", "--z-loss", "1e-4", "--kl", "0.1",
                  "--accum", "2", *common, "-o", out)).stdout.strip() == str(out)
    assert read_manifest(out, "predictor")["training"]["tokens"] == 3 * 2 * 2 * 32
    md = ok(kvp("eval", "--predictor", out, "--n", "2", "--prompt-len", "24", "--cont-len", "8", "--greedy-tokens",
                "2", "--heldout", assets["corpus"], "-o", tmp_path / "report")).stdout
    assert "| KVP |" in md

    base_out = tmp_path / "baseline"
    ok(kvp("train", "--baseline", "--aux", built["aux"], "--tokens", str(3 * 2 * 32), *common, "-o", base_out))
    am = read_manifest(base_out, "aux")
    assert am["recipe"]["method"] == "baseline-ce" and am["training"]["steps"] == 3
    assert set(am["training"]["loss"]) == {"loss", "ce_aux", "grad_norm"}
    assert not (base_out / "predictor.safetensors").exists()
    trained, init = load_file(str(base_out / "model.safetensors")), load_file(str(built["aux"] / "model.safetensors"))
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], init["model.layers.0.mlp.up_proj.weight"])
    # the baseline is an aux folder like derive's: fit takes it
    fit(base_out, tmp_path / "refit", calib=[str(assets["corpus"])], calib_tokens=2048, progress=False)


def _same_result(a, b) -> None:
    for rel in ("predictor.safetensors", "aux/model.safetensors"):
        wa, wb = load_file(str(a / rel)), load_file(str(b / rel))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), rel
    assert (a / "train_log.jsonl").read_text() == (b / "train_log.jsonl").read_text()


def test_stop_and_resume_is_exact(built, assets, tmp_path):
    kw = small(assets, predictor=built["pred"], steps=6, checkpoint_every=2)
    whole = train(tmp_path / "whole", **kw)
    part = tmp_path / "part"
    assert train(part, stop_after=3, **kw) is None and not part.exists()
    ckpt = tmp_path / "part.ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000002", "step-00000003"]
    with pytest.raises(KvpError, match="checkpoints of an earlier run .* --resume"):
        train(part, **kw)
    with pytest.raises(KvpError, match=r"another training plan \(lr"):
        train(part, resume=True, **{**kw, "lr": 1e-2})
    assert train(part, resume=True, **kw) == part
    _same_result(whole, part)
    assert train(tmp_path / "timed", max_minutes=1e-6, **kw) is None  # out of time after the first step
    assert [p.name for p in (tmp_path / "timed.ckpt").iterdir()] == ["step-00000001"]


def test_kill_and_resume_is_exact(built, assets, tmp_path):
    """SIGKILL a training process once it has checkpointed; resuming reaches the uninterrupted result."""
    args = ["--predictor", built["pred"], "--steps", "40", "--checkpoint-every", "3", "--data", assets["corpus"],
            "--seq-len", "32", "--batch", "2", "--lr", "2e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kvp_export.cli", "train", *map(str, args), "-o",
                             str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed.ckpt"
    deadline = time.monotonic() + 120
    while not (ckpt.is_dir() and any(p.name.startswith("step-") for p in ckpt.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "killed").exists()
    ok(kvp("train", *args, "--resume", "-o", tmp_path / "killed"))
    whole = train(tmp_path / "whole", **small(assets, predictor=built["pred"], steps=40))
    _same_result(whole, tmp_path / "killed")


def test_corrupt_checkpoint_is_refused(built, assets, tmp_path):
    kw = small(assets, predictor=built["pred"], steps=4, checkpoint_every=2)
    assert train(tmp_path / "out", stop_after=2, **kw) is None
    weights = tmp_path / "out.ckpt" / "step-00000002" / "weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    args = ["--predictor", built["pred"], "--steps", "4", "--data", assets["corpus"], "--seq-len", "32", "--batch",
            "2", "--lr", "2e-3", "--resume", "-o", tmp_path / "out"]
    user_error(kvp("train", *args), r"corrupt checkpoint .*step-00000002: weights.safetensors does not match")
    (weights.parent / "meta.json").write_text("{")
    user_error(kvp("train", *args), r"corrupt checkpoint .*unreadable meta.json")


# --------------------------------------------------------------------------- torchrun


def torchrun(*args, nproc: int = 2) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "kvp_export.cli", *map(str, args)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    # the ranks' own errors come before torchrun's long traceback: show them first
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() and "elastic" not in line]
    assert proc.returncode == 0, "\n".join(errors[-20:]) + "\n...\n" + proc.stderr[-1500:]
    return proc.stdout


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_with_the_combined_batch(built, assets, tmp_path, strategy):
    """2 processes x batch 2 == 1 process x batch 4 == 1 process x batch 2 x 2 micro-steps. The
    FSDP run also stops after 2 steps and resumes from its (gathered) checkpoint."""
    kw = small(assets, predictor=built["pred"], steps=4)
    one = train(tmp_path / "one", **{**kw, "batch": 4})
    accum = train(tmp_path / "accum", **{**kw, "batch": 2, "accum": 2})
    args = ["train", "--predictor", built["pred"], "--steps", "4", "--batch", "2", "--strategy", strategy, "--data",
            assets["corpus"], "--seq-len", "32", "--lr", "2e-3", "-o", tmp_path / "two"]
    if strategy == "fsdp":
        assert torchrun(*args, "--stop-after", "2") == ""
        assert [p.name for p in (tmp_path / "two.ckpt").iterdir()] == ["step-00000002"]
        args.append("--resume")
    assert torchrun(*args).strip() == str(tmp_path / "two")  # printed once, by rank 0
    logs = {name: [json.loads(x) for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
            for name in ("one", "accum", "two")}
    for name in ("accum", "two"):
        for a, b in zip(logs["one"], logs[name], strict=True):
            for term in ("loss", "ce_base", "ce_aux", "l1", "grad_norm"):
                assert abs(a[term] - b[term]) <= 1e-5 * abs(a[term]) + 1e-6, (name, a["step"], term)
    two = read_manifest(tmp_path / "two", "predictor")["training"]
    assert two["world_size"] == 2 and two["strategy"] == strategy
    for folder in (accum, tmp_path / "two"):
        wa, wb = load_file(str(one / "predictor.safetensors")), load_file(str(folder / "predictor.safetensors"))
        assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_fit_under_torchrun_matches_one_process(built, assets, tmp_path):
    calib = ["--calib", assets["corpus"], "--calib-tokens", "4096"]
    fit(built["aux"], tmp_path / "one", calib=[str(assets["corpus"])], calib_tokens=4096, progress=False)
    torchrun("fit", "--aux", built["aux"], *calib, "-o", tmp_path / "two")
    a, b = KVPredictor.load(tmp_path / "one"), KVPredictor.load(tmp_path / "two")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-4, rtol=1e-4), name
    ra, rb = (read_manifest(tmp_path / d, "predictor")["fit_report"] for d in ("one", "two"))
    assert ra["tokens_fit"] == rb["tokens_fit"] and ra["alpha_k"] == rb["alpha_k"]


# --------------------------------------------------------------------------- bad input


class TestBadInput:
    def test_refused_before_training(self, built, assets, tmp_path):
        out = tmp_path / "out"
        pred = ["--predictor", built["pred"], "--data", assets["corpus"]]
        if not torch.cuda.is_available():
            user_error(kvp("train", *pred, "--device", "cuda", "-o", out),
                       "--device cuda: no CUDA device is available .* --device auto", out)
        user_error(kvp("train", "--data", assets["corpus"], "-o", out), "starts from a fitted predictor", out)
        user_error(kvp("train", "--baseline", "-o", out), "--baseline needs an aux folder", out)
        user_error(kvp("train", "--baseline", "--aux", built["aux"], "--kl", "1", "-o", out),
                   "--kl applies to KVP training", out)
        user_error(kvp("train", *pred, "--steps", "3", "--tokens", "100", "-o", out), "either --steps or --tokens", out)
        user_error(kvp("train", *pred, "--steps", "0", "-o", out), "steps must be >= 1", out)
        user_error(kvp("train", *pred, "--lr", "0", "-o", out), "lr must be > 0", out)
        user_error(kvp("train", *pred, "--steps", "2", "--warmup-steps", "2", "-o", out), "warmup-steps", out)
        user_error(kvp("train", *pred, "--seq-len", "2", "-o", out), r"seq-len must be >= 3", out)
        user_error(kvp("train", *pred, "--mix", "code", "-o", out), "does not apply to files given", out)
        user_error(kvp("train", "--predictor", built["aux"], "-o", out), "'aux' artifact, expected 'predictor'", out)
        assert not (tmp_path / "out.ckpt").exists()

    def test_mismatched_models_refused(self, built, assets, tmp_path):
        sib = derive(tmp_path / "sib", base=str(assets["llama"]), sibling=str(assets["sibling"]), progress=False)
        out = tmp_path / "out"
        user_error(kvp("train", "--predictor", built["pred"], "--aux", sib, "--data", assets["corpus"], "-o", out),
                   r"predictor does not fit these models: aux hidden width 32 != 64", out)
        user_error(kvp("train", "--predictor", built["pred"], "--base", assets["foreign"], "-o", out),
                   "tokenizers differ", out)

    def test_device_auto_falls_back_to_the_cpu(self, built, assets, tmp_path):
        out = train(tmp_path / "out", predictor=built["pred"], steps=1, device="auto", **small(assets))
        want = "cuda" if torch.cuda.is_available() else "cpu"
        assert read_manifest(out, "predictor")["training"]["device"].startswith(want)


# --------------------------------------------------------------------------- real model, driver


@pytest.mark.integration
def test_predicted_kv_forward_exact_on_smollm2():
    """The injection on the real (tied, RoPE theta 1e5) model: identity KV gives the base's logits,
    and one training step sends gradients to the aux and the predictor only."""
    base, tok = load("smollm2-135m")
    n, kv_dim = base.config.num_hidden_layers, base.config.num_key_value_heads * base.config.head_dim
    trainee = Trainee(prune(base, list(range(n))), KVPredictor.identity(n, kv_dim))
    x = tok(["def fibonacci(n):\n    if n < 2:\n        return n\n"], return_tensors="pt").input_ids
    with torch.no_grad():
        want = base(input_ids=x).logits
    base.requires_grad_(False)
    obj = Objective(trainee, base, plan(lambda_c=1 / n), contextlib.nullcontext)
    seen = []  # the LM head runs once per step here: on the base reading the predicted KV
    hook = base.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    terms = obj.step(x, 1.0)
    hook.remove()
    assert len(seen) == 1 and (seen[0] - want).abs().max().item() < 1e-4 and terms["l1"].item() < 1e-5
    assert trainee.predictor.k[0].weight.grad is not None and all(p.grad is None for p in base.parameters())


@pytest.mark.slow
def test_gpu_benchmark_driver_runs_on_cpu(assets, tmp_path):
    corpus = str(assets["corpus"])
    cmd = [sys.executable, "benchmarks/train_gpu.py", "--base", str(assets["llama"]), "--device", "cpu",
           "--tokens", "2048", "--calib-tokens", "2048", "--eval-n", "2", "--greedy-tokens", "2", "--prompt-len",
           "24", "--cont-len", "8", "--seq-len", "64", "--batch", "2", "--calib", corpus, "--heldout", corpus,
           "--data", corpus, "--out", str(tmp_path / "bench")]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["device"] == "cpu" and summary["tokens"]["train_kvp"] == summary["tokens"]["train_baseline"]
    assert {"kvp_ridge", "kvp_trained", "aux_baseline_oe_lp"} <= set(summary["paths"])
