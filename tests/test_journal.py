"""The journal (schema, edit tree, lock) and the Editor's byte-exact replay / rollback / export.

Synthetic EditRecords test the SQLite layer; a tiny GPT-2 (3 layers, 32 wide) tests the
Editor end to end. A LoadedModel is never shared between Editors: an Editor edits it in place.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_HPARAMS, tiny_loaded

from romebatch import api
from romebatch.editor import Editor
from romebatch.errors import BaseModelMismatchError, JournalLockedError, UserError
from romebatch.hparams import HParams
from romebatch.journal import DB_NAME, LOCK_NAME, Journal
from romebatch.journal_records import EditRecord
from romebatch.journal_schema import migrate
from romebatch.manifest import Fact
from romebatch.model import tokenizer_hash, weight_hash

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- synthetic records
EXPECTED_SCHEMA = {
    "meta": ["key", "value"],
    "edits": [
        "seq",
        "parent",
        "fact_id",
        "fact_hash",
        "fact_json",
        "layer",
        "weight_name",
        "lam",
        "u",
        "update_norm",
        "denominator",
        "weight_hash_before",
        "weight_hash_after",
        "v_steps",
        "v_loss",
        "p_new_before",
        "p_true_before",
        "p_new_after",
        "p_true_after",
        "seconds_key",
        "seconds_value",
        "seconds_total",
        "created_at",
        # m002_probe_columns
        "neighborhood_drop",
        "probe_regression",
        "retention",
        "seconds_probes",
        # m003_key_column
        "k_star",
        # m004_row_hashes
        "row_hash",
        # m005_warning_column
        "warning",
    ],
    "rejections": [
        "id",
        "parent",
        "fact_id",
        "fact_hash",
        "fact_json",
        "layer",
        "reason",
        "update_norm",
        "denominator",
        "created_at",
        "row_hash",
    ],
    "_migrations": ["name", "applied_at"],
}


MIGRATION_NAMES = [
    "m001_initial",
    "m002_probe_columns",
    "m003_key_column",
    "m004_row_hashes",
    "m005_warning_column",
    "m006_derived_status",
]


def columns(db: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


def tables(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def synthetic(parent: int, n: int, d_model: int = 4, d_ff: int = 8) -> EditRecord:
    rng = np.random.default_rng(n)
    lam = rng.normal(size=d_model).astype(np.float32)
    u = rng.normal(size=d_ff).astype(np.float32)
    fact = {"id": f"f{n}", "subject": f"S{n}", "prompt": "{} is in", "target_new": f"T{n}"}
    return EditRecord(
        seq=0,
        parent=parent,
        fact_id=f"f{n}",
        fact_hash=f"sha256:fact{n}",
        fact_json=json.dumps(fact),
        layer=1,
        weight_name="transformer.h.1.mlp.c_proj",
        lam=lam,
        u=u,
        update_norm=float(np.linalg.norm(lam) * np.linalg.norm(u)),
        denominator=0.5 + n,
        weight_hash_before=f"sha256:before{n}",
        weight_hash_after=f"sha256:after{n}",
        v_steps=n,
        v_loss=0.1 * n,
    )


def statuses(journal: Journal) -> dict[int, str]:
    """Each edit's status, derived twice: in Python from the tree, and by the SQL view."""
    derived = journal.status()
    assert dict(journal.db.execute("SELECT seq, status FROM edit_status").fetchall()) == derived
    return derived


def test_blank_journal_reaches_the_schema(tmp_path):
    directory = tmp_path / "nested" / "J"
    with Journal(directory, write=True, create=True) as journal:
        db = journal.db
        assert {name: columns(db, name) for name in EXPECTED_SCHEMA} == EXPECTED_SCHEMA
        assert tables(db) == set(EXPECTED_SCHEMA)
        assert [row[0] for row in db.execute("SELECT name FROM _migrations")] == MIGRATION_NAMES
        indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "edits_fact_hash" in indexes
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert journal.head == 0 and journal.edits() == [] and journal.lineage() == []
        assert not journal.initialised
    # The record dataclass and the table agree (rows are rebuilt with EditRecord(**row)).
    assert list(EditRecord.__dataclass_fields__) == EXPECTED_SCHEMA["edits"]
    # Opening again applies nothing twice.
    with Journal(directory, write=True) as journal:
        assert journal.db.execute("SELECT count(*) FROM _migrations").fetchone()[0] == len(MIGRATION_NAMES)


def test_migrate_stop_before_and_pending_migrations(tmp_path):
    directory = tmp_path / "J"
    directory.mkdir()
    db = sqlite3.connect(str(directory / DB_NAME), isolation_level=None)
    migrate(db, stop_before="m001_initial")
    assert "edits" not in tables(db)
    assert db.execute("SELECT count(*) FROM _migrations").fetchone()[0] == 0
    db.close()
    # A reader refuses a database that is not (yet) a journal, without changing it.
    with pytest.raises(UserError, match="no meta table"):
        Journal(directory)
    db = sqlite3.connect(str(directory / DB_NAME))
    assert "edits" not in tables(db)
    db.close()
    # A writer applies the pending migration.
    with Journal(directory, write=True) as journal:
        assert {name: columns(journal.db, name) for name in EXPECTED_SCHEMA} == EXPECTED_SCHEMA
        assert [row[0] for row in journal.db.execute("SELECT name FROM _migrations")] == MIGRATION_NAMES


def test_an_m001_journal_with_edits_upgrades_and_still_rolls_back(tmp_path):
    """A journal written before m002 (old shape, with rows) opens, keeps its edits, and moves its head."""
    directory = tmp_path / "J"
    directory.mkdir()
    db = sqlite3.connect(str(directory / DB_NAME), isolation_level=None)
    migrate(db, stop_before="m002_probe_columns")
    assert "neighborhood_drop" not in columns(db, "edits")
    old_columns = [c for c in columns(db, "edits") if c != "seq"]
    for n, parent in ((1, 0), (2, 1)):
        rec = synthetic(parent, n)
        values = {c: getattr(rec, c, None) for c in old_columns}
        values.update(lam=rec.lam.astype("<f4").tobytes(), u=rec.u.astype("<f4").tobytes(), created_at="2025-01-01")
        values["status"] = "applied"  # stored by journals before m006
        db.execute(
            f"INSERT INTO edits ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})", list(values.values())
        )
    db.execute("INSERT INTO meta VALUES ('head', '2')")
    db.close()

    with Journal(directory, write=True) as journal:
        assert [row[0] for row in journal.db.execute("SELECT name FROM _migrations")] == MIGRATION_NAMES
        assert columns(journal.db, "edits") == EXPECTED_SCHEMA["edits"]
        first = journal.edit(1)
        assert first.lam.tobytes() == synthetic(0, 1).lam.tobytes()
        assert first.neighborhood_drop is None and first.retention is None and first.k_star is None
        assert first.warning is None
        assert [r.seq for r in journal.lineage()] == [1, 2]
        journal.move_head(1)
        assert statuses(journal) == {1: "applied", 2: "rolled_back"}
        assert journal.commit_edit(synthetic(1, 3)) == 3
        assert [r.seq for r in journal.lineage()] == [1, 3]


def test_a_stored_status_column_is_dropped_and_derived(tmp_path):
    """A format-2 journal stored each edit's status; a reader derives it from the tree (even
    where the stored copy is stale), and a writer drops the column, keeping every row hash."""
    from romebatch.audit import audit

    directory = tmp_path / "J"
    with Journal(directory, write=True, create=True) as journal:
        for n, parent in ((1, 0), (2, 1), (3, 2)):
            journal.commit_edit(synthetic(parent, n))
        journal.move_head(1)
        journal.commit_edit(synthetic(1, 4))  # a branch: 2 and 3 are off the path to 4
        hashes = dict(journal.db.execute("SELECT seq, row_hash FROM edits").fetchall())
    # Rebuild it as format 2 left it: the column back, filled as m001-m005 kept it, no view.
    db = sqlite3.connect(str(directory / DB_NAME), isolation_level=None)
    db.execute("DROP VIEW edit_status")
    db.execute("ALTER TABLE edits ADD COLUMN status TEXT NOT NULL DEFAULT 'applied'")
    db.execute("UPDATE edits SET status = 'rolled_back' WHERE seq IN (2, 3)")
    db.execute("DELETE FROM _migrations WHERE name = 'm006_derived_status'")
    db.execute("UPDATE meta SET value = '2' WHERE key = 'format'")
    db.close()

    with Journal(directory) as reader:  # readers never migrate
        assert "status" in reader.columns("edits")
        assert reader.status() == {1: "applied", 2: "rolled_back", 3: "rolled_back", 4: "applied"}
        assert [r.seq for r in reader.lineage()] == [1, 4]
    with Journal(directory, write=True) as journal:
        assert "status" not in journal.columns("edits")
        assert journal.get("format") == 3
        assert statuses(journal) == {1: "applied", 2: "rolled_back", 3: "rolled_back", 4: "applied"}
        assert dict(journal.db.execute("SELECT seq, row_hash FROM edits").fetchall()) == hashes
        journal.move_head(3)  # one meta write moves every status
        assert statuses(journal) == {1: "applied", 2: "applied", 3: "applied", 4: "rolled_back"}
        assert journal.prune() == 1
        assert statuses(journal) == {1: "applied", 2: "applied", 3: "applied"}
        # The synthetic rows carry made-up fact hashes; nothing else may be wrong.
        assert [p for p in audit(journal.db) if "field fact_hash" not in p] == []


def test_missing_and_corrupt_journals_are_user_errors(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(UserError, match="no journal"):
        Journal(missing)
    with pytest.raises(UserError, match="no journal"):
        Journal(missing, write=True)
    assert not missing.exists()

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / DB_NAME).write_bytes(b"this is not an sqlite database, just some text " * 50)
    with pytest.raises(UserError, match="not a romebatch journal or damaged"):
        Journal(corrupt, write=True)
    with pytest.raises(UserError):
        Journal(corrupt)
    # The failed writer released its lock.
    with open(corrupt / LOCK_NAME, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(handle, fcntl.LOCK_UN)


def test_edit_tree_commit_path_move_head_prune(tmp_path):
    with Journal(tmp_path / "J", write=True, create=True) as journal:
        assert journal.commit_edit(synthetic(0, 1)) == 1
        assert journal.commit_edit(synthetic(1, 2)) == 2
        assert journal.head == 2
        assert [r.seq for r in journal.lineage()] == [1, 2]
        assert journal.applied_hashes() == {"sha256:fact1", "sha256:fact2"}

        # Roll back to 1, then branch: the new edit's parent is 1, edit 2 is kept but rolled back.
        journal.move_head(1)
        assert journal.head == 1
        assert statuses(journal) == {1: "applied", 2: "rolled_back"}
        assert journal.applied_hashes() == {"sha256:fact1"}
        assert journal.commit_edit(synthetic(1, 3)) == 3
        assert journal.edit(3).parent == 1
        assert journal.head == 3
        assert [r.seq for r in journal.lineage()] == [1, 3]
        assert [r.seq for r in journal.lineage(2)] == [1, 2]
        assert statuses(journal) == {1: "applied", 2: "rolled_back", 3: "applied"}
        assert journal.applied_hashes() == {"sha256:fact1", "sha256:fact3"}

        # Back to the old branch and to the base.
        journal.move_head(2)
        assert statuses(journal) == {1: "applied", 2: "applied", 3: "rolled_back"}
        journal.move_head(0)
        assert journal.head == 0 and journal.lineage() == []
        assert set(statuses(journal).values()) == {"rolled_back"}
        assert journal.applied_hashes() == set()

        # A head that does not exist is refused and changes nothing.
        with pytest.raises(UserError, match="no edit 9"):
            journal.move_head(9)
        assert journal.head == 0

        # A writer whose idea of the head is stale cannot commit.
        with pytest.raises(RuntimeError):
            journal.commit_edit(synthetic(3, 4))
        assert [r.seq for r in journal.edits()] == [1, 2, 3]

        # Prune deletes exactly the rolled-back edits.
        journal.move_head(3)
        assert journal.prune() == 1
        assert [r.seq for r in journal.edits()] == [1, 3]
        assert [r.seq for r in journal.lineage()] == [1, 3]
        assert statuses(journal) == {1: "applied", 3: "applied"}
        assert journal.prune() == 0

    # Everything survives a reopen, read-only.
    with Journal(tmp_path / "J") as reader:
        assert reader.head == 3
        assert [r.seq for r in reader.lineage()] == [1, 3]


def test_blobs_and_fields_round_trip_exactly(tmp_path):
    rec = synthetic(0, 1, d_model=7, d_ff=13)
    special = np.array([0.0, -0.0, 1e-45, -3.4028235e38, 3.4028235e38, np.float32(1) / 3, np.pi], dtype=np.float32)
    rec.lam = special
    rec.u = np.random.default_rng(3).normal(size=13)  # float64 in: stored as float32
    with Journal(tmp_path / "J", write=True, create=True) as journal:
        seq = journal.commit_edit(rec)
    with Journal(tmp_path / "J") as journal:
        back = journal.edit(seq)
    assert back.lam.dtype == np.float32 and back.u.dtype == np.float32
    assert back.lam.tobytes() == special.tobytes()  # bit for bit, signed zero and subnormal included
    assert back.u.tobytes() == rec.u.astype(np.float32).tobytes()
    assert back.lam.flags.writeable  # a copy, not a read-only view of the row
    for name in (
        "parent",
        "fact_id",
        "fact_hash",
        "fact_json",
        "layer",
        "weight_name",
        "update_norm",
        "denominator",
        "weight_hash_before",
        "weight_hash_after",
        "v_steps",
        "v_loss",
    ):
        assert getattr(back, name) == getattr(rec, name), name
    assert back.created_at
    with Journal(tmp_path / "J") as journal:
        assert statuses(journal)[seq] == "applied"
    assert back.fact["subject"] == "S1"


def test_seq_numbers_are_never_reused_after_prune(tmp_path):
    # Regression: seq was a bare INTEGER PRIMARY KEY, so the next edit after a prune took the pruned seq.
    with Journal(tmp_path / "J", write=True, create=True) as journal:
        journal.commit_edit(synthetic(0, 1))
        journal.commit_edit(synthetic(1, 2))
        # Fact X is rejected on top of edit 2 (state 2).
        fact_x = Fact(id="x", subject="X", prompt="{} is in", target_new="Y")
        journal.record_rejection(fact_x, 1, "too large", 1e9, 1e-9)
        assert fact_x.hash in journal.rejected_hashes()
        journal.move_head(1)
        assert fact_x.hash not in journal.rejected_hashes()  # state 2 is not on the path any more
        journal.prune()  # edit 2 is gone for good
        seq = journal.commit_edit(synthetic(1, 3))
        # A new edit is a new state: it must not take the pruned edit's number ...
        assert seq > 2, f"new edit got seq {seq}, the number of a pruned edit"
        # ... and X was never tried on it.
        assert fact_x.hash not in journal.rejected_hashes()


# ----------------------------------------------------------------------------- the write lock
def test_write_lock_in_process(tmp_path):
    directory = tmp_path / "J"
    first = Journal(directory, write=True, create=True)
    try:
        first.commit_edit(synthetic(0, 1))
        with pytest.raises(JournalLockedError) as info:
            Journal(directory, write=True)
        assert f"pid {os.getpid()}" in info.value.message
        assert info.value.exit_code == 2
        with Journal(directory) as reader:  # readers take no lock
            assert reader.head == 1
            assert [r.seq for r in reader.edits()] == [1]
    finally:
        first.close()
    with Journal(directory, write=True) as second:
        assert second.head == 1


HOLD_LOCK = """
import sys
from romebatch.journal import Journal
journal = Journal(sys.argv[1], write=True, create=True)
print("locked", flush=True)
sys.stdin.read()
"""


def hold_lock(directory: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_write_lock_held_by_another_process(tmp_path):
    directory = tmp_path / "J"
    proc = hold_lock(directory)
    try:
        with pytest.raises(JournalLockedError) as info:
            Journal(directory, write=True)
        assert f"pid {proc.pid}" in info.value.message
        assert str(directory) in info.value.message
        with Journal(directory) as reader:
            assert reader.head == 0
    finally:
        proc.kill()  # SIGKILL: the kernel drops the flock, so a dead holder blocks nobody
        proc.wait()
    with Journal(directory, write=True) as journal:
        assert journal.head == 0


# ----------------------------------------------------------------------------- the Editor
LAYER = 1
FACTS = [
    Fact(
        id="needle",
        subject="The Space Needle",
        prompt="{} is located in the city of",
        target_new="Paris",
        target_true="Seattle",
    ),
    Fact(
        id="eiffel",
        subject="The Eiffel Tower",
        prompt="{} is located in the city of",
        target_new="Rome",
        target_true="Paris",
    ),
    Fact(id="ben", subject="Big Ben", prompt="{} is located in the city of", target_new="Tokyo", target_true="London"),
    Fact(
        id="darrieux",
        subject="Danielle Darrieux",
        prompt="The mother tongue of {} is",
        target_new="Spain",
        target_true="French",
    ),
]
NEW_FACTS = [
    Fact(
        id="colosseum",
        subject="The Colosseum",
        prompt="{} is located in the city of",
        target_new="Berlin",
        target_true="Rome",
    ),
    Fact(
        id="rocard",
        subject="Michel Rocard",
        prompt="{} is a native speaker of",
        target_new="London",
        target_true="French",
    ),
]


def quiet(message: str) -> None:
    pass


def db_dump(directory: Path) -> list[str]:
    db = sqlite3.connect(str(directory / DB_NAME))
    try:
        return list(db.iterdump())
    finally:
        db.close()


class FirstRun:
    """Four facts applied once; the weight of the edited layer kept after every edit."""

    def __init__(self, directory, tokenizer):
        self.directory = directory
        self.tokenizer = tokenizer
        lm = tiny_loaded("gpt2", tokenizer)
        self.base_model = {name: p.detach().clone() for name, p in lm.model.named_parameters()}
        self.states = {0: lm.weight(LAYER).detach().clone()}
        self.hashes = {0: weight_hash(lm.weight(LAYER))}
        self.reported = []

        def on_edit(row):
            self.reported.append(row)
            self.states[row.seq] = lm.weight(LAYER).detach().clone()
            self.hashes[row.seq] = weight_hash(lm.weight(LAYER))

        with Editor(directory, lm=lm, hparams=HParams(**TINY_HPARAMS), log=quiet) as editor:
            assert editor.hparams.layer == LAYER
            self.result = editor.apply(FACTS, on_edit=on_edit, repair_every=0)
        with Journal(directory) as journal:
            self.rows = journal.edits()
            self.statuses = statuses(journal)
            self.prefixes = journal.get("prefixes")

    def copy(self, tmp_path: Path) -> Path:
        target = tmp_path / "journal"
        shutil.copytree(self.directory, target)
        return target

    def editor(self, directory: Path, **kwargs) -> Editor:
        return Editor(directory, lm=tiny_loaded("gpt2", self.tokenizer), log=quiet, **kwargs)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, bytelevel_tokenizer):
    # Module scope runs before conftest's per-test ROMEBATCH_HOME: point it at the same temp home.
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ROMEBATCH_HOME", str(tmp_path_factory.getbasetemp() / "home"))
        torch.set_num_threads(1)
        try:
            return FirstRun(tmp_path_factory.mktemp("first") / "journal", bytelevel_tokenizer)
        finally:
            torch.set_num_threads(threads)


def test_first_run_records_every_state(first_run):
    result = first_run.result
    assert [r.status for r in result.results] == ["applied"] * 4, [r.reason for r in result.results]
    assert result.head == 4 and not result.interrupted
    assert [r.seq for r in first_run.reported] == [1, 2, 3, 4]
    assert [r.fact_id for r in first_run.reported] == [f.id for f in FACTS]
    rows = first_run.rows
    assert [(r.seq, r.parent, first_run.statuses[r.seq]) for r in rows] == [
        (1, 0, "applied"),
        (2, 1, "applied"),
        (3, 2, "applied"),
        (4, 3, "applied"),
    ]
    assert [r.fact_hash for r in rows] == [f.hash for f in FACTS]
    for r in rows:
        assert r.weight_hash_after == first_run.hashes[r.seq]
        assert r.weight_hash_before == first_run.hashes[r.seq - 1]
        assert r.layer == LAYER and r.weight_name == "transformer.h.1.mlp.c_proj"
        assert r.update_norm > 0 and r.denominator > 0
        assert r.fact["subject"] == FACTS[r.seq - 1].subject
        # The stored (Λ, u) is the step from the previous state to this one.
        delta = torch.outer(torch.from_numpy(r.lam), torch.from_numpy(r.u)).T  # Conv1D layout
        torch.testing.assert_close(first_run.states[r.seq] - first_run.states[r.seq - 1], delta, rtol=1e-4, atol=1e-5)
    assert len(set(first_run.hashes.values())) == 5  # every edit changed the weight
    assert first_run.prefixes and len(first_run.prefixes) == 2


def test_replay_rollback_reproduce_exact_bytes(first_run, tmp_path):
    directory = first_run.copy(tmp_path)
    with first_run.editor(directory) as editor:
        weight = editor.lm.weight(LAYER)
        assert editor.head == 4
        assert torch.equal(weight, first_run.states[4])
        for name, value in editor.lm.model.named_parameters():  # nothing but the edited layer differs
            if name != "transformer.h.1.mlp.c_proj.weight":
                assert torch.equal(value, first_run.base_model[name]), name

        assert editor.rollback(to=2) == 2
        assert editor.head == 2 and torch.equal(weight, first_run.states[2])
        with Journal(directory) as reader:
            assert statuses(reader) == {1: "applied", 2: "applied", 3: "rolled_back", 4: "rolled_back"}
            assert reader.applied_hashes() == {FACTS[0].hash, FACTS[1].hash}

        assert editor.rollback(base=True) == 0
        pristine = tiny_loaded("gpt2", first_run.tokenizer)
        assert torch.equal(weight, pristine.weight(LAYER))

        assert editor.rollback(to=4) == 4  # forward again along the old branch
        assert torch.equal(weight, first_run.states[4])
        assert editor.rollback(steps=1) == 3
        assert torch.equal(weight, first_run.states[3])
        assert editor.rollback(steps=3) == 0
        assert torch.equal(weight, first_run.states[0])
        editor.rollback(to=4)
        assert editor.rollback(fact="ben") == 2  # the state just before "ben" (edit 3) was applied
        assert torch.equal(weight, first_run.states[2])
        assert editor.rollback(fact="needle") == 0

        for bad in (dict(), dict(to=2, steps=1), dict(steps=5), dict(fact="darrieux"), dict(to=17)):
            with pytest.raises(UserError):
                editor.rollback(**bad)  # fact "darrieux" is not on the path at head 0
        assert editor.head == 0

        editor.rollback(to=3)
    # The head is persistent: a new editor on a fresh base model opens at state 3.
    with first_run.editor(directory) as editor:
        assert editor.head == 3
        assert torch.equal(editor.lm.weight(LAYER), first_run.states[3])


def test_branch_after_rollback_and_return_to_old_branch(first_run, tmp_path):
    directory = first_run.copy(tmp_path)
    branch = {}
    with first_run.editor(directory) as editor:
        editor.rollback(to=2)
        # The rolled-back facts are pending again; the applied ones are not.
        assert [f.id for f in editor.pending(FACTS + NEW_FACTS)] == ["ben", "darrieux", "colosseum", "rocard"]
        result = editor.apply(
            NEW_FACTS,
            on_edit=lambda r: branch.__setitem__(r.seq, editor.lm.weight(LAYER).detach().clone()),
            repair_every=0,
        )
        assert [(r.status, r.seq) for r in result.results] == [("applied", 5), ("applied", 6)]
        with Journal(directory) as reader:
            assert reader.edit(5).parent == 2 and reader.edit(6).parent == 5
            assert [r.seq for r in reader.lineage()] == [1, 2, 5, 6]
            assert statuses(reader) == {
                1: "applied",
                2: "applied",
                3: "rolled_back",
                4: "rolled_back",
                5: "applied",
                6: "applied",
            }
            assert reader.edit(5).weight_hash_before == first_run.hashes[2]
        assert not torch.equal(branch[6], first_run.states[4])

        editor.rollback(to=4)  # the old branch, exactly
        assert torch.equal(editor.lm.weight(LAYER), first_run.states[4])
        with Journal(directory) as reader:
            assert statuses(reader) == {
                1: "applied",
                2: "applied",
                3: "applied",
                4: "applied",
                5: "rolled_back",
                6: "rolled_back",
            }
        editor.rollback(to=5)
        assert torch.equal(editor.lm.weight(LAYER), branch[5])
    with first_run.editor(directory) as editor:  # and a fresh process-like reopen of the new branch
        editor.rollback(to=6)
        assert torch.equal(editor.lm.weight(LAYER), branch[6])


def test_recomputing_from_scratch_is_deterministic(first_run, tmp_path):
    """Crash-resume relies on this: the same facts on the same base give the same bytes."""
    with first_run.editor(tmp_path / "again", hparams=HParams(**TINY_HPARAMS)) as editor:
        result = editor.apply(FACTS[:3], repair_every=0)
        assert [r.seq for r in result.results] == [1, 2, 3]
        assert torch.equal(editor.lm.weight(LAYER), first_run.states[3])
    with Journal(tmp_path / "again") as reader:
        assert [r.weight_hash_after for r in reader.edits()] == [first_run.hashes[i] for i in (1, 2, 3)]
        assert reader.get("prefixes") == first_run.prefixes


def test_reapplying_rolled_back_facts_on_their_state(first_run, tmp_path):
    """Rolled back to 2, the facts of edits 3 and 4 are pending again and end at state 4's bytes."""
    directory = first_run.copy(tmp_path)
    with first_run.editor(directory) as editor:
        editor.rollback(to=2)
        result = editor.apply(FACTS, repair_every=0)
        assert [r.status for r in result.results] == ["already_applied", "already_applied", "applied", "applied"]
        assert torch.equal(editor.lm.weight(LAYER), first_run.states[4])
        head = editor.head
    with Journal(directory) as reader:
        path = reader.lineage()
        assert [r.fact_hash for r in path] == [f.hash for f in FACTS]
        assert path[-1].seq == head and path[-1].weight_hash_after == first_run.hashes[4]
        assert set(statuses(reader).values()) == {"applied"}


def test_reapplying_the_same_facts_writes_nothing(first_run, tmp_path):
    directory = first_run.copy(tmp_path)
    before = db_dump(directory)
    # Different ids and target_true do not make a different edit: the hash is the edit's content.
    renamed = [Fact(id=f"other-{f.id}", subject=f.subject, prompt=f.prompt, target_new=f.target_new) for f in FACTS]
    with first_run.editor(directory, hparams=HParams(**TINY_HPARAMS)) as editor:
        for facts in (FACTS, renamed):
            result = editor.apply(facts, repair_every=0)
            assert [r.status for r in result.results] == ["already_applied"] * 4
            assert result.head == 4 and result.count("applied") == 0
            assert all(r.seq is None for r in result.results)
        assert editor.pending(FACTS) == []
        assert torch.equal(editor.lm.weight(LAYER), first_run.states[4])
    assert db_dump(directory) == before


def test_other_base_model_is_refused(first_run, tmp_path):
    directory = first_run.copy(tmp_path)
    before = db_dump(directory)
    with pytest.raises(BaseModelMismatchError):
        Editor(directory, lm=tiny_loaded("gpt2", first_run.tokenizer, seed=1), log=quiet)
    assert db_dump(directory) == before
    with Journal(directory, write=True):  # the refused editor released the lock
        pass


def _meta_value(directory: Path, key: str):
    db = sqlite3.connect(str(directory / DB_NAME))
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    finally:
        db.close()
    return None if row is None else json.loads(row[0])


def _with_other_weights(lm):
    """The same model with one weight an edit never touches changed (an attention projection)."""
    with torch.no_grad():
        lm.model.get_submodule("transformer.h.0.attn.c_attn").weight[0, 0] += 1.0
    return lm


def test_other_weights_beyond_the_down_projections_are_refused(first_run, tmp_path):
    # The down-projections match, so only the whole-model identity can tell.
    directory = first_run.copy(tmp_path)
    recorded = _meta_value(directory, "weights_hash")
    # Reference, computed here: every parameter's dtype, shape and bytes in order, the tied head once.
    reference = hashlib.sha256()
    for parameter in tiny_loaded("gpt2", first_run.tokenizer).model.parameters():
        reference.update(f"{parameter.dtype}:{list(parameter.shape)};".encode())
        reference.update(parameter.detach().numpy().tobytes())
    assert recorded == "sha256:" + reference.hexdigest()
    logged = api.log(directory)
    assert (logged["weights_hash"], logged["tokenizer_hash"]) == (recorded, _meta_value(directory, "tokenizer_hash"))
    with Editor(directory, lm=tiny_loaded("gpt2", first_run.tokenizer), log=quiet, write=False) as editor:
        assert editor.check().base_checked == "whole model"
    before = db_dump(directory)
    other = _with_other_weights(tiny_loaded("gpt2", first_run.tokenizer))
    assert other.base_hash() == tiny_loaded("gpt2", first_run.tokenizer).base_hash()
    with pytest.raises(BaseModelMismatchError, match="other weights .*only the down-projections match"):
        Editor(directory, lm=other, log=quiet)
    assert db_dump(directory) == before


def test_another_tokenizer_is_refused(first_run, tmp_path):
    import copy

    directory = first_run.copy(tmp_path)
    tokenizer = copy.deepcopy(first_run.tokenizer)
    tokenizer.add_tokens(["Seattlemania"])  # one more vocabulary entry: "Seattle" may tokenize the same, others not
    lm = tiny_loaded("gpt2", first_run.tokenizer)
    lm.tokenizer = tokenizer
    with pytest.raises(BaseModelMismatchError, match="another tokenizer"):
        Editor(directory, lm=lm, log=quiet)


@pytest.mark.parametrize("fast", [True, False])
def test_tokenizer_hash_ignores_padding_and_truncation_state(first_run, fast, tmp_path):
    import copy

    from transformers import GPT2Tokenizer

    tok = copy.deepcopy(first_run.tokenizer)
    if not fast:
        folder = tmp_path / "slow-tokenizer"
        tok.save_pretrained(folder)
        tok = GPT2Tokenizer.from_pretrained(folder)
    before = tokenizer_hash(tok)
    tok.pad_token = tok.eos_token
    assert tokenizer_hash(tok) == before  # a pad token from the vocabulary: no text tokenizes otherwise
    tok(["a b c", "a"], padding="max_length", truncation=True, max_length=4)  # sets the backend's padding
    assert tokenizer_hash(tok) == before
    tok.add_tokens(["Seattlemania"])
    assert tokenizer_hash(tok) != before
    bos = copy.deepcopy(tok)
    bos.add_special_tokens({"bos_token": "<|start|>"})  # a new start token: probes with specials change
    assert tokenizer_hash(bos) != tokenizer_hash(tok)


def test_tokenizer_hash_is_behaviour_not_format(first_run, tmp_path):
    # The same vocabulary as a slow (Python) and a fast (Rust) tokenizer: one hash.
    from transformers import GPT2Tokenizer

    first_run.tokenizer.save_pretrained(tmp_path / "tok")
    slow = GPT2Tokenizer.from_pretrained(tmp_path / "tok")
    assert tokenizer_hash(slow) == tokenizer_hash(first_run.tokenizer)


def test_journal_without_identity_keys_still_opens_and_checks_down_projections(first_run, tmp_path):
    # A journal written before the whole-model identity was recorded.
    directory = first_run.copy(tmp_path)
    db = sqlite3.connect(str(directory / DB_NAME))
    with db:
        db.execute("DELETE FROM meta WHERE key IN ('weights_hash', 'tokenizer_hash')")
    db.close()
    with Editor(directory, lm=_with_other_weights(tiny_loaded("gpt2", first_run.tokenizer)), log=quiet) as editor:
        assert editor.head == 4
        report = editor.check()
        assert report.ok and report.base_checked == "down-projections"  # said, so a user knows how far it goes
    with pytest.raises(BaseModelMismatchError):
        Editor(directory, lm=tiny_loaded("gpt2", first_run.tokenizer, seed=1), log=quiet)


def test_changed_defining_hparams_are_refused(first_run, tmp_path):
    directory = first_run.copy(tmp_path)
    with pytest.raises(UserError, match="v_lr"):
        first_run.editor(directory, hparams=HParams(**{**TINY_HPARAMS, "v_lr": 1.0}))
    with pytest.raises(UserError, match="stats_tokens"):
        first_run.editor(directory, hparams=HParams(**{**TINY_HPARAMS, "stats_tokens": 700}))
    # Guard settings do not define an edit: a resumed run may change them.
    relaxed = HParams(**{**TINY_HPARAMS, "guard_max_relative": 50.0})
    with first_run.editor(directory, hparams=relaxed) as editor:
        assert editor.hparams.guard_max_relative == 50.0
        assert torch.equal(editor.lm.weight(LAYER), first_run.states[4])


def test_tampered_head_hash_is_detected(first_run, tmp_path):
    directory = first_run.copy(tmp_path)
    db = sqlite3.connect(str(directory / DB_NAME))
    with db:
        db.execute("UPDATE edits SET weight_hash_after = ? WHERE seq = 4", ("sha256:" + "0" * 64,))
    db.close()
    with pytest.raises(UserError, match="edit 4"):
        first_run.editor(directory)
    with Journal(directory, write=True):  # the lock was released
        pass


def test_tampered_vector_is_detected(first_run, tmp_path):
    directory = first_run.copy(tmp_path)
    db = sqlite3.connect(str(directory / DB_NAME))
    lam = np.frombuffer(db.execute("SELECT lam FROM edits WHERE seq = 2").fetchone()[0], dtype="<f4").copy()
    lam[0] = np.nextafter(lam[0], np.float32(np.inf))  # one ulp in one number of an earlier edit
    with db:
        db.execute("UPDATE edits SET lam = ? WHERE seq = 2", (lam.tobytes(),))
    db.close()
    with pytest.raises(UserError, match="replaying"):
        first_run.editor(directory)


def test_rollback_to_a_tampered_state_is_refused(first_run, tmp_path):
    directory = first_run.copy(tmp_path)
    db = sqlite3.connect(str(directory / DB_NAME))
    with db:
        db.execute("UPDATE edits SET weight_hash_after = ? WHERE seq = 2", ("sha256:" + "0" * 64,))
    db.close()
    with first_run.editor(directory) as editor:
        with pytest.raises(UserError, match="edit 2"):
            editor.rollback(to=2)
        assert editor.head == 4
    with Journal(directory) as reader:
        assert reader.head == 4
        assert set(statuses(reader).values()) == {"applied"}


def test_refused_rollback_leaves_the_model_at_the_head(first_run, tmp_path):
    # Regression: the model was left at the refused state while the journal stayed at the head.
    directory = first_run.copy(tmp_path)
    db = sqlite3.connect(str(directory / DB_NAME))
    with db:
        db.execute("UPDATE edits SET weight_hash_after = ? WHERE seq = 2", ("sha256:" + "0" * 64,))
    db.close()
    with first_run.editor(directory) as editor:
        with pytest.raises(UserError):
            editor.rollback(to=2)
        # The Editor promises the in-memory model is always the journal's head state.
        assert editor.head == 4
        assert torch.equal(editor.lm.weight(LAYER), first_run.states[4])


def test_guard_rejects_and_records(first_run, tmp_path):
    directory = tmp_path / "guarded"
    strict = HParams(**{**TINY_HPARAMS, "guard_max_relative": 1e-9})
    lm = tiny_loaded("gpt2", first_run.tokenizer)
    with Editor(directory, lm=lm, hparams=strict, log=quiet) as editor:
        result = editor.apply(FACTS, repair_every=0)
        assert [r.status for r in result.results] == ["rejected"] * 4
        assert all("exceeds" in r.reason for r in result.results)
        assert all(r.update_norm and r.update_norm > 0 and r.seq is None for r in result.results)
        assert editor.head == 0 and result.head == 0
        assert torch.equal(lm.weight(LAYER), first_run.states[0])
        # A second run does not retry (nor record) them again.
        again = editor.apply(FACTS, repair_every=0)
        assert [r.status for r in again.results] == ["rejected"] * 4
        assert all("earlier run" in r.reason for r in again.results)
    with Journal(directory) as reader:
        assert reader.edits() == []
        rejections = reader.rejections()
        assert [r["fact_id"] for r in rejections] == [f.id for f in FACTS]
        assert [r["fact_hash"] for r in rejections] == [f.hash for f in FACTS]
        for row, res in zip(rejections, result.results):
            assert row["parent"] == 0 and row["layer"] == LAYER
            assert row["reason"] == res.reason
            assert row["update_norm"] == pytest.approx(res.update_norm)
            assert json.loads(row["fact_json"])["subject"] == res.subject
        assert reader.rejected_hashes() == {f.hash for f in FACTS}


def test_export_materialises_the_head(first_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = first_run.copy(tmp_path)
    out = tmp_path / "exported"
    with first_run.editor(directory) as editor:
        assert editor.export(out) == out
        editor.rollback(to=2)
        # A non-empty folder is refused without --force and left as it was.
        occupied = tmp_path / "occupied"
        occupied.mkdir()
        (occupied / "keep.txt").write_text("mine")
        with pytest.raises(UserError, match="not empty"):
            editor.export(occupied)
        assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
        assert (occupied / "keep.txt").read_text() == "mine"
        # --force replaces only an earlier export (it has romebatch.json), never someone's folder.
        with pytest.raises(UserError, match="not an earlier romebatch export"):
            editor.export(occupied, force=True)
        assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
        (occupied / "keep.txt").unlink()
        editor.export(occupied)
        (occupied / "stale.txt").write_text("from the earlier export")
        # With force, an earlier export is replaced by the head state (2 now).
        editor.export(occupied, force=True)
        assert not (occupied / "stale.txt").exists()
    # No staging folders are left beside the targets.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "journal", "occupied"]
    # The folder gets the umask's mode, not mkdtemp's private 0700.
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask

    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert torch.equal(model.transformer.h[LAYER].mlp.c_proj.weight, first_run.states[4])
    assert torch.equal(model.transformer.wte.weight, first_run.base_model["transformer.wte.weight"])
    text = "The Space Needle is located in the city of"
    assert tokenizer(text)["input_ids"] == first_run.tokenizer(text)["input_ids"]
    provenance = json.loads((out / "romebatch.json").read_text())
    assert provenance["head"] == 4
    assert [e["seq"] for e in provenance["edits"]] == [1, 2, 3, 4]
    assert [e["fact_id"] for e in provenance["edits"]] == [f.id for f in FACTS]
    assert [e["weight_hash_after"] for e in provenance["edits"]] == [first_run.hashes[i] for i in (1, 2, 3, 4)]

    model2 = AutoModelForCausalLM.from_pretrained(str(occupied))
    assert torch.equal(model2.transformer.h[LAYER].mlp.c_proj.weight, first_run.states[2])
    assert [e["seq"] for e in json.loads((occupied / "romebatch.json").read_text())["edits"]] == [1, 2]


def test_export_onto_a_file_is_a_user_error(first_run, tmp_path):
    # Regression: NotADirectoryError from outdir.iterdir().
    directory = first_run.copy(tmp_path)
    target = tmp_path / "model.bin"
    target.write_text("not a folder")
    with first_run.editor(directory) as editor:
        with pytest.raises(UserError):
            editor.export(target)
    assert target.read_text() == "not a folder"


def test_in_lists_are_chunked_under_sqlites_variable_limit(tmp_path, monkeypatch):
    # SQLite refuses a statement with more parameters than SQLITE_LIMIT_VARIABLE_NUMBER; lower
    # the limit (and the chunk size with it) so a short journal has more edits than both.
    from romebatch import journal_records

    limit, n = 10, 25
    monkeypatch.setattr(journal_records, "IN_CHUNK", limit)
    with Journal(tmp_path / "J", write=True, create=True) as journal:
        for seq in range(1, n + 1):
            assert journal.commit_edit(synthetic(seq - 1, seq)) == seq
        journal.db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)
        with pytest.raises(sqlite3.OperationalError, match="too many SQL variables"):
            journal.db.execute(f"SELECT seq FROM edits WHERE seq IN ({','.join('?' * n)})", list(range(n)))
        assert [r.seq for r in journal.lineage()] == list(range(1, n + 1))
        journal.move_head(n - 1)
        assert statuses(journal) == {**{seq: "applied" for seq in range(1, n)}, n: "rolled_back"}
        journal.move_head(n)
        assert set(statuses(journal).values()) == {"applied"}
