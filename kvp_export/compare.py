"""`kvp compare RUN_OR_REPORT ...`: one table over runs, formats and variants, and a Pareto plot.

Inputs are run folders (run.json, from `kvp run`) or validation report folders (report.json,
from `kvp validate`). One row per (run, format, variant): size of the deployed graphs (KVP
prefill + base decode), TTFT of KVP and the speedup over the base's prefill at every
measured point, quality through the runtime (KVP NLL, its increase over the base, first-token
agreement, greedy agreement), and parity. The Pareto plot puts quality (y) against KVP TTFT
(x) at one point, labels each variant, draws the base of each run for reference and the
Pareto front over the variants. Written as compare.md, compare.json and pareto.png.

Imports no torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvp_validate.contract import (
    MANIFEST,
    REPORT_JSON,
    RUN_JSON,
    CoremlReport,
    OnnxManifest,
    OnnxReport,
    read_json,
    read_report,
)
from kvp_validate.metrics import DELTA_NLL, FIRST_TOKEN_AGREEMENT, NLL
from kvp_validate.report import atomic_write_text, md_table

from .artifacts import read_contract
from .errors import KvpError, check_choice

METRICS = {FIRST_TOKEN_AGREEMENT: ("first-token agreement with the base", True),
           NLL: ("KVP NLL (nats/token)", False),
           DELTA_NLL: ("KVP NLL - base NLL", False)}
DEPLOYED = ("kvp_prefill", "base_decode")


def _onnx_rows(label: str, payload: OnnxReport, export_manifest: OnnxManifest | None) -> list[dict]:
    res = payload.results
    rows = []
    for v in payload.variants:
        row: dict = {"run": label, "format": "onnx", "variant": v}
        if export_manifest:
            graphs = export_manifest.variants.get(v, {})
            sizes = [graphs[g].bytes for g in DEPLOYED if g in graphs]
            row["size_mb"] = round(sum(sizes) / 1e6, 3) if sizes else None
        q = res.get("quality", {}).get(v)
        if q:
            paths = q["paths"]
            g = q["greedy_tokens"]
            kvp, base = paths.get("kvp", {}), paths.get("base", {})
            row["quality"] = {
                NLL: kvp.get(NLL), "base_nll": base.get(NLL),
                DELTA_NLL: kvp[NLL] - base[NLL] if NLL in kvp and NLL in base else None,
                FIRST_TOKEN_AGREEMENT: kvp.get(FIRST_TOKEN_AGREEMENT),
                f"greedy{g}_agreement": kvp.get(f"greedy{g}_agreement"),
                "aux_nll": paths.get("aux", {}).get(NLL),
            }
        t = res.get("ttft", {}).get(v)
        if t:
            row["ttft"] = {f"{p['batch']}x{p['prompt_len']}": {"kvp_ms": p["ms"]["kvp"], "base_ms": p["ms"]["base"],
                                                                "aux_ms": p["ms"].get("aux"),
                                                                "speedup": p["kvp_speedup"]}
                           for p in t["points"]}
        par = res.get("parity", {}).get(v)
        if par is not None:
            row["parity"] = "ok" if par["ok"] else "FAIL"
        rows.append(row)
    return rows


def _coreml_rows(label: str, payload: CoremlReport) -> list[dict]:
    rows = []
    mac = payload.macos
    for v, c in payload.linux_checks.items():
        row = {"run": label, "format": "coreml", "variant": v, "size_mb": round(c.get("bytes", 0) / 1e6, 3),
               "parity": ("ok" if c.get("ok") else "FAIL") + ("" if mac.get("measured") else " (Linux checks)")}
        rows.append(row)
    return rows


def rows_from_report(folder: Path, label: str | None = None) -> list[dict]:
    if (folder / MANIFEST).is_file():  # a report written since 0.3: its files checked (integrity.py)
        read_contract(folder, "validation")
    payload = read_report(folder)
    # a report folder named generically (runs/x/validate) is labelled by the folder above it
    label = label or (folder.resolve().parent.name if folder.name in ("validate", "report") else folder.name)
    if isinstance(payload, CoremlReport):
        return _coreml_rows(label, payload)
    manifest = None
    if (Path(payload.export) / MANIFEST).is_file():  # the export's graph sizes, when it is still there
        manifest = read_contract(payload.export, "onnx", check=False)
    return _onnx_rows(label, payload, manifest)


def rows_from_run(run_dir: Path) -> list[dict]:
    run = read_json(Path(run_dir) / RUN_JSON)
    label = run.get("recipe") or Path(run_dir).name
    rows = []
    for s in run.get("stages", []):
        if s["name"].startswith("validate-"):
            rows += rows_from_report(Path(run_dir) / s["folder"], label)
    return rows


def collect(inputs: list[str | Path]) -> list[dict]:
    """Rows from each input (run folder or validation report folder); one-line errors otherwise."""
    if not inputs:
        raise KvpError("nothing to compare: give run folders or validation report folders")
    rows = []
    for p in map(Path, inputs):
        if not p.exists():
            raise KvpError(f"no such run or report folder: {p}")
        if (p / RUN_JSON).is_file():
            got = rows_from_run(p)
        elif (p / REPORT_JSON).is_file():
            got = rows_from_report(p)
        elif (p / MANIFEST).is_file():
            raise KvpError(f"{p} is an artifact without a validation report: run `kvp validate {p} -o REPORT` "
                           "and compare REPORT")
        else:
            raise KvpError(f"not a run folder (no run.json) or validation report (no report.json): {p}")
        if not got:
            raise KvpError(f"{p} has no validated variants to compare (its run has no validation stage yet)")
        rows += got
    labels = [(r["run"], r["format"], r["variant"]) for r in rows]
    if len(set(labels)) != len(labels):  # the same recipe twice: tell the runs apart by position
        seen: dict = {}
        for r in rows:
            k = (r["run"], r["format"], r["variant"])
            seen[k] = seen.get(k, 0) + 1
            if seen[k] > 1:
                r["run"] = f"{r['run']} #{seen[k]}"
    return rows


def points(rows: list[dict]) -> list[str]:
    pts = {p for r in rows for p in r.get("ttft", {})}
    return sorted(pts, key=lambda p: tuple(int(x) for x in p.split("x")))


def default_point(rows: list[dict]) -> str | None:
    """Batch 1 at the longest length every timed row has (else the longest measured anywhere)."""
    timed = [set(r["ttft"]) for r in rows if r.get("ttft")]
    if not timed:
        return None
    common = set.intersection(*timed) or set.union(*timed)
    return max(common, key=lambda p: (int(p.split("x")[0]) == 1, int(p.split("x")[1]), -int(p.split("x")[0])))


def pareto_front(pts: list[tuple[float, float]], higher_better: bool) -> list[int]:
    """Indices of the points no other point beats on both TTFT (lower) and quality."""
    order = sorted(range(len(pts)), key=lambda i: (pts[i][0], -pts[i][1] if higher_better else pts[i][1]))
    front, best = [], None
    for i in order:
        y = pts[i][1]
        if best is None or (y > best if higher_better else y < best):
            front.append(i)
            best = y
    return front


def _point_names(rows: list[dict]):
    """Short point labels: the runs' common prefix ("smollm2-135m-") and a format shared by every
    row are left out, so close points stay readable."""
    runs = sorted({r["run"] for r in rows})
    prefix = os.path.commonprefix(runs) if len(runs) > 1 else ""
    prefix = prefix[: max(prefix.rfind("-"), prefix.rfind("_"), prefix.rfind("/")) + 1]
    one_format = len({r["format"] for r in rows}) == 1

    def name(r: dict) -> str:
        parts = [] if len(runs) == 1 else [r["run"][len(prefix):] or r["run"]]
        return " ".join(parts + ([] if one_format else [r["format"]]) + [r["variant"]])

    return name


def plot(rows: list[dict], path: Path, *, at: str, metric: str, title: str = "") -> bool:
    """The Pareto PNG; False when no row has both a TTFT at `at` and the metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ylabel, higher = METRICS[metric]
    pts, labels = [], []
    name = _point_names(rows)
    for r in rows:
        t, q = r.get("ttft", {}).get(at), r.get("quality", {})
        if t and q.get(metric) is not None:
            pts.append((t["kvp_ms"], q[metric]))
            labels.append(name(r))
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs, ys = zip(*pts)
    ax.scatter(xs, ys, s=36, color="tab:blue", zorder=3, label="KVP variants")
    for i, ((x, y), lab) in enumerate(zip(pts, labels)):  # staggered, so close points stay readable
        ax.annotate(lab, (x, y), textcoords="offset points", xytext=(5, 4 if i % 2 == 0 else -10), fontsize=7)
    front = pareto_front(pts, higher)
    fx = [pts[i][0] for i in front]
    fy = [pts[i][1] for i in front]
    ax.step(fx, fy, where="post", color="tab:red", lw=1.2, zorder=2, label="Pareto front")
    base_seen, labelled = set(), set()
    for r in rows:  # the base of each run and variant, for reference (quality 1 / base NLL, delta 0)
        t, q = r.get("ttft", {}).get(at), r.get("quality", {})
        if not t or not q or (r["run"], r["variant"]) in base_seen:
            continue
        base_seen.add((r["run"], r["variant"]))
        by = {FIRST_TOKEN_AGREEMENT: 1.0, NLL: q.get("base_nll"), DELTA_NLL: 0.0}[metric]
        if by is not None:
            ax.scatter([t["base_ms"]], [by], marker="x", color="gray", zorder=3,
                       label="base prefill (each run)" if len(base_seen) == 1 else None)
            if r["variant"] not in labelled:  # runs of one base: name each variant's base once
                labelled.add(r["variant"])
                ax.annotate(f"base {r['variant']}", (t["base_ms"], by), textcoords="offset points",
                            xytext=(3, -9 - 7 * (len(labelled) - 1)), fontsize=6, color="gray")
    ax.set_xlabel(f"TTFT (ms) at batch x prompt = {at}, onnxruntime CPU")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "Quality against time to first token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def markdown(rows: list[dict], *, at: str | None, metric: str, png: str | None, title: str) -> str:
    pts = points(rows)
    greedy = next((k for r in rows for k in r.get("quality", {}) if k.startswith("greedy")), None)
    headers = ["run", "format", "variant", "size MB"]
    for p in pts:
        headers += [f"KVP ms {p}", f"speedup {p}"]
    headers += ["KVP NLL", "ΔNLL vs base", "first-token agr."] + ([greedy.replace("_", " ")] if greedy else [])
    headers += ["parity"]
    table = []
    for r in rows:
        t, q = r.get("ttft", {}), r.get("quality", {})
        row = [r["run"], r["format"], r["variant"], r.get("size_mb")]
        for p in pts:
            row += [t.get(p, {}).get("kvp_ms"), t.get(p, {}).get("speedup")]
        row += [q.get(NLL), q.get(DELTA_NLL), q.get(FIRST_TOKEN_AGREEMENT)]
        row += [q.get(greedy)] if greedy else []
        row += [r.get("parity", "-")]
        table.append(row)
    lines = [f"# {title}", "", md_table(headers, table, 3), "",
             "Size: the deployed graphs (KVP prefill + base decode). Speedup: base prefill time / KVP time "
             "(kvp_prefill + the base's first step), measured in the same run. Quality through the runtime "
             "on held-out text. Core ML TTFT needs macOS (not measured elsewhere)."]
    if png:
        lines += ["", f"![Pareto: {METRICS[metric][0]} against KVP TTFT at {at}]({png})"]
    return "\n".join(lines) + "\n"


def render(rows: list[dict], out: Path, *, at: str | None = None, metric: str = FIRST_TOKEN_AGREEMENT,
           title: str = "KVP variants compared", stem: str = "compare", extra_md: str = "",
           md_name: str | None = None) -> dict:
    """Write <stem>.md (or md_name), <stem>.json and pareto.png into `out`; return the JSON payload."""
    check_choice("metric", metric, METRICS)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pts = points(rows)
    if at is not None and at not in pts:
        raise KvpError(f"TTFT point {at} was not measured (measured: {', '.join(pts) or 'none'})")
    at = at or default_point(rows)
    png = "pareto.png" if at and plot(rows, out / "pareto.png", at=at, metric=metric, title=title) else None
    md = markdown(rows, at=at, metric=metric, png=png, title=title)
    if extra_md:
        head, _, rest = md.partition("\n\n")
        md = f"{head}\n\n{extra_md.rstrip()}\n\n## Variants\n\n{rest}"
    payload = {"rows": rows, "points": pts, "pareto": {"at": at, "metric": metric, "png": png}}
    atomic_write_text(out / (md_name or f"{stem}.md"), md)
    atomic_write_text(out / f"{stem}.json", json.dumps(payload, indent=2) + "\n")
    return payload
