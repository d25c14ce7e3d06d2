"""The journal's schema: its migrations, the columns they make, and the schema check.

Schema changes are new migrations at the end of `MIGRATIONS`, never edits of old ones;
opening a journal for writing applies what is pending (romebatch/journal.py). Each
migration checks before it changes anything, so a half-upgraded file finishes upgrading.
docs/journal-schema.md is generated from these (docs/generate.py).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from . import integrity
from .errors import JournalDamagedError

# The journal layout this romebatch writes; a journal from a newer one is refused, not guessed at.
FORMAT = 3
# Meta keys naming the base model beyond `base_hash` (the down-projections an edit touches):
# every parameter's bytes and the tokenizer's behaviour (model.py). Journals and bundles
# written before them lack both and are checked on `base_hash` alone (opening.py).
IDENTITY_KEYS = ("weights_hash", "tokenizer_hash")
# Meta keys of repair passes (romebatch/repair.py): the plan of the pass in progress, the
# heads at which passes ended (both name seqs, so bundles map them), and the fact hash the
# next bounded pass starts its rotation at (copied as it is).
REPAIR_PLAN = "repair_plan"
REPAIR_MARKS = "repair_passes"
REPAIR_CURSOR = "repair_cursor"


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
    db.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (json.dumps(2),))  # the format it made
    integrity.hash_all_rows(db)


def m005_warning_column(db: sqlite3.Connection) -> None:
    """Why a regression check failed on an edit that `--on-regression warn` kept (NULL: none failed),
    written in the edit's own transaction so a warning is never lost or orphaned."""
    have = {row[1] for row in db.execute("PRAGMA table_info(edits)")}
    if "warning" not in have:
        db.execute("ALTER TABLE edits ADD COLUMN warning TEXT")


# Whether an edit is on the head's path follows from `parent` and meta `head`; m006 stops
# storing it (a stored copy had to be rewritten on every head move) and offers this view to
# SQL readers. UNION, not UNION ALL, so a damaged journal's parent cycle ends the recursion.
EDIT_STATUS_VIEW = """
        CREATE VIEW IF NOT EXISTS edit_status AS
        WITH RECURSIVE path(seq) AS (
            SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'head'
            UNION
            SELECT edits.parent FROM edits JOIN path ON edits.seq = path.seq WHERE edits.parent < edits.seq
        )
        SELECT seq, CASE WHEN seq IN (SELECT seq FROM path) THEN 'applied' ELSE 'rolled_back' END AS status
        FROM edits"""


def m006_derived_status(db: sqlite3.Connection) -> None:
    """`edits.status` is derived, not stored: the column goes, the `edit_status` view replaces it."""
    have = {row[1] for row in db.execute("PRAGMA table_info(edits)")}
    if "status" in have:
        db.execute("ALTER TABLE edits DROP COLUMN status")
    db.execute(EDIT_STATUS_VIEW)
    db.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (json.dumps(3),))  # the format it makes
    # Row hashes never covered `status`, so only meta's digest changes (the new 'format').
    db.execute(
        "INSERT OR REPLACE INTO meta VALUES (?, ?)", (integrity.META_DIGEST, json.dumps(integrity.meta_digest(db)))
    )


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    m001_initial,
    m002_probe_columns,
    m003_key_column,
    m004_row_hashes,
    m005_warning_column,
    m006_derived_status,
]
_KNOWN: dict[tuple[str, ...], dict[str, set[str]]] = {}


def known_columns() -> dict[str, set[str]]:
    """Every column a journal of this version may have, by table: what the migrations make
    after each step (run once on an in-memory database), so a new migration needs no second
    list and a journal a reader opens unmigrated (`status` before m006) is still known. A
    column outside this means a newer romebatch wrote the journal."""
    key = tuple(m.__name__ for m in MIGRATIONS)
    if key not in _KNOWN:
        db = sqlite3.connect(":memory:", isolation_level=None)
        db.row_factory = sqlite3.Row
        known: dict[str, set[str]] = {"edits": set(), "rejections": set()}
        for migration in MIGRATIONS:
            migration(db)
            for table, columns in known.items():
                columns.update(row[1] for row in db.execute(f"PRAGMA table_info({table})"))
        _KNOWN[key] = known
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
        with Transaction(db):
            migration(db)
            db.execute("INSERT INTO _migrations VALUES (?, ?)", (migration.__name__, now()))


class Transaction:
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


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_schema(db: sqlite3.Connection, where: Path, complete: bool = True) -> None:
    """Refuse a damaged journal, or one a newer romebatch wrote; `complete=False`: before migrating."""
    names = _tables(db)
    migrated = {row[0] for row in db.execute("SELECT name FROM _migrations")} if "_migrations" in names else set()
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
        extra = sorted({row[1] for row in db.execute(f"PRAGMA table_info({table})")} - columns)
        if extra:
            raise JournalDamagedError(
                f"{where}: written by a newer romebatch (unknown column {table}.{extra[0]})",
                hint="open it with the romebatch version that wrote it",
            )
    if "meta" not in names:
        return
    fmt = _format(db, where)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise JournalDamagedError(f"{where}: meta key 'format' is {fmt!r}, not a journal format number")
    if fmt > FORMAT:
        raise JournalDamagedError(
            f"{where}: journal format {fmt} is newer than this romebatch's ({FORMAT})",
            hint="open it with the romebatch version that wrote it",
        )


def _tables(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _format(db: sqlite3.Connection, where: Path) -> object:
    """meta's 'format' key (1 when absent: journals before m004 did not write it)."""
    return read_meta(db, "format", where, default=1)


def read_meta(db: sqlite3.Connection, key: str, where: Path, default=None):
    """meta[key], decoded; a value that is not JSON is damage, named with the file `where`."""
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    if row is None:
        return default
    try:
        return json.loads(row[0])
    except (TypeError, ValueError, RecursionError):
        raise JournalDamagedError(
            f"{where}: meta key {key!r} is not valid JSON",
            hint="run `romebatch check` to see all the damage",
        ) from None
