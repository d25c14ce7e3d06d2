"""The model-free half of `romebatch check`: is the journal file itself sound?

Every problem is one line naming the table, row and field. The audit reads each row once,
never follows a parent link more than once, and never trusts a field's type, so damage of
any kind (a flipped byte, an edited field, a deleted, duplicated or moved row, a changed
meta key) ends in a named problem, not a traceback or a loop. The replay half, which needs
the model, runs only on a journal this audit passes (romebatch/editor.py `Editor.check`).
"""

from __future__ import annotations

import json
import re
import sqlite3
from typing import Any, TypeGuard

import numpy as np

from . import integrity
from .errors import ManifestError
from .journal_schema import IDENTITY_KEYS

_STATUSES = ("applied", "rolled_back")
# Past this many problems the rest is noise: the journal is damaged either way.
MAX_PROBLEMS = 50


def audit(db: sqlite3.Connection) -> list[str]:
    """Structural problems of an open journal database, [] if it is sound."""
    problems: list[str] = []
    try:
        # integrity_check, not quick_check: it also finds an index that disagrees with its table.
        verdict = [row[0] for row in db.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as error:
        return [f"the SQLite file is damaged ({error})"]
    if verdict != ["ok"]:
        return [f"the SQLite file is damaged ({'; '.join(str(v) for v in verdict[:3])})"]
    try:
        _check_schema(db, problems)
        meta = _meta(db, problems)
        edits = _rows(db, "edits", "seq")
        rejections = _rows(db, "rejections", "id")
    except sqlite3.DatabaseError as error:
        return problems + [f"cannot read the journal's tables ({error})"]
    hashed = bool(edits or rejections) and any(r.get("row_hash") for r in [*edits, *rejections])
    hashed = hashed or isinstance(meta.get("format"), int) and meta.get("format", 1) >= 2
    _check_edits(edits, meta, hashed, problems)
    _check_rejections(rejections, hashed, problems)
    if hashed:
        _check_digests(db, meta, problems)
    return problems[:MAX_PROBLEMS]


def damaged_edits(problems: list[str]) -> set[int] | None:
    """The edits named by `audit`'s problems ("edit N: ..."), or None if any problem is not
    about one edit (the file, a table, meta): then no earlier state is known to be good."""
    seqs = set()
    for line in problems:
        match = _EDIT_PROBLEM.match(line)
        if match is None:
            return None
        seqs.add(int(match.group(1)))
    return seqs


_EDIT_PROBLEM = re.compile(r"edit (\d+): ")


def _check_schema(db: sqlite3.Connection, problems: list[str]) -> None:
    """The tables and indexes must be exactly what romebatch's migrations made, text included."""
    applied = [row[0] for row in db.execute("SELECT name FROM _migrations ORDER BY rowid")]
    expected = _expected_schema(tuple(applied))
    actual = {
        (kind, name): sql
        for kind, name, sql in db.execute("SELECT type, name, sql FROM sqlite_master")
        if sql is not None
    }
    for key in sorted(set(expected) | set(actual)):
        if expected.get(key) != actual.get(key):
            what = (
                "is missing"
                if key not in actual
                else "is not romebatch's"
                if key not in expected
                else "differs from what romebatch made"
            )
            problems.append(f"the schema of {key[0]} {key[1]} {what} (the file was changed)")


_SCHEMAS: dict[tuple[str, ...], dict] = {}


def _expected_schema(applied: tuple[str, ...]) -> dict:
    """sqlite_master as the migrations named in `applied` leave it, built once in memory."""
    if applied not in _SCHEMAS:
        from .journal_schema import MIGRATIONS, migrate

        names = [m.__name__ for m in MIGRATIONS]
        stop = names[len(applied)] if applied == tuple(names[: len(applied)]) and len(applied) < len(names) else None
        db = sqlite3.connect(":memory:", isolation_level=None)
        db.row_factory = sqlite3.Row
        migrate(db, stop_before=stop)
        _SCHEMAS[applied] = {
            (kind, name): sql
            for kind, name, sql in db.execute("SELECT type, name, sql FROM sqlite_master")
            if sql is not None
        }
        db.close()
    return _SCHEMAS[applied]


def _meta(db: sqlite3.Connection, problems: list[str]) -> dict:
    meta: dict[str, Any] = {}
    for key, value in db.execute("SELECT key, value FROM meta"):
        try:
            meta[str(key)] = json.loads(value)
        except (TypeError, ValueError, RecursionError):
            problems.append(f"meta key {key!r}: not valid JSON")
    head = meta.get("head", 0)
    if not _is_int(head) or head < 0:
        problems.append(f"meta key 'head': {_short(head)} is not an edit number")
    for key in ("base_hash", *IDENTITY_KEYS):
        if key in meta and not isinstance(meta[key], str):
            problems.append(f"meta key {key!r}: {_short(meta[key])} is not a hash")
    return meta


def _rows(db: sqlite3.Connection, table: str, key: str) -> list[dict]:
    cursor = db.execute(f"SELECT * FROM {table} ORDER BY {key}")
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor]


def _check_edits(edits: list[dict], meta: dict, hashed: bool, problems: list[str]) -> None:
    by_seq: dict[int, dict] = {}
    sizes: dict[str, int] = {}
    for row in edits:
        seq = row.get("seq")
        if not _is_int(seq) or seq < 1:
            problems.append(f"edits: a row has seq {_short(seq)}, not a positive edit number")
            continue
        by_seq[seq] = row
        where = f"edit {seq}"
        parent = row.get("parent")
        if not _is_int(parent) or not 0 <= parent < seq:
            problems.append(f"{where}: field parent is {_short(parent)}, not an earlier edit")
        _check_edit_fields(row, where, sizes, problems)
        # `status` is stored only by journals before m006 (opened here unmigrated): check that copy.
        if "status" in row and row["status"] not in _STATUSES:
            problems.append(f"{where}: field status is {_short(row.get('status'))}, not applied or rolled_back")
    for seq, row in by_seq.items():
        parent = row.get("parent")
        if _is_int(parent) and 0 < parent < seq and parent not in by_seq:
            problems.append(f"edit {seq}: its parent edit {parent} is missing")
    head = meta.get("head", 0)
    on_path = _path(head, by_seq) if _is_int(head) and head >= 0 else None
    if _is_int(head) and head > 0 and head not in by_seq:
        problems.append(f"meta key 'head': edit {head} does not exist")
    elif on_path is not None:
        for seq, row in by_seq.items():
            expected = "applied" if seq in on_path else "rolled_back"
            if "status" in row and row["status"] in _STATUSES and row["status"] != expected:
                problems.append(
                    f"edit {seq}: field status is {row['status']!r}, but it is "
                    f"{'on' if seq in on_path else 'off'} the head's path"
                )
    if hashed:
        for seq, row in by_seq.items():
            parent = row.get("parent")
            parent_hash = by_seq[parent].get("row_hash") or "" if _is_int(parent) and parent in by_seq else ""
            if row.get("row_hash") != integrity.row_hash(row, parent_hash):
                problems.append(f"edit {seq}: its fields do not match its row hash (the row was changed)")


def edit_row_problems(rows: list[dict]) -> list[tuple[int, str]]:
    """(index, problem) for each problem of these edit rows' own fields, as `audit` finds them
    in a journal (vectors, layer, fact, fact hash and id): a bundle's rows are checked with
    this before any is appended, so nothing `check` calls damaged gets in that way."""
    found: list[tuple[int, str]] = []
    sizes: dict[str, int] = {}
    for index, row in enumerate(rows):
        problems: list[str] = []
        _check_edit_fields(row, "", sizes, problems)
        found.extend((index, line.removeprefix(": ")) for line in problems)
    return found


def _check_edit_fields(row: dict, where: str, sizes: dict[str, int], problems: list[str]) -> None:
    for column in ("lam", "u", "k_star"):
        _vector(row, column, where, sizes, problems)
    if not _is_int(row.get("layer")) or row["layer"] < 0:
        problems.append(f"{where}: field layer is {_short(row.get('layer'))}, not a layer number")
    _check_fact(row, where, problems)


def _path(head: int, by_seq: dict[int, dict]) -> set[int] | None:
    path: set[int] = set()
    seq = head
    while seq:
        row = by_seq.get(seq)
        if row is None or seq in path:
            return None
        path.add(seq)
        parent = row.get("parent")
        if not _is_int(parent) or not 0 <= parent < seq:
            return None
        seq = parent
    return path


def _vector(row: dict, column: str, where: str, sizes: dict[str, int], problems: list[str]) -> None:
    value = row.get(column)
    if value is None and column == "k_star":
        return
    if not isinstance(value, bytes) or not value or len(value) % 4:
        problems.append(f"{where}: field {column} is not a float32 vector")
        return
    # A NaN or infinite value would replay to NaN weights even with every hash recomputed.
    if not np.isfinite(np.frombuffer(value, dtype="<f4")).all():
        problems.append(f"{where}: field {column} holds NaN or infinite values")
        return
    size_key = "u" if column == "k_star" else column  # k* lives in the same space as u
    expected = sizes.setdefault(size_key, len(value))
    if len(value) != expected:
        problems.append(f"{where}: field {column} has {len(value) // 4} values, other edits {expected // 4}")


def _check_fact(row: dict, where: str, problems: list[str]) -> None:
    from .manifest import fact_from_dict

    try:
        # A missing or non-text fact_json raises TypeError here, reported as an invalid fact.
        fact = fact_from_dict(json.loads(row.get("fact_json")))  # type: ignore[arg-type]
    except (TypeError, ValueError, RecursionError, ManifestError):
        problems.append(f"{where}: field fact_json is not a valid fact")
        return
    if row.get("fact_hash") != fact.hash:
        problems.append(f"{where}: field fact_hash does not match the fact it stores")
    if row.get("fact_id") != fact.id:
        problems.append(f"{where}: field fact_id {_short(row.get('fact_id'))} is not the stored fact's id")


def _check_rejections(rows: list[dict], hashed: bool, problems: list[str]) -> None:
    for row in rows:
        where = f"rejection {_short(row.get('id'))}"
        parent = row.get("parent")
        # Its parent may since have been pruned, so only the type is checked here.
        if not _is_int(parent) or parent < 0:
            problems.append(f"{where}: field parent is {_short(parent)}, not an edit number")
        if hashed and row.get("row_hash") != integrity.row_hash(row):
            problems.append(f"{where}: its fields do not match its row hash (the row was changed)")


def _check_digests(db: sqlite3.Connection, meta: dict, problems: list[str]) -> None:
    for key, table, column, what in (
        (integrity.EDITS_DIGEST, "edits", "seq", "edits"),
        (integrity.REJECTIONS_DIGEST, "rejections", "id", "rejections"),
    ):
        if meta.get(key, "") != integrity.table_digest(db, table, column):
            problems.append(f"the {what} table does not match its digest (a row was added, deleted or moved)")
    stored = meta.get(integrity.META_DIGEST)
    if stored != integrity.meta_digest(db):
        problems.append("the meta table does not match its digest (a meta key was changed, added or deleted)")


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
