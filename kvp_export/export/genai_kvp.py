"""KVP under onnxruntime-genai: a `decoder-pipeline` folder whose prompt stage is KVP (issue 13).

genai 0.18 has no API to hand it a precomputed KV cache, but its `decoder-pipeline` model type
runs a list of ONNX stages, each marked `run_on_prompt` / `run_on_token_gen`, and writes any
stage output named `present.N.key/value` into its own cache. So:

- stage `kvp_prompt` (prompt only): one graph = kvp_prefill.onnx followed by base_decode.onnx's
  first step (the exact sink and the last token, as our runtime does), then rearranged to what
  genai expects after a prompt of N tokens: `present.N.*` [B, Hkv, N, D] in slot order (the
  exact sink KV in slots 0..s-1, the predicted KV in s..N-2, the last token's exact KV in N-1)
  and `logits` [B, 1, V] (a static 1: genai then allocates only the last position's logits);
- stage `base_decode` (token generation only): the variant's base_decode.onnx as it is.

`write_genai_kvp(export, variant)` writes `<export>/<variant>/genai-kvp/`: genai_config.json,
kvp_prompt.onnx, and hard links (copies across file systems) to base_decode.onnx and the
tokenizer files, since genai only opens files inside the config's folder. It reads the export's
graphs only after checking their SHA-256 against the export's manifest, writes the folder
atomically (replacing an older one only when the new one is complete), and gives it its own
manifest.json (stage "genai-kvp"): every file's size and SHA-256, and the export's kvp_prefill and
base_decode hashes it was built from, so that a reader (kvp_validate.genai.kvp_folder) refuses a
changed file or a folder left from another export in one line.

Limits (genai 0.18): no exact tail (an export with `model.tail` > 0 is refused); batch 1 per generator (genai feeds pad tokens unmasked); prompts of at
least 2 x sink + 2 tokens (shorter ones: use the variant folder itself, the base model); one
prompt per generator (`rewind_to` is refused for decoder-pipeline models, and a second
multi-token append would rerun the prompt stage without the past); the prompt stage holds its
own copy of the base's weights (base_decode's first step), so the base weights are loaded twice.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, compose, helper

from kvp_validate.artifact import OnnxArtifact
from kvp_validate.genai import refuse_tail

from ..artifacts import atomic_dir, write_manifest
from ..errors import KvpError
from .genai import GENAI_CONFIG, GENAI_TOKENIZER

FOLDER = "genai-kvp"
PROMPT_GRAPH = "kvp_prompt.onnx"
SHARED = ("base_decode.onnx", "base_decode.onnx.data", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json")
MAX_PROTO = 1_900_000_000  # protobuf's 2 GB limit: larger graphs keep their weights beside them


def kv(prefix: str, n_layers: int) -> list[str]:
    return [f"{prefix}.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]


def prompt_graph(variant_dir: Path, n_layers: int, sink: int, vocab: int) -> onnx.ModelProto:
    """kvp_prefill + the base's first step, emitting genai's cache layout and last logits."""
    pre = onnx.load(str(variant_dir / "kvp_prefill.onnx"))
    dec = compose.add_prefix(onnx.load(str(variant_dir / "base_decode.onnx")), "base/")
    # the two graphs use the same symbolic dim names for different sizes ("seq" is N in one and
    # s + 1 in the other); onnxruntime plans buffers by them, so the base's get their own names
    for vi in [*dec.graph.input, *dec.graph.output, *dec.graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = "base_" + dim.dim_param
    io_map = [("next_input_ids", "base/input_ids"), ("next_position_ids", "base/position_ids"),
              ("next_attention_mask", "base/attention_mask")]
    io_map += [(p, "base/past_key_values" + p[len("present"):]) for p in kv("present", n_layers)]
    m = compose.merge_models(pre, dec, io_map=io_map)
    g = m.graph
    rename = {p: "pred/" + p for p in kv("present", n_layers)}  # free the names for the outputs
    for n in g.node:
        n.input[:] = [rename.get(x, x) for x in n.input]
        n.output[:] = [rename.get(x, x) for x in n.output]
    nodes = [helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [1], [v]))
             for name, v in (("kvpg/axis1", 1), ("kvpg/axis2", 2), ("kvpg/s", sink), ("kvpg/end", 2**62),
                             ("kvpg/minus1", -1))]
    # after the base step the cache is [predicted 0..N-2 | exact sink 0..s-1 | exact N-1]; L = N-1
    nodes += [helper.make_node("Shape", ["pred/present.0.key"], ["kvpg/shape"]),
              helper.make_node("Gather", ["kvpg/shape", "kvpg/axis2"], ["kvpg/L"], axis=0),
              helper.make_node("Add", ["kvpg/L", "kvpg/s"], ["kvpg/Ls"])]
    for name in kv("present", n_layers):
        src, p = "base/" + name, "kvpg/" + name
        nodes += [helper.make_node("Slice", [src, "kvpg/L", "kvpg/Ls", "kvpg/axis2"], [p + "/sink"]),
                  helper.make_node("Slice", [src, "kvpg/s", "kvpg/L", "kvpg/axis2"], [p + "/predicted"]),
                  helper.make_node("Slice", [src, "kvpg/Ls", "kvpg/end", "kvpg/axis2"], [p + "/last"]),
                  helper.make_node("Concat", [p + "/sink", p + "/predicted", p + "/last"], [name], axis=2)]
    nodes.append(helper.make_node("Slice", ["base/logits", "kvpg/minus1", "kvpg/end", "kvpg/axis1"], ["logits"]))
    g.node.extend(nodes)
    kv_shape = next(o for o in dec.graph.output if o.name == "base/present.0.key").type.tensor_type.shape.dim
    hkv, d = kv_shape[1].dim_value, kv_shape[3].dim_value
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, vocab]))
    g.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", hkv, "prompt", d])
                    for n in kv("present", n_layers))
    return m


def pipeline_config(base_config: dict, n_layers: int) -> dict:
    """The variant's genai_config.json turned into a two-stage decoder-pipeline."""
    cfg = json.loads(json.dumps(base_config))
    dec = cfg["model"]["decoder"]
    dec.pop("filename", None)
    dec["pipeline"] = [{
        "kvp_prompt": {"filename": PROMPT_GRAPH, "inputs": ["input_ids", "attention_mask"],
                       "outputs": ["logits", *kv("present", n_layers)],
                       "run_on_prompt": True, "run_on_token_gen": False},
        "base_decode": {"filename": "base_decode.onnx",
                        "inputs": ["input_ids", "attention_mask", "position_ids", *kv("past_key_values", n_layers)],
                        "outputs": ["logits", *kv("present", n_layers)],
                        "run_on_prompt": False, "run_on_token_gen": True},
    }]
    cfg["model"]["type"] = "decoder-pipeline"
    return cfg


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_genai_kvp(export: str | Path, variant: str = "fp32") -> Path:
    """`<export>/<variant>/genai-kvp/`: KVP through onnxruntime-genai (see the module docstring)."""
    art = OnnxArtifact.open(export)  # every file's size; the small files' SHA-256
    art.check_variant(variant)
    refuse_tail(art)
    variant_dir = art.folder / variant
    if not (variant_dir / GENAI_CONFIG).is_file():
        raise KvpError(f"no {GENAI_CONFIG} in {variant_dir} (an export made before genai support? re-export it)")
    for name in ("kvp_prefill", "base_decode"):  # the graphs read below, hashed before they are parsed
        art.verify_graph(variant, name)
    base_cfg = json.loads((variant_dir / GENAI_CONFIG).read_text())
    n_layers, sink, vocab = art.model["base_layers"], art.model["sink_len"], art.model["vocab"]
    out = variant_dir / FOLDER
    with atomic_dir(out, overwrite=True) as tmp:
        m = prompt_graph(variant_dir, n_layers, sink, vocab)
        if m.ByteSize() > MAX_PROTO:
            onnx.save(m, str(tmp / PROMPT_GRAPH), save_as_external_data=True, location=PROMPT_GRAPH + ".data")
        else:
            onnx.save(m, str(tmp / PROMPT_GRAPH))
        for name in SHARED:
            if (variant_dir / name).is_file():
                _link(variant_dir / name, tmp / name)
        if (variant_dir / GENAI_TOKENIZER).is_dir():
            shutil.copytree(variant_dir / GENAI_TOKENIZER, tmp / GENAI_TOKENIZER)
        cfg = pipeline_config(base_cfg, n_layers)
        (tmp / GENAI_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        graphs = art.manifest.variants[variant]
        write_manifest(tmp, FOLDER, inputs={"export": str(art.folder.resolve()), "variant": variant,
                                            **{name: graphs[name].sha256 for name in ("kvp_prefill", "base_decode")}})
    return out
