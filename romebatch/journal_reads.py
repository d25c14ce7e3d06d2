"""The journal's read queries: meta, the edit tree, and the facts it settles.

`JournalReads` is the half of `Journal` (romebatch/journal.py) that only reads: it needs
the open connection `db`, the folder `directory` and the file `db_path`, and nothing here
writes.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .errors import JournalDamagedError, UserError
from .journal_records import EditRecord, chunks, placeholders, record_from_row
from .journal_schema import read_meta


def _fits_sqlite(number: int) -> bool:
    return -(2**63) <= number < 2**63


class JournalReads:
    db: sqlite3.Connection
    directory: Path
    db_path: Path

    # -- meta --------------------------------------------------------------------------
    def get(self, key: str, default=None):
        return read_meta(self.db, key, self.db_path, default)

    @property
    def initialised(self) -> bool:
        return self.get("base_hash") is not None

    @property
    def head(self) -> int:
        head = self.get("head", 0)
        if not isinstance(head, int) or isinstance(head, bool) or head < 0:
            raise JournalDamagedError(
                f"{self.db_path}: meta key 'head' is {head!r}, not an edit number",
                hint="run `romebatch check` to see all the damage",
            )
        return head

    def edit(self, seq: int) -> EditRecord:
        # A number past SQLite's 64-bit integers names no edit; SQLite would raise OverflowError.
        row = self.db.execute("SELECT * FROM edits WHERE seq = ?", (seq,)).fetchone() if _fits_sqlite(seq) else None
        if row is None:
            raise UserError(f"journal {self.directory} has no edit {seq}")
        return record_from_row(row, self.directory)

    def edits(self) -> list[EditRecord]:
        return [record_from_row(row, self.directory) for row in self.db.execute("SELECT * FROM edits ORDER BY seq")]

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

    def lineage(self, head: int | None = None) -> list[EditRecord]:
        """The edits that make state `head`, oldest first (follows parent links)."""
        chain = self.chain(head)
        if not chain:
            return []
        rows = {}
        for part in chunks(chain):
            query = f"SELECT * FROM edits WHERE seq IN ({placeholders(part)})"
            rows.update({row["seq"]: record_from_row(row, self.directory) for row in self.db.execute(query, part)})
        return [rows[seq] for seq in chain]

    def lineage_facts(self, head: int | None = None) -> list[tuple[int, str]]:
        """(seq, fact hash) of the edits that make state `head`, oldest first: cheap, no vectors."""
        chain = self.chain(head)
        hashes = dict(self.db.execute("SELECT seq, fact_hash FROM edits").fetchall())
        return [(seq, hashes[seq]) for seq in chain]

    def child(self, parent: int, fact_hash: str) -> EditRecord | None:
        """An existing edit of this fact computed on `parent` (e.g. rolled back earlier), if any."""
        row = self.db.execute(
            "SELECT * FROM edits WHERE parent = ? AND fact_hash = ? ORDER BY seq LIMIT 1", (parent, fact_hash)
        ).fetchone()
        return record_from_row(row, self.directory) if row else None

    def all_seqs(self) -> list[int]:
        return [row[0] for row in self.db.execute("SELECT seq FROM edits ORDER BY seq")]

    def status(self, head: int | None = None) -> dict[int, str]:
        """Every edit's status, derived from the tree: 'applied' on the path to `head`, else
        'rolled_back' (SQL readers get the same from the `edit_status` view)."""
        on_path = set(self.chain(head))
        return {seq: "applied" if seq in on_path else "rolled_back" for seq in self.all_seqs()}

    def applied_summaries(self) -> list[dict]:
        """Applied edits without their vectors, oldest first: cheap enough to read after every edit."""
        chain = self.chain()
        rows: dict[int, dict] = {}
        for part in chunks(chain):
            query = (
                "SELECT seq, fact_json, update_norm, p_new_after, p_true_after FROM edits "
                f"WHERE seq IN ({placeholders(part)})"
            )
            rows.update({row[0]: dict(row) for row in self.db.execute(query, part)})
        return [rows[seq] for seq in sorted(chain)]

    def applied_hashes(self) -> set[str]:
        """The facts of the edits on the head's path."""
        return {fact_hash for _, fact_hash in self.lineage_facts()}

    def rolled_back_hashes(self) -> set[str]:
        """The facts of the edits off the head's path."""
        on_path = set(self.chain())
        return {h for seq, h in self.db.execute("SELECT seq, fact_hash FROM edits") if seq not in on_path}

    def rejected_hashes(self) -> set[str]:
        path = {0} | set(self.chain())
        return {h for h, parent in self.db.execute("SELECT fact_hash, parent FROM rejections") if parent in path}

    def settled_hashes(self) -> set[str]:
        """Facts a re-run skips: applied on the head's path, or rejected on a state on it."""
        return self.applied_hashes() | self.rejected_hashes()

    def rejections(self) -> list[dict]:
        return [dict(row) for row in self.db.execute("SELECT * FROM rejections ORDER BY id")]

    def _row_hash(self, seq: int) -> str:
        if not seq:
            return ""
        row = self.db.execute("SELECT row_hash FROM edits WHERE seq = ?", (seq,)).fetchone()
        return row[0] if row and row[0] else ""

    def columns(self, table: str) -> list[str]:
        return [row[1] for row in self.db.execute(f"PRAGMA table_info({table})")]

    def next_seq(self) -> int:
        """The seq the next edit gets: seqs are never reused, even after --prune deleted the highest."""
        (highest,) = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM edits").fetchone()
        return max(int(highest), int(self.get("max_seq", 0))) + 1
