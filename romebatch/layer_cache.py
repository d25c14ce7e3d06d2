"""The traced layer of each model, cached in `$ROMEBATCH_HOME/layers.json` for `--layer auto`.

Keyed by the model's full weight hash. The file is a cache romebatch writes (`trace --facts`,
`tune`, `apply --layer auto`), not the user's configuration, so it is never trusted blindly and
never stops a run: a file that is unreadable, not JSON (nesting too deep included) or not an
object, and an entry for the model that is malformed or names a layer the model does not have,
is reported in one line through the log ("layer cache FILE: ...") and treated as absent; the
layer is traced again and the entry rewritten.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import UserError, one_line
from .files import MAX_JSON_BYTES, read_regular_text
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


def load_recommendation(lm: LoadedModel, log: Callable[[str], None] | None = None) -> int | None:
    """The cached layer of `lm`'s weights, or None (none cached, or the cache is bad: `log` says which)."""
    path = romebatch_home() / "layers.json"
    if not path.exists():
        return None
    problems: list[str] = []
    data = _read_layers(path, problems)
    key = lm.full_hash()
    if key in data:
        entry = data[key]
        layer = entry.get("layer") if isinstance(entry, dict) else None
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            problems.append(f"the entry for {lm.spec} has no valid layer ({one_line(repr(layer))[:60]})")
        elif layer >= lm.n_layers:
            problems.append(
                f"the entry for {lm.spec} names layer {layer}, but the model has layers 0..{lm.n_layers - 1}"
            )
        else:
            return layer
    if problems and log is not None:
        log(one_line(f"layer cache {path}: {problems[0]}; ignoring it and tracing again."))
    return None


def _read_layers(path, problems: list[str] | None = None) -> dict:
    """The layer cache, or {} when it is missing or damaged (it is recomputed, never trusted blindly);
    what was wrong with a damaged one is appended to `problems`."""
    if not path.exists():
        return {}
    try:
        data = json.loads(read_regular_text(path, limit=MAX_JSON_BYTES))
    except UserError as error:  # not a regular file, or too large
        if problems is not None:
            problems.append(error.message.removeprefix(f"{path}: "))
        return {}
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        if problems is not None:
            what = "nested too deeply" if isinstance(error, RecursionError) else getattr(error, "msg", str(error))
            problems.append(f"unreadable ({what})")
        return {}
    if not isinstance(data, dict):
        if problems is not None:
            problems.append("not a JSON object")
        return {}
    return data
