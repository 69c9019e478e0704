"""Click options generated from a stage config (config.py): one option per field, its help the
field's description, its default the field's default, its choices the field's Literal.

Values are checked by the config, not by click (a bad value is the config's one-line error),
except for choices and the syntax of integer lists, which click refuses as usage errors.
"""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

import click

from .config import Config, flag_of


def _strip_optional(tp) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(x) for x in str(value).split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 0,2,4, got {value!r}") from None


def _option(name: str, field) -> click.Option:
    tp, optional = _strip_optional(field.annotation)
    cli = (field.json_schema_extra or {}).get("cli", {})
    decls = [d for d in (cli.get("short"), cli.get("flag") or flag_of(name)) if d] + [name]
    default = field.get_default(call_default_factory=True)
    unset = default is None or default is False or (isinstance(default, list) and not default)
    kw: dict[str, Any] = {"help": field.description or None, "default": default, "show_default": not unset}
    if cli.get("metavar"):
        kw["metavar"] = cli["metavar"]
    origin = get_origin(tp)
    if tp is bool:
        kw.update(is_flag=True, show_default=False)
    elif origin is Literal:
        kw["type"] = click.Choice(get_args(tp))
    elif origin is list and get_args(tp)[0] is int:  # "0,2,4"
        kw.update(type=str, callback=_int_list, metavar=kw.get("metavar", "N,N,..."),
                  default=None if default is None else ",".join(map(str, default)))
    elif origin is list:  # repeatable
        item = get_args(tp)[0]
        kw.update(multiple=True, default=tuple(default or ()),
                  type=click.Choice(get_args(item)) if get_origin(item) is Literal else str)
    else:
        kw["type"] = tp
    if optional and default is None:
        kw["show_default"] = False
    return click.Option(decls, **kw)


def options(cls: type[Config], *, only: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()):
    """A decorator adding the options of `cls`'s fields (all, `only` some, or all but `exclude`)."""
    names = [n for n in cls.model_fields if (only is None or n in only) and n not in exclude]

    def decorate(f):
        params = getattr(f, "__click_params__", [])
        params.extend(_option(n, cls.model_fields[n]) for n in reversed(names))
        f.__click_params__ = params
        return f

    return decorate


def take(cls: type[Config], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the values of `cls`'s fields out of a command's keyword arguments."""
    return {n: kwargs.pop(n) for n in list(kwargs) if n in cls.model_fields}
