"""Print the BENCHMARKS.md table of Core ML exports from their manifests (and validator reports).

Usage: python benchmarks/render_coreml.py EXPORT_DIR...  (each beside its EXPORT_DIR-report)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvp_validate.contract import MANIFEST, REPORT_JSON


def main(folders: list[str]) -> None:
    print("| variant | form | MiB | convert s | compress s | save s | total s | weights max / median rel. err | "
          "Linux checks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for folder in map(Path, folders):
        m = json.loads((folder / MANIFEST).read_text())
        report = Path(f"{folder}-report") / REPORT_JSON
        checks = json.loads(report.read_text())["linux_checks"] if report.is_file() else {}
        for key, v in m["variants"].items():
            form = "stateful, multifunction" if v["multifunction"] else "stateless pair"
            s, w = v["seconds"], v["weights"]
            ok = "pass" if checks.get(key, {}).get("ok") else ("FAIL" if key in checks else "-")
            print(f"| {key} | {form} | {v['bytes'] / 2**20:.1f} | {s['convert']:.0f} | {s['compress']:.0f} | "
                  f"{s['save']:.0f} | {s['total']:.0f} | {w['max_rel']:.3g} / {w['median_rel']:.3g} | {ok} |")
    for folder in map(Path, folders):
        m = json.loads((folder / MANIFEST).read_text())
        for target, r in m["checks"]["numeric"].items():
            print(f"\n{target} modules before conversion vs the PyTorch KVP path ({r['prompt_tokens']}-token prompt "
                  f"padded to {r['padded_to']}, prefill + {r['decode_steps']} decode steps): max |logits diff| / "
                  f"max |logits| = {r['float32']['rel']:.2g} in float32, {r['float16']['rel']:.2g} in float16; "
                  f"top-1 agreement {r['float16']['top1_agreement']:.2f}. Export wall time {m['wall_seconds']:.0f} s.")


if __name__ == "__main__":
    main(sys.argv[1:])
