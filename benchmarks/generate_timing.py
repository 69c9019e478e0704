"""`kvp generate`'s timing lines, measured: load, first call and warm TTFT per runtime, variant and mode.

    python benchmarks/generate_timing.py --onnx EXPORT --predictor FIT [--out OUT.json]

Each row is one `kvp generate ... --json` in a fresh process (as a user runs it) on a short
prompt and on a 512-token one, for the ONNX variants in modes kvp / base / auto and for the
PyTorch runtime in modes kvp / base. It prints a Markdown table and writes the raw timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _bench import parser, write_result

SHORT = "The capital of France is"


def long_prompt(tokens: int = 512) -> str:
    words = ("def parse(line): return [field.strip() for field in line.split(',')] " * 200).split()
    return " ".join(words[: int(tokens * 0.8)])


def run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "kvp_export", "generate", "--json", "--max-new-tokens", "4", *args],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--onnx", type=Path, required=True)
    ap.add_argument("--predictor", type=Path, required=True)
    ap.add_argument("--variants", default="fp32,int8,int4")
    a = ap.parse_args()
    rows = []
    prompts = {"short": SHORT, "512": long_prompt()}
    for pname, prompt in prompts.items():
        for v in a.variants.split(","):
            for mode in ("kvp", "base", "auto"):
                g = run(["--onnx", str(a.onnx), "--variant", v, "--mode", mode, prompt])
                rows.append({"runtime": f"onnx {v}", "prompt": pname, "tokens": g["prompt_tokens"][0], **g["timing"]})
                print(json.dumps(rows[-1]), flush=True)
        for mode in ("kvp", "base"):
            g = run(["--predictor", str(a.predictor), "--mode", mode, prompt])
            rows.append({"runtime": "pytorch", "prompt": pname, "tokens": g["prompt_tokens"][0], **g["timing"]})
            print(json.dumps(rows[-1]), flush=True)
    print("| runtime | prompt tokens | mode | path | load ms | TTFT first call ms | TTFT warm ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        load = r["load_ms"].get("wall", sum(r["load_ms"].values()))
        print(f"| {r['runtime']} | {r['tokens']} | {r['mode']} | {r['path']} | {load:.0f} | "
              f"{r['ttft_first_call_ms']:.1f} | {r['ttft_warm_ms']:.1f} |")
    write_result(a.out, {"rows": rows})


if __name__ == "__main__":
    main()
