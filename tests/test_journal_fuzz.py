"""Journal damage, fuzzed: every random mutation ends in `check` naming it, or refusing the file.

A real journal (a tiny GPT-2, edits on two branches, a rejection, a repair-free run) is
damaged 500+ ways per run, seeded: a byte of the file flipped, a field of a row set to a
value of another type or a nearby one, a row deleted, duplicated or moved, a meta key
changed, deleted or added. Each damaged copy goes through `romebatch.check` (the audit, then
replay when the audit passes) with a time limit. The outcome must be one of:

- the damage is named (`report.ok` is False, with problem lines), or
- the file is refused with a one-line UserError;

and when the mutation changed nothing the journal holds (a byte in free space, a value set to
itself), check must pass. Never a traceback, never a hang.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import sqlite3
from pathlib import Path

import pytest
from conftest import TINY_HPARAMS, tiny_loaded

from romebatch import api
from romebatch.editor import Editor
from romebatch.errors import UserError
from romebatch.hparams import HParams
from romebatch.journal import DB_NAME
from romebatch.manifest import Fact

MUTATIONS = 520
SECONDS_EACH = 10
FACTS = [
    Fact(id=f"f{i}", subject=s, prompt="{} is located in the city of", target_new=new, target_true=true)
    for i, (s, new, true) in enumerate(
        [
            ("The Space Needle", "Paris", "Seattle"),
            ("The Eiffel Tower", "Rome", "Paris"),
            ("The Colosseum", "London", "Rome"),
            ("Big Ben", "Tokyo", "London"),
        ]
    )
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, bytelevel_tokenizer):
    root = tmp_path_factory.mktemp("fuzz")
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    base = {name: tensor.clone() for name, tensor in lm.model.state_dict().items()}
    path = root / "journal"
    with Editor(path, lm=lm, hparams=HParams(**TINY_HPARAMS), log=lambda m: None) as editor:
        editor.apply(FACTS[:3], repair_every=0)
        editor.rollback(to=1)
        editor.apply(FACTS[3:], repair_every=0)  # a second branch: edit 4 on edit 1; 2 and 3 rolled back
        editor.journal.record_rejection(FACTS[2], 1, "test rejection", 1.0, 0.5)
    # One self-contained file: no WAL beside it.
    db = sqlite3.connect(path / DB_NAME)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("PRAGMA journal_mode=DELETE")
    db.close()
    return path, Checker(lm, base)


class Checker:
    """`api.check` with the one tiny model, put back to its base weights before each call."""

    def __init__(self, lm, base):
        self.lm, self.base = lm, base

    def __call__(self, path):
        self.lm.model.load_state_dict(self.base)
        return api.check(path, lm=self.lm)

    def editor(self, path):
        self.lm.model.load_state_dict(self.base)
        return Editor(path, lm=self.lm, log=lambda m: None)


def content(path: Path):
    """Everything a journal holds, table by table, or None if SQLite cannot read it."""
    try:
        db = sqlite3.connect(f"file:{path / DB_NAME}?mode=ro", uri=True)
        try:
            tables = sorted(r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type IN ('table','index')"))
            return {
                t: sorted(map(repr, db.execute(f"SELECT * FROM {t}")))
                for t in tables
                if not t.startswith("sqlite_autoindex") and t != "edits_fact_hash"
            } | {
                "integrity": [r[0] for r in db.execute("PRAGMA integrity_check")],
                "schema": sorted(map(repr, db.execute("SELECT type, name, sql FROM sqlite_master"))),
            }
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return None


def mutate(rng: random.Random, path: Path) -> str:
    db_file = path / DB_NAME
    kind = rng.choice(["byte", "field", "field", "field", "delete", "duplicate", "move", "meta", "meta"])
    if kind == "byte":
        data = bytearray(db_file.read_bytes())
        offset = rng.randrange(len(data))
        data[offset] ^= 1 << rng.randrange(8)
        db_file.write_bytes(bytes(data))
        return f"byte {offset} flipped"
    db = sqlite3.connect(db_file, isolation_level=None)
    try:
        table = rng.choice(["edits", "edits", "rejections"])
        key = "seq" if table == "edits" else "id"
        keys = [r[0] for r in db.execute(f"SELECT {key} FROM {table}")]
        target = rng.choice(keys)
        columns = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
        if kind == "field":
            column = rng.choice(columns)
            old = db.execute(f"SELECT {column} FROM {table} WHERE {key} = ?", (target,)).fetchone()[0]
            value = _nearby(rng, old)
            try:
                db.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (value, target))
            except sqlite3.IntegrityError:
                return "nothing (constraint refused the change)"
            return f"{table} {target}: {column} {old!r:.30} -> {value!r:.30}"
        if kind == "delete":
            db.execute(f"DELETE FROM {table} WHERE {key} = ?", (target,))
            return f"{table} {target} deleted"
        if kind == "duplicate":
            new_key = max(keys) + 1
            row = list(db.execute(f"SELECT * FROM {table} WHERE {key} = ?", (target,)).fetchone())
            row[columns.index(key)] = new_key
            db.execute(f"INSERT INTO {table} VALUES ({','.join('?' * len(row))})", row)
            return f"{table} {target} duplicated as {new_key}"
        if kind == "move":
            new_key = max(keys) + rng.randint(1, 5)
            db.execute(f"UPDATE {table} SET {key} = ? WHERE {key} = ?", (new_key, target))
            return f"{table} {target} moved to {new_key}"
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        name = rng.choice(sorted(meta) + ["new_key"])
        action = rng.choice(["change", "delete"]) if name != "new_key" else "add"
        if action == "delete":
            db.execute("DELETE FROM meta WHERE key = ?", (name,))
        else:
            value = rng.choice(
                [
                    '"abc"',
                    "5",
                    "-1",
                    "null",
                    "{not json",
                    json.dumps(meta.get(name, "x") + " "),
                    "[]",
                    '"sha256:00"',
                    "3",
                ]
            )
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))
        return f"meta {name}: {action}"
    finally:
        db.close()


def _nearby(rng: random.Random, old):
    choice = rng.random()
    if choice < 0.15:
        return None if old is not None else 0
    if choice < 0.3:
        return rng.choice(["abc", "", 7, 1.5, b"\x00\x01\x02", -1])
    if isinstance(old, bool) or isinstance(old, int):
        return old + rng.choice([-1, 1, 2])
    if isinstance(old, float):
        return old * 1.0000001 if old else 1e-9
    if isinstance(old, bytes):
        data = bytearray(old)
        if data and rng.random() < 0.8:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        else:
            data = data[: -rng.randint(1, 3)] if data else b"\x01"
        return bytes(data)
    if isinstance(old, str):
        if rng.random() < 0.5 and old:
            i = rng.randrange(len(old))
            return old[:i] + chr((ord(old[i]) + 1) % 0x10000 or 65) + old[i + 1 :]
        return old + rng.choice([" ", "x", "}"])
    return old


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def test_random_damage_is_always_named_or_refused(pristine, tmp_path):
    source, check = pristine
    base = content(source)
    assert check(source).ok
    rng = random.Random("romebatch-journal-fuzz")
    outcomes = {"named": 0, "refused": 0, "unchanged": 0}
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for trial in range(MUTATIONS):
            path = tmp_path / f"m{trial}"
            shutil.copytree(source, path)
            what = mutate(rng, path)
            changed = content(path) != base
            signal.alarm(SECONDS_EACH)
            try:
                report = check(path)
            except UserError as error:
                assert changed, f"trial {trial} ({what}): an unchanged journal was refused: {error.message}"
                assert "\n" not in error.message
                outcomes["refused"] += 1
            except _Timeout:
                pytest.fail(f"trial {trial} ({what}): check took over {SECONDS_EACH} s")
            else:
                if changed:
                    assert not report.ok, f"trial {trial} ({what}): damage went unnoticed"
                    assert report.problems and all("\n" not in p for p in report.problems)
                    outcomes["named"] += 1
                else:
                    assert report.ok, f"trial {trial} ({what}): an unchanged journal failed: {report.problems}"
                    outcomes["unchanged"] += 1
            finally:
                signal.alarm(0)
            # `log` reads every row without checking: it must also end cleanly, never a traceback.
            signal.alarm(SECONDS_EACH)
            try:
                api.log(path)
            except UserError as error:
                assert changed and "\n" not in error.message, f"trial {trial} ({what}): {error.message}"
            except _Timeout:
                pytest.fail(f"trial {trial} ({what}): log took over {SECONDS_EACH} s")
            finally:
                signal.alarm(0)
            shutil.rmtree(path)
    finally:
        signal.signal(signal.SIGALRM, previous)
    print(outcomes)  # shown with -s
    # The corpus must exercise both endings, or it tests less than it claims.
    assert outcomes["named"] > MUTATIONS // 3 and outcomes["refused"] >= 5 and outcomes["unchanged"] >= 5


def damaged_copy(source: Path, tmp_path: Path, sql: str) -> Path:
    """A copy of the pristine journal with one SQL statement run on it."""
    path = tmp_path / "j"
    shutil.copytree(source, path)
    with sqlite3.connect(path / DB_NAME) as db:
        db.execute(sql)
    return path


def test_a_swapped_fact_hash_no_longer_makes_a_resume_reapply(pristine, tmp_path):
    """Regression: with edit 1's fact_hash swapped, a resumed run applied fact f0 a second time."""
    source, check = pristine
    path = damaged_copy(
        source, tmp_path, "UPDATE edits SET fact_hash = 'sha256:' || substr(fact_hash, 8, 63) || '0' WHERE seq = 1"
    )
    report = check(path)
    assert any(p.startswith("edit 1: field fact_hash does not match") for p in report.problems), report.problems
    with check.editor(path) as editor:
        with pytest.raises(UserError, match="is damaged"):
            editor.apply(FACTS[:1], repair_every=0)
        assert editor.head == 4


def test_a_parent_cycle_is_named_not_looped(pristine, tmp_path):
    source, check = pristine
    path = damaged_copy(source, tmp_path, "UPDATE edits SET parent = 4 WHERE seq = 1")  # 4 -> 1 -> 4 -> ...
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS_EACH)
    try:
        report = check(path)
        data = None
        with pytest.raises(UserError, match="parent"):
            data = api.log(path)
    finally:
        signal.alarm(0)
    assert data is None
    assert any("edit 1: field parent is 4" in p for p in report.problems)


@pytest.mark.parametrize(
    "damage, named",
    [
        ("UPDATE meta SET value = '\"abc\"' WHERE key = 'head'", "meta key 'head'"),
        ("UPDATE meta SET value = '{not json' WHERE key = 'hparams'", "meta key 'hparams': not valid JSON"),
        ("UPDATE edits SET lam = x'0102030405' WHERE seq = 2", "edit 2: field lam is not a float32 vector"),
        ("DROP VIEW edit_status", "the schema of view edit_status is missing"),
        ("UPDATE edits SET layer = 2 WHERE seq = 4", "edit 4: its fields do not match its row hash"),
        ("UPDATE edits SET fact_id = 'other' WHERE seq = 4", "edit 4: field fact_id"),
        ("DELETE FROM edits WHERE seq = 3", "the edits table does not match its digest"),
        ("UPDATE rejections SET reason = 'x' WHERE id = 1", "rejection 1: its fields do not match"),
        ("INSERT INTO meta VALUES ('extra', '1')", "the meta table does not match its digest"),
    ],
)
def test_each_kind_of_damage_is_named(pristine, tmp_path, damage, named):
    source, check = pristine
    report = check(damaged_copy(source, tmp_path, damage))
    assert not report.ok and any(named in p for p in report.problems), report.problems


@pytest.mark.parametrize(
    "damage, refused",
    [
        ("DROP TABLE meta", "no meta table"),
        ("ALTER TABLE edits ADD COLUMN from_the_future TEXT", "newer romebatch (unknown column edits.from_the_future)"),
        ("INSERT INTO _migrations VALUES ('m999_future', 'x')", "newer romebatch (unknown migration m999_future)"),
        ("UPDATE meta SET value = '99' WHERE key = 'format'", "journal format 99 is newer"),
    ],
)
def test_a_journal_from_a_newer_romebatch_or_without_its_tables_is_refused(pristine, tmp_path, damage, refused):
    source, check = pristine
    path = damaged_copy(source, tmp_path, damage)
    for opener in (lambda: check(path), lambda: api.log(path), lambda: check.editor(path)):
        with pytest.raises(UserError, match=refused.replace("(", r"\(").replace(")", r"\)")):
            opener()
    # Refused before migrating: a writer left the newer journal as it was.
    with sqlite3.connect(path / DB_NAME) as db:
        assert "row_hash" in {r[1] for r in db.execute("PRAGMA table_info(edits)")}


def test_every_check_problem_is_one_line_whatever_its_source():
    # SQLite's integrity_check can report "*** in database main ***\nMultiple uses for byte …"
    # (a real page-damage message this suite's fuzzing met): a report prints one line a problem.
    from romebatch.outcomes import CheckReport

    report = CheckReport("j", 0, 0, ["the SQLite file is damaged (*** in database main ***\nMultiple uses)"], 0)
    assert len(report.problems) == 1 and "\n" not in report.problems[0]
    assert "Multiple uses" in report.problems[0]
