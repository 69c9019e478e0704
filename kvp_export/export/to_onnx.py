"""The ONNX graphs of a KVP export, traced from export/modules.py.

Five graphs, all with dynamic batch and sequence lengths:
- kvp_prefill:  aux over the context + predictor -> the base's cache and the next step's inputs;
- base_decode:  the base with past KV (optimum/ORT-GenAI naming: past_key_values.N.key/value ->
                present.N.key/value), which also runs KVP's first step and, in the default
                mode, prompts below the crossover (`logits_to_keep`, an input with a default);
- base_prefill: the base over a whole prompt, last-position logits (the baseline without KVP);
- aux_prefill / aux_decode: the aux alone, the other baseline (TTFT, quality, HumanEval).
The legacy TorchScript exporter is used: the modules take every mask and position as an
input, so nothing is baked at the example length, and it exports these models in seconds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch

from kvp_validate.protocol import positions

from ..errors import KvpError
from ..models import arch
from ..predictor.module import KVPredictor
from .modules import Decoder, KVPPrefill

OPSET = 17
GRAPHS = ("kvp_prefill", "base_decode", "base_prefill", "aux_decode", "aux_prefill")
# Above this many bytes of weights a graph keeps them in `<graph>.onnx.data` (protobuf's 2 GB
# limit; optimum's convention). Smaller graphs stay one self-contained file.
EXTERNAL_DATA_BYTES = 1 << 30


# Inputs a graph gives a default value (an initializer of the same name, which onnxruntime lets a
# feed override): a runtime that does not know them leaves them out. name -> default.
DEFAULTS = {"logits_to_keep": 0}


@dataclass
class GraphIO:
    inputs: list[str]  # required, in the graph's order
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    optional: list[str] = field(default_factory=list)  # inputs with a default (DEFAULTS), after `inputs`


def kv_names(prefix: str, n_layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


def decoder_io(n_layers: int, with_past: bool) -> GraphIO:
    past = kv_names("past_key_values", n_layers) if with_past else []
    present = kv_names("present", n_layers)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "logits_seq"}}
    axes |= {n: {0: "batch", 2: "past"} for n in past} | {n: {0: "batch", 2: "total"} for n in present}
    optional = ["logits_to_keep"] if with_past else []
    return GraphIO(["input_ids", "attention_mask", "position_ids", *past], ["logits", *present], axes, optional)


def kvp_prefill_io(n_layers: int) -> GraphIO:
    present = kv_names("present", n_layers)
    outs = [*present, "next_input_ids", "next_position_ids", "next_attention_mask"]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "next_input_ids": {0: "batch"}, "next_position_ids": {0: "batch"},
            "next_attention_mask": {0: "batch", 1: "next_total"}}
    axes |= {n: {0: "batch", 2: "context"} for n in present}
    return GraphIO(["input_ids", "attention_mask"], outs, axes)


def example_inputs(spec: arch.ArchSpec, name: str, batch: int = 2, seq: int = 7, past: int = 5) -> tuple:
    """Tracing inputs: left padding in row 1 so the padding paths are traced too."""
    ids = torch.randint(0, spec.vocab, (batch, seq))
    if name == "kvp_prefill":
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1, :2] = 0
        return ids, mask
    with_past = name.endswith("decode")
    total = seq + (past if with_past else 0)
    mask = torch.ones(batch, total, dtype=torch.long)
    mask[1, :2] = 0
    pos = positions(mask)[:, -seq:]
    if not with_past:
        return ids, mask, pos
    kv = torch.randn(batch, spec.n_kv_heads, past, spec.head_dim)
    return (ids, mask, pos, *[kv] * (2 * spec.n_layers))


def build_module(name: str, base, aux, predictor: KVPredictor, sink_len: int) -> tuple[torch.nn.Module, GraphIO, arch.ArchSpec]:
    model = base if name.startswith("base") or name == "kvp_prefill" else aux
    spec = arch.ArchSpec.of(model)
    if name == "kvp_prefill":
        return KVPPrefill(base, aux, predictor, sink_len).eval(), kvp_prefill_io(spec.n_layers), spec
    with_past = name.endswith("decode")
    module = Decoder(model, with_past=with_past, last_only=not with_past, keep_input=with_past).eval()
    return module, decoder_io(spec.n_layers, with_past), spec


def export_graph(name: str, path: Path, base, aux, predictor: KVPredictor, sink_len: int) -> GraphIO:
    """Trace one graph to `path` (weights external when large) and run the full ONNX check."""
    module, io, spec = build_module(name, base, aux, predictor, sink_len)
    args = (*example_inputs(spec, name), *(torch.tensor(DEFAULTS[n]) for n in io.optional))
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints: the sizes are inputs here
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=io.inputs + io.optional, output_names=io.outputs,
                          dynamic_axes=io.dynamic_axes, do_constant_folding=True)
    finish_graph(path, io.optional, external=weight_bytes > EXTERNAL_DATA_BYTES)
    check_graph(path)
    return io


def finish_graph(path: Path, defaults: list[str], external: bool) -> None:
    """In one load and save of the traced graph: give inputs `defaults` their DEFAULTS value (an
    initializer named like the input), and move the weights to `<graph>.onnx.data` if `external`."""
    if not defaults and not external:
        return
    model = onnx.load(str(path))
    model.graph.initializer.extend(onnx.numpy_helper.from_array(np.array(DEFAULTS[n], np.int64), n) for n in defaults)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def check_graph(path: Path) -> None:
    """onnx.checker's full check (with shape inference), by path so external data is allowed."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001 - report the checker's first line
        raise KvpError(f"exported graph {path.name} fails onnx.checker: {str(e).splitlines()[0]}") from None
