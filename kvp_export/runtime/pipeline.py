"""KVP generation from a predictor folder: text in, text out, with the prefill time (TTFT).

Prompts of different lengths are batched with left padding; the base decodes every
token, the aux and predictor only read the prompt (kvp.py). Modes: "kvp", "base" (the
ordinary base prefill, for comparison) and "auto" (the default): KVP from the crossover
prompt length on, the base below it, since on a short prompt reading the aux's weights on top
of the base's costs more than it saves (kvp_validate.crossover). The crossover is measured once
per predictor, device, dtype, thread count and CPU, and cached under the cache folder.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvp_validate.contract import MANIFEST
from kvp_validate.crossover import find_crossover, lengths_for
from kvp_validate.crossover import use_kvp as kvp_pays
from kvp_validate.machine import machine
from kvp_validate.protocol import MODES as PROTOCOL_MODES
from kvp_validate.protocol import check_tail, min_kvp_len
from kvp_validate.sampling import MAX_NEW_TOKENS

from ..artifacts import read_manifest, write_json
from ..cache import cache_dir
from ..config import OnDevice, default_of
from ..data import jsonl_records
from ..data import read_lines as _prompt_lines
from ..errors import KvpError, check_choice
from ..models import check_same_tokenizer, load
from ..models.arch import ArchSpec, context_length
from ..predictor.module import KVPredictor
from ..stage import ref_spec
from .decode import Sampling, decode
from .kvp import Prefilled, SinkCache, check_context, prefill_full, prefill_kvp

MODES = tuple(m for m in PROTOCOL_MODES if m != "aux")  # the aux alone runs on the ONNX path only


@dataclass
class Generation:
    prompts: list[str]
    completions: list[str]
    prompt_tokens: list[int]
    token_ids: list[list[int]]  # generated ids per prompt, up to (not including) EOS
    prefill_seconds: float  # this call's prefill of the whole batch: its time to first token
    kvp: bool  # the path taken: KVP, or the base prefill
    warm_prefill_seconds: float | None = None  # median of warm repeats of the same prefill
    crossover: int | None = None  # "auto": KVP from this prompt length on
    seconds: dict[str, float] = field(default_factory=dict)  # e.g. the crossover's one-time calibration


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
                 manifest: dict | None = None, aux_dir: Path | None = None, tail: int = 0):
        """`tail`: KVP's exact tail W (runtime.kvp.prefill_kvp): the base reads the prompt's last W+1 tokens."""
        check_compatible(base, aux, predictor)
        check_tail(tail)
        self.tail = tail
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
                       device: str | torch.device = default_of(OnDevice, "device"), dtype: torch.dtype = torch.float32,
                       tail: int = 0) -> KVPPipeline:
        """Load what a `fit` folder names (aux and base may be overridden). On a GPU pass e.g.
        device="cuda", dtype=torch.bfloat16: the models take that dtype, the predictor stays
        float32 (it is small) and casts at its edges."""
        manifest = read_manifest(folder, "predictor")
        predictor = KVPredictor.load(folder).to(device)
        aux = aux or manifest["inputs"]["aux"]["path"]
        if (Path(aux) / MANIFEST).is_file():  # a derive or train folder: its files checked too
            read_manifest(aux)
        base_model, tok = load(base or ref_spec(manifest["inputs"]["base"]), dtype=dtype)
        aux_model, aux_tok = load(aux, dtype=dtype)
        base_model, aux_model = base_model.to(device), aux_model.to(device)
        check_same_tokenizer(tok, aux_tok)
        return cls(base_model, aux_model, predictor, tok, sink_len=manifest["sink_len"],
                   manifest=manifest, aux_dir=Path(aux), tail=tail)

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
                           sinks=self.sinks, tail=self.tail)

    def _timed_prefill(self, ids, mask, kvp: bool, sink: int | None) -> float:
        t0 = time.perf_counter()
        self.prefill(ids, mask, use_kvp=kvp, sink_len=sink)
        if ids.is_cuda:
            torch.cuda.synchronize(ids.device)
        return time.perf_counter() - t0

    def crossover(self) -> tuple[int | None, float]:
        """The prompt length from which KVP beats the base prefill here, and the seconds spent
        measuring it (0 when cached). Measured once with kvp_validate.crossover.find_crossover on
        random tokens after the sink, and cached by predictor, tail, device, dtype, threads and CPU."""
        if getattr(self, "_crossover", None) is not None:
            return self._crossover[0], 0.0
        key = {"predictor": self.manifest.get("created"), "aux": str(self.aux_dir), "device": str(self.base.device),
               "dtype": str(self.base.dtype), "threads": torch.get_num_threads(), "cpu": machine()["cpu"],
               "torch": torch.__version__, **({"tail": self.tail} if self.tail else {})}  # tail 0: the old key
        path = cache_dir("crossover") / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
                                         + ".json")
        t0, measured = time.perf_counter(), False
        try:
            found = json.loads(path.read_text())["crossover"]
        except (OSError, ValueError, KeyError):
            measured = True
            limit = context_length(self.base) or 1 << 30
            gen = torch.Generator().manual_seed(0)
            vocab = self.base.config.vocab_size

            def time_ms(path: str, n: int) -> float:
                ids = torch.randint(0, vocab, (1, n), generator=gen).to(self.base.device)
                mask = torch.ones_like(ids)
                return self._timed_prefill(ids, mask, path == "kvp", None) * 1e3

            found = find_crossover(time_ms, lengths_for(min_kvp_len(self.sink_len, self.tail), limit))
            write_json(path, {"key": key, "crossover": found})
        self._crossover = (found["prompt_len"], found)
        return found["prompt_len"], (time.perf_counter() - t0) if measured else 0.0

    @torch.no_grad()
    def generate(self, prompts: list[str], *, max_new_tokens: int = MAX_NEW_TOKENS, sampling: Sampling | None = None,
                 mode: str = "auto", prefix: str | None = None, warm_repeats: int = 0, crossover: int | None = -1,
                 stop: Callable[[list[list[int]]], list[bool]] | None = None) -> Generation:
        """Generate for a batch of prompts. With `prefix`, the whole prefix is the exact sink:
        its KV is computed by the base once and reused by every later call. `warm_repeats` more
        prefills of the same batch give the warm TTFT (their median) beside this call's. `crossover`
        (mode "auto"): KVP from this prompt length on; -1 measures it (once, cached), None: never."""
        sampling = sampling or Sampling()
        sampling.check_call(max_new_tokens, warm_repeats)
        check_choice("mode", mode, MODES)
        ids, mask = self.encode(prompts, extra=max_new_tokens, prefix=prefix)
        ids, mask = ids.to(self.base.device), mask.to(self.base.device)
        sink = max(self.sink_len, len(self.tokenizer(prefix).input_ids)) if prefix else None
        cross, extra = None, {}
        if mode == "auto" and crossover != -1:
            cross = crossover
        elif mode == "auto":
            cross, calib = self.crossover()
            if calib:
                extra["crossover_calibration"] = calib
        kvp = mode == "kvp" or (mode == "auto" and kvp_pays(ids.shape[1], cross))
        t0 = time.perf_counter()
        pre = self.prefill(ids, mask, use_kvp=kvp, sink_len=sink)
        if ids.is_cuda:
            torch.cuda.synchronize(ids.device)
        ttft = time.perf_counter() - t0
        warm = (statistics.median([self._timed_prefill(ids, mask, kvp, sink) for _ in range(warm_repeats)])
                if warm_repeats else None)
        out = decode(self.base, pre, max_new_tokens, sampling=sampling, eos_ids=self.eos_ids,
                     pad_id=self.tokenizer.pad_token_id, stop=stop)
        rows = [self._until_eos(r) for r in out.tolist()]
        return Generation(
            prompts=list(prompts),
            completions=[self.tokenizer.decode(r, skip_special_tokens=True) for r in rows],
            prompt_tokens=mask.sum(-1).tolist(),
            token_ids=rows,
            prefill_seconds=ttft,
            kvp=kvp,
            warm_prefill_seconds=warm,
            crossover=cross,
            seconds=extra,
        )

    def _until_eos(self, row: list[int]) -> list[int]:
        return next((row[:i] for i, t in enumerate(row) if t in self.eos_ids), row)


def _eos_ids(tokenizer, model) -> set[int]:
    """The tokenizer's EOS and the model's generation EOS (chat models often have several)."""
    gen = getattr(model.generation_config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(gen if isinstance(gen, list) else [gen])}
    return {i for i in ids if i is not None}




MAX_PROMPTS = 4096  # one call generates for all its prompts as one batch


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: one per non-blank line, or JSONL (a string or an object with "prompt");
    at most MAX_PROMPTS, read as a stream (a file of millions of lines is refused, not held)."""
    path = Path(path)
    if not path.is_file():
        raise KvpError(f"cannot read prompts file {path}: no such file")
    jsonl = path.suffix.lower() == ".jsonl"
    prompts = []
    records = jsonl_records(path) if jsonl else ((no, ln) for no, ln in enumerate(_prompt_lines(path), 1)
                                                 if ln.strip())
    for no, obj in records:
        if len(prompts) == MAX_PROMPTS:
            raise KvpError(f"{path}:{no}: more than {MAX_PROMPTS} prompts (one call generates for all of them as "
                           "one batch): split the file")
        if not jsonl:
            prompts.append(obj)
            continue
        text = obj.get("prompt") if isinstance(obj, dict) else obj
        if not isinstance(text, str):
            raise KvpError(f'{path}:{no}: expected a string or an object with a "prompt" string')
        if not text.strip():
            raise KvpError(f"{path}:{no}: empty prompt")
        prompts.append(text)
    return prompts
