"""One layer's attention (SmolLM2-135M shapes: 9 heads, 3 KV heads, head 64): today's exported ops
(kvp_export.export.modules: RoPE on q/k, cache concat, grouped attention with an additive bias)
against onnxruntime's GroupQueryAttention with rotary (standard separate past/present contract).
Same outputs (checked), then interleaved timing (variant_table's rounds), ratios only.
Usage: python benchmarks/gqa_attention.py PAST NEW [ROUNDS] (PAST 0: a prefill of NEW tokens).
BENCHMARKS.md, "Issue 12, second session"."""

import sys
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto as T
from onnx import helper as h
from variant_table import interleaved, repeated  # the shared interleaved timing (this folder)

from kvp_export.export.modules import attend
from kvp_export.models import arch
from kvp_validate.runtime import session_options

H, HKV, D = 9, 3, 64
P, S = int(sys.argv[1]), int(sys.argv[2])
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 15
MAXLEN = 2048
inv = 1.0 / (100000 ** (torch.arange(0, D, 2).float() / D))
ang = torch.arange(MAXLEN).float()[:, None] * inv[None]
cos_half, sin_half = ang.cos(), ang.sin()


class Ours(torch.nn.Module):
    def forward(self, q, k, v, past_k, past_v, cos, sin, bias):
        b, t, _ = q.shape
        q = arch.apply_rope(q.view(b, t, H, D).transpose(1, 2), cos, sin)
        k = arch.apply_rope(k.view(b, t, HKV, D).transpose(1, 2), cos, sin)
        v = v.view(b, t, HKV, D).transpose(1, 2)
        kf, vf = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        return attend(q, kf, vf, bias, D**-0.5), kf, vf


rng = np.random.default_rng(0)
q = rng.standard_normal((1, S, H * D)).astype(np.float32)
k = rng.standard_normal((1, S, HKV * D)).astype(np.float32)
v = rng.standard_normal((1, S, HKV * D)).astype(np.float32)
pk = rng.standard_normal((1, HKV, P, D)).astype(np.float32)
pv = rng.standard_normal((1, HKV, P, D)).astype(np.float32)
pos = np.arange(P, P + S)
cos = torch.cat([cos_half[pos], cos_half[pos]], -1)[None].numpy()
sin = torch.cat([sin_half[pos], sin_half[pos]], -1)[None].numpy()
vis = np.concatenate([np.ones((S, P), bool), np.tril(np.ones((S, S), bool))], 1)
bias = np.where(vis, 0, np.finfo(np.float32).min / 2).astype(np.float32)[None, None, None]
tmp = tempfile.mkdtemp()
with warnings.catch_warnings(), torch.no_grad():
    warnings.simplefilter("ignore")
    args = tuple(map(torch.from_numpy, (q, k, v, pk, pv, cos, sin, bias)))
    names = ["q", "k", "v", "past_k", "past_v", "cos", "sin", "bias"]
    torch.onnx.export(
        Ours(),
        args,
        f"{tmp}/ours.onnx",
        dynamo=False,
        opset_version=17,
        input_names=names,
        output_names=["out", "present_k", "present_v"],
        dynamic_axes={n: {1: "t"} for n in ("q", "k", "v")}
        | {"past_k": {2: "p"}, "past_v": {2: "p"}, "cos": {1: "t"}, "sin": {1: "t"}, "bias": {3: "t", 4: "tot"}},
    )
node = h.make_node(
    "GroupQueryAttention",
    ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total", "cos_cache", "sin_cache"],
    ["out", "present_k", "present_v"],
    domain="com.microsoft",
    num_heads=H,
    kv_num_heads=HKV,
    do_rotary=1,
    scale=D**-0.5,
)
g = h.make_graph(
    [node],
    "gqa",
    [
        h.make_tensor_value_info("q", T.FLOAT, [1, "t", H * D]),
        h.make_tensor_value_info("k", T.FLOAT, [1, "t", HKV * D]),
        h.make_tensor_value_info("v", T.FLOAT, [1, "t", HKV * D]),
        h.make_tensor_value_info("past_k", T.FLOAT, [1, HKV, "p", D]),
        h.make_tensor_value_info("past_v", T.FLOAT, [1, HKV, "p", D]),
        h.make_tensor_value_info("seqlens_k", T.INT32, [1]),
        h.make_tensor_value_info("total", T.INT32, []),
    ],
    [h.make_tensor_value_info(n, T.FLOAT, None) for n in ("out", "present_k", "present_v")],
    [
        onnx.numpy_helper.from_array(cos_half.numpy(), "cos_cache"),
        onnx.numpy_helper.from_array(sin_half.numpy(), "sin_cache"),
    ],
)
onnx.save(
    h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)]), f"{tmp}/gqa.onnx"
)


def sess(p):
    return ort.InferenceSession(p, session_options(2), providers=["CPUExecutionProvider"])  # the runtime's


ours, gqa = sess(f"{tmp}/ours.onnx"), sess(f"{tmp}/gqa.onnx")
f_ours = dict(q=q, k=k, v=v, past_k=pk, past_v=pv, cos=cos, sin=sin, bias=bias)
f_gqa = dict(
    q=q, k=k, v=v, past_k=pk, past_v=pv, seqlens_k=np.array([P + S - 1], np.int32), total=np.array(P + S, np.int32)
)
a, b = ours.run(None, f_ours), gqa.run(None, f_gqa)
err = [float(np.abs(x - y).max() / (np.abs(x).max() + 1e-9)) for x, y in zip(a, b)]
med = interleaved(
    {"ours": repeated(lambda: ours.run(None, f_ours)), "gqa": repeated(lambda: gqa.run(None, f_gqa))}, ROUNDS
)
print(
    f"past {P}, new {S}: rel. max error out/present_k/present_v {err[0]:.1e}/{err[1]:.1e}/{err[2]:.1e}; "
    f"ours / GQA time {med['ours'] / med['gqa']:.2f}"
)
