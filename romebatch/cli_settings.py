"""`apply`'s ROME settings and regression thresholds, made from the dataclasses that declare them.

Each `HParams` field with `help` metadata (romebatch/hparams.py) becomes an option of its own,
its type, choices and --help text (with the field's real default) taken from the field; any
field can also be set with `--set name=value`. Each `Thresholds` field (the regression checks)
becomes an option with the field's default. Nothing is declared twice: a new field shows up
here by itself. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import Field, fields
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .hparams import CHOICES, HParams, Thresholds

SETTINGS_PANEL = "ROME settings (a journal that exists keeps its own)"
CHECKS_PANEL = "Regression checks"

# Where the command line needs another type than the field: a layer may also be 'auto', and
# a corpus is a file.
CLI_TYPES = {"layer": str, "stats_corpus": Path}

SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="NAME=VALUE",
        help="Any hyper-parameter (a field of romebatch.HParams), repeatable: --set v_loss_stop=0.1 "
        "--set prefixes=[[5,10]]. Over --hparams; an option of its own may not be set twice.",
        rich_help_panel=SETTINGS_PANEL,
    ),
]


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def setting_fields() -> list[Field]:
    """The HParams fields that are options of their own, in the dataclass's order."""
    return [f for f in fields(HParams) if "help" in f.metadata]


def _kind(f: Field) -> str:
    return str(f.type).replace("| None", "").strip()


def _setting_parameter(f: Field) -> inspect.Parameter:
    help_text = f.metadata["help"].format(default=f.default)
    if _kind(f) == "bool":  # a flag: --exact-protocol sets it, its absence leaves the default
        option = typer.Option(option_name(f.name), help=help_text, rich_help_panel=SETTINGS_PANEL)
        return inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[bool, option], default=False
        )
    kind = CLI_TYPES.get(f.name) or _choice(f) or {"int": int, "float": float, "str": str}[_kind(f)]
    option = typer.Option(option_name(f.name), help=help_text, rich_help_panel=SETTINGS_PANEL)
    # Default None: "not given", so an existing journal keeps its own value (help shows the real one).
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind | None, option], default=None
    )


def _choice(f: Field):
    """An enumeration of the field's CHOICES, its default first (typer shows them in this order)."""
    if f.name not in CHOICES:
        return None
    values = sorted(CHOICES[f.name], key=lambda value: value != f.default)
    return Enum(f.name, {value: value for value in values}, type=str)


def _threshold_parameter(f: Field) -> inspect.Parameter:
    option = typer.Option(option_name(f.name), help=f.metadata["help"], rich_help_panel=CHECKS_PANEL)
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[float, option], default=f.default
    )


def threshold_fields() -> list[Field]:
    """The Thresholds fields that are options (shares, 0..1), in the dataclass's order."""
    return [f for f in fields(Thresholds) if "help" in f.metadata]


def with_settings(command):
    """`command` with one option per ROME setting and per regression threshold, handed to it as
    `settings` (field: value, None where not given) and `thresholds` (field: value)."""
    own = list(inspect.signature(command, eval_str=True).parameters.values())
    assert {"settings", "thresholds"} <= {p.name for p in own}, "the command takes `settings` and `thresholds`"
    rome, checks = setting_fields(), threshold_fields()
    generated = [_setting_parameter(f) for f in rome] + [_threshold_parameter(f) for f in checks]
    parameters = [p for p in own if p.name not in ("settings", "thresholds")]
    parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in parameters] + generated

    @functools.wraps(command)
    def wrapper(**given):
        settings = {f.name: _plain(given.pop(f.name)) for f in rome}
        thresholds = {f.name: given.pop(f.name) for f in checks}
        return command(**given, settings=settings, thresholds=thresholds)

    wrapper.__signature__ = inspect.Signature(parameters)
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


def _plain(value):
    """What HParams holds: an enumeration's value, a path's text; a flag not given is None."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return None if value is False else value


def parse_sets(sets: list[str] | None) -> dict:
    """`--set name=value` pairs, each name a field of HParams; values typed by the field."""
    from .errors import UserError, one_line

    known = {f.name: f for f in fields(HParams)}
    out = {}
    for item in sets or []:
        name, equals, text = item.partition("=")
        name = name.strip()
        if not equals or not name:
            raise UserError(f"--set {one_line(item)!r}: give NAME=VALUE, e.g. --set v_loss_stop=0.1")
        if name not in known:
            raise UserError(f"--set: unknown hyper-parameter {one_line(name)!r}; known: {', '.join(sorted(known))}")
        if name in out:
            raise UserError(f"--set {name}: given twice")
        out[name] = _parse_value(known[name], text.strip())
    return out


def _parse_value(f: Field, text: str):
    optional = "None" in str(f.type)
    if optional and text == "null":
        return None
    if _kind(f) == "str":
        return text
    try:
        return json.loads(text)  # numbers, true/false, [[5, 10], [10, 10]]
    except ValueError:
        return text  # HParams.validate names the field and what it must be
    except (RecursionError, MemoryError):  # '[' * 1000: no setting nests like that
        from .errors import UserError

        raise UserError(f"--set {f.name}: the value is nested too deeply to be a setting") from None


def hparams_from(hparams_file: Path | None, settings: dict | None = None, sets: list[str] | None = None):
    """The HParams the user asked for: a file, then `--set`, then the options of their own.

    None when the user set nothing (an existing journal then keeps its own hyper-parameters).
    """
    from .errors import UserError
    from .hparams import load_hparams

    given = {k: v for k, v in (settings or {}).items() if v is not None}
    pairs = parse_sets(sets)
    for name in sorted(set(pairs) & set(given)):
        raise UserError(f"--set {name}=...: {option_name(name)} is given too; give it once")
    if hparams_file is None and not given and not pairs:
        return None
    base = load_hparams(hparams_file) if hparams_file else HParams()
    if pairs:
        base = HParams.from_dict({**base.to_dict(), **pairs}, source="--set")
    return base.replace(**given)
