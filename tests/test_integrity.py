"""Journal integrity: every kind of damage is found by `check`, precisely, and is recoverable.

Damage kinds: a flipped byte in a stored vector, a tampered hash, an edit row copied from
another journal, a truncated file, and the wrong base model. After each, the user can roll
back to the last good edit and carry on.
"""

from __future__ import annotations

import shutil
import sqlite3

import pytest
from conftest import CITY_FACTS as FACTS
from conftest import TINY_HPARAMS, quiet, tiny_loaded

from romebatch.editor import Editor
from romebatch.errors import BaseModelMismatchError, UserError
from romebatch.hparams import HParams
from romebatch.manifest import Fact


@pytest.fixture
def tok(bytelevel_tokenizer):
    return bytelevel_tokenizer


def editor(path, tok, seed=0, **kwargs):
    kwargs.setdefault("hparams", HParams(**TINY_HPARAMS))
    return Editor(path, lm=tiny_loaded("gpt2", tok, seed), log=quiet, **kwargs)


@pytest.fixture
def journal(tmp_path, tok):
    path = tmp_path / "j"
    with editor(path, tok) as ed:
        result = ed.apply(FACTS, repair_every=0)
    assert [r.seq for r in result.results] == [1, 2, 3, 4]
    return path


def check(path, tok, seed=0):
    with editor(path, tok, seed, write=False, verify=False, hparams=None) as ed:
        return ed.check()


def test_a_healthy_journal_checks_clean(journal, tok):
    report = check(journal, tok)
    assert report.ok and report.edits == 4 and report.last_good == 4


def flip_byte(path, seq, column):
    with sqlite3.connect(path / "journal.sqlite") as db:
        blob = bytearray(db.execute(f"SELECT {column} FROM edits WHERE seq = ?", (seq,)).fetchone()[0])
        blob[5] ^= 0x40
        db.execute(f"UPDATE edits SET {column} = ? WHERE seq = ?", (bytes(blob), seq))


@pytest.mark.parametrize("column", ["lam", "u"])
def test_a_flipped_byte_in_a_vector_is_found_and_recoverable(journal, tok, column):
    flip_byte(journal, 3, column)
    report = check(journal, tok)
    assert not report.ok
    assert any(line.startswith("edit 3 (fact 2)") and "damaged vector" in line for line in report.problems)
    assert any(line.startswith("edit 4 ") for line in report.problems)  # built on the damaged one
    assert report.last_good == 2
    # Opening the journal normally refuses the damaged head and names the next step.
    with pytest.raises(UserError, match="replaying to edit 4") as error:
        editor(journal, tok, hparams=None)
    assert "romebatch check" in error.value.hint
    # Roll back to the last good edit: that state is intact, and work can continue.
    with editor(journal, tok, hparams=None, verify=False) as ed:
        assert ed.rollback(to=report.last_good) == 2
    with editor(journal, tok, hparams=None) as ed:
        assert ed.head == 2


def test_a_tampered_hash_is_found(journal, tok):
    with sqlite3.connect(journal / "journal.sqlite") as db:
        db.execute(
            "UPDATE edits SET weight_hash_after = 'sha256:' || substr(weight_hash_after, 8, 60) || 'ffff' WHERE seq = 2"
        )
    report = check(journal, tok)
    assert any(line.startswith("edit 2 (fact 1)") for line in report.problems)
    assert report.last_good == 1


def test_an_edit_row_from_another_journal_is_found(journal, tok, tmp_path):
    other = tmp_path / "other"
    with editor(other, tok) as ed:
        ed.apply([Fact(id="x", subject="The Louvre", prompt="{} is in", target_new="Oslo")], repair_every=0)
    with sqlite3.connect(other / "journal.sqlite") as src:
        row = src.execute("SELECT * FROM edits WHERE seq = 1").fetchone()
    with sqlite3.connect(journal / "journal.sqlite") as db:
        values = list(row)
        values[0], values[1] = 5, 4  # appended after edit 4, as if it belonged here
        db.execute(f"INSERT INTO edits VALUES ({','.join('?' * len(values))})", values)
        db.execute("UPDATE meta SET value = '5' WHERE key = 'head'")
    report = check(journal, tok)
    assert any(line.startswith("edit 5 (fact x): was not computed on the state of edit 4") for line in report.problems)
    assert report.last_good == 4


def test_a_truncated_journal_is_reported_not_a_traceback(journal, tok):
    db_file = journal / "journal.sqlite"
    data = db_file.read_bytes()
    db_file.write_bytes(data[: len(data) // 3])
    for wal in journal.glob("journal.sqlite-*"):
        wal.unlink()
    with pytest.raises(UserError) as error:
        check(journal, tok)
    assert "journal.sqlite" in error.value.message


def test_the_wrong_base_model_is_refused(journal, tok):
    with pytest.raises(BaseModelMismatchError, match="different weights"):
        check(journal, tok, seed=1)


def test_check_leaves_a_copy_identical(journal, tok, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(journal, copy)
    assert check(copy, tok).ok  # a journal copied elsewhere verifies the same
