"""What the benchmark scripts share: their parser, options taken from a stage's config, and
result files that record the machine beside the figures.

Scripts run as `python benchmarks/NAME.py`, so this folder is on sys.path and this module
imports as `_bench`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from kvp_export.artifacts import write_json
from kvp_export.config import Config, flag_of
from kvp_validate.machine import machine


def parser(doc: str | None, *, out_required: bool = False,
           out_help: str = "Write the result here as JSON.") -> argparse.ArgumentParser:
    """The script's parser: its docstring's first paragraph as the description, and -o/--out (by
    default the JSON file `write_result` writes; `out_help` says what it is where it is a folder)."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    p.add_argument("-o", "--out", type=Path, required=out_required, help=out_help)
    return p


def config_args(p: argparse.ArgumentParser, config: type[Config], *names: str, **defaults) -> None:
    """Adds `--name` for each of the config's fields named: the CLI's help and default (unless
    `defaults` gives the benchmark's own), so a benchmark measures what the product runs."""
    for name in names:
        field = config.model_fields[name]
        default = defaults.get(name, field.default)
        kind = field.annotation if field.annotation in (int, float, str) else str
        p.add_argument(flag_of(name), type=kind, default=default, help=f"{field.description} (default {default})")


def grid_args(p: argparse.ArgumentParser, *, variants: str, lengths: str, rounds: int | None = None,
              threads: int | None = None) -> None:
    """The timing grid's options the export benchmarks share: --variants and --lengths (comma lists, kept as
    the strings given), and --rounds / --threads where the benchmark has them."""
    p.add_argument("--variants", default=variants, help=f"ONNX variants, comma-separated (default {variants})")
    p.add_argument("--lengths", default=lengths, help=f"prompt lengths, comma-separated (default {lengths})")
    if rounds is not None:
        p.add_argument("--rounds", type=int, default=rounds, help=f"interleaved timing rounds (default {rounds})")
    if threads is not None:
        p.add_argument("--threads", type=int, default=threads, help=f"onnxruntime threads (default {threads})")


def export_parser(doc: str | None, **grid) -> argparse.ArgumentParser:
    """`parser`, the ONNX export folder the benchmark times, and its grid (`grid_args`)."""
    p = parser(doc)
    p.add_argument("export", type=Path, help="an ONNX export folder (kvp export onnx)")
    grid_args(p, **grid)
    return p


def load_average() -> float:
    """The 1-minute load average: other jobs on the machine inflate timings, so results record it."""
    return os.getloadavg()[0]


def write_result(out: Path | None, payload: dict, *, load_start: float | None = None) -> dict:
    """The payload stamped with the machine (CPU model, ISA flags), the UTC date, the command line
    and, given `load_start`, the load average at the start and now; written atomically to `out`."""
    stamped = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": " ".join(sys.argv), **payload}
    if load_start is not None:
        stamped["load_average"] = {"start": load_start, "end": load_average()}
    if out is not None:
        write_json(out, stamped)
    return stamped
