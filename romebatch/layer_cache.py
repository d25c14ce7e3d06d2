"""The traced layer of each model, cached in `$ROMEBATCH_HOME/layers.json` for `--layer auto`.

Keyed by the model's full weight hash; a damaged or missing file is treated as empty (the
layer is traced again), never trusted blindly.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .home import romebatch_home
from .model import LoadedModel


def save_recommendation(lm: LoadedModel, layer: int, effect: np.ndarray, facts: int) -> None:
    """Cache the traced layer for `apply --layer auto`, keyed by the model's weights."""
    path = romebatch_home() / "layers.json"
    data = _read_layers(path)
    data[lm.full_hash()] = {"layer": layer, "facts": facts, "mlp_effect": [float(x) for x in effect], "model": lm.spec}
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temp file of this process's own (not a fixed name), so concurrent runs cannot
    # interleave their writes; the rename is atomic, so the last writer wins whole.
    fd, tmp = tempfile.mkstemp(prefix=".layers.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_recommendation(lm: LoadedModel) -> int | None:
    path = romebatch_home() / "layers.json"
    if not path.exists():
        return None
    entry = _read_layers(path).get(lm.full_hash())
    layer = entry.get("layer") if isinstance(entry, dict) else None
    return layer if isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0 else None


def _read_layers(path) -> dict:
    """The layer cache, or {} when it is missing or damaged (it is recomputed, never trusted blindly)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}
