"""Gemma 3 270M against transformers' own Gemma 3, past the 512-token window (issue 16).

Writes JSON: the GGUF -> safetensors conversion check (from the model folder's manifest), the
export modules' logits against transformers over one held-out prompt longer than the window
(prefill, then greedy decode steps on the module's own cache), and the greedy tokens of both.
With --layers it writes instead what each layer is worth to a layer-pruned aux: the held-out
continuation NLL of the base with that one layer removed (no healing), beside ShortGPT's block
influence (what `--select importance` ranks by).
Usage: python benchmarks/gemma3_checks.py OUT.json [--prompt-len 640] [--steps 16]
       python benchmarks/gemma3_checks.py OUT.json --layers [--pairs 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from kvp_export import data
from kvp_export.artifacts import read_manifest
from kvp_export.export.modules import Decoder
from kvp_export.models import load, resolve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--prompt-len", type=int, default=640)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--layers", action="store_true", help="drop-one-layer NLL and block influence instead")
    ap.add_argument("--pairs", type=int, default=8)
    a = ap.parse_args()
    folder = resolve(a.model)
    model, tok = load(folder)
    if a.layers:
        write(a.out, {"model": a.model, "date": time.strftime("%Y-%m-%d"), **layer_worth(model, tok, a.pairs)})
        return
    prompts, _ = data.eval_pairs(tok, data.corpus_from_spec(None, "heldout"), 1, a.prompt_len, 1)
    ids = torch.as_tensor(prompts)[:1]
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=a.steps, do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
        want_prefill = model(input_ids=ids).logits[0]
        logits, *past = Decoder(model, with_past=False, last_only=False)(ids, mask, pos)
        got_prefill = logits[0]
        step = Decoder(model, with_past=True, last_only=False)
        tokens, step_logits = [], [logits[0, -1]]
        nxt = int(logits[0, -1].argmax())
        for t in range(a.steps - 1):
            tokens.append(nxt)
            n = ids.shape[1] + t
            out = step(torch.tensor([[nxt]]), torch.ones(1, n + 1, dtype=torch.long), torch.tensor([[n]]), *past)
            step_logits.append(out[0][0, -1])
            past = out[1:]
            nxt = int(out[0][0, -1].argmax())
        tokens.append(nxt)
    hf_tokens = hf.sequences[0, ids.shape[1]:].tolist()
    hf_logits = torch.stack([x[0] for x in hf.logits])
    ours = torch.stack(step_logits)

    def rel(x, y):
        return float((x - y).norm() / y.norm())

    result = {
        "model": a.model,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__, "python": platform.python_version(),
        "conversion": read_manifest(folder, "model")["conversion"],
        "prompt_tokens": ids.shape[1],
        "window": model.config.sliding_window,
        "prefill_logits": {"rel": rel(got_prefill, want_prefill),
                           "max_abs": float((got_prefill - want_prefill).abs().max()),
                           "argmax_agreement": float((got_prefill.argmax(-1) == want_prefill.argmax(-1)).float().mean())},
        "decode_logits": {"rel": rel(ours, hf_logits), "max_abs": float((ours - hf_logits).abs().max())},
        "greedy": {"steps": a.steps, "transformers": hf_tokens, "export_modules": tokens,
                   "identical": hf_tokens == tokens},
    }
    write(a.out, result)
    print(json.dumps({k: result[k] for k in ("prefill_logits", "decode_logits")}, indent=1), result["greedy"]["identical"])


def layer_worth(model, tok, pairs: int, prompt_len: int = 192, cont_len: int = 64) -> dict:
    """Held-out NLL of the base without each one of its layers, and each layer's block influence."""
    import torch.nn.functional as F

    from kvp_export.derive.prune import importance_layers, prune

    prompts, conts = data.eval_pairs(tok, data.corpus_from_spec(None, "heldout"), pairs, prompt_len, cont_len)
    seq = torch.cat([prompts, conts], 1)

    def nll(m) -> float:
        with torch.no_grad():
            logits = m(input_ids=seq, logits_to_keep=cont_len + 1).logits[:, :-1]
        return float(F.cross_entropy(logits.flatten(0, 1), conts.flatten()))

    n = model.config.num_hidden_layers
    calib = data.token_sequences(tok, data.corpus_from_spec(None, "calib"), 256, 256 * pairs)
    kept, influence = importance_layers(model, calib, n_keep=(n + 1) // 2)
    return {"pairs": pairs, "prompt_len": prompt_len, "cont_len": cont_len, "base_nll": nll(model),
            "drop_one_nll": [nll(prune(model, [j for j in range(n) if j != i])) for i in range(n)],
            "block_influence": influence, "importance_keeps_half": kept}


def write(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
