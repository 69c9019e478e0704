"""The validator's command, `kvp validate` (and `kvp-validate`, which needs no torch).

Exit codes: 0 all gates pass; 1 a user error (one line on stderr); 3 a gate failed (the
report names each failing gate and its measured value).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .contract import REPORT_MD
from .errors import KvpError
from .gates import GATE_FAILED
from .limits import check_limits
from .options import CHECKS, DEFAULT_CHECKS, OPTIONS, Option, problem


def _ints(name: str):
    def parse(ctx, param, value: str) -> tuple[int, ...]:
        try:
            out = tuple(int(x) for x in value.split(",") if x.strip())
        except ValueError:
            raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
        why = problem(name, out)
        if why is not None:
            raise click.BadParameter(why)
        return out

    return parse


def _option(o: Option) -> click.Option:
    if o.kind is tuple:
        return click.Option([o.flag], default=",".join(map(str, o.default)), show_default=True,
                            callback=_ints(o.name), metavar="N,N,...", help=o.help)
    return click.Option([o.flag], type=click.IntRange(min=o.minimum), default=o.default,
                        show_default=o.default is not None, help=o.help)


def measurement_options(f):
    """The options of options.OPTIONS, in their order."""
    f.__click_params__ = getattr(f, "__click_params__", []) + [_option(o) for o in reversed(OPTIONS)]
    return f


def _tolerances(values: tuple[str, ...]) -> dict:
    """--tol int8.kl_vs_fp32=0.15 -> {"int8": {"kl_vs_fp32": 0.15}}"""
    out: dict = {}
    for v in values:
        try:
            key, num = v.split("=", 1)
            variant, name = key.split(".", 1)
            out.setdefault(variant, {})[name] = float(num)
        except ValueError:
            raise KvpError(f"invalid tolerance '{v}' (expected VARIANT.METRIC=VALUE, e.g. int8.kl_vs_fp32=0.15)") from None
    return out


@click.command("validate")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Report folder.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--variant", "variants", multiple=True, help="Variants to check (default: all in the export).")
@click.option("--check", "checks", multiple=True, type=click.Choice(list(CHECKS)),
              help=f"Checks to run (default: {', '.join(DEFAULT_CHECKS)}).")
@click.option("--gate", "gates", multiple=True, metavar="KEY OP VALUE",
              help="e.g. 'parity.*.ok==1' or 'ttft.fp32.1x512.kvp_speedup>=1.5'; exit 3 when one fails.")
@click.option("--tol", "tols", multiple=True, metavar="VARIANT.METRIC=VALUE", help="Override a parity tolerance.")
@measurement_options
@click.option("--allow-unsafe-execution", is_flag=True,
              help="HumanEval: execute generated code even where no OS sandbox (bubblewrap) is available, with only "
                   "rlimits and a Python guard (docs/sandbox.md).")
@click.option("--junit", type=click.Path(path_type=Path), metavar="PATH",
              help="Also write JUnit XML: one test case per gate and per parity check (for CI).")
def validate_cmd(export_dir, out, overwrite, variants, checks, gates, tols, allow_unsafe_execution, junit, **measure):
    """Validate an export (ONNX: parity, accuracy, TTFT; Core ML: its checks); write report.json + report.md to OUT."""
    from .onnx_report import validate_onnx

    check_limits(**measure)  # absurd numbers (limits.py): refused before any work
    if export_stage(export_dir) == "coreml":
        from .coreml import validate_coreml

        payload = validate_coreml(export_dir, out, repeats=measure["repeats"], overwrite=overwrite)
        click.echo((Path(out) / REPORT_MD).read_text(), nl=False)
        _junit(junit, payload)
        if not payload.get("ok", True):
            sys.exit(GATE_FAILED)
        return

    payload = validate_onnx(export_dir, out, variants=list(variants) or None,
                            checks=tuple(checks) or DEFAULT_CHECKS, gates=list(gates), tolerances=_tolerances(tols),
                            overwrite=overwrite, progress=sys.stderr.isatty(),
                            allow_unsafe_execution=allow_unsafe_execution, **measure)
    click.echo((Path(out) / REPORT_MD).read_text(), nl=False)
    _junit(junit, payload)
    failed = [g for g in payload["gates"] if not g["ok"]]
    for g in failed:
        click.echo(f"gate failed: {g['gate']} (measured {g['key']} = {g['value']})", err=True)
    if failed:
        sys.exit(GATE_FAILED)


def _junit(path: Path | None, payload: dict) -> None:
    if path is not None:
        from .junit import report_suites, write_junit

        write_junit(path, report_suites(payload), name="kvp validate")
        click.echo(f"kvp: JUnit XML written to {path}", err=True)


def export_stage(folder: Path) -> str | None:
    """The stage an export folder's manifest names (None when unreadable: the validators say why)."""
    from .contract import MANIFEST, read_json

    try:
        return read_json(Path(folder) / MANIFEST).get("stage")
    except KvpError:
        return None


def main() -> None:
    """`kvp-validate`: the same command without the kvp_export (torch) package."""
    try:
        validate_cmd.main(standalone_mode=False)
    except KvpError as e:
        click.echo(f"error: {str(e).strip().splitlines()[0]}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
