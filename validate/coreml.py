"""The validator's Core ML section: Linux checks of an export, and measurements on macOS.

On any host (coremltools reads packages without the Core ML runtime):
- the export-time checks from the manifest: the converted PyTorch modules against the HF
  path (float32 and emulated float16), the weights read back against the source;
- recomputed from each package: its interface checked against the manifest's model
  (inputs, outputs, states and their shapes), its op inventory, the Neural Engine lint.
On macOS with the Core ML runtime, per variant and compute units (CPU_ONLY, CPU_AND_NE,
ALL): parity with the reference outputs stored at export time, TTFT split into the
prefill (which returns the first token's logits) and the first decode step, and the
share of ops MLComputePlan places on the Neural Engine. Anywhere else each of these
reads UNMEASURED: a number is only ever a measurement.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import numpy as np

from . import mlpackage
from .artifact import check_sections, load_manifest
from .contract import CoremlVariant, now, parse_manifest
from .errors import KvpError
from .integrity import inside, verify
from .options import DEFAULTS
from .report import md_table, write_report_folder

UNMEASURED = "not measured on this host"
COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_NE", "ALL")
MEASURES = ("parity", "prefill_ms", "first_decode_ms", "ane_op_share")
# Max |logits diff| / max |reference logits| on a Mac; first bounds, to be tuned on measured runs.
PARITY_TOL = {"fp16": 0.05, "int8": 0.15, "int4": 0.5, "palettize4": 0.5}


class CoremlExport:
    """An export folder with its manifest, every package it lists checked to be on disk."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        raw = load_manifest(self.folder, "export")
        if raw.get("stage") != "coreml":
            raise KvpError(f"{folder} is a '{raw.get('stage')}' artifact, expected a Core ML export")
        check_sections(raw, self.folder, ("variants", "model", "checks", "reference"))
        self.manifest = parse_manifest(raw, self.folder, "coreml")  # the typed contract (contract.py)
        for v, entry in self.manifest.variants.items():
            for role in entry.packages:
                if not self.package(v, role).is_dir():
                    raise KvpError(f"missing Core ML package {self.package(v, role)} (listed in the manifest)")
        verify(self.folder, raw)  # every file's size and SHA-256 (integrity.py)

    @property
    def variants(self) -> list[str]:
        return list(self.manifest.variants)

    @property
    def model(self) -> dict:
        """The model facts as a dict (the report embeds it); typed: `manifest.model`."""
        return self.manifest.model.model_dump()

    def package(self, variant: str, role: str) -> Path:
        return inside(self.folder, self.manifest.variants[variant].packages[role].path, "package")

    def reference(self) -> dict[str, np.ndarray]:
        path = inside(self.folder, self.manifest.reference.file)
        if not path.is_file():
            raise KvpError(f"missing reference outputs {path}")
        with np.load(path) as z:
            return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------- Linux checks


def expected_interface(model: dict, target: str) -> dict[str, dict]:
    """Per function: input, output and state names with the shapes that must hold."""
    cache = model["cache_shape"]
    prefill_in = {"input_ids": [[1, n] for n in model["prompt_lengths"]], "last_index": [1]}
    decode_in = {"input_ids": [1, 1], "position": [1]}
    if target == "ios18":
        states = {"key_cache": cache, "value_cache": cache}
        return {"prefill": {"inputs": prefill_in, "outputs": ["logits"], "states": states},
                "decode": {"inputs": decode_in, "outputs": ["logits"], "states": states}}
    return {"prefill": {"inputs": prefill_in, "outputs": ["logits", "keys", "values"], "states": {}},
            "decode": {"inputs": decode_in | {"key_cache": cache, "value_cache": cache},
                       "outputs": ["logits", "new_keys", "new_values"], "states": {}}}


def spec_problems(iface: dict, want: dict, vocab: int) -> list[str]:
    """Differences between a package's functions and the expected interface (empty: it matches)."""
    problems = []
    for fname, w in want.items():
        f = iface["functions"].get(fname)
        if f is None:
            problems.append(f"no function '{fname}'")
            continue
        inputs = {x["name"]: x for x in f["inputs"]}
        for name, shape in w["inputs"].items():
            got = inputs.get(name)
            shapes = got and sorted(got.get("enumerated", [got["shape"]]))
            if got is None or shapes != sorted(shape if isinstance(shape[0], list) else [shape]):
                problems.append(f"{fname}: input {name} is {shapes}, expected {shape}")
        outputs = [o["name"] for o in f["outputs"]]
        if outputs != w["outputs"]:
            problems.append(f"{fname}: outputs {outputs}, expected {w['outputs']}")
        logits = next((o for o in f["outputs"] if o["name"] == "logits"), None)
        if logits and logits["shape"] and logits["shape"][-1] != vocab:
            problems.append(f"{fname}: logits have {logits['shape'][-1]} entries, the vocabulary {vocab}")
        states = {s["name"]: s["shape"] for s in f["states"]}
        if states != w["states"]:
            problems.append(f"{fname}: states {states}, expected {w['states']}")
    return problems


def _function_map(variant: CoremlVariant) -> dict[str, tuple[str, str | None]]:
    """function -> (package role, function name inside it)."""
    if variant.multifunction:
        return {"prefill": ("kvp", "prefill"), "decode": ("kvp", "decode")}
    return {"prefill": ("prefill", None), "decode": ("decode", None)}


def linux_checks(art: CoremlExport) -> dict:
    """Per variant: the export-time checks, and the interface, ops and lint recomputed from the packages."""
    out = {}
    numeric = art.manifest.checks["numeric"]
    for key, v in art.manifest.variants.items():
        iface: dict = {"functions": {}}
        ops, lint, size = {}, [], 0
        for role in v.packages:
            path = art.package(key, role)
            got = mlpackage.interface(path)
            prog = mlpackage.program(path)
            names = {f: f if f != "main" else role for f in got["functions"]}
            iface["functions"] |= {names[f]: spec for f, spec in got["functions"].items()}
            ops |= {names[f]: counts for f, counts in mlpackage.ops(prog).items()}
            lint += [d | {"function": names[d["function"]]} for d in mlpackage.lint(prog, got)]
            size += mlpackage.package_bytes(path)
        problems = spec_problems(iface, expected_interface(art.model, v.target), art.manifest.model.vocab)
        if size != v.bytes:
            problems.append(f"packages hold {size} bytes, the manifest says {v.bytes}")
        num = numeric[v.target]
        out[key] = {
            "numeric": {p: {k: num[p][k] for k in ("rel", "tolerance", "top1_agreement", "ok")}
                        for p in ("float32", "float16")},
            "weights": v.weights,
            "spec": {"ok": not problems, "problems": problems, "functions": iface["functions"]},
            "ops": ops,
            "lint": lint,
            "bytes": size,
            "ok": num["ok"] and v.weights["ok"] and not problems,
        }
    return out


# --------------------------------------------------------------------------- macOS measurements


def runtime_status() -> tuple[bool, str]:
    """(True, "") where Core ML can run predictions; else (False, why not)."""
    if platform.system() != "Darwin":
        return False, f"{platform.system()} host: Core ML predictions, states and MLComputePlan need macOS"
    mlpackage.coremltools()
    from coremltools.models import model as ct_model

    if getattr(ct_model, "_MLModelProxy", None) is None:
        return False, "coremltools has no Core ML runtime here (libcoremlpython missing)"
    if int(platform.mac_ver()[0].split(".")[0] or 0) < 15:
        return False, "macOS 15+ is needed for stateful and multifunction models"
    return True, ""


class CoremlKVP:
    """One variant's prefill and decode: the host side of the package's contract (padding, state
    or explicit cache). `models` are Core ML models on macOS (`load`), anything with the same
    `predict(feed, state=None)` / `make_state()` in tests."""

    def __init__(self, models: dict, stateful: bool, cache_shape: list[int], lengths: list[int]):
        self.models, self.stateful, self.cache_shape, self.lengths = models, stateful, cache_shape, lengths

    @classmethod
    def load(cls, art: CoremlExport, variant: str, compute_units: str) -> CoremlKVP:
        ct = mlpackage.coremltools()
        v = art.manifest.variants[variant]
        models = {fn: ct.models.MLModel(str(art.package(variant, role)), compute_units=ct.ComputeUnit[compute_units],
                                        function_name=name)
                  for fn, (role, name) in _function_map(v).items()}
        return cls(models, v.stateful, art.manifest.model.cache_shape, art.manifest.model.prompt_lengths)

    def bucket(self, n: int) -> int:
        fits = [b for b in self.lengths if b >= n]
        if not fits:
            raise KvpError(f"prompt of {n} tokens is longer than the longest exported prompt length {self.lengths[-1]}")
        return fits[0]

    def session(self):
        """A fresh cache: a Core ML state (shared by both functions: same names, shapes, dtypes) or two arrays."""
        if self.stateful:
            return self.models["prefill"].make_state()
        return np.zeros(self.cache_shape, np.float16), np.zeros(self.cache_shape, np.float16)

    def prefill(self, ids: np.ndarray, session) -> np.ndarray:
        """ids [1, n] -> the first token's logits [V]; fills the cache for positions 0..n-1."""
        n = ids.shape[1]
        x = np.zeros((1, self.bucket(n)), np.int32)
        x[0, :n] = ids[0]
        feed = {"input_ids": x, "last_index": np.array([n - 1], np.int32)}
        if self.stateful:
            return self.models["prefill"].predict(feed, state=session)["logits"][0]
        out = self.models["prefill"].predict(feed)
        k, v = session
        k[:, :, :, : x.shape[1]], v[:, :, :, : x.shape[1]] = out["keys"], out["values"]
        return out["logits"][0]

    def decode(self, token: int, position: int, session) -> np.ndarray:
        feed = {"input_ids": np.array([[token]], np.int32), "position": np.array([position], np.int32)}
        if self.stateful:
            return self.models["decode"].predict(feed, state=session)["logits"][0]
        k, v = session
        out = self.models["decode"].predict(feed | {"key_cache": k, "value_cache": v})
        k[:, :, :, position : position + 1], v[:, :, :, position : position + 1] = out["new_keys"], out["new_values"]
        return out["logits"][0]


def parity(rt: CoremlKVP, ref: dict, tol: float) -> dict:
    """Teacher-forced logits on the reference tokens, and the variant's own greedy tokens."""
    ids, tokens, want = ref["input_ids"], ref["tokens"][0], ref["logits"]
    n = ids.shape[1]
    session = rt.session()
    got = [rt.prefill(ids, session)]
    for t in range(len(tokens) - 1):
        got.append(rt.decode(int(tokens[t]), n + t, session))
    got = np.stack(got).astype(np.float32)
    session = rt.session()
    greedy = [int(rt.prefill(ids, session).argmax())]
    for t in range(len(tokens) - 1):
        greedy.append(int(rt.decode(greedy[-1], n + t, session).argmax()))
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    return {"logits_rel": rel, "tolerance": tol, "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
            "greedy_agreement": float(np.mean(np.array(greedy) == tokens)), "ok": rel <= tol}


def ttft(rt: CoremlKVP, ref: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Median ms of the prefill (time to the first token's logits) and of the first decode, per prompt length."""
    out = {}
    for n in rt.lengths:
        ids = np.resize(ref["input_ids"], (1, n)).astype(np.int32)
        pre, dec = [], []
        for i in range(repeats + 1):  # the first run warms up
            session = rt.session()  # allocated once per conversation, not part of TTFT
            t0 = time.perf_counter()
            logits = rt.prefill(ids, session)
            t1 = time.perf_counter()
            rt.decode(int(logits.argmax()), n, session)
            t2 = time.perf_counter()
            if i:
                pre.append((t1 - t0) * 1e3)
                dec.append((t2 - t1) * 1e3)
        out[str(n)] = {"prefill_ms": statistics.median(pre), "first_decode_ms": statistics.median(dec)}
    return out


def ane_share(rt: CoremlKVP, compute_units: str) -> dict[str, float]:
    """Per function: the share of compute ops whose preferred device is the Neural Engine."""
    ct = mlpackage.coremltools()
    from coremltools.models.compute_device import MLNeuralEngineComputeDevice
    from coremltools.models.compute_plan import MLComputePlan

    out = {}
    for fn, model in rt.models.items():
        plan = MLComputePlan.load_from_path(path=model.get_compiled_path(),
                                            compute_units=ct.ComputeUnit[compute_units])
        ops = plan.model_structure.program.functions[model.function_name or "main"].block.operations
        usages = [plan.get_compute_device_usage_for_mlprogram_operation(op) for op in ops
                  if op.operator_name != "const" and not op.operator_name.startswith("constexpr_")]
        usages = [u for u in usages if u is not None]
        on_ane = sum(isinstance(u.preferred_compute_device, MLNeuralEngineComputeDevice) for u in usages)
        out[fn] = on_ane / len(usages) if usages else 0.0
    return out


def mac_measurements(art: CoremlExport, variant: str, repeats: int) -> dict:
    ref = art.reference()
    tol = PARITY_TOL[art.manifest.variants[variant].compression]
    out = {}
    for cu in COMPUTE_UNITS:
        rt = CoremlKVP.load(art, variant, cu)
        times = ttft(rt, ref, repeats)
        out[cu] = {"parity": parity(rt, ref, tol),
                   "prefill_ms": {n: t["prefill_ms"] for n, t in times.items()},
                   "first_decode_ms": {n: t["first_decode_ms"] for n, t in times.items()},
                   "ane_op_share": ane_share(rt, cu)}
    return out


# --------------------------------------------------------------------------- section and report


def section(folder: str | Path, repeats: int = DEFAULTS["repeats"]) -> dict:
    """The Core ML section of a validation report (see the module docstring)."""
    art = CoremlExport(folder)
    ok, why = runtime_status()
    checks = linux_checks(art)
    if ok:
        mac = {v: mac_measurements(art, v, repeats) for v in art.variants}
    else:
        mac = {v: {cu: dict.fromkeys(MEASURES, UNMEASURED) for cu in COMPUTE_UNITS} for v in art.variants}
    parity_ok = not ok or all(m["parity"]["ok"] for per in mac.values() for m in per.values())
    from .machine import machine

    return {"export": str(art.folder.resolve()), "host": f"{platform.system()} {platform.machine()}",
            "machine": machine(), "model": art.model, "recipe": art.manifest.recipe, "linux_checks": checks,
            "macos": {"measured": ok, "reason": why or None, "variants": mac},
            "ok": parity_ok and all(c["ok"] for c in checks.values())}


def validate_coreml(folder: str | Path, out: str | Path, *, repeats: int = DEFAULTS["repeats"], overwrite: bool = False) -> dict:
    """Write the Core ML section as report.json + report.md into the folder `out`; return it."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise KvpError(f"output folder exists: {out} (pass --overwrite to replace it)")
    mlpackage.coremltools()  # first, so a validator without the coreml extra says so in one line
    payload = section(folder, repeats) | {"created": now()}
    write_report_folder(out, payload, markdown(payload), overwrite)
    return payload


def _cell(x, fmt: str = "{:.1f}") -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        return ", ".join(f"{k}: {_cell(v, fmt)}" for k, v in x.items())
    return fmt.format(x)


def markdown(s: dict) -> str:
    lines = [f"## Core ML: {s['export']}", "", f"Host: {s['host']}. Context {s['model']['context']}, prompt lengths "
             f"{', '.join(map(str, s['model']['prompt_lengths']))}, batch 1.", "", "### Checks on any host", ""]
    rows = []
    for v, c in s["linux_checks"].items():
        rows.append([v, f"{c['bytes'] / 2**20:.1f}", f"{c['numeric']['float32']['rel']:.2g}",
                     f"{c['numeric']['float16']['rel']:.2g}", f"{c['weights']['max_rel']:.3g}",
                     "ok" if c["spec"]["ok"] else "; ".join(c["spec"]["problems"]),
                     sum(d["severity"] == "warn" for d in c["lint"]), "ok" if c["ok"] else "FAIL"])
    lines += [md_table(["variant", "MiB", "module fp32 rel", "module fp16 rel", "weights max rel", "spec",
                        "lint warnings", ""], rows), ""]
    first = next(iter(s["linux_checks"].values()), None)
    if first:
        lines += ["Neural Engine lint (first variant; every variant is in report.json):", ""]
        lines += [f"- {d['severity']} `{d['rule']}` ({d['function']}): {d['detail']}" for d in first["lint"]] + [""]
    mac = s["macos"]
    lines += ["### Measured with Core ML (macOS)", ""]
    if not mac["measured"]:
        lines += [f"{UNMEASURED}: {mac['reason']}.", ""]
    rows = [[v, cu, _cell(m["parity"] if isinstance(m["parity"], str) else
                          f"rel {m['parity']['logits_rel']:.3g}, top-1 {m['parity']['top1_agreement']:.2f}"),
             _cell(m["prefill_ms"]), _cell(m["first_decode_ms"]), _cell(m["ane_op_share"], "{:.0%}")]
            for v, per in mac["variants"].items() for cu, m in per.items()]
    lines += [md_table(["variant", "compute units", "parity", "prefill ms (TTFT)", "first decode ms",
                        "ops on the ANE"], rows), ""]
    return "\n".join(lines)
