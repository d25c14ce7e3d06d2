"""JSON manifests (`.json`): one document holding a list of records (or `{"facts": [...]}`).

Four layouts share the suffix: CounterFact as published (`requested_rewrite`), CounterFact
flattened as in EasyEdit, zsRE in MEND's layout, and romebatch's own fact records (format
"json"). Without `--format`, the first record decides.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from romebatch.errors import located

from .counterfact import adapt_counterfact, adapt_counterfact_flat
from .reading import DuplicateKey, FileProblem, Input, Source, fact_list, numbered, strict_json, value_problem
from .records import adapt_generic
from .validation import Checker, Fact, describe
from .zsre import adapt_zsre

ADAPTERS: dict[str, Callable[[Any, Checker], Fact | None]] = {
    "counterfact": adapt_counterfact,
    "zsre": adapt_zsre,
    "counterfact-flat": adapt_counterfact_flat,
    "json": adapt_generic,
}


def json_source(src: Input, layout: str | None = None) -> Source:
    """`layout`: one of ADAPTERS, or None to pick it from the first record."""
    path = src.name
    text = src.read_text()
    try:
        doc = strict_json(text)
    except json.JSONDecodeError as e:
        raise FileProblem(located(path, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})")) from None
    except RecursionError:
        raise FileProblem(located(path, None, None, "invalid JSON: nested too deeply")) from None
    except DuplicateKey as e:
        raise FileProblem(
            located(path, None, None, f"invalid JSON: key {describe(e.key)} appears twice in one object")
        ) from None
    except ValueError as e:
        raise FileProblem(located(path, None, None, f"invalid JSON: {value_problem(e)}")) from None
    records = fact_list(path, doc, "JSON manifest")
    fmt = layout or sniff_json(records[0] if records else None)
    return Source(fmt, "record", numbered(records), ADAPTERS[fmt])


def sniff_json(first: Any) -> str:
    """Pick the layout from the first record; later records of another shape then fail loudly."""
    if isinstance(first, dict):
        if "requested_rewrite" in first:
            return "counterfact"
        if "src" in first and "alt" in first:
            return "zsre"
        if "ground_truth" in first or "rephrase_prompt" in first or "locality_prompt" in first:
            return "counterfact-flat"
    return "json"
