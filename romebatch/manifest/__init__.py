"""Read and validate a manifest: the list of facts to edit into a model.

The CLI validates a manifest before it loads any model, so this package imports only the
standard library and PyYAML: `romebatch --help` and a bad manifest must both fail fast.

Validation is all-or-nothing. `load_manifest` reads the whole file, collects every
problem as one `file:row: field 'name': what` line and raises one `ManifestError`
listing them all, so a user fixes a manifest in one pass instead of one error per run.

Layouts (`format`), one module each; chosen by extension unless `format` names one:

- csv (`.csv`, csv_file): a header row, then one fact per row.
- yaml (`.yaml` / `.yml`, yaml_file): a list of fact mappings, or `facts:` holding one.
- jsonl (`.jsonl`, jsonl_file): one fact object per line.
- json, counterfact, counterfact-flat, zsre (`.json`, json_file): a list of records (or
  `{"facts": [...]}`): romebatch's fact objects (records), CounterFact as published (with
  `requested_rewrite`) or flattened as in EasyEdit (counterfact), zsRE in MEND's layout
  (zsre). Without `format`, the first record decides.

The path `-` reads standard input, once; without `format`, its start must say the layout
(`[`: JSON; one object per line: JSONL; a CSV header; `- ` or `facts:`: YAML). Messages call
it `<stdin>`. The checks every record goes through live in `validation`.
"""

from __future__ import annotations

import csv as _csv
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from romebatch.errors import ManifestError, UserError, located
from romebatch.files import MAX_FILE_BYTES, STDIN  # noqa: F401 (MAX_FILE_BYTES: documented here too)

from .csv_file import CSV_COLUMNS, CSV_REQUIRED, csv_source
from .json_file import json_source
from .jsonl_file import jsonl_records
from .reading import FileProblem, Input, Source, Unparsed, strict_json
from .records import RECORD_KEYS, adapt_generic, fact_from_dict
from .validation import MAX_FIELD_CHARS, PLACEHOLDER, Checker, Fact, Neighbor, is_valid_unicode
from .yaml_file import manifest_yaml, yaml_records

__all__ = [
    "CSV_COLUMNS",
    "CSV_REQUIRED",
    "FORMATS",
    "MAX_FIELD_CHARS",
    "PLACEHOLDER",
    "RECORD_KEYS",
    "Fact",
    "Manifest",
    "Neighbor",
    "fact_from_dict",
    "is_valid_unicode",
    "load_manifest",
    "manifest_yaml",
    "strict_json",
]

# The layouts `format=` (the CLI's --format) names; `Manifest.format` is one of them.
FORMATS = ("csv", "yaml", "jsonl", "json", "counterfact", "counterfact-flat", "zsre")
_BY_SUFFIX = {".csv": "csv", ".yaml": "yaml", ".yml": "yaml", ".jsonl": "jsonl", ".json": None}


@dataclass
class Manifest:
    path: str  # as given, or "<stdin>"
    format: str  # one of FORMATS
    facts: list[Fact]  # valid, de-duplicated, in file order
    duplicates_dropped: int
    # With skip_invalid=True: one entry per dropped record, its problems joined by "; ".
    skipped: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Entry point


def load_manifest(
    path: str | os.PathLike | Manifest,
    *,
    limit: int | None = None,
    skip_invalid: bool = False,
    format: str | None = None,
) -> Manifest:
    """Read, validate and de-duplicate a manifest.

    Raises ManifestError listing every problem. With `skip_invalid=True` (for third-party
    benchmark data) invalid records are dropped and listed in `Manifest.skipped` instead;
    problems with the file itself (unreadable, not UTF-8, not parseable) still raise.
    `limit` keeps the first N facts, after the whole file has been validated. `format`
    names the layout (one of FORMATS) instead of the suffix; `path` "-" is standard input.

    A Manifest already loaded is returned as it is (`limit` applied), so every function that
    takes a manifest's path also takes one that was read before (standard input is read once).
    """
    if limit is not None and limit < 0:
        raise UserError(f"limit must be zero or more, got {limit}")
    if isinstance(path, Manifest):
        return path if limit is None else replace(path, facts=path.facts[:limit])
    if format is not None and format not in FORMATS:
        raise UserError(f"format {format!r}: choose one of {', '.join(FORMATS)}")
    name = os.fspath(path)
    try:
        src = Input.stdin() if name == "-" else Input(name)
        source = _open_source(src, format)
        collector = _Collector(src.name, source.unit, skip_invalid)
        for row, raw in source.records:
            collector.add(row, raw, source.adapt)
    except FileProblem as e:
        raise ManifestError([e.line]) from None
    if collector.problems:
        raise ManifestError(collector.problems)
    if collector.records_seen == 0:
        raise ManifestError([located(src.name, None, None, "contains no facts")])
    facts = collector.facts if limit is None else collector.facts[:limit]
    return Manifest(src.name, source.format, facts, collector.duplicates, collector.skipped)


def _open_source(src: Input, format: str | None) -> Source:
    if format is None:
        if src.data is not None:
            return _open_layout(src, _sniff_stdin(src))
        ext = os.path.splitext(src.name)[1].lower()
        if ext not in _BY_SUFFIX:
            raise FileProblem(
                located(
                    src.name,
                    None,
                    None,
                    f"unsupported file type '{ext or '(none)'}'; use .csv, .yaml, .yml, .jsonl or .json",
                )
            )
        return _open_layout(src, _BY_SUFFIX[ext])
    return _open_layout(src, format)


def _open_layout(src: Input, layout: str | None) -> Source:
    """`layout` None: a JSON document whose first record says which of the JSON layouts it is."""
    if layout == "csv":
        return csv_source(src)
    if layout == "yaml":
        return Source("yaml", "record", yaml_records(src), adapt_generic)
    if layout == "jsonl":
        return Source("jsonl", "line", jsonl_records(src), adapt_generic)
    return json_source(src, layout)


def _sniff_stdin(src: Input) -> str | None:
    """The layout that the start of piped data shows, or a problem asking for --format."""
    assert src.data is not None
    head = src.data[: 64 * 1024].decode("utf-8-sig", "replace")
    lines = [line.strip() for line in head.splitlines()]
    first = next((line for line in lines if line and not line.startswith("#")), None)
    if first is None:
        if not head.strip():
            raise FileProblem(located(src.name, None, None, "is empty; pipe a manifest into it"))
    elif first.startswith("["):
        return None  # a JSON document: its first record says which layout
    elif first.startswith("{"):
        try:
            record = strict_json(first)
        except ValueError:  # a document spread over lines (duplicate keys, too: ValueError)
            return None
        except RecursionError:
            return "jsonl"  # that line reports it
        return None if isinstance(record, dict) and list(record) == ["facts"] else "jsonl"
    elif first == "-" or first.startswith(("- ", "---", "facts:")):
        return "yaml"
    else:
        columns = [name.strip() for name in next(_csv.reader([first]), [])]
        if len(columns) > 1 and all(name in CSV_COLUMNS for name in columns):
            return "csv"
    raise FileProblem(
        located(
            src.name,
            None,
            None,
            f"cannot tell the manifest's layout from its first line; give --format ({', '.join(FORMATS)})",
        )
    )


# ---------------------------------------------------------------------------------------
# Cross-record checks


class _Collector:
    """Validates records one at a time; keeps only small per-fact keys for cross-record checks."""

    def __init__(self, path: str, unit: str, skip_invalid: bool):
        self.path = path
        self.unit = unit
        self.skip_invalid = skip_invalid
        self.facts: list[Fact] = []
        self.problems: list[str] = []
        self.skipped: list[str] = []
        self.duplicates = 0
        self.records_seen = 0
        self._rows_by_hash: dict[str, int] = {}
        self._rows_by_id: dict[str, int] = {}
        self._targets_by_key: dict[tuple[str, str], tuple[str, int]] = {}

    def add(self, row: int, raw: Any, adapt: Callable[[Any, Checker], Fact | None]) -> None:
        self.records_seen += 1
        chk = Checker(self.path, row)
        if isinstance(raw, Unparsed):
            chk.problem(None, raw.what)
            fact = None
        else:
            fact = adapt(raw, chk)
        if fact is not None:
            if fact.hash not in self._rows_by_hash:
                # Also for a record with other problems, so that the user sees all of them now.
                self._check_against_earlier(fact, chk)
            elif not chk.problems:
                # The same edit twice is harmless: keep the first, whatever the ids say.
                self.duplicates += 1
                return
        if fact is None or chk.problems:
            self._reject(chk.problems)
            return
        self._remember(fact, row)
        self.facts.append(fact)

    def _check_against_earlier(self, fact: Fact, chk: Checker) -> None:
        first = self._rows_by_id.get(fact.id)
        if first is not None:
            chk.problem("id", f"duplicate id '{fact.id}' (first used on {self.unit} {first})")
        earlier = self._targets_by_key.get((fact.subject, fact.prompt))
        if earlier is not None:
            # Two targets for one prompt cannot both be written; which one wins would
            # depend on order, so make the user choose.
            target, first = earlier
            chk.problem(
                "target_new",
                f"conflicting targets for subject '{fact.subject}' and this prompt: "
                f"'{fact.target_new}' here, '{target}' on {self.unit} {first}",
            )

    def _remember(self, fact: Fact, row: int) -> None:
        self._rows_by_hash[fact.hash] = row
        self._rows_by_id[fact.id] = row
        self._targets_by_key[(fact.subject, fact.prompt)] = (fact.target_new, row)

    def _reject(self, problems: list[str]) -> None:
        if self.skip_invalid:
            self.skipped.append("; ".join(problems))
        else:
            self.problems.extend(problems)
