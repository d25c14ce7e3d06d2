"""Tuned presets: per-model defaults measured by `romebatch tune`, keyed by the model's hash.

A preset lives in `$ROMEBATCH_HOME/presets.json`, keyed by `LoadedModel.full_hash()` (every
parameter and the architecture), so it applies to exactly the weights it was measured on:
a fine-tuned copy, another revision or a quantised conversion has another hash and falls
back to the measured table or the published values. `apply` fills only what neither a flag
nor an `--hparams` file set, and says where each default came from.

Presets measured in `benchmarks/RESULTS.md` ship with the package (`presets_shipped.json`,
the same layout); one the user tuned wins over a shipped one for the same weights.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from .hparams import MEASURED, HParams

FIELDS = ("layer", "clamp_norm_factor")
PRESETS = "presets.json"
SHIPPED = Path(__file__).with_name("presets_shipped.json")


def presets_path() -> Path:
    from .home import romebatch_home

    return romebatch_home() / PRESETS


def _read() -> dict:
    path = presets_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # a damaged cache file is not the user's input: ignore it, tune rewrites it
    return data if isinstance(data, dict) else {}


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
    return json.loads(SHIPPED.read_text(encoding="utf-8"))


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
    for data, origin in ((user, "preset"), (shipped, "shipped")):
        entry = data.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("values"), dict):
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
