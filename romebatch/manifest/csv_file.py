"""CSV manifests (`.csv`): a header row (line 1), then one fact per row.

Rows are reported by the line they start on. Columns: id, subject, prompt, target_new,
target_true, paraphrases, neighborhood_prompts, neighborhood_answers. A list cell holds
items separated by `|`, each item trimmed (`a | b` is ["a", "b"]); a cell whose first
non-blank character is `[` is parsed as a JSON list of strings instead, kept as written, for
items that contain `|`. An empty cell means "absent".
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from typing import Any

from romebatch.errors import ManifestError, located

from .reading import DuplicateKey, FileProblem, Input, Source, strict_json, value_problem
from .validation import MAX_FIELD_CHARS, NO_PROBES, Checker, Fact, Probes, describe, make_fact

CSV_COLUMNS = (
    "id",
    "subject",
    "prompt",
    "target_new",
    "target_true",
    "paraphrases",
    "neighborhood_prompts",
    "neighborhood_answers",
)
CSV_REQUIRED = ("subject", "prompt", "target_new")


def csv_source(src: Input) -> Source:
    path = src.name
    f = src.open(newline="")
    # Read the header eagerly so header problems surface before any row is looked at.
    reader = csv.reader(f, strict=True)
    try:
        header = next(reader, None)
    except (csv.Error, UnicodeDecodeError) as e:
        f.close()
        raise FileProblem(_csv_problem(src, 1, e)) from None
    if header is None:
        f.close()
        raise FileProblem(located(path, None, None, "file is empty; expected a header row"))
    columns = [name.strip() for name in header]
    problems = _header_problems(path, columns)
    if problems:
        f.close()
        raise ManifestError(problems)
    return Source("csv", "line", _csv_rows(src, f, reader, columns), adapt_csv)


def _header_problems(path: str, columns: list[str]) -> list[str]:
    # A bad header would make every row report the same problem; report it once instead.
    problems = []
    seen = set()
    for i, name in enumerate(columns, 1):
        if not name:
            problems.append(located(path, 1, None, f"column {i} has no name"))
        elif name not in CSV_COLUMNS:
            problems.append(located(path, 1, name, f"unknown column; expected {', '.join(CSV_COLUMNS)}"))
        elif name in seen:
            problems.append(located(path, 1, name, "column appears twice"))
        seen.add(name)
    for name in CSV_REQUIRED:
        if name not in columns:
            problems.append(located(path, 1, name, "required column missing"))
    return problems


def _csv_problem(src: Input, line: int, e: Exception) -> str:
    if isinstance(e, UnicodeDecodeError):
        return src.bad_utf8()
    return located(src.name, line, None, f"malformed CSV: {e}")


def _csv_rows(src: Input, f: Any, reader: Any, columns: list[str]) -> Iterator[tuple[int, Any]]:
    with f:
        # Report the line a record starts on (what an editor shows), even when a quoted
        # cell spans several lines; reader.line_num is where the record ends.
        start = reader.line_num + 1
        try:
            for cells in reader:
                row, start = start, reader.line_num + 1
                if not cells or all(not c.strip() for c in cells):
                    continue  # blank lines are layout, not records
                yield row, (columns, cells)
        except (csv.Error, UnicodeDecodeError) as e:
            raise FileProblem(_csv_problem(src, start, e)) from None


def adapt_csv(raw: tuple[list[str], list[str]], chk: Checker) -> Fact | None:
    columns, cells = raw
    if len(cells) > len(columns):
        chk.problem(None, f"row has {len(cells)} cells but the header has {len(columns)} columns")
        return None
    # Empty cells mean "absent"; missing trailing cells are treated the same way.
    row = {name: cell for name, cell in zip(columns, cells) if cell.strip()}
    paraphrases = _csv_list(chk, row.get("paraphrases"), "paraphrases")
    n_prompts = _csv_list(chk, row.get("neighborhood_prompts"), "neighborhood_prompts")
    n_answers = _csv_list(chk, row.get("neighborhood_answers"), "neighborhood_answers")
    neighbors = (NO_PROBES, NO_PROBES)
    if n_prompts is not None and n_answers is not None:
        if len(n_prompts) != len(n_answers):
            chk.problem(
                "neighborhood_answers",
                f"has {len(n_answers)} items but neighborhood_prompts has {len(n_prompts)}; they pair up one to one",
            )
        else:
            neighbors = (Probes(n_prompts, "neighborhood_prompts"), Probes(n_answers, "neighborhood_answers"))
    return make_fact(
        chk,
        fid=chk.record_id(row.get("id"), "id", str(chk.row)),
        # Required cells that are blank get the specific "empty ..." message.
        subject=chk.string(row.get("subject", ""), "subject"),
        prompt=chk.string(row.get("prompt", ""), "prompt"),
        target_new=chk.string(row.get("target_new", ""), "target_new"),
        target_true=chk.string(row.get("target_true"), "target_true", required=False),
        paraphrases=Probes(paraphrases or [], "paraphrases"),
        neighbors=neighbors,
    )


def _csv_list(chk: Checker, cell: str | None, column: str) -> list[str] | None:
    """Split a list cell: `a|b|c`, or a JSON list when items themselves contain `|`."""
    if cell is None:
        return []
    if cell.lstrip().startswith("["):
        try:
            value = strict_json(cell)
        except json.JSONDecodeError as e:
            chk.problem(column, f"starts with '[' but is not a JSON list of strings: {e.msg} (column {e.colno})")
            return None
        except RecursionError:
            chk.problem(column, "starts with '[' but is nested too deeply to be a list of strings")
            return None
        except (DuplicateKey, ValueError) as e:
            what = f"key {describe(e.key)} appears twice" if isinstance(e, DuplicateKey) else value_problem(e)
            chk.problem(column, f"starts with '[' but is not a JSON list of strings: {what}")
            return None
        return chk.string_list(value, column)
    # Spaces around "|" are for readability ("a | b"), not part of the items.
    items = [item.strip() for item in cell.split("|")]
    if len(cell) <= MAX_FIELD_CHARS:
        return items  # no item can be longer than its cell; skip per-item checks
    ok = True
    for i, item in enumerate(items, 1):
        ok = chk.string(item, column, f"item {i}") is not None and ok
    return items if ok else None
