"""The machine a measurement ran on: CPU model, cores and the instruction sets that change results.

Timings and quantized accuracy depend on the CPU: onnxruntime's int8 kernels take a
different path with AVX-512 VNNI / AVX-VNNI (exact int32 dot products) or AMX than on a
plain AVX2 CPU (pairwise products summed in saturating int16), and fp32 GEMMs are faster
with AVX-512. Every report records these flags beside its figures, so a reader can tell a
hardware effect from a regression. No torch: the validator's reports use this too.
"""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

# Flags that matter for the numbers we report, as /proc/cpuinfo spells them.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16")


def _linux_cpu() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = val.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(val.split())
    except OSError:
        pass
    return model, flags


def _mac_cpu() -> tuple[str, set[str]]:
    def sysctl(name: str) -> str:
        try:
            return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    feats = (sysctl("machdep.cpu.features") + " " + sysctl("machdep.cpu.leaf7_features")).lower().split()
    return sysctl("machdep.cpu.brand_string"), {f.replace(".", "_") for f in feats}


def int8_path(flags: set[str] | frozenset[str]) -> str:
    """Which int8 GEMM path onnxruntime's MLAS takes on x86 (what int8 results depend on)."""
    if {"amx_tile", "amx_int8"} <= set(flags):
        return "amx"
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "vnni"
    if "avx2" in flags:
        return "avx2"  # u8 x s8 products summed pairwise into saturating int16
    return "other"


@lru_cache(maxsize=1)
def machine() -> dict:
    """CPU model, cores, OS, Python and onnxruntime versions, and the ISA flags of ISA_FLAGS present."""
    model, flags = _mac_cpu() if platform.system() == "Darwin" else _linux_cpu()
    info = {
        "cpu": model or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "int8_path": int8_path(flags) if platform.machine() in ("x86_64", "AMD64") else "other",
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def describe(info: dict | None = None) -> str:
    """One line for reports: 'AMD EPYC (2 cores; avx2, avx512f, avx512_vnni; int8 path vnni)'."""
    m = info or machine()
    isa = ", ".join(m.get("isa") or []) or "no listed ISA extensions"
    return f"{m['cpu']} ({m['cores']} cores; {isa}; int8 path {m.get('int8_path', '?')})"
