"""Export-friendly forwards of the base, the aux and the predictor, shared by ONNX and Core ML.

HF's modeling code builds masks and caches in ways a tracer bakes into the graph at the
example length (docs/architecture.md, "Stack facts that shaped the code"), so the exported
graphs come from these small modules instead. They reuse the HF submodules (projections,
norms, RoPE, MLP: the same weights), found and wired by the family's adapter
(models/adapters/), and write attention and masking from explicit inputs.
tests/test_export_onnx.py checks them against the HF path. The graphs' contract:
docs/architecture.md, "The ONNX graph contract".

Masking rule of `Decoder` (past keys = the cache it is given, new keys = this call's tokens):
- a new token sees the new tokens at or before it (causal by index) that the mask keeps;
- a new token at position p sees the past keys the mask keeps when p >= the number of kept
  past keys. In ordinary decoding every new position is at least that count, so this is plain
  causal attention and any ONNX LLM runtime can drive the graph. It also lets KVP's first base
  step recompute the sink: the sink tokens are fed again at positions 0..s-1 beside the last
  prompt token, see only themselves, and get the base's exact KV in the same weight read;
- on a sliding-window layer (window W), a new token at position p also needs p - k < W for a
  key at position k. New keys are at their position_ids; the kept past keys hold consecutive
  positions ending at f - 1, f = the smallest position among the new tokens that see the past
  (they continue it). The cache stays full length: see docs/architecture.md, "Sliding-window
  layers" (after KVP's first step the runtime moves the sink into place to keep that true).
"""

from __future__ import annotations

import torch
from torch import nn

from kvp_validate.protocol import first_step, positions

from ..models import arch
from ..predictor.module import KVPredictor


def _neg(dtype: torch.dtype) -> float:
    """Half the dtype's minimum: a masked score plus any real score stays finite."""
    return torch.finfo(dtype).min / 2


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
           layout: str = "grouped") -> torch.Tensor:
    """GQA attention without repeating K/V: q [B,H,T,D], k/v [B,Hkv,K,D] -> [B,T,H*D].

    Query heads are grouped onto their KV head (HF order: head h reads KV head h // rep), so
    the cache is read once. The scale (the family's, usually 1/sqrt(D)) is applied to q (T*D
    values) rather than to the scores (T*K), and masking is one add of the additive `bias`, in
    one of two layouts:
    - "grouped" (the ONNX graphs): [B,1,1,T,K], broadcast over the scores viewed [B,Hkv,rep,T,K];
      built once per forward by `attention_bias`: on a 1024-token prompt the per-layer Where +
      Mul over the scores had cost a quarter of the base prefill here;
    - "flat" (the Core ML modules, 4-D throughout, batch 1): [T,K], repeated for the rep query
      heads of a group and cast to the scores' dtype.
    """
    b, h, t, d = q.shape
    hkv = k.shape[1]
    rep = h // hkv
    q = q * scale
    scores = torch.matmul(q.reshape(b, hkv, rep * t, d), k.transpose(-1, -2))
    if layout == "grouped":
        probs = torch.softmax(scores.view(b, hkv, rep, t, -1) + bias, dim=-1).view(b, hkv, rep * t, -1)
    elif layout == "flat":
        probs = torch.softmax(scores + torch.cat([bias] * rep).to(scores.dtype), dim=-1)
    else:
        raise ValueError(f"unknown bias layout {layout!r}")
    out = torch.matmul(probs, v).view(b, h, t, d)
    return out.transpose(1, 2).reshape(b, t, h * d)


def attention_bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, K] bool -> [B, 1, 1, T, K] additive bias: 0 where visible, half the dtype's minimum
    elsewhere (never -inf: a row with nothing visible, a padding query, stays finite, and so
    does everything computed from it)."""
    zero = torch.zeros((), dtype=dtype)
    return torch.where(visible, zero, torch.tensor(_neg(dtype), dtype=dtype))[:, None, None]


def causal_visibility(attention_mask: torch.Tensor, position_ids: torch.Tensor, past_len) -> torch.Tensor:
    """[B, T, P+T] bool: the rule in the module docstring."""
    past_mask = attention_mask[:, :past_len].bool()
    new_mask = attention_mask[:, past_len:].bool()
    t = new_mask.shape[1]
    kept_past = past_mask.sum(-1, keepdim=True)  # [B, 1]
    see_past = past_mask[:, None, :] & (position_ids >= kept_past)[:, :, None]
    idx = torch.arange(t, device=attention_mask.device)
    see_new = (idx[None, :] <= idx[:, None])[None] & new_mask[:, None, :]
    return torch.cat([see_past, see_new], dim=-1)


def window_visibility(attention_mask: torch.Tensor, position_ids: torch.Tensor, past_len, window: int) -> torch.Tensor:
    """[B, T, P+T] bool: keys within `window` positions of each new token (the rule in the module docstring)."""
    past_mask = attention_mask[:, :past_len].long()
    kept_past = past_mask.sum(-1, keepdim=True)  # [B, 1]
    inline = position_ids >= kept_past
    first = torch.where(inline, position_ids, torch.full_like(position_ids, 1 << 40)).amin(-1, keepdim=True)
    past_pos = first - 1 - kept_past + past_mask.cumsum(-1)  # [B, P]; masked slots: never visible anyway
    key_pos = torch.cat([past_pos, position_ids], dim=-1)  # [B, P+T]
    return (position_ids[:, :, None] - key_pos[:, None, :]) < window


class Biases:
    """The additive attention biases of one forward, one per distinct window among the layers."""

    def __init__(self, attention_mask, position_ids, past_len, dtype, windows):
        vis = causal_visibility(attention_mask, position_ids, past_len)
        self.by_window = {w: attention_bias(vis if w is None else vis & window_visibility(
            attention_mask, position_ids, past_len, w), dtype) for w in dict.fromkeys(windows)}

    def __getitem__(self, window):
        return self.by_window[window]


class LayerPlan(nn.Module):
    """A model's rotary embeddings and, per layer, which one and which window it uses (from the adapter)."""

    def __init__(self, model):
        super().__init__()
        ad = arch.adapter(model)
        n = arch.ArchSpec.of(model).n_layers
        self.kinds = [ad.rope_kind(i) for i in range(n)]
        self.windows = [ad.window(i) for i in range(n)]
        self.rotaries = nn.ModuleDict({k: r for k, r in ad.rotaries(model).items() if k in self.kinds})

    def rope(self, h, position_ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin per layer for `position_ids`."""
        by_kind = {k: r(h, position_ids) for k, r in self.rotaries.items()}
        return [by_kind[k] for k in self.kinds]

    def biases(self, attention_mask, position_ids, past_len, dtype) -> list[torch.Tensor]:
        """The additive bias per layer."""
        b = Biases(attention_mask, position_ids, past_len, dtype, self.windows)
        return [b[w] for w in self.windows]


class Layer(nn.Module):
    """One HF decoder layer with explicit cache and visibility; optionally extra outputs of its input norm.

    `extra` [out, hidden] (+ bias) is fused into the layer's q/k/v projection: one matmul
    reads the normed hidden state once and yields q, k, v and the predictor's partial
    outputs for the base layers that read this aux layer.
    """

    def __init__(self, layer: nn.Module, ad: arch.Adapter, spec: arch.ArchSpec, extra_w: torch.Tensor | None = None,
                 extra_b: torch.Tensor | None = None):
        super().__init__()
        q_proj, k_proj, v_proj, self.o_proj = ad.projections(layer)
        self.ad, self.spec, self.scale = ad, spec, ad.attn_scale(layer)
        self.norm1, self.post1 = ad.input_norm(layer), ad.attn_post_norm(layer)
        self.norm2, self.post2, self.mlp = ad.mlp_norm(layer), ad.mlp_post_norm(layer), ad.mlp(layer)
        self.q_norm, self.k_norm = ad.query_norm(layer), ad.key_norm(layer)
        ws = [q_proj.weight, k_proj.weight, v_proj.weight]
        bs = [p.bias if p.bias is not None else torch.zeros(p.out_features, dtype=p.weight.dtype)
              for p in (q_proj, k_proj, v_proj)]
        self.split = [w.shape[0] for w in ws]
        if extra_w is not None:
            ws.append(extra_w.to(ws[0].dtype))
            bs.append((extra_b if extra_b is not None else torch.zeros(extra_w.shape[0])).to(ws[0].dtype))
            self.split.append(extra_w.shape[0])
        self.qkv = nn.Linear(ws[0].shape[1], sum(self.split), bias=True)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat(ws))
            self.qkv.bias.copy_(torch.cat(bs))

    def project(self, h, cos, sin):
        """The attention inputs of new tokens h [B, T, hidden]: (q, k_rot, v_h, k_pre, v, extra).

        q [B, H, T, D] and k_rot [B, Hkv, T, D] rotated, v_h [B, Hkv, T, D]; k_pre (normed,
        pre-RoPE) and v [B, T, Hkv*D] for the predictor; extra: the fused outputs, or None.
        """
        s = self.spec
        b, t, _ = h.shape
        parts = torch.split(self.qkv(self.norm1(h)), self.split, dim=-1)
        q, k, v = parts[0], parts[1], parts[2]
        q = q.view(b, t, s.n_heads, s.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        k = k.view(b, t, s.n_kv_heads, s.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        k_pre = k.reshape(b, t, s.kv_dim)
        q = arch.apply_rope(q.transpose(1, 2), cos, sin)
        k_rot = arch.apply_rope(k.transpose(1, 2), cos, sin)
        v_h = v.view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        return q, k_rot, v_h, k_pre, v, (parts[3] if len(parts) > 3 else None)

    def finish(self, h, attn):
        """The residual adds after attention: o_proj of attn [B, T, H*D], then the MLP (each
        branch through its post norm where the family has one)."""
        o = self.o_proj(attn)
        h = h + (self.post1(o) if self.post1 is not None else o)
        m = self.ad.down_proj(self.mlp)(self.ad.mlp_inner(self.mlp, self.norm2(h)))
        return h + (self.post2(m) if self.post2 is not None else m)

    def forward(self, h, cos, sin, past_k, past_v, bias):
        """-> (h_out, k_full, v_full, pre-RoPE normed k, v, extra or None); bias from `attention_bias`."""
        q, k_rot, v_h, k_pre, v, extra = self.project(h, cos, sin)
        k_full = k_rot if past_k is None else torch.cat([past_k, k_rot], dim=2)
        v_full = v_h if past_v is None else torch.cat([past_v, v_h], dim=2)
        h = self.finish(h, attend(q, k_full, v_full, bias, self.scale))
        return h, k_full, v_full, k_pre, v, extra


class Decoder(nn.Module):
    """A causal LM over new tokens with an optional past cache (the base decoder, the base and aux prefill).

    forward(input_ids, attention_mask [B, P+T], position_ids [B, T], *past (key, value per layer)
    [, logits_to_keep]) -> (logits, *present). With `last_only`, logits are for the last position
    only [B, 1, V]: the LM head over the whole prompt is pure waste in a prefill. With
    `keep_input`, a last input `logits_to_keep` (a 0-d int64, transformers' name and meaning)
    keeps the logits of the last N positions, 0 = all: the export gives it a default of 0, so a
    runtime that does not know it (optimum, onnxruntime-genai) gets every position as before,
    while ours asks for 1 when base_decode runs a prompt or KVP's first step.
    """

    def __init__(self, model: nn.Module, *, with_past: bool, last_only: bool, keep_input: bool = False):
        super().__init__()
        self.spec, ad = arch.ArchSpec.of(model), arch.adapter(model)
        self.embed = ad.embedding(model)
        self.plan = LayerPlan(model)
        self.layers = nn.ModuleList(Layer(layer, ad, self.spec) for layer in ad.layers(model))
        self.norm, self.lm_head = ad.final_norm(model), ad.lm_head(model)
        self.with_past, self.last_only, self.keep_input = with_past, last_only, keep_input

    def forward(self, input_ids, attention_mask, position_ids, *past):
        past, logits_to_keep = (past[:-1], past[-1]) if self.keep_input else (past, None)
        h = self.embed(input_ids)
        past_len = past[0].shape[2] if self.with_past else 0
        ropes = self.plan.rope(h, position_ids)
        biases = self.plan.biases(attention_mask, position_ids, past_len, h.dtype)
        present = []
        for i, layer in enumerate(self.layers):
            pk, pv = (past[2 * i], past[2 * i + 1]) if self.with_past else (None, None)
            h, k, v, *_ = layer(h, *ropes[i], pk, pv, biases[i])
            present += [k, v]
        if self.last_only:
            h = h[:, -1:]
        elif logits_to_keep is not None:
            h = h[:, -logits_to_keep:]  # -0 = 0: every position
        return (self.lm_head(self.norm(h)), *present)


class KVPPrefill(nn.Module):
    """The aux over the prompt's context and the predictor, emitting the base's cache and the next step's inputs.

    forward(input_ids [B, N], attention_mask [B, N]) for left-padded prompts ->
      present.i.key / present.i.value [B, Hkv_base, N-1, D]: the predicted base cache for
        positions 0..N-2, keys rotated with the base's RoPE at their positions;
      next_input_ids [B, s+1], next_position_ids [B, s+1], next_attention_mask [B, N+s]: the
        base's first step, laid out by kvp_validate.protocol.first_step (the s sink tokens at
        0..s-1 and the last prompt token; the context mask without the predicted sink slots).
    The three `next_*` outputs and the present cache feed the base decoder as they are: its
    first step computes the sink's exact KV and the first token's logits in one pass.
    Needs every prompt to hold `protocol.min_kvp_len(s)` tokens (the runtime checks).
    """

    def __init__(self, base: nn.Module, aux: nn.Module, predictor: KVPredictor, sink_len: int):
        super().__init__()
        self.bspec, self.aspec = arch.ArchSpec.of(base), arch.ArchSpec.of(aux)
        self.sink_len = sink_len
        self.mode = predictor.input_mode
        ad = arch.adapter(aux)
        self.embed = ad.embedding(aux)
        self.aux_plan, self.base_plan = LayerPlan(aux), LayerPlan(base)
        n_aux = self.aspec.n_layers
        self.sources = predictor.sources
        # Which aux source index (0..n_aux; n_aux = final normed state) feeds which predictor slices.
        self.plan: list[list[tuple[int, str, int]]] = [[] for _ in range(n_aux + 1)]  # (base layer, k|v, width)
        fused_w: list[list[torch.Tensor]] = [[] for _ in range(n_aux + 1)]
        fused_b: list[list[torch.Tensor]] = [[] for _ in range(n_aux + 1)]
        self.up = None
        if self.mode == "hidden":
            d = self.aspec.hidden
            for i, src in enumerate(predictor.sources):
                # reduced rank: the shared first factor is fused ("z"), K and V follow it (self.up)
                firsts = (("z", predictor.down[i]),) if predictor.down is not None else \
                    (("k", predictor.k[i]), ("v", predictor.v[i]))
                for kind, lin in firsts:
                    bias = lin.bias if lin.bias is not None else torch.zeros(lin.out_features)
                    for part, j in enumerate(src):
                        fused_w[j].append(lin.weight[:, part * d : (part + 1) * d])
                        fused_b[j].append(bias if part == 0 else torch.zeros_like(bias))
                        self.plan[j].append((i, kind, lin.out_features))
            if predictor.down is not None:  # one [r -> K | V] matmul per base layer
                self.up = nn.ModuleList(nn.Linear(predictor.rank, 2 * predictor.dims["out"]) for _ in predictor.sources)
                with torch.no_grad():
                    for up, k, v in zip(self.up, predictor.k, predictor.v):
                        up.weight.copy_(torch.cat([k.weight, v.weight]))
                        up.bias.copy_(torch.cat([k.bias, v.bias]))
        else:  # "kv": the predictor reads the aux's own keys (normed, pre-RoPE) and values
            self.pk, self.pv = predictor.k, predictor.v
        layers = []
        for j, layer in enumerate(ad.layers(aux)):
            w = torch.cat(fused_w[j]) if fused_w[j] else None
            b = torch.cat(fused_b[j]) if fused_b[j] else None
            layers.append(Layer(layer, ad, self.aspec, w, b))
        self.layers = nn.ModuleList(layers)
        self.final_norm = ad.final_norm(aux)
        self.final = None
        if fused_w[n_aux]:
            self.final = nn.Linear(self.aspec.hidden, sum(p[2] for p in self.plan[n_aux]))
            with torch.no_grad():
                self.final.weight.copy_(torch.cat(fused_w[n_aux]))
                self.final.bias.copy_(torch.cat(fused_b[n_aux]))
        # Aux layers after the deepest one the predictor reads are never run.
        used = [j for j in range(n_aux + 1) if self.plan[j]] if self.mode == "hidden" else predictor.layer_map
        self.depth = min(max(used) + 1, n_aux)

    def predict(self, h, step) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per base layer, predicted pre-RoPE keys and values [B, S, Hkv*D] from the aux run over embeddings h.

        step(j, layer, h) -> (h, k_pre, v, extra) runs aux layer j: the caller decides how it
        attends (a visibility mask here; the Core ML export uses its own static-shape attention).
        """
        sums: dict[tuple[int, str], torch.Tensor] = {}
        aux_kv: list[tuple[torch.Tensor, torch.Tensor]] = []

        def add(j: int, out: torch.Tensor) -> None:
            off = 0
            for i, kind, width in self.plan[j]:
                piece = out[..., off : off + width]
                off += width
                sums[(i, kind)] = piece if (i, kind) not in sums else sums[(i, kind)] + piece

        for j in range(self.depth):
            h, k_pre, v, extra = step(j, self.layers[j], h)
            if extra is not None:
                add(j, extra)
            aux_kv.append((k_pre, v))
        if self.final is not None:
            add(len(self.layers), self.final(self.final_norm(h)))
        if self.up is not None:
            return [tuple(up(sums[(i, "z")]).chunk(2, dim=-1)) for i, up in enumerate(self.up)]
        if self.mode == "hidden":
            return [(sums[(i, "k")], sums[(i, "v")]) for i in range(self.bspec.n_layers)]
        return [(self.pk[i](aux_kv[s[0]][0]), self.pv[i](aux_kv[s[0]][1])) for i, s in enumerate(self.sources)]

    def forward(self, input_ids, attention_mask):
        ctx, cmask = input_ids[:, :-1], attention_mask[:, :-1]
        pos = positions(attention_mask)
        cpos = pos[:, :-1]
        h = self.embed(ctx)
        ropes = self.aux_plan.rope(h, cpos)
        biases = self.aux_plan.biases(cmask, cpos, 0, h.dtype)

        def step(j, layer, h):
            h, _k, _v, k_pre, v, extra = layer(h, *ropes[j], None, None, biases[j])
            return h, k_pre, v, extra

        bs = self.bspec
        b, s_ctx = ctx.shape
        present = []
        for (k, v), (bcos, bsin) in zip(self.predict(h, step), self.base_plan.rope(h, cpos)):
            k = arch.apply_rope(k.view(b, s_ctx, bs.n_kv_heads, bs.head_dim).transpose(1, 2), bcos, bsin)
            v = v.view(b, s_ctx, bs.n_kv_heads, bs.head_dim).transpose(1, 2)
            present += [k, v]
        return (*present, *first_step(input_ids, attention_mask, self.sink_len))
