"""KVP generation on onnxruntime: prefill graph -> base first step -> decode loop (numpy only).

Three prefill paths over left-padded prompts, one decoding loop:
- "kvp":  kvp_prefill (aux + predictor -> the base's cache and the next step's inputs), then
          base_decode on those inputs as they come out (the sink tokens and the last prompt
          token; see kvp_export/export/modules.py): the first token comes from the base;
- "base": base_prefill, the baseline;
- "aux":  aux_prefill, the aux alone (it also decodes alone, with aux_decode).
Every later token is an ordinary decode step of base_decode (aux_decode for "aux").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from .artifact import OnnxArtifact
from .errors import KvpError

MODES = ("kvp", "base", "aux")


def session_options(threads: int) -> ort.SessionOptions:
    """Fixed threads (TTFT is compared at a fixed count), all graph optimisations, sequential."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


@dataclass(frozen=True)
class Sampling:
    """Greedy when temperature == 0; else temperature, then top-k, then top-p (nucleus), seeded."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if self.temperature < 0:
            raise KvpError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise KvpError(f"top-k must be >= 0 (0 is off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise KvpError(f"top-p must be in (0, 1], got {self.top_p}")

    def pick(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.temperature == 0:
            return logits.argmax(-1)
        z = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < z.shape[-1]:
            kth = np.partition(z, -self.top_k, axis=-1)[:, -self.top_k][:, None]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if self.top_p < 1:
            order = np.argsort(-p, axis=-1)
            sorted_p = np.take_along_axis(p, order, -1)
            drop = np.cumsum(sorted_p, -1) - sorted_p > self.top_p  # keep the smallest set reaching top_p
            mask = np.zeros_like(p, dtype=bool)
            np.put_along_axis(mask, order, drop, -1)
            p = np.where(mask, 0.0, p)
            p /= p.sum(-1, keepdims=True)
        return np.array([rng.choice(p.shape[-1], p=row) for row in p])


@dataclass
class State:
    """After a prefill: next-token logits [B, V], the cache, its mask, the next positions."""

    logits: np.ndarray
    past: list[np.ndarray]
    mask: np.ndarray
    next_pos: np.ndarray
    mode: str
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Generation:
    prompts: list[str]
    completions: list[str]
    token_ids: list[list[int]]
    prompt_tokens: list[int]
    ttft_seconds: float
    seconds: dict[str, float]
    mode: str


class OnnxKVP:
    """The graphs of one variant of an export, with sessions opened on first use."""

    def __init__(self, artifact: OnnxArtifact | str, variant: str = "fp32", threads: int = 2):
        self.art = artifact if isinstance(artifact, OnnxArtifact) else OnnxArtifact.open(artifact)
        self.art.check_variant(variant)
        if threads < 1:
            raise KvpError(f"threads must be >= 1, got {threads}")
        self.variant, self.threads = variant, threads
        self.model = self.art.model
        self.sink_len = int(self.model["sink_len"])
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._tok = None

    # --- sessions and tokenizer ---

    def session(self, name: str) -> ort.InferenceSession:
        if name not in self._sessions:
            path = self.art.graph(self.variant, name)
            try:
                sess = ort.InferenceSession(str(path), session_options(self.threads), providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - a corrupt graph is the user's file
                raise KvpError(f"cannot load graph {path}: {str(e).splitlines()[0]}") from None
            self.art.check_session_io(sess, self.variant, name)
            self._sessions[name] = sess
        return self._sessions[name]

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = self.art.tokenizer()
        return self._tok

    # --- prefill ---

    def check_context(self, n_tokens: int, extra: int = 0) -> None:
        limit = self.model.get("context") or 0
        if limit and n_tokens + extra > limit:
            raise KvpError(f"prompt of {n_tokens} tokens (+{extra} to generate) is longer than the exported context ({limit})")

    def kvp_applies(self, mask: np.ndarray) -> bool:
        """KVP needs every prompt to hold the sink, at least as many predicted tokens, and the last."""
        return int(mask.sum(-1).min()) >= 2 * self.sink_len + 2

    def prefill(self, ids: np.ndarray, mask: np.ndarray | None = None, mode: str = "kvp") -> State:
        if mode not in MODES:
            raise KvpError(f"unknown prefill mode '{mode}' (choose from {', '.join(MODES)})")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        mask = np.ones_like(ids) if mask is None else np.ascontiguousarray(mask, dtype=np.int64)
        self.check_context(ids.shape[1])
        if mode == "kvp" and self.kvp_applies(mask):
            return self._prefill_kvp(ids, mask)
        model = "aux" if mode == "aux" else "base"
        pos = positions(mask)
        t0 = time.perf_counter()
        out = self.session(f"{model}_prefill").run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos})
        dt = time.perf_counter() - t0
        return State(out[0][:, -1], out[1:], mask, pos[:, -1] + 1, mode if mode != "kvp" else "base",
                     {f"{model}_prefill": dt, "total": dt})

    def _prefill_kvp(self, ids: np.ndarray, mask: np.ndarray) -> State:
        t0 = time.perf_counter()
        out = self.session("kvp_prefill").run(None, {"input_ids": ids, "attention_mask": mask})
        t1 = time.perf_counter()
        past, (next_ids, next_pos, next_mask) = out[:-3], out[-3:]
        first = self.step("base", next_ids, next_mask, next_pos, past)
        t2 = time.perf_counter()
        return State(first[0][:, -1], first[1:], next_mask, next_pos[:, -1] + 1, "kvp",
                     {"kvp_prefill": t1 - t0, "base_first_step": t2 - t1, "total": t2 - t0})

    def step(self, model: str, ids, mask, pos, past) -> list[np.ndarray]:
        sess = self.session(f"{model}_decode")
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        feeds |= dict(zip(self.art.manifest["io"][f"{model}_decode"]["inputs"][3:], past))
        return sess.run(None, feeds)

    # --- decoding ---

    def decode(self, state: State, max_new_tokens: int, sampling: Sampling = Sampling(),
               eos_ids: set[int] | None = None, pad_id: int = 0,
               stop: Callable[[np.ndarray], np.ndarray] | None = None, stop_every: int = 16) -> np.ndarray:
        """Up to max_new_tokens [B, T] after a prefill; finished rows are padded with pad_id.

        `stop(tokens [B, t]) -> bool [B]`, checked every `stop_every` steps, ends rows early
        (e.g. when the decoded text reached a stop string)."""
        model = "aux" if state.mode == "aux" else "base"
        rng = np.random.default_rng(sampling.seed)
        eos = np.array(sorted(eos_ids if eos_ids is not None else self.model["eos_token_ids"]), dtype=np.int64)
        logits, past, mask, pos = state.logits, state.past, state.mask, state.next_pos.copy()
        done = np.zeros(logits.shape[0], dtype=bool)
        out = []
        for step in range(max_new_tokens):
            tok = np.where(done, pad_id, sampling.pick(logits, rng)).astype(np.int64)
            out.append(tok)
            done |= np.isin(tok, eos)
            if stop is not None and (step + 1) % stop_every == 0:
                done |= stop(np.stack(out, axis=1))
            if done.all() or step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, (~done).astype(np.int64)[:, None]], axis=1)
            res = self.step(model, tok[:, None], mask, pos[:, None], past)
            logits, past, pos = res[0][:, -1], res[1:], pos + 1
        return np.stack(out, axis=1)

    def score(self, state: State, cont: np.ndarray) -> np.ndarray:
        """Teacher-forced logits [B, T, V] for continuation tokens [B, T] (row 0 = the prefill's)."""
        if cont.shape[1] <= 1:
            return state.logits[:, None]
        t = cont.shape[1] - 1
        model = "aux" if state.mode == "aux" else "base"
        mask = np.concatenate([state.mask, np.ones((cont.shape[0], t), np.int64)], axis=1)
        pos = state.next_pos[:, None] + np.arange(t)
        res = self.step(model, np.ascontiguousarray(cont[:, :-1], dtype=np.int64), mask, pos, state.past)
        return np.concatenate([state.logits[:, None], res[0]], axis=1)

    # --- text in, text out ---

    def encode(self, prompts: list[str], extra: int = 0) -> tuple[np.ndarray, np.ndarray]:
        if not prompts:
            raise KvpError("no prompts given")
        rows = [e.ids for e in self.tokenizer.encode_batch(list(prompts))]
        empty = [i + 1 for i, r in enumerate(rows) if not r]
        if empty:
            raise KvpError(f"prompt {empty[0]} is empty (no tokens)")
        n = max(len(r) for r in rows)
        self.check_context(n, extra)
        pad = int(self.model["pad_token_id"] or 0)
        ids = np.full((len(rows), n), pad, np.int64)
        mask = np.zeros((len(rows), n), np.int64)
        for i, r in enumerate(rows):
            ids[i, n - len(r):], mask[i, n - len(r):] = r, 1
        return ids, mask

    def generate(self, prompts: list[str], *, max_new_tokens: int = 64, sampling: Sampling = Sampling(),
                 mode: str = "kvp", stop_strings: tuple[str, ...] = ()) -> Generation:
        if max_new_tokens < 1:
            raise KvpError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
        sampling.check()  # the PyTorch pipeline shares these parameters and checks (runtime/decode.py)
        ids, mask = self.encode(prompts, extra=max_new_tokens)
        t0 = time.perf_counter()
        state = self.prefill(ids, mask, mode)
        ttft = time.perf_counter() - t0
        stop = None
        if stop_strings:
            def stop(toks: np.ndarray) -> np.ndarray:
                texts = self.tokenizer.decode_batch(toks.tolist(), skip_special_tokens=True)
                return np.array([any(s in t for s in stop_strings) for t in texts])
        toks = self.decode(state, max_new_tokens, sampling, pad_id=int(self.model["pad_token_id"] or 0), stop=stop)
        eos = set(self.model["eos_token_ids"])
        rows = [next((r[:i] for i, t in enumerate(r) if t in eos), r) for r in toks.tolist()]
        return Generation(list(prompts), [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows], rows,
                          mask.sum(-1).tolist(), ttft, state.seconds, state.mode)


def positions(mask: np.ndarray) -> np.ndarray:
    return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(np.int64)
