"""KVP generation from a predictor folder: text in, text out, with the prefill time (TTFT).

Prompts of different lengths are batched with left padding; the base decodes every
token, the aux and predictor only read the prompt (kvp.py). `use_kvp=False` runs the
ordinary base prefill instead, for comparison.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import read_manifest
from ..data import jsonl_records
from ..errors import KvpError
from ..models import check_same_tokenizer, load
from ..models.arch import ArchSpec
from ..predictor.module import KVPredictor
from ..stage import ref_spec
from .decode import Sampling, decode
from .kvp import Prefilled, SinkCache, check_context, prefill_full, prefill_kvp


@dataclass
class Generation:
    prompts: list[str]
    completions: list[str]
    prompt_tokens: list[int]
    token_ids: list[list[int]]  # generated ids per prompt, up to (not including) EOS
    prefill_seconds: float  # the whole batch's prefill: time to first token
    kvp: bool


def check_compatible(base, aux, predictor: KVPredictor) -> None:
    """A predictor only fits the base and aux shapes it was fitted for (say which differ)."""
    sb, sa = ArchSpec.of(base), ArchSpec.of(aux)
    want_in = sa.hidden if predictor.input_mode == "hidden" else sa.kv_dim
    problems = [
        f"{what} {got} != {want}"
        for what, got, want in (
            ("base layers", sb.n_layers, predictor.n_base_layers),
            ("base KV width", sb.kv_dim, predictor.dims["out"]),
            (f"aux {predictor.input_mode} width", want_in, predictor.dims["in_k"]),
        )
        if got != want
    ]
    if max(predictor.layer_map) >= sa.n_layers:
        problems.append(f"aux layers {sa.n_layers} <= {max(predictor.layer_map)} (layer map)")
    if problems:
        raise KvpError("the predictor does not fit these models: " + "; ".join(problems))


class KVPPipeline:
    """Base + aux + predictor + tokenizer, ready to generate."""

    def __init__(self, base, aux, predictor: KVPredictor, tokenizer, *, sink_len: int = 1,
                 manifest: dict | None = None, aux_dir: Path | None = None):
        check_compatible(base, aux, predictor)
        self.base, self.aux, self.predictor, self.sink_len = base, aux, predictor, sink_len
        self.manifest, self.aux_dir = manifest or {}, aux_dir
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.sinks = SinkCache(base)  # the sink's exact KV is computed once per distinct prefix
        self.eos_ids = _eos_ids(tokenizer, base)

    @classmethod
    def from_predictor(cls, folder: str | Path, *, aux: str | None = None, base: str | None = None,
                       device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> KVPPipeline:
        """Load what a `fit` folder names (aux and base may be overridden). On a GPU pass e.g.
        device="cuda", dtype=torch.bfloat16: the models take that dtype, the predictor stays
        float32 (it is small) and casts at its edges."""
        manifest = read_manifest(folder, "predictor")
        predictor = KVPredictor.load(folder).to(device)
        aux = aux or manifest["inputs"]["aux"]["path"]
        base_model, tok = load(base or ref_spec(manifest["inputs"]["base"]), dtype=dtype)
        aux_model, aux_tok = load(aux, dtype=dtype)
        base_model, aux_model = base_model.to(device), aux_model.to(device)
        check_same_tokenizer(tok, aux_tok)
        return cls(base_model, aux_model, predictor, tok, sink_len=manifest["sink_len"],
                   manifest=manifest, aux_dir=Path(aux))

    def encode(self, prompts: list[str], extra: int = 0, prefix: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and mask; refuses empty prompts and prompts that overflow the context.

        A `prefix` (a fixed system or template text) is tokenized on its own and put before
        every prompt, so its ids, and so its exact KV, are the same in every call.
        """
        if not prompts:
            raise KvpError("no prompts given")
        if prefix:
            head = self.tokenizer(prefix).input_ids
            rows = [{"input_ids": head + self.tokenizer(p, add_special_tokens=False).input_ids} for p in prompts]
            enc = self.tokenizer.pad(rows, padding=True, return_tensors="pt")
        else:
            enc = self.tokenizer(list(prompts), padding=True, return_tensors="pt")
        empty = [i + 1 for i, n in enumerate(enc.attention_mask.sum(-1).tolist()) if n == 0]
        if empty:
            raise KvpError(f"prompt {empty[0]} is empty (no tokens)")
        for model in (self.base, self.aux):
            check_context(model, enc.input_ids, extra=extra)
        return enc.input_ids, enc.attention_mask

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, *, use_kvp: bool = True,
                sink_len: int | None = None) -> Prefilled:
        if not use_kvp:
            return prefill_full(self.base, ids, mask)
        return prefill_kvp(self.base, self.aux, self.predictor, ids, mask, sink_len=sink_len or self.sink_len,
                           sinks=self.sinks)

    @torch.no_grad()
    def generate(self, prompts: list[str], *, max_new_tokens: int = 64, sampling: Sampling = Sampling(),
                 use_kvp: bool = True, prefix: str | None = None,
                 stop: Callable[[list[list[int]]], list[bool]] | None = None) -> Generation:
        """Generate for a batch of prompts. With `prefix`, the whole prefix is the exact sink:
        its KV is computed by the base once and reused by every later call."""
        check_sampling(max_new_tokens, sampling)
        ids, mask = self.encode(prompts, extra=max_new_tokens, prefix=prefix)
        ids, mask = ids.to(self.base.device), mask.to(self.base.device)
        sink = max(self.sink_len, len(self.tokenizer(prefix).input_ids)) if prefix else None
        t0 = time.perf_counter()
        pre = self.prefill(ids, mask, use_kvp=use_kvp, sink_len=sink)
        if ids.is_cuda:
            torch.cuda.synchronize(ids.device)
        ttft = time.perf_counter() - t0
        out = decode(self.base, pre, max_new_tokens, sampling=sampling, eos_ids=self.eos_ids,
                     pad_id=self.tokenizer.pad_token_id, stop=stop)
        rows = [self._until_eos(r) for r in out.tolist()]
        return Generation(
            prompts=list(prompts),
            completions=[self.tokenizer.decode(r, skip_special_tokens=True) for r in rows],
            prompt_tokens=mask.sum(-1).tolist(),
            token_ids=rows,
            prefill_seconds=ttft,
            kvp=use_kvp,
        )

    def _until_eos(self, row: list[int]) -> list[int]:
        return next((row[:i] for i, t in enumerate(row) if t in self.eos_ids), row)


def _eos_ids(tokenizer, model) -> set[int]:
    """The tokenizer's EOS and the model's generation EOS (chat models often have several)."""
    gen = getattr(model.generation_config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(gen if isinstance(gen, list) else [gen])}
    return {i for i in ids if i is not None}


def check_sampling(max_new_tokens: int, s: Sampling) -> None:
    if max_new_tokens < 1:
        raise KvpError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    s.check()


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: one per non-blank line, or JSONL (a string or an object with "prompt")."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise KvpError(f"cannot read prompts file {path}: {getattr(e, 'strerror', None) or e}") from None
    if path.suffix.lower() != ".jsonl":
        return [ln for ln in lines if ln.strip()]
    prompts = []
    for no, obj in jsonl_records(path, lines):
        text = obj.get("prompt") if isinstance(obj, dict) else obj
        if not isinstance(text, str):
            raise KvpError(f'{path}:{no}: expected a string or an object with a "prompt" string')
        prompts.append(text)
    return prompts
