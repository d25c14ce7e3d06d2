"""Tamper evidence for a journal: chained row hashes, table digests, and a model-free audit.

`romebatch check` replays every edit against the model and compares weight hashes, but a
changed fact, id, layer or parent link would go unseen by that alone: a swapped
`fact_hash` made a resumed run apply an applied fact again. So every edit row carries
`row_hash`, a hash of every one of its fields (vectors by their bytes) chained to its
parent's `row_hash`; every rejection row carries a hash of its own fields; the meta table
stores a running digest of both tables and, over all of that, a digest of itself. Any
change to any field of any row or meta key is then found here, without a model, and named.

These hashes detect damage and careless editing, not a forger who recomputes them all:
there is no secret key (a signed journal would need one).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Any

# Fields that are not part of a row's content: `status` is derived from the head's path
# and rewritten on every head move; `row_hash` is the hash itself.
_NOT_HASHED = frozenset({"status", "row_hash"})

EDITS_DIGEST = "edits_digest"
REJECTIONS_DIGEST = "rejections_digest"
META_DIGEST = "meta_digest"


def _field(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "blob:" + hashlib.sha256(bytes(value)).hexdigest()
    if isinstance(value, float):
        return "float:" + value.hex()  # exact, and NaN/inf-safe
    return value


def row_hash(row: dict, parent_hash: str = "") -> str:
    """Hash of every non-null field of `row` (but status and the hash itself), chained to `parent_hash`.

    Null fields are left out, so a column added by a later migration (null in old rows)
    does not change the hashes of rows written before it.
    """
    fields = sorted((k, _field(v)) for k, v in row.items() if k not in _NOT_HASHED and v is not None)
    payload = json.dumps([parent_hash, fields], ensure_ascii=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode("ascii")).hexdigest()


def extend_digest(digest: str, key: int, value: str) -> str:
    """The running digest of a table after appending row `key` with hash `value`."""
    return "sha256:" + hashlib.sha256(f"{digest}|{key}:{value}".encode("ascii")).hexdigest()


def table_digest(db: sqlite3.Connection, table: str, key: str) -> str:
    digest = ""
    for row_key, value in db.execute(f"SELECT {key}, row_hash FROM {table} ORDER BY {key}"):
        digest = extend_digest(digest, row_key, str(value))
    return digest


def meta_digest(db: sqlite3.Connection) -> str:
    rows = db.execute("SELECT key, value FROM meta WHERE key != ? ORDER BY key", (META_DIGEST,)).fetchall()
    payload = json.dumps([[str(k), str(v)] for k, v in rows], ensure_ascii=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode("ascii")).hexdigest()


def hash_all_rows(db: sqlite3.Connection) -> None:
    """Give every row its hash and store the digests (the migration that introduced them)."""
    hashes: dict[int, str] = {}
    for row in db.execute("SELECT * FROM edits ORDER BY seq").fetchall():
        values = dict(row) if isinstance(row, sqlite3.Row) else _as_dict(db, "edits", row)
        parent = int(values["parent"])
        h = row_hash(values, hashes.get(parent, ""))
        hashes[int(values["seq"])] = h
        db.execute("UPDATE edits SET row_hash = ? WHERE seq = ?", (h, values["seq"]))
    for row in db.execute("SELECT * FROM rejections ORDER BY id").fetchall():
        values = dict(row) if isinstance(row, sqlite3.Row) else _as_dict(db, "rejections", row)
        db.execute("UPDATE rejections SET row_hash = ? WHERE id = ?", (row_hash(values), values["id"]))
    _set(db, EDITS_DIGEST, table_digest(db, "edits", "seq"))
    _set(db, REJECTIONS_DIGEST, table_digest(db, "rejections", "id"))
    _set(db, META_DIGEST, meta_digest(db))


def _as_dict(db: sqlite3.Connection, table: str, row: tuple) -> dict:
    names = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
    return dict(zip(names, row))


def _set(db: sqlite3.Connection, key: str, value: str) -> None:
    db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
