"""KVP generation on onnxruntime: prefill graph -> base first step -> decode loop (numpy only).

Three prefill paths over left-padded prompts, one decoding loop:
- "kvp":  kvp_prefill (aux + predictor -> the base's cache and the next step's inputs), then
          base_decode on those inputs as they come out (the sink tokens and the last prompt
          token; see kvp_export/export/modules.py): the first token comes from the base.
          With an exact tail of W tokens (the export's `model.tail`, or the `tail` argument),
          kvp_prefill reads the prompt without its last W tokens and base_decode's first step
          reads them after its inputs: the base computes the prompt's last W+1 tokens over the
          predicted cache of the others, as the PyTorch runtime's `prefill_kvp(tail=W)`;
- "base": base_prefill, the baseline;
- "aux":  aux_prefill, the aux alone (it also decodes alone, with aux_decode).
Every later token is an ordinary decode step of base_decode (aux_decode for "aux").
The default mode, "auto", is "kvp" from the export's measured crossover prompt length on
(crossover.py) and the base below it; below it the base prompt runs through base_decode with
an empty cache, so "auto" loads two graphs (kvp_prefill, base_decode) and not three.

Sessions are created by `load` (concurrently), never inside a timed call, so load time and
TTFT are reported apart. Graphs run through onnxruntime's IO binding by default: the cache a
graph writes stays an OrtValue that the next step reads in place, instead of being copied out
to numpy after every call (`io_binding=False` gives the copying path; both give the same
tokens, tests/test_export_onnx.py). An optimised copy of each graph, saved at export (`optimized/`, see
kvp_export/export/optimize.py), is used when its recorded source hash and onnxruntime version
match; otherwise the source graph is loaded with a one-line warning.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .artifact import OPTIMIZED_DIR, OnnxArtifact  # noqa: F401  (OPTIMIZED_DIR: the export imports it from here)
from .crossover import use_kvp
from .errors import KvpError, check_choice
from .integrity import share_verified
from .options import DEFAULTS, check
from .protocol import MODES, check_tail, continuation, first_real, first_step, min_kvp_len, positions
from .sampling import MAX_NEW_TOKENS, Sampling

NEXT_INPUTS = ("next_input_ids", "next_position_ids", "next_attention_mask")  # kvp_prefill's small outputs
LAST_ONLY = np.array(1, np.int64)  # base_decode's `logits_to_keep` for a prompt: the next token's logits alone
# The graphs each mode needs to generate (first token and decoding).
GRAPHS_FOR = {"auto": ("kvp_prefill", "base_decode"), "kvp": ("kvp_prefill", "base_decode"),
              "base": ("base_prefill", "base_decode"), "aux": ("aux_prefill", "aux_decode")}


# How a session's worker threads wait for work (onnxruntime's session config entries):
#   "run":    spin while a Run() is active, stop as soon as it returns (`session.force_spinning_stop`);
#   "always": onnxruntime's default, workers keep spinning for a while after a Run() returns;
#   "off":    never spin (`session.intra_op.allow_spinning` 0).
# KVP runs two sessions back to back (kvp_prefill, then base_decode's first step), each with its own
# worker pool: under "always" the first session's workers are still spinning while the second one
# runs, on the same cores. "run" keeps spinning's latency inside a Run and gives the cores back
# between sessions (BENCHMARKS.md, "Spinning").
SPIN_POLICIES = ("run", "always", "off")


def check_spin(spin: str) -> None:
    check_choice("spin policy", spin, SPIN_POLICIES)


def session_options(threads: int, level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                    spin: str = "run") -> ort.SessionOptions:
    """Fixed threads (TTFT is compared at a fixed count), the given graph optimisations, sequential,
    and the worker threads' spin policy (SPIN_POLICIES)."""
    check_spin(spin)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    if spin == "run":
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    elif spin == "off":
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def optimized_graph(art: OnnxArtifact, variant: str, name: str, quiet: bool = False) -> Path | None:
    """The export's pre-optimised copy of a graph, when it is there and still matches (else None).

    It matches when its record names the source graph's recorded SHA-256 and this onnxruntime's
    version; a stale copy is skipped with a one-line warning and the source graph is loaded."""
    entry = art.manifest.optimized.get(variant, {}).get(name)
    if not entry:
        return None
    path = art.path(entry.file, "graph")
    source_sha = art.manifest.variants[variant][name].sha256
    why = None
    if entry.onnxruntime != ort.__version__:
        why = f"made by onnxruntime {entry.onnxruntime}, this is {ort.__version__}"
    elif entry.source_sha256 != source_sha:
        why = "its source graph's hash differs"
    elif not path.is_file() or path.stat().st_size != entry.bytes:
        why = "the file is missing or its size differs"
    if why:
        if not quiet:
            print(f"kvp: warning: not using the optimised {variant}/{name} ({why}); loading the source graph",
                  file=sys.stderr)
        return None
    return path


def verify_variants(art: OnnxArtifact, variants: list[str]) -> None:
    """Hash every graph file of `variants` (and of fp32, which quantized variants' parity runs),
    source graphs (what a user ships) and optimised copies (what the runtime loads), against the
    manifest, and hand the digests to the processes started from now on (integrity.share_verified):
    quality workers and cold-start children hash nothing again."""
    for v in dict.fromkeys([*variants, *(["fp32"] if "fp32" in art.variants else [])]):
        for name in art.manifest.variants[v]:
            art.verify_graph(v, name)
            if art.graph_files(v, name, optimized=True):
                art.verify_graph(v, name, optimized=True)
    share_verified(art.folder)


def as_array(v) -> np.ndarray:
    """A runtime value as numpy: an OrtValue (IO binding) copied out, an array as it is."""
    return v.numpy() if isinstance(v, ort.OrtValue) else v


def settle_sinks(present: list[np.ndarray], next_mask: np.ndarray, mask: np.ndarray, sink_len: int) -> None:
    """After KVP's first base step, move the sink's exact KV (the step's s re-fed entries, right
    after the predicted context: protocol.first_step) into the context's masked sink slots, and mask the re-fed copies
    (in place). The same keys stay visible, so full attention is unchanged; sliding-window layers
    need it: base_decode places the kept past keys at consecutive positions (docs/architecture.md,
    "Sliding-window layers")."""
    if sink_len == 0:
        return
    n_ctx = mask.shape[1] - 1
    starts = first_real(mask)
    for b, start in enumerate(starts.tolist()):
        src, dst = slice(n_ctx, n_ctx + sink_len), slice(start, start + sink_len)
        for kv in present:
            kv[b, :, dst] = kv[b, :, src]
        next_mask[b, dst], next_mask[b, src] = 1, 0


@dataclass
class State:
    """After a prefill: next-token logits [B, V], the cache, its mask, the next positions."""

    logits: np.ndarray
    past: list  # numpy arrays, or onnxruntime OrtValues where the runtime binds its outputs
    mask: np.ndarray
    next_pos: np.ndarray
    mode: str
    seconds: dict[str, float] = field(default_factory=dict)

    def past_arrays(self) -> list[np.ndarray]:
        """The cache as numpy arrays (copies of the OrtValues under IO binding)."""
        return [as_array(p) for p in self.past]


@dataclass
class Generation:
    """Completions and how long the first token took, with loading kept apart from TTFT.

    load_seconds: the sessions this call had to create (per graph, and "wall" for all of them
    loaded concurrently); empty when they were loaded before. ttft_seconds: this call's prefill
    (the first call after a load pays one-time allocations). warm_ttft_seconds: the median of
    `warm_repeats` more prefills of the same batch (None when none were asked for)."""

    prompts: list[str]
    completions: list[str]
    token_ids: list[list[int]]
    prompt_tokens: list[int]
    ttft_seconds: float
    seconds: dict[str, float]
    mode: str
    load_seconds: dict[str, float] = field(default_factory=dict)
    warm_ttft_seconds: float | None = None
    warm_seconds: dict[str, float] = field(default_factory=dict)
    crossover: int | None = None


class OnnxKVP:
    """The graphs of one variant of an export, with sessions opened on first use."""

    def __init__(self, artifact: OnnxArtifact | str, variant: str = "fp32", threads: int = DEFAULTS["threads"], *,
                 crossover: int | None = -1, use_optimized: bool = True, spin: str = "run",
                 io_binding: bool = True, tail: int | None = None):
        """`crossover`: the prompt length from which "auto" uses KVP; -1 (default) takes the one
        the export measured for this variant, None means never. `spin`: see SPIN_POLICIES.
        `io_binding`: keep each graph's cache output where onnxruntime wrote it (False: copy every
        output to numpy). `tail`: KVP's exact tail W (None: the export's, 0 before 0.3.3)."""
        self.art = artifact if isinstance(artifact, OnnxArtifact) else OnnxArtifact.open(artifact)
        self.art.check_variant(variant)
        check(threads=threads)
        self.variant, self.threads = variant, threads
        self.model = self.art.model
        self.sink_len = int(self.model["sink_len"])
        self.windowed = any(self.model.get("windows") or [])  # a sliding-window layer (Gemma 3)
        self.tail = int(self.model.get("tail") or 0) if tail is None else tail
        check_tail(self.tail)
        if crossover == -1:
            crossover = c.prompt_len if (c := self.art.manifest.crossover.get(variant)) else None
        self.crossover = crossover
        self.use_optimized = use_optimized
        check_spin(spin)  # refused now, not at the first load
        self.spin = spin
        self.io_binding = io_binding
        self._bindable = {n: set(io.inputs) for n, io in self.art.manifest.io.items()}  # per graph, once
        self._sessions: dict[str, ort.InferenceSession] = {}
        self.load_seconds: dict[str, float] = {}
        self._tok = None

    # --- sessions and tokenizer ---

    def _create(self, name: str) -> ort.InferenceSession:
        src = self.art.graph(self.variant, name)
        opt = optimized_graph(self.art, self.variant, name) if self.use_optimized else None
        # the saved copy is already optimised: only the (cheap) basic passes run again at load
        level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if opt else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = opt or src
        self.art.verify_graph(self.variant, name, optimized=bool(opt))  # hashed once per process, never timed
        t0 = time.perf_counter()
        try:
            sess = ort.InferenceSession(str(path), session_options(self.threads, level, self.spin),
                                        providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - a corrupt graph is the user's file
            raise KvpError(f"cannot load graph {path}: {str(e).splitlines()[0]}") from None
        self.load_seconds[name] = time.perf_counter() - t0
        self.art.check_session_io(sess, self.variant, name)
        return sess

    def session(self, name: str) -> ort.InferenceSession:
        if name not in self._sessions:
            self._sessions[name] = self._create(name)
        return self._sessions[name]

    def load(self, mode: str = "auto", concurrent: bool = True) -> dict[str, float]:
        """Create the sessions `mode` needs now (in parallel threads: onnxruntime releases the GIL
        while it reads and optimises a graph); return seconds per graph and the wall time."""
        self._check_mode(mode)
        names = [n for n in GRAPHS_FOR[mode] if n not in self._sessions]
        self.verify(names)  # outside the timed load: the sessions below find the digests cached
        t0 = time.perf_counter()
        if concurrent and len(names) > 1:
            with ThreadPoolExecutor(len(names)) as pool:
                for name, sess in zip(names, pool.map(self._create, names)):
                    self._sessions[name] = sess
        else:
            for name in names:
                self.session(name)
        return {**{n: self.load_seconds[n] for n in names}, "wall": time.perf_counter() - t0}

    def verify(self, names: tuple[str, ...] | list[str] | None = None) -> None:
        """Hash the files of the graphs `names` (default: every graph of the variant) that sessions
        would load against the manifest; a changed graph is refused before it is ever run."""
        for name in names or self.art.manifest.variants[self.variant]:
            opt = optimized_graph(self.art, self.variant, name, quiet=True) if self.use_optimized else None
            self.art.verify_graph(self.variant, name, optimized=bool(opt))

    @staticmethod
    def _check_mode(mode: str) -> None:
        check_choice("prefill mode", mode, MODES)

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

    @property
    def min_kvp_len(self) -> int:
        """KVP needs every prompt to hold the sink, at least as many predicted tokens, the tail and the last."""
        return min_kvp_len(self.sink_len, self.tail)

    def kvp_applies(self, mask: np.ndarray) -> bool:
        return int(mask.sum(-1).min()) >= self.min_kvp_len

    def resolve(self, mode: str, ids: np.ndarray, mask: np.ndarray) -> str:
        """The path a call takes: "auto" is KVP from the crossover prompt length on (the padded
        length: what the graphs compute over), else the base through its decoder."""
        self._check_mode(mode)
        if mode in ("auto", "kvp") and not self.kvp_applies(mask):
            return "base_via_decoder"  # too short for KVP: the base, with the graphs already loaded
        if mode == "auto":
            return "kvp" if use_kvp(ids.shape[1], self.crossover) else "base_via_decoder"
        return mode

    def prefill(self, ids: np.ndarray, mask: np.ndarray | None = None, mode: str = "auto") -> State:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        mask = np.ones_like(ids) if mask is None else np.ascontiguousarray(mask, dtype=np.int64)
        self.check_context(ids.shape[1])
        path = self.resolve(mode, ids, mask)
        if mode == "kvp":  # a tail as long as a prompt is an error, not a silent fall back to the base
            check_tail(self.tail, int(mask.sum(-1).min()))
        if path == "kvp":
            return self._prefill_kvp(ids, mask)
        if path == "base_via_decoder":
            return self.prefill_with_decoder(ids, mask)
        model = "aux" if mode == "aux" else "base"
        pos = positions(mask)
        t0 = time.perf_counter()
        out = self.run(f"{model}_prefill", {"input_ids": ids, "attention_mask": mask, "position_ids": pos})
        dt = time.perf_counter() - t0
        return State(out[0][:, -1], out[1:], mask, pos[:, -1] + 1, model, {f"{model}_prefill": dt, "total": dt})

    def prefill_with_decoder(self, ids: np.ndarray, mask: np.ndarray) -> State:
        """The base prompt through base_decode with an empty cache: the same computation as
        base_prefill (the last position's logits only, where the graph takes `logits_to_keep`),
        without loading a third graph. The default mode's path below the crossover; public so that
        the TTFT timer (ttft.prefill_timer) times exactly it. `ids`, `mask`: int64 [B, N]."""
        m = self.model
        empty = np.zeros((ids.shape[0], m["kv_heads"], 0, m["head_dim"]), np.float32)
        pos = positions(mask)
        t0 = time.perf_counter()
        out = self.step("base", ids, mask, pos, [empty] * (2 * m["base_layers"]), last_only=True)
        dt = time.perf_counter() - t0
        return State(out[0][:, -1], out[1:], mask, pos[:, -1] + 1, "base", {"base_decode": dt, "total": dt})

    def _prefill_kvp(self, ids: np.ndarray, mask: np.ndarray) -> State:
        c = ids.shape[1] - self.tail  # the columns kvp_prefill reads; the base reads the last W after them
        t0 = time.perf_counter()
        out = self.run("kvp_prefill", {"input_ids": ids[:, :c], "attention_mask": mask[:, :c]}, NEXT_INPUTS)
        t1 = time.perf_counter()
        past, (next_ids, next_pos, next_mask) = out[:-3], out[-3:]
        if self.tail:  # the graph laid out a step for its c columns; the base reads the last W after them too
            next_ids, next_pos, next_mask = first_step(ids, mask, self.sink_len, tail=self.tail)
        first = self.step("base", next_ids, next_mask, next_pos, past, last_only=True)  # not the sink's logits
        if self.windowed:  # full attention sees the same keys either way: nothing to move
            first = [first[0], *map(as_array, first[1:])]
            settle_sinks(first[1:], next_mask, mask[:, :c], self.sink_len)
        t2 = time.perf_counter()  # after the move: the parts add up to what a caller waits for
        return State(first[0][:, -1], first[1:], next_mask, next_pos[:, -1] + 1, "kvp",
                     {"kvp_prefill": t1 - t0, "base_first_step": t2 - t1, "total": t2 - t0})

    def step(self, model: str, ids, mask, pos, past, last_only: bool = False) -> list:
        """One call of `model`_decode: [logits (numpy), *present] (OrtValues under IO binding).
        `last_only` asks for the last position's logits alone where the graph can (`logits_to_keep`);
        either way logits[:, -1] is the last position's."""
        io = self.art.manifest.io[f"{model}_decode"]
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        feeds |= dict(zip(io.inputs[3:], past))
        if last_only and "logits_to_keep" in io.optional:
            feeds["logits_to_keep"] = LAST_ONLY
        return self.run(f"{model}_decode", feeds)

    def run(self, name: str, feeds: dict, numpy_outputs: tuple[str, ...] = ("logits",)) -> list:
        """All outputs of graph `name`, in the manifest's order. Under IO binding the inputs are
        read where they are (numpy memory or OrtValues) and only `numpy_outputs` are copied out;
        the rest (the cache) stay OrtValues for the next call to read in place."""
        sess = self.session(name)
        if not self.io_binding:
            return sess.run(None, {k: as_array(v) for k, v in feeds.items()})
        outputs = self.art.manifest.io[name].outputs
        if not feeds.keys() <= self._bindable[name]:
            # an input with a default (logits_to_keep) cannot be bound; run_with_ort_values reads the
            # inputs where they are and leaves the outputs as OrtValues just the same
            vals = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.asarray(v, order="C"))
                    for k, v in feeds.items()}
            got = sess.run_with_ort_values(outputs, vals)
            return [v.numpy() if k in numpy_outputs else v for k, v in zip(outputs, got)]
        binding = sess.io_binding()
        # numpy inputs are bound by address: keep every array alive until the run has returned
        feeds = {k: v if isinstance(v, ort.OrtValue) else np.ascontiguousarray(v) for k, v in feeds.items()}
        for k, v in feeds.items():
            if isinstance(v, ort.OrtValue):
                binding.bind_ortvalue_input(k, v)
            else:
                binding.bind_cpu_input(k, v)
        for k in outputs:
            binding.bind_output(k, "cpu")
        sess.run_with_iobinding(binding)
        return [v.numpy() if k in numpy_outputs else v for k, v in zip(outputs, binding.get_outputs())]

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
        model = "aux" if state.mode == "aux" else "base"
        mask, pos = continuation(state.mask, state.next_pos, cont.shape[1] - 1)
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

    def generate(self, prompts: list[str], *, max_new_tokens: int = MAX_NEW_TOKENS, sampling: Sampling = Sampling(),
                 mode: str = "auto", stop_strings: tuple[str, ...] = (), warm_repeats: int = 0) -> Generation:
        sampling.check_call(max_new_tokens, warm_repeats)  # the PyTorch pipeline's too (runtime/decode.py)
        ids, mask = self.encode(prompts, extra=max_new_tokens)
        loaded = self.load(mode) if any(n not in self._sessions for n in GRAPHS_FOR[mode]) else {}
        t0 = time.perf_counter()
        state = self.prefill(ids, mask, mode)
        ttft = time.perf_counter() - t0
        warm, warm_parts = None, {}
        if warm_repeats:
            runs = [self.prefill(ids, mask, mode).seconds for _ in range(warm_repeats)]
            warm_parts = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
            warm = warm_parts["total"]
        stop = None
        if stop_strings:
            def stop(toks: np.ndarray) -> np.ndarray:
                texts = self.tokenizer.decode_batch(toks.tolist(), skip_special_tokens=True)
                return np.array([any(s in t for s in stop_strings) for t in texts])
        toks = self.decode(state, max_new_tokens, sampling, pad_id=int(self.model["pad_token_id"] or 0), stop=stop)
        eos = set(self.model["eos_token_ids"])
        rows = [next((r[:i] for i, t in enumerate(r) if t in eos), r) for r in toks.tolist()]
        return Generation(list(prompts), [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows], rows,
                          mask.sum(-1).tolist(), ttft, state.seconds, state.mode, loaded, warm, warm_parts,
                          self.crossover)
