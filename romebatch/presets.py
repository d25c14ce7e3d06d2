"""Tuned presets: per-model defaults measured by `romebatch tune`, keyed by the model's hash.

A preset lives in `$ROMEBATCH_HOME/presets.json`, keyed by `LoadedModel.full_hash()` (every
parameter and the architecture), so it applies to exactly the weights it was measured on:
a fine-tuned copy, another revision or a quantised conversion has another hash and falls
back to the measured table or the published values. `apply` fills only what neither a flag
nor an `--hparams` file set, and says where each default came from.

Presets measured in `benchmarks/RESULTS.md` ship with the package (`presets_shipped.json`,
the same layout); one the user tuned wins over a shipped one for the same weights.

`presets.json` is the user's own configuration (written by `tune`, and theirs to edit): it
sets the hyper-parameters of every new journal, so it is never ignored silently. A file that
is not valid JSON (nesting too deep included) or not an object is refused, naming the file,
by whatever reads it (`apply`; `tune` when it saves, never overwriting it; `check_presets_file`
lets a caller refuse it up front); so is the entry for
the model in use when it is malformed or its values are out of range ("preset for MODEL in
FILE: ..."): the layer must exist in the model, the clamp be a positive finite number.
Entries for other weights are not checked (they are not used). The shipped file is checked
the same way.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

from .errors import UserError, one_line
from .files import MAX_JSON_BYTES, read_regular_text
from .hparams import MEASURED, HParams

FIELDS = ("layer", "clamp_norm_factor")
PRESETS = "presets.json"
SHIPPED = Path(__file__).with_name("presets_shipped.json")


def presets_path() -> Path:
    from .home import romebatch_home

    return romebatch_home() / PRESETS


def _read() -> dict:
    """The user's presets file ({} when there is none); a damaged one is refused, naming it."""
    path = presets_path()
    if not path.exists():
        return {}
    return _read_json(path)


def check_presets_file() -> None:
    """Refuse a damaged presets file now (before minutes of tuning that would end by saving into it)."""
    _read()


def _read_json(path: Path) -> dict:
    hint = "fix it, or delete it to run without tuned presets (`romebatch tune` writes a new one)"
    try:
        data = json.loads(read_regular_text(path, limit=MAX_JSON_BYTES))
    except UserError as error:  # not a regular file, or too large
        raise UserError(f"presets file {error.message}", hint=hint) from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"presets file {path}: cannot read it ({one_line(str(error))})", hint=hint) from None
    except RecursionError:
        raise UserError(f"presets file {path}: invalid JSON (nested too deeply)", hint=hint) from None
    except ValueError as error:
        raise UserError(
            f"presets file {path}: invalid JSON ({one_line(getattr(error, 'msg', str(error)))})", hint=hint
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"presets file {path}: expected a JSON object keyed by model hash", hint=hint)
    return data


def check_entry(entry: object, where: str, n_layers: int | None) -> dict:
    """A preset entry's values, checked: `where` names it in the error ("preset for MODEL in FILE")."""
    if not isinstance(entry, dict) or not isinstance(entry.get("values"), dict):
        raise UserError(f"{where}: expected an object with a 'values' object")
    values = entry["values"]
    unknown = sorted(str(k) for k in set(values) - set(FIELDS))
    if unknown:
        raise UserError(f"{where}: unknown field {one_line(unknown[0])!r}; a preset holds {', '.join(FIELDS)}")
    layer = values.get("layer")
    if layer is not None:
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise UserError(f"{where}: layer must be a non-negative whole number, got {one_line(repr(layer))[:60]}")
        if n_layers is not None and layer >= n_layers:
            raise UserError(f"{where}: layer {layer}, but this model has layers 0..{n_layers - 1}")
    clamp = values.get("clamp_norm_factor")
    if clamp is not None and not (
        isinstance(clamp, (int, float)) and not isinstance(clamp, bool) and math.isfinite(clamp) and clamp > 0
    ):
        raise UserError(
            f"{where}: clamp_norm_factor must be a positive finite number, got {one_line(repr(clamp))[:60]}"
        )
    return values


def save_preset(lm, values: dict, source: dict | None = None) -> Path:
    """Record `values` (layer, clamp_norm_factor) as the preset of `lm`'s weights; returns the file."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ValueError(f"a preset holds only {FIELDS}, not {sorted(unknown)}")
    data = _read()
    data[lm.full_hash()] = {
        "model": lm.spec,
        "model_type": lm.config.model_type,
        "n_layers": lm.n_layers,
        "values": dict(values),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(source or {}),
    }
    path = presets_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)  # atomic: a reader sees the old file or the new one
    return path


def shipped_presets() -> dict:
    """The presets that ship with romebatch, keyed by full model hash (measured in RESULTS.md)."""
    return _read_json(SHIPPED)


def load_preset(lm) -> dict | None:
    """The preset of `lm`'s weights (the user's, else a shipped one), or None.

    Hashing every weight costs a second or more, so the model is hashed only when the user
    has a presets file or a shipped preset has the model's architecture and depth.
    """
    user = _read()
    shipped = {
        key: entry
        for key, entry in shipped_presets().items()
        if (entry.get("model_type"), entry.get("n_layers")) == (lm.config.model_type, lm.n_layers)
    }
    if not user and not shipped:
        return None
    key = lm.full_hash()
    for data, origin, path in ((user, "preset", presets_path()), (shipped, "shipped", SHIPPED)):
        if key in data:
            entry = data[key]
            check_entry(entry, f"preset for {one_line(lm.spec)} in {path}", lm.n_layers)
            return {**entry, "origin": origin}
    return None


def fill_defaults(hp: HParams, lm) -> tuple[HParams, dict[str, str]]:
    """`hp` with the preset's values where it leaves a field to the default, and each field's source.

    Sources: "flag" (a flag or --hparams file set it), "preset" (this model's tuned preset),
    "shipped" (a preset measured in RESULTS.md and shipped with romebatch), "measured" (hparams.MEASURED, the table measured in RESULTS.md) or "published" (depth/4
    and the published clamp of 4).
    """
    preset = load_preset(lm) if any(getattr(hp, f) is None for f in FIELDS) else None
    measured = MEASURED.get((lm.config.model_type, lm.n_layers), {})
    sources, changes = {}, {}
    for name in FIELDS:
        if getattr(hp, name) is not None:
            sources[name] = "flag"
        elif preset is not None and preset["values"].get(name) is not None:
            changes[name] = preset["values"][name]
            sources[name] = preset["origin"]
        else:
            sources[name] = "measured" if name in measured else "published"
    return (hp.replace(**changes) if changes else hp), sources


def describe(resolved: HParams, sources: dict[str, str]) -> str:
    """One line: each default and where it came from."""
    where = {
        "preset": f"preset in {presets_path()}",
        "shipped": "shipped preset, measured in benchmarks/RESULTS.md",
        "measured": "measured table, romebatch/hparams.py",
        "published": "published default",
        "flag": "flag or --hparams file",
    }
    parts = [f"{name} {getattr(resolved, name)} ({where[sources[name]]})" for name in FIELDS]
    return "hyper-parameters: " + "; ".join(parts)
