"""The journal: an append-only SQLite log of rank-one edits, the source of truth.

The base model on disk is never modified. State N is `base + edits on the path to N`,
rebuilt by replay; `rollback` moves the head; `export` materialises the head. Edits form a
tree: each records the head it was computed on (`parent`), so rolling back and then
applying new facts never invalidates what a stored edit means, and moving the head back
to an old branch is exact too.

One edit is one SQLite transaction (WAL, synchronous=FULL): a crash leaves either the
whole edit or none of it. Vectors are float32 blobs; metrics are columns, so the journal
can be queried directly (`polars.read_database`). Schema changes are new migrations at the
end of `MIGRATIONS`, never edits of old ones; opening a journal applies what is pending.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import JournalLockedError, UserError

DB_NAME = "journal.sqlite"
LOCK_NAME = "lock"


# ----------------------------------------------------------------------------- migrations
def m001_initial(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("""
        CREATE TABLE IF NOT EXISTS edits (
            seq INTEGER PRIMARY KEY,          -- 1, 2, ... in the order edits were made
            parent INTEGER NOT NULL,          -- the head this edit was computed on (0 = base)
            status TEXT NOT NULL,             -- 'applied' (on the path to head) | 'rolled_back'
            fact_id TEXT NOT NULL,
            fact_hash TEXT NOT NULL,          -- content hash: (subject, prompt, target_new)
            fact_json TEXT NOT NULL,          -- the whole fact, probes included
            layer INTEGER NOT NULL,
            weight_name TEXT NOT NULL,
            lam BLOB NOT NULL,                -- Λ, float32 little-endian (d_model)
            u BLOB NOT NULL,                  -- u, float32 little-endian (d_ff)
            update_norm REAL NOT NULL,        -- ‖Λ uᵀ‖_F
            denominator REAL NOT NULL,        -- uᵀ k*
            weight_hash_before TEXT NOT NULL,
            weight_hash_after TEXT NOT NULL,  -- checked on every replay
            v_steps INTEGER,
            v_loss REAL,
            p_new_before REAL, p_true_before REAL, p_new_after REAL, p_true_after REAL,
            seconds_key REAL, seconds_value REAL, seconds_total REAL,
            created_at TEXT NOT NULL
        )""")
    db.execute("CREATE INDEX IF NOT EXISTS edits_fact_hash ON edits(fact_hash)")
    db.execute("""
        CREATE TABLE IF NOT EXISTS rejections (
            id INTEGER PRIMARY KEY,
            parent INTEGER NOT NULL,          -- the head the edit was computed on
            fact_id TEXT NOT NULL,
            fact_hash TEXT NOT NULL,
            fact_json TEXT NOT NULL,
            layer INTEGER,
            reason TEXT NOT NULL,
            update_norm REAL,
            denominator REAL,
            created_at TEXT NOT NULL
        )""")


def m002_probe_columns(db: sqlite3.Connection) -> None:
    """Regression-probe outcomes of each edit (issue: regression checks during apply)."""
    have = {row[1] for row in db.execute("PRAGMA table_info(edits)")}
    for column in ("neighborhood_drop", "probe_regression", "retention", "seconds_probes"):
        if column not in have:
            db.execute(f"ALTER TABLE edits ADD COLUMN {column} REAL")


def m003_key_column(db: sqlite3.Connection) -> None:
    """Each edit's key k* (float32, d_ff): the running state of the sequential-stability
    methods (romebatch/rome/preserve.py) is rebuilt from the keys on the current path."""
    have = {row[1] for row in db.execute("PRAGMA table_info(edits)")}
    if "k_star" not in have:
        db.execute("ALTER TABLE edits ADD COLUMN k_star BLOB")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [m001_initial, m002_probe_columns, m003_key_column]


def migrate(db: sqlite3.Connection, stop_before: str | None = None) -> None:
    """Apply every pending migration, each in its own transaction, recording its name."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    done = {row[0] for row in db.execute("SELECT name FROM _migrations")}
    for migration in MIGRATIONS:
        if migration.__name__ == stop_before:
            return
        if migration.__name__ in done:
            continue
        with transaction(db):
            migration(db)
            db.execute("INSERT INTO _migrations VALUES (?, ?)", (migration.__name__, _now()))


class transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (the connection is in autocommit)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False


_FAULT_COUNTS: dict[str, int] = {}


def _fault_point(name: str) -> None:
    """Crash-test seam: ROMEBATCH_FAULT=commit:3 kills the process (SIGKILL) inside its 3rd commit.

    The kill lands after the edit row is written but before the transaction commits, the
    moment a crash is most likely to leave a half-written edit if atomicity were broken.
    """
    spec = os.environ.get("ROMEBATCH_FAULT")
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] == int(count or 1):
        os.kill(os.getpid(), 9)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def vector_blob(values) -> bytes:
    return np.ascontiguousarray(np.asarray(values, dtype="<f4")).tobytes()


def blob_vector(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4").copy()


# ----------------------------------------------------------------------------- records
@dataclass
class EditRecord:
    seq: int
    parent: int
    status: str
    fact_id: str
    fact_hash: str
    fact_json: str
    layer: int
    weight_name: str
    lam: np.ndarray
    u: np.ndarray
    update_norm: float
    denominator: float
    weight_hash_before: str
    weight_hash_after: str
    v_steps: int | None = None
    v_loss: float | None = None
    p_new_before: float | None = None
    p_true_before: float | None = None
    p_new_after: float | None = None
    p_true_after: float | None = None
    seconds_key: float | None = None
    seconds_value: float | None = None
    seconds_total: float | None = None
    created_at: str = ""
    neighborhood_drop: float | None = None
    probe_regression: float | None = None
    retention: float | None = None
    seconds_probes: float | None = None
    k_star: np.ndarray | None = None  # float32 (d_ff,); None in journals written before m003

    @property
    def fact(self) -> dict:
        return json.loads(self.fact_json)


_EDIT_COLUMNS = [f for f in EditRecord.__dataclass_fields__]


def _record(row: sqlite3.Row) -> EditRecord:
    values = dict(row)
    values["lam"] = blob_vector(values["lam"])
    values["u"] = blob_vector(values["u"])
    if values.get("k_star") is not None:
        values["k_star"] = blob_vector(values["k_star"])
    return EditRecord(**values)


# ----------------------------------------------------------------------------- the journal
class Journal:
    """A journal directory: `journal.sqlite` plus a `lock` file held by the one writer.

    `Journal(dir, write=True)` creates the directory if needed and takes the write lock at
    once (a second writer is refused, naming the holder); readers take no lock and read a
    consistent snapshot thanks to WAL.
    """

    def __init__(self, directory: str | Path, *, write: bool = False, create: bool = False):
        self.directory = Path(directory)
        self.write = write
        self._lock_file = None
        db_path = self.directory / DB_NAME
        if not db_path.exists():
            if not create:
                raise UserError(f"no journal at {self.directory}", hint="run `romebatch apply MANIFEST --journal DIR` first")
            self.directory.mkdir(parents=True, exist_ok=True)
        if write:
            self._lock()
        try:
            self.db = sqlite3.connect(str(db_path), isolation_level=None, timeout=30)
        except sqlite3.Error as error:
            self._unlock()
            raise UserError(f"{db_path}: cannot open the journal ({error})") from None
        self.db.row_factory = sqlite3.Row
        try:
            if write:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")  # a committed edit survives a power cut
                migrate(self.db)
            else:
                self._check_schema()
        except sqlite3.DatabaseError as error:
            self.close()
            raise UserError(f"{db_path}: not a romebatch journal or corrupt ({error})") from None

    def _check_schema(self) -> None:
        names = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "edits" not in names:
            raise UserError(f"{self.directory / DB_NAME}: not a romebatch journal (no edits table)")

    # -- locking -----------------------------------------------------------------------
    def _lock(self) -> None:
        path = self.directory / LOCK_NAME
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise JournalLockedError(
                f"journal {self.directory} is in use by {holder}",
                hint="wait for it to finish; `romebatch log` reads the journal meanwhile",
            ) from None
        # The kernel releases a flock when its holder dies, so a stale lock cannot block anyone.
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._lock_file = handle

    def _unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def close(self) -> None:
        if getattr(self, "db", None) is not None:
            self.db.close()
            self.db = None
        self._unlock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- meta --------------------------------------------------------------------------
    def get(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def set_many(self, values: dict) -> None:
        with transaction(self.db):
            self._set_all(values)

    def _set_all(self, values: dict | None) -> None:
        """Set each key, inside the caller's transaction."""
        for key, value in (values or {}).items():
            self.set(key, value)

    @property
    def initialised(self) -> bool:
        return self.get("base_hash") is not None

    @property
    def head(self) -> int:
        return int(self.get("head", 0))

    # -- edits -------------------------------------------------------------------------
    def edit(self, seq: int) -> EditRecord:
        row = self.db.execute("SELECT * FROM edits WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            raise UserError(f"journal {self.directory} has no edit {seq}")
        return _record(row)

    def edits(self) -> list[EditRecord]:
        return [_record(row) for row in self.db.execute("SELECT * FROM edits ORDER BY seq")]

    def chain(self, head: int | None = None) -> list[int]:
        """The seqs of the edits that make state `head`, oldest first, without their vectors."""
        head = self.head if head is None else head
        parents = dict(self.db.execute("SELECT seq, parent FROM edits").fetchall())
        chain = []
        seq = head
        while seq:
            if seq not in parents:
                raise UserError(f"journal {self.directory}: edit {seq} is missing (the journal is damaged)")
            chain.append(seq)
            seq = parents[seq]
        chain.reverse()
        return chain

    def path(self, head: int | None = None) -> list[EditRecord]:
        """The edits that make state `head`, oldest first (follows parent links)."""
        chain = self.chain(head)
        if not chain:
            return []
        rows = {}
        for start in range(0, len(chain), 500):  # SQLite caps the parameters of one statement
            part = chain[start:start + 500]
            rows.update({row["seq"]: _record(row) for row in self.db.execute(
                f"SELECT * FROM edits WHERE seq IN ({','.join('?' * len(part))})", part)})
        return [rows[seq] for seq in chain]

    def path_facts(self, head: int | None = None) -> list[tuple[int, str]]:
        """(seq, fact hash) of the edits that make state `head`, oldest first: cheap, no vectors."""
        chain = self.chain(head)
        hashes = dict(self.db.execute("SELECT seq, fact_hash FROM edits").fetchall())
        return [(seq, hashes[seq]) for seq in chain]

    def child(self, parent: int, fact_hash: str) -> EditRecord | None:
        """An existing edit of this fact computed on `parent` (e.g. rolled back earlier), if any."""
        row = self.db.execute("SELECT * FROM edits WHERE parent = ? AND fact_hash = ? ORDER BY seq LIMIT 1",
                              (parent, fact_hash)).fetchone()
        return _record(row) if row else None

    def applied_summaries(self) -> list[dict]:
        """Applied edits without their vectors, oldest first: cheap enough to read after every edit."""
        return [dict(row) for row in self.db.execute(
            "SELECT seq, fact_json, update_norm, p_new_after, p_true_after FROM edits WHERE status = 'applied' ORDER BY seq")]

    def applied_hashes(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT fact_hash FROM edits WHERE status = 'applied'")}

    def rejected_hashes(self) -> set[str]:
        path = {0} | {row[0] for row in self.db.execute("SELECT seq FROM edits WHERE status = 'applied'")}
        return {h for h, parent in self.db.execute("SELECT fact_hash, parent FROM rejections") if parent in path}

    def settled_hashes(self) -> set[str]:
        """Facts a re-run skips: applied on the head's path, or rejected on a state on it."""
        return self.applied_hashes() | self.rejected_hashes()

    def commit_edit(self, record: EditRecord, meta: dict | None = None) -> int:
        """Write one edit and move the head to it, in one transaction; returns its seq.

        `meta` keys are set in the same transaction (a repair pass's progress, say).
        """
        values = {c: getattr(record, c) for c in _EDIT_COLUMNS if c != "seq"}
        values["lam"] = vector_blob(record.lam)
        values["u"] = vector_blob(record.u)
        values["k_star"] = vector_blob(record.k_star) if record.k_star is not None else None
        values["status"] = "applied"
        values["created_at"] = values["created_at"] or _now()
        with transaction(self.db):
            if self.head != record.parent:
                raise RuntimeError("the journal's head moved under this writer")
            # Sequence numbers are never reused, even after --prune deleted the highest ones:
            # rejections and exported provenance refer to them.
            (highest,) = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM edits").fetchone()
            seq = max(int(highest), int(self.get("max_seq", 0))) + 1
            values = {"seq": seq, **values}
            self.db.execute(f"INSERT INTO edits ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                            list(values.values()))
            _fault_point("commit")
            self.set("head", seq)
            self.set("max_seq", seq)
            self._set_all(meta)
        return seq

    def record_rejection(self, fact, layer: int | None, reason: str, norm: float | None, denominator: float | None,
                         meta: dict | None = None):
        with transaction(self.db):
            self._set_all(meta)
            self.db.execute(
                "INSERT INTO rejections (parent, fact_id, fact_hash, fact_json, layer, reason, update_norm, "
                "denominator, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (self.head, fact.id, fact.hash, json.dumps(fact.to_dict()), layer, reason, norm, denominator, _now()))

    def rejections(self) -> list[dict]:
        return [dict(row) for row in self.db.execute("SELECT * FROM rejections ORDER BY id")]

    def move_head(self, seq: int, meta: dict | None = None) -> None:
        """Make `seq` the head (0 = base); edits off its path are marked rolled back, not deleted."""
        if seq:
            self.edit(seq)  # exists?
        with transaction(self.db):
            self.set("head", seq)
            self._set_all(meta)
            self._mark_statuses()

    def _mark_statuses(self) -> None:
        on_path = set(self.chain())  # the seqs only: loading every edit's vectors here made rollbacks O(N) in blobs
        self.db.execute("UPDATE edits SET status = 'rolled_back'")
        if on_path:
            self.db.execute(f"UPDATE edits SET status = 'applied' WHERE seq IN ({','.join('?' * len(on_path))})",
                            sorted(on_path))

    def prune(self) -> int:
        """Delete edits that are not on the path to the head; returns how many."""
        with transaction(self.db):
            cursor = self.db.execute("DELETE FROM edits WHERE status = 'rolled_back'")
        return cursor.rowcount
