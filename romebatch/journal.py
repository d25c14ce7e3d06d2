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
import functools
import json
import os
import sqlite3
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import integrity
from .errors import JournalDamagedError, JournalLockedError, JournalWriteError, UserError, one_line

DB_NAME = "journal.sqlite"
LOCK_NAME = "lock"
# The journal layout this romebatch writes; a journal from a newer one is refused, not guessed at.
FORMAT = 2


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


def m004_row_hashes(db: sqlite3.Connection) -> None:
    """Tamper evidence (romebatch/integrity.py): a chained hash of every field of every row."""
    for table in ("edits", "rejections"):
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if "row_hash" not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN row_hash TEXT")
    db.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (json.dumps(FORMAT),))
    integrity.hash_all_rows(db)


def m005_warning_column(db: sqlite3.Connection) -> None:
    """Why a regression check failed on an edit that `--on-regression warn` kept (NULL: none failed),
    written in the edit's own transaction so a warning is never lost or orphaned."""
    have = {row[1] for row in db.execute("PRAGMA table_info(edits)")}
    if "warning" not in have:
        db.execute("ALTER TABLE edits ADD COLUMN warning TEXT")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    m001_initial,
    m002_probe_columns,
    m003_key_column,
    m004_row_hashes,
    m005_warning_column,
]
_KNOWN: dict[tuple[str, ...], dict[str, set[str]]] = {}


def known_columns() -> dict[str, set[str]]:
    """Every column a journal of this version may have, by table: what the migrations make
    (run once on an in-memory database), so a new migration needs no second list. A column
    outside this means a newer romebatch wrote the journal."""
    key = tuple(m.__name__ for m in MIGRATIONS)
    if key not in _KNOWN:
        db = sqlite3.connect(":memory:", isolation_level=None)
        db.row_factory = sqlite3.Row
        migrate(db)
        _KNOWN[key] = {
            table: {row[1] for row in db.execute(f"PRAGMA table_info({table})")} for table in ("edits", "rejections")
        }
        db.close()
    return _KNOWN[key]


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
        if exc_type is not None:
            self.db.execute("ROLLBACK")
            return False
        try:
            self.db.execute("COMMIT")
        except sqlite3.Error:
            # A COMMIT that fails (a full disk) leaves the transaction open: end it, unwritten.
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        return False


# Crash-test seam: tests install a callable here (tests/fault_cli.py) that may kill the process
# at a named point. Nothing in romebatch sets it, and no environment variable arms it.
FAULT_HOOK: Callable[[str], None] | None = None


def _fault_point(name: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(name)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def vector_blob(values) -> bytes:
    return np.ascontiguousarray(np.asarray(values, dtype="<f4")).tobytes()


def blob_vector(blob: bytes) -> np.ndarray:
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) % 4:
        raise ValueError("not a float32 vector")
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
    row_hash: str | None = None  # romebatch/integrity.py; set by commit_edit
    warning: str | None = None  # the failed regression checks of a kept edit (m005)

    @property
    def fact(self) -> dict:
        try:
            fact = json.loads(self.fact_json)
        except (TypeError, ValueError, RecursionError):
            fact = None
        if not isinstance(fact, dict) or not all(
            isinstance(fact.get(k), str) for k in ("subject", "prompt", "target_new")
        ):
            raise JournalDamagedError(
                f"journal edit {self.seq}: field fact_json is not a valid fact",
                hint="run `romebatch check` to see all the damage",
            )
        return fact


_EDIT_COLUMNS = [f for f in EditRecord.__dataclass_fields__]


def _record(row: sqlite3.Row, where: object = "journal") -> EditRecord:
    values = dict(row)
    for column in ("lam", "u", "k_star"):
        if values.get(column) is None and column == "k_star":
            continue
        try:
            values[column] = blob_vector(values[column])
        except ValueError:
            raise JournalDamagedError(
                f"{where}: edit {values.get('seq')}: column {column} is not a float32 vector",
                hint="run `romebatch check` to see all the damage",
            ) from None
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
        self.db = None
        db_path = self.directory / DB_NAME
        _check_location(self.directory, db_path, create)
        if not db_path.exists():
            if not write:
                raise UserError(f"no journal at {self.directory}")
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise UserError(f"cannot create journal folder {self.directory} ({error.strerror or error})") from None
        if write:
            self._lock()
        try:
            self.db = _connect(db_path, write)
        except sqlite3.Error as error:
            self._unlock()
            raise UserError(f"{db_path}: cannot open the journal ({error})") from None
        self.db.row_factory = sqlite3.Row
        try:
            if write:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")  # a committed edit survives a power cut
                self._check_schema(complete=False)  # before migrating: never rewrite a newer romebatch's journal
                migrate(self.db)
            self._check_schema()
        except sqlite3.OperationalError as error:
            self.close()
            if "full" in str(error) or "I/O" in str(error):
                raise UserError(
                    f"{db_path}: cannot update the journal ({error}); nothing was changed",
                    hint="free some space and run the same command again",
                ) from None
            raise UserError(f"{db_path}: not a romebatch journal or damaged ({error})") from None
        except sqlite3.DatabaseError as error:
            self.close()
            raise UserError(f"{db_path}: not a romebatch journal or damaged ({error})") from None
        except BaseException:
            self.close()
            raise

    def _tables(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    def _check_schema(self, complete: bool = True) -> None:
        """Refuse a damaged journal, or one a newer romebatch wrote; `complete=False`: before migrating."""
        where = self.directory / DB_NAME
        names = self._tables()
        migrated = (
            {row[0] for row in self.db.execute("SELECT name FROM _migrations")} if "_migrations" in names else set()
        )
        for table in ("meta", "edits", "rejections"):
            if table not in names and (complete or "m001_initial" in migrated):
                raise JournalDamagedError(f"{where}: not a romebatch journal or damaged (no {table} table)")
        known = {m.__name__ for m in MIGRATIONS}
        if migrated:
            unknown = sorted(migrated - known)
            if unknown:
                raise JournalDamagedError(
                    f"{where}: written by a newer romebatch (unknown migration {unknown[0]})",
                    hint="open it with the romebatch version that wrote it",
                )
        for table, columns in known_columns().items():
            extra = sorted({row[1] for row in self.db.execute(f"PRAGMA table_info({table})")} - columns)
            if extra:
                raise JournalDamagedError(
                    f"{where}: written by a newer romebatch (unknown column {table}.{extra[0]})",
                    hint="open it with the romebatch version that wrote it",
                )
        if "meta" not in names:
            return
        fmt = self.get("format", 1)
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
            raise JournalDamagedError(f"{where}: meta key 'format' is {fmt!r}, not a journal format number")
        if fmt > FORMAT:
            raise JournalDamagedError(
                f"{where}: journal format {fmt} is newer than this romebatch's ({FORMAT})",
                hint="open it with the romebatch version that wrote it",
            )

    # -- locking -----------------------------------------------------------------------
    def _lock(self) -> None:
        path = self.directory / LOCK_NAME
        try:
            handle = open(path, "a+")
        except OSError as error:
            raise UserError(
                f"cannot take the write lock {path} ({error.strerror or error})",
                hint="the journal must be writable for this command",
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = one_line(handle.read(200).strip()) or "another process"
            handle.close()
            raise JournalLockedError(
                f"journal {self.directory} is in use by {holder}",
                hint="wait for it to finish; `romebatch log` reads the journal meanwhile",
            ) from None
        # The kernel releases a flock when its holder dies, so a stale lock cannot block anyone.
        # The pid written is only for the message another writer gets: a full disk may keep
        # it from being written, which must not stop this writer.
        try:
            os.ftruncate(handle.fileno(), 0)
            os.pwrite(handle.fileno(), f"pid {os.getpid()}".encode(), 0)  # unbuffered: nothing left to flush
        except OSError:
            pass
        self._lock_file = handle

    def _unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            try:
                self._lock_file.close()
            except OSError:
                pass
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
        if row is None:
            return default
        try:
            return json.loads(row[0])
        except (TypeError, ValueError, RecursionError):
            raise JournalDamagedError(
                f"{self.directory / DB_NAME}: meta key {key!r} is not valid JSON",
                hint="run `romebatch check` to see all the damage",
            ) from None

    def set(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def set_many(self, values: dict) -> None:
        with self._transaction():
            self._set_all(values)

    def _transaction(self) -> _Sealed:
        """A write transaction that re-seals the meta digest before it commits."""
        return _Sealed(self.db)

    def _set_all(self, values: dict | None) -> None:
        """Set each key, inside the caller's transaction."""
        for key, value in (values or {}).items():
            self.set(key, value)

    @property
    def initialised(self) -> bool:
        return self.get("base_hash") is not None

    @property
    def head(self) -> int:
        head = self.get("head", 0)
        if not isinstance(head, int) or isinstance(head, bool) or head < 0:
            raise JournalDamagedError(
                f"{self.directory / DB_NAME}: meta key 'head' is {head!r}, not an edit number",
                hint="run `romebatch check` to see all the damage",
            )
        return head

    # -- edits -------------------------------------------------------------------------
    def edit(self, seq: int) -> EditRecord:
        row = self.db.execute("SELECT * FROM edits WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            raise UserError(f"journal {self.directory} has no edit {seq}")
        return _record(row, self.directory)

    def edits(self) -> list[EditRecord]:
        return [_record(row, self.directory) for row in self.db.execute("SELECT * FROM edits ORDER BY seq")]

    def chain(self, head: int | None = None) -> list[int]:
        """The seqs of the edits that make state `head`, oldest first, without their vectors."""
        head = self.head if head is None else head
        parents = dict(self.db.execute("SELECT seq, parent FROM edits").fetchall())
        chain = []
        seq = head
        while seq:
            if seq not in parents:
                raise JournalDamagedError(
                    f"journal {self.directory}: edit {seq} is missing (the journal is damaged)",
                    hint="run `romebatch check` to see all the damage",
                )
            parent = parents[seq]
            # An edit is always computed on an earlier state, so parents only go down: this
            # also ends a damaged journal's parent cycle instead of looping on it.
            if not isinstance(parent, int) or not 0 <= parent < seq:
                raise JournalDamagedError(
                    f"journal {self.directory}: edit {seq} has parent {parent!r}, not an "
                    f"earlier edit (the journal is damaged)",
                    hint="run `romebatch check` to see all the damage",
                )
            chain.append(seq)
            seq = parent
        chain.reverse()
        return chain

    def path(self, head: int | None = None) -> list[EditRecord]:
        """The edits that make state `head`, oldest first (follows parent links)."""
        chain = self.chain(head)
        if not chain:
            return []
        rows = {}
        for start in range(0, len(chain), 500):  # SQLite caps the parameters of one statement
            part = chain[start : start + 500]
            rows.update(
                {
                    row["seq"]: _record(row, self.directory)
                    for row in self.db.execute(f"SELECT * FROM edits WHERE seq IN ({','.join('?' * len(part))})", part)
                }
            )
        return [rows[seq] for seq in chain]

    def path_facts(self, head: int | None = None) -> list[tuple[int, str]]:
        """(seq, fact hash) of the edits that make state `head`, oldest first: cheap, no vectors."""
        chain = self.chain(head)
        hashes = dict(self.db.execute("SELECT seq, fact_hash FROM edits").fetchall())
        return [(seq, hashes[seq]) for seq in chain]

    def child(self, parent: int, fact_hash: str) -> EditRecord | None:
        """An existing edit of this fact computed on `parent` (e.g. rolled back earlier), if any."""
        row = self.db.execute(
            "SELECT * FROM edits WHERE parent = ? AND fact_hash = ? ORDER BY seq LIMIT 1", (parent, fact_hash)
        ).fetchone()
        return _record(row, self.directory) if row else None

    def applied_summaries(self) -> list[dict]:
        """Applied edits without their vectors, oldest first: cheap enough to read after every edit."""
        return [
            dict(row)
            for row in self.db.execute(
                "SELECT seq, fact_json, update_norm, p_new_after, p_true_after FROM edits WHERE status = 'applied' ORDER BY seq"
            )
        ]

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
        with self._transaction():
            if self.head != record.parent:
                raise RuntimeError("the journal's head moved under this writer")
            # Sequence numbers are never reused, even after --prune deleted the highest ones:
            # rejections and exported provenance refer to them.
            (highest,) = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM edits").fetchone()
            seq = max(int(highest), int(self.get("max_seq", 0))) + 1
            values = {"seq": seq, **values}
            values["row_hash"] = integrity.row_hash(values, self._row_hash(record.parent))
            self.db.execute(
                f"INSERT INTO edits ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                list(values.values()),
            )
            _fault_point("commit")
            self.set("head", seq)
            self.set("max_seq", seq)
            self.set(
                integrity.EDITS_DIGEST,
                integrity.extend_digest(self.get(integrity.EDITS_DIGEST, ""), seq, values["row_hash"]),
            )
            self._set_all(meta)
        return seq

    def _row_hash(self, seq: int) -> str:
        if not seq:
            return ""
        row = self.db.execute("SELECT row_hash FROM edits WHERE seq = ?", (seq,)).fetchone()
        return row[0] if row and row[0] else ""

    def record_rejection(
        self,
        fact,
        layer: int | None,
        reason: str,
        norm: float | None,
        denominator: float | None,
        meta: dict | None = None,
    ):
        with self._transaction():
            self._set_all(meta)
            (highest,) = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM rejections").fetchone()
            values = {
                "id": int(highest) + 1,
                "parent": self.head,
                "fact_id": fact.id,
                "fact_hash": fact.hash,
                "fact_json": json.dumps(fact.to_dict()),
                "layer": layer,
                "reason": reason,
                "update_norm": norm,
                "denominator": denominator,
                "created_at": _now(),
            }
            values["row_hash"] = integrity.row_hash(values)
            self.db.execute(
                f"INSERT INTO rejections ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                list(values.values()),
            )
            self.set(
                integrity.REJECTIONS_DIGEST,
                integrity.extend_digest(self.get(integrity.REJECTIONS_DIGEST, ""), values["id"], values["row_hash"]),
            )

    def rejections(self) -> list[dict]:
        return [dict(row) for row in self.db.execute("SELECT * FROM rejections ORDER BY id")]

    def move_head(self, seq: int, meta: dict | None = None) -> None:
        """Make `seq` the head (0 = base); edits off its path are marked rolled back, not deleted."""
        if seq:
            self.edit(seq)  # exists?
        with self._transaction():
            self.set("head", seq)
            self._set_all(meta)
            self._mark_statuses()

    def _mark_statuses(self) -> None:
        on_path = set(self.chain())  # the seqs only: loading every edit's vectors here made rollbacks O(N) in blobs
        self.db.execute("UPDATE edits SET status = 'rolled_back'")
        if on_path:
            self.db.execute(
                f"UPDATE edits SET status = 'applied' WHERE seq IN ({','.join('?' * len(on_path))})", sorted(on_path)
            )

    def prune(self) -> int:
        """Delete edits that are not on the path to the head; returns how many."""
        with self._transaction():
            cursor = self.db.execute("DELETE FROM edits WHERE status = 'rolled_back'")
            self.set(integrity.EDITS_DIGEST, integrity.table_digest(self.db, "edits", "seq"))
        return cursor.rowcount

    # -- edits made elsewhere (romebatch/bundle_file.py) ----------------------------------------
    def columns(self, table: str) -> list[str]:
        return [row[1] for row in self.db.execute(f"PRAGMA table_info({table})")]

    def next_seq(self) -> int:
        """The seq the next edit gets: seqs are never reused, even after --prune deleted the highest."""
        (highest,) = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM edits").fetchone()
        return max(int(highest), int(self.get("max_seq", 0))) + 1

    def append_rows(self, edits: list[dict], rejections: list[dict], meta: dict | None, *, parent: int) -> None:
        """Append edits and rejections made elsewhere, and set `meta`, in one transaction.

        Each row maps a column to its SQL value; edit rows come numbered (`seq`, `parent`:
        each on the one before, the first on `parent`) and are checked here only for
        that: the caller (a bundle) has verified their weight hashes. The head moves to the
        last edit. If the head is no longer `parent`, nothing is written.
        """
        known = {"edits": set(self.columns("edits")), "rejections": set(self.columns("rejections"))}
        expected = parent
        for row in edits:
            if row.get("parent") != expected or not row.get("seq", 0) > max(expected, 0):
                raise RuntimeError("appended edits must follow each other from the head")
            expected = row["seq"]
        with self._transaction():
            if self.head != parent:
                raise RuntimeError("the journal's head moved under this writer")
            if edits and edits[0]["seq"] < self.next_seq():
                raise RuntimeError("appended edits must have seqs above every seq the journal has used")
            previous_hash = self._row_hash(parent)
            (next_id,) = self.db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM rejections").fetchone()
            for table, rows in (("edits", edits), ("rejections", rejections)):
                for values in rows:
                    unknown = set(values) - known[table]
                    if unknown:  # column names go into SQL: only the table's own
                        raise RuntimeError(f"no column {sorted(unknown)[0]!r} in table {table}")
                    # Hashes are this journal's own: recomputed over the row as it is stored here.
                    values = {k: v for k, v in values.items() if k != "row_hash"}
                    if table == "edits":
                        values["row_hash"] = previous_hash = integrity.row_hash(values, previous_hash)
                        digest_key, key = integrity.EDITS_DIGEST, values["seq"]
                    else:
                        values["id"], next_id = next_id, next_id + 1  # ids in this journal's order
                        values["row_hash"] = integrity.row_hash(values)
                        digest_key, key = integrity.REJECTIONS_DIGEST, values["id"]
                    self.db.execute(
                        f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                        list(values.values()),
                    )
                    self.set(digest_key, integrity.extend_digest(self.get(digest_key, ""), key, values["row_hash"]))
            _fault_point("append")
            if edits:
                self.set("head", edits[-1]["seq"])
                self.set("max_seq", edits[-1]["seq"])
            self._set_all(meta)


class _Sealed(transaction):
    """A journal write: re-seals the meta digest last, so out-of-band meta edits show, and
    turns a full disk or an I/O error into a JournalWriteError (nothing of the write is kept)."""

    def __enter__(self):
        try:
            return super().__enter__()
        except sqlite3.OperationalError as error:
            raise _write_error(self.db, error) from None

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.db.execute(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    (integrity.META_DIGEST, json.dumps(integrity.meta_digest(self.db))),
                )
            except BaseException as error:
                self.db.execute("ROLLBACK")
                if isinstance(error, sqlite3.OperationalError):
                    raise _write_error(self.db, error) from None
                raise
        try:
            super().__exit__(exc_type, exc, tb)
        except sqlite3.OperationalError as error:
            raise _write_error(self.db, error) from None
        if isinstance(exc, sqlite3.OperationalError):
            raise _write_error(self.db, exc) from None
        return False


def _write_error(db: sqlite3.Connection, error: sqlite3.Error) -> JournalWriteError:
    path = next((row[2] for row in db.execute("PRAGMA database_list") if row[1] == "main"), "the journal")
    return JournalWriteError(
        f"could not write to journal {path} ({error}); nothing of this change was written",
        hint="free some space and run the same command again: it resumes",
    )


def reads_journal(function):
    """Make SQLite's own errors from a damaged file one-line UserErrors (for the API's functions)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except sqlite3.DatabaseError as error:
            if "full" in str(error) or "I/O" in str(error):
                raise JournalWriteError(
                    f"could not write to the journal ({error})", hint="free some space and run the same command again"
                ) from None
            raise JournalDamagedError(
                f"the journal file is damaged or unreadable ({error})",
                hint="run `romebatch check` to see all the damage",
            ) from None

    return wrapper


def _check_location(directory: Path, db_path: Path, create: bool) -> None:
    """Refuse, in one line, journal paths that are files, dangling links or missing (when not creating)."""
    if directory.is_symlink() and not directory.exists():
        raise UserError(f"journal {directory} is a symbolic link to nothing ({os.readlink(directory)})")
    if directory.exists() and not directory.is_dir():
        raise UserError(f"journal {directory} is a file, not a journal folder")
    if db_path.is_symlink() and not db_path.exists():
        raise UserError(f"journal {directory}: {DB_NAME} is a symbolic link to nothing")
    if db_path.exists() and not db_path.is_file():
        raise UserError(f"journal {directory}: {DB_NAME} is not a regular file")
    if not db_path.exists() and not create:
        raise UserError(f"no journal at {directory}", hint="run `romebatch apply MANIFEST --journal DIR` first")


def _connect(db_path: Path, write: bool) -> sqlite3.Connection:
    """Writers open read-write; readers open read-only, so a journal on read-only media still reads."""
    if write:
        return sqlite3.connect(str(db_path), isolation_level=None, timeout=30)
    uri = "file:" + urllib.parse.quote(str(db_path.resolve()))
    writable = os.access(db_path.parent, os.W_OK) and os.access(db_path, os.W_OK) and not _read_only_mount(db_path)
    wal = db_path.with_name(db_path.name + "-wal")
    if not writable and not (wal.exists() and wal.stat().st_size):
        # Nothing can change a file on read-only media, and no shared-memory file can be made
        # beside it: immutable mode reads it without one.
        return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, isolation_level=None, timeout=30)
    return sqlite3.connect(uri + "?mode=ro", uri=True, isolation_level=None, timeout=30)


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
