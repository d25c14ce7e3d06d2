"""The journal: an append-only SQLite log of rank-one edits, the source of truth.

The base model on disk is never modified. State N is `base + edits on the path to N`,
rebuilt by replay; `rollback` moves the head; `export` materialises the head. Edits form a
tree: each records the head it was computed on (`parent`), so rolling back and then
applying new facts never invalidates what a stored edit means, and moving the head back
to an old branch is exact too.

One edit is one SQLite transaction (WAL, synchronous=FULL): a crash leaves either the
whole edit or none of it. Vectors are float32 blobs; metrics are columns, so the journal
can be queried directly (`polars.read_database`).

This file holds the connection, the write lock and every write; the read queries are in
journal_reads.py, the rows' Python shape in journal_records.py, the migrations and the
schema check in journal_schema.py.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import sqlite3
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from . import integrity
from .errors import JournalDamagedError, JournalLockedError, JournalWriteError, UserError, one_line
from .journal_reads import JournalReads
from .journal_records import EDIT_COLUMNS, EditRecord, chunks, placeholders, vector_blob
from .journal_schema import Transaction, check_schema, migrate, now

DB_NAME = "journal.sqlite"
LOCK_NAME = "lock"

# Crash-test seam: tests install a callable here (tests/fault_cli.py) that may kill the process
# at a named point. Nothing in romebatch sets it, and no environment variable arms it.
FAULT_HOOK: Callable[[str], None] | None = None


def _fault_point(name: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(name)


class Journal(JournalReads):
    """A journal directory: `journal.sqlite` plus a `lock` file held by the one writer.

    `Journal(dir, write=True)` creates the directory if needed and takes the write lock at
    once (a second writer is refused, naming the holder); readers take no lock and read a
    consistent snapshot thanks to WAL. Reads are inherited from `JournalReads`.
    """

    def __init__(self, directory: str | Path, *, write: bool = False, create: bool = False):
        self.directory = Path(directory)
        self.db_path = db_path = self.directory / DB_NAME
        self.write = write
        self._lock_file = None
        self.db = None  # type: ignore[assignment]  # typed as open (JournalReads); None until then, and once closed
        self.created = False  # this object made journal.sqlite (`discard_if_new` may remove it again)
        self._made: list[Path] = []  # the folders it made, innermost first
        _check_location(self.directory, db_path, create)
        if not db_path.exists():
            if not write:
                raise UserError(f"no journal at {self.directory}")
            missing = [p for p in (self.directory, *self.directory.parents) if not p.exists()]
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise UserError(f"cannot create journal folder {self.directory} ({error.strerror or error})") from None
            self._made = missing
        if write:
            self._lock_file = _take_lock(self.directory)
            self.created = not db_path.exists()  # under the lock: no other writer can make it meanwhile
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
                # Checked before migrating too: never rewrite a newer romebatch's journal.
                check_schema(self.db, db_path, complete=False)
                migrate(self.db)
            check_schema(self.db, db_path)
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

    # -- locking -----------------------------------------------------------------------
    def _unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            try:
                self._lock_file.close()
            except OSError:
                pass
            self._lock_file = None

    def discard_if_new(self) -> None:
        """Remove the journal if this object created it and nothing was committed to it: a run
        that fails while setting up leaves no empty journal behind. An existing journal, or one
        holding any edit or rejection, is never touched."""
        if not self.created or self.db is None:
            return
        try:
            if any(self.db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() for table in ("edits", "rejections")):
                return
        except sqlite3.Error:
            return
        self.db.close()
        self.db = None  # type: ignore[assignment]  # closed: see __init__
        try:
            for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", LOCK_NAME):
                (self.directory / name).unlink(missing_ok=True)
            for folder in self._made:  # innermost first; a folder something else was put in stays
                folder.rmdir()
        except OSError:
            pass
        finally:
            self.created = False
            self._unlock()

    def close(self) -> None:
        if getattr(self, "db", None) is not None:
            self.db.close()
            self.db = None  # type: ignore[assignment]  # closed: see __init__
        self._unlock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- meta --------------------------------------------------------------------------
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

    # -- writes ------------------------------------------------------------------------
    def commit_edit(self, record: EditRecord, meta: dict | None = None) -> int:
        """Write one edit and move the head to it, in one transaction; returns its seq.

        `meta` keys are set in the same transaction (a repair pass's progress, say).
        """
        values = {c: getattr(record, c) for c in EDIT_COLUMNS if c != "seq"}
        values["lam"] = vector_blob(record.lam)
        values["u"] = vector_blob(record.u)
        values["k_star"] = vector_blob(record.k_star) if record.k_star is not None else None
        values["created_at"] = values["created_at"] or now()
        _edit_number(record.parent, "parent")
        with self._transaction():
            if self.head != record.parent:
                raise RuntimeError("the journal's head moved under this writer")
            # Sequence numbers are never reused, even after --prune deleted the highest ones:
            # rejections and exported provenance refer to them.
            seq = self.next_seq()
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
                "created_at": now(),
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

    def move_head(self, seq: int, meta: dict | None = None) -> None:
        """Make `seq` the head (0 = base); edits off its path stay, rolled back (derived from the path)."""
        _edit_number(seq, "head")
        if seq:
            self.edit(seq)  # exists?
        with self._transaction():
            self.set("head", seq)
            self._set_all(meta)

    def prune(self) -> int:
        """Delete edits that are not on the path to the head; returns how many."""
        with self._transaction():
            off_path = sorted(set(self.all_seqs()) - set(self.chain()))
            for part in chunks(off_path):
                self.db.execute(f"DELETE FROM edits WHERE seq IN ({placeholders(part)})", part)
            self.set(integrity.EDITS_DIGEST, integrity.table_digest(self.db, "edits", "seq"))
        return len(off_path)

    def append_rows(self, edits: list[dict], rejections: list[dict], meta: dict | None, *, parent: int) -> None:
        """Append edits and rejections made elsewhere, and set `meta`, in one transaction.

        Each row maps a column to its SQL value; edit rows come numbered (`seq`, `parent`:
        each on the one before, the first on `parent`) and are checked here only for
        that: the caller (a bundle) has verified their weight hashes. The head moves to the
        last edit. If the head is no longer `parent`, nothing is written.
        """
        known = {"edits": set(self.columns("edits")), "rejections": set(self.columns("rejections"))}
        _edit_number(parent, "parent")
        for row in edits:
            _edit_number(row.get("seq"), "seq")
            _edit_number(row.get("parent"), "parent")
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


def _edit_number(value, what: str) -> None:
    """Only ints are ever written as a seq, parent or head: 1.0 or True would be stored as such
    and make the journal unreadable (its head would no longer be an edit number)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"{what} {value!r}: not an edit number (a whole number, 0 or more)")


class _Sealed(Transaction):
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


def check_new_location(directory: str | Path) -> None:
    """Refuse, without creating anything, a journal path that a writing run could not use
    (`apply --dry-run` says what a run would do, so it refuses what the run would refuse)."""
    directory = Path(directory)
    _check_location(directory, directory / DB_NAME, create=True)
    ancestor = directory.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        if ancestor.is_symlink():
            raise UserError(f"cannot create journal folder {directory} ({ancestor} is a symbolic link to nothing)")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot create journal folder {directory} ({ancestor} is not a folder)")


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


def _take_lock(directory: Path):
    """Take the write lock of `directory` (refused, naming the holder, if another writer has it)."""
    path = directory / LOCK_NAME
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
            f"journal {directory} is in use by {holder}",
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
    return handle
