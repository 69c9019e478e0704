"""Gemma 3 270M against transformers' own Gemma 3, past the 512-token window (issue 16).

Writes JSON: the GGUF -> safetensors conversion check (from the model folder's manifest), the
export modules' logits against transformers over one held-out prompt longer than the window
(prefill, then greedy decode steps on the module's own cache), and the greedy tokens of both.
Usage: python benchmarks/gemma3_checks.py OUT.json [--prompt-len 640] [--steps 16]
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
    a = ap.parse_args()
    folder = resolve(a.model)
    model, tok = load(folder)
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
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("prefill_logits", "decode_logits")}, indent=1), result["greedy"]["identical"])


if __name__ == "__main__":
    main()
