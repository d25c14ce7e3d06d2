"""Hostile journals and bundles: rows edited with sqlite3 and every row hash recomputed
(`integrity.hash_all_rows`), so only the model-aware checks can tell.

A damaged head never blocks the way back: the last good state `check` names is reachable
by a rollback that replays straight to it. A tampered layer, weight name or non-finite
vector is one named line, never a traceback; a failed setup leaves no journal behind; a
bundle whose rows or meta `check` would call damaged is refused with the journal unchanged;
only ints are ever written as a head.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CITY_FACTS as FACTS
from conftest import TINY_HPARAMS, quiet, tiny_loaded, tiny_model

from romebatch import api
from romebatch.bundle_apply import apply_bundles
from romebatch.bundle_file import DIGEST_KEY, DOC_KEY, write_bundle
from romebatch.editor import Editor, rollback_target
from romebatch.errors import JournalDamagedError, UserError
from romebatch.hparams import HParams
from romebatch.integrity import hash_all_rows
from romebatch.journal import Journal

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory, bytelevel_tokenizer):
    """A model folder M and a journal J of four edits on it (edit i+1 is fact i), built once."""
    root = tmp_path_factory.mktemp("hostile")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ROMEBATCH_HOME", str(root / "home"))
        folder = root / "M"
        tiny_model("gpt2", bytelevel_tokenizer, 0).save_pretrained(folder)
        bytelevel_tokenizer.save_pretrained(folder)
        journal = root / "J"
        hp = HParams(**TINY_HPARAMS, layer=1)
        with Editor(journal, lm=tiny_loaded("gpt2", bytelevel_tokenizer), hparams=hp, log=quiet) as editor:
            result = editor.apply(FACTS, repair_every=0)
        assert [r.seq for r in result.results] == [1, 2, 3, 4]
    return folder, journal


@pytest.fixture
def journal(built, tmp_path):
    copy = tmp_path / "J"
    shutil.copytree(built[1], copy)
    return copy


def lm(tok):
    return tiny_loaded("gpt2", tok)


def tamper(path: Path, sql: str, *args) -> None:
    """Edit the journal's rows, then recompute every row hash and digest: a consistent forgery."""
    db = sqlite3.connect(path / "journal.sqlite", isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute(sql, args)
    hash_all_rows(db)
    db.close()


def nan_blob(path: Path, seq: int, column: str, value: float) -> bytes:
    with sqlite3.connect(path / "journal.sqlite") as db:
        blob = db.execute(f"SELECT {column} FROM edits WHERE seq = ?", (seq,)).fetchone()[0]
    vector = np.frombuffer(blob, dtype="<f4").copy()
    vector[3] = value
    return vector.tobytes()


def test_a_nan_head_rolls_back_to_the_last_good_state(journal, bytelevel_tokenizer):
    tamper(journal, "UPDATE edits SET lam = ? WHERE seq = 3", nan_blob(journal, 3, "lam", float("nan")))
    report = api.check(journal, lm=lm(bytelevel_tokenizer))
    assert not report.ok and report.last_good == 2
    assert any("edit 3" in line and "NaN" in line for line in report.problems)
    # The head (4, on the damaged 3) need not replay: the target is replayed from the base.
    with Editor(journal, lm=lm(bytelevel_tokenizer), verify=False, log=quiet) as editor:
        assert editor.rollback(to=2) == 2
        editor.prune()  # the damaged edits are off the path now: only pruning removes them
    assert api.check(journal, lm=lm(bytelevel_tokenizer)).ok


def test_a_head_on_layer_99_is_one_named_line_and_rolls_back(journal, bytelevel_tokenizer):
    tamper(journal, "UPDATE edits SET layer = 99 WHERE seq = 4")
    with pytest.raises(JournalDamagedError, match=r"edit 4 \(fact 3\) is damaged: field layer is 99"):
        Editor(journal, lm=lm(bytelevel_tokenizer), write=False, log=quiet)
    report = api.check(journal, lm=lm(bytelevel_tokenizer))
    assert report.last_good == 3
    assert report.problems == ["edit 4 (fact 3): field layer is 99, but the model has layers 0..2"]
    with Editor(journal, lm=lm(bytelevel_tokenizer), verify=False, log=quiet) as editor:
        with pytest.raises(JournalDamagedError, match="edit 4"):
            editor.export(journal.parent / "out")  # anything needing the damaged head refuses
        assert editor.rollback(to=3) == 3
        editor.prune()
    assert api.check(journal, lm=lm(bytelevel_tokenizer)).ok


def test_cli_export_of_layer_99_is_one_line_not_a_traceback(built, journal):
    tamper(journal, "UPDATE edits SET layer = 99 WHERE seq = 2")
    out = journal.parent / "out"
    done = subprocess.run(
        [sys.executable, "-m", "romebatch", "export", str(out), "--journal", str(journal), "--model", str(built[0])],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "AttributeError" not in done.stderr
    assert "edit 2 (fact 1) is damaged: field layer is 99" in done.stderr
    assert not out.exists()


def test_cli_check_says_how_much_of_the_base_it_matched(built, journal, monkeypatch, capsys):
    from romebatch.cli import main

    def check_lines(*extra: str) -> tuple[int, str]:
        monkeypatch.setattr(
            sys, "argv", ["romebatch", "check", "--journal", str(journal), "--model", str(built[0]), *extra]
        )
        code = 0
        try:
            main()
        except SystemExit as exit:
            code = int(exit.code or 0)
        captured = capsys.readouterr()
        return code, " ".join((captured.err + captured.out).split())  # the console wraps long lines

    code, text = check_lines()
    assert code == 0 and "4 edit(s) verified by replay" in text and "down-projections only" not in text
    # As a journal written before the two hashes (the meta digest recomputed, or check calls it damaged).
    tamper(journal, "DELETE FROM meta WHERE key IN ('weights_hash', 'tokenizer_hash')")
    code, text = check_lines()
    assert code == 0 and "base model matched on its down-projections only" in text
    monkeypatch.setattr(
        sys, "argv", ["romebatch", "check", "--json", "--journal", str(journal), "--model", str(built[0])]
    )
    try:
        main()
    except SystemExit:
        pass
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["base_checked"] == "down-projections"


def test_api_rollback_from_a_damaged_head(built, journal, bytelevel_tokenizer):
    tamper(journal, "UPDATE edits SET lam = ? WHERE seq = 3", nan_blob(journal, 3, "lam", float("nan")))
    assert api.rollback(journal, to=2, prune=True, model=str(built[0])) == 2
    assert api.check(journal, lm=lm(bytelevel_tokenizer)).ok


@pytest.mark.parametrize("column, value", [("u", float("inf")), ("lam", float("-inf")), ("u", float("nan"))])
def test_rehashed_non_finite_vectors_fail_check(journal, bytelevel_tokenizer, column, value):
    # The weight hashes recomputed too, so replay alone would agree with the row.
    tamper(journal, f"UPDATE edits SET {column} = ? WHERE seq = 4", nan_blob(journal, 4, column, value))
    with Journal(journal) as j:
        record = j.edit(4)
    loaded = lm(bytelevel_tokenizer)
    from romebatch.model import weight_hash
    from romebatch.opening import edit_of
    from romebatch.rome import apply_edit

    with Editor(journal, lm=loaded, write=False, verify=False, log=quiet) as editor:
        editor.replay(3, verify=False)
        apply_edit(loaded, edit_of(record))
        forged = weight_hash(loaded.weight(record.layer))
    tamper(journal, "UPDATE edits SET weight_hash_after = ? WHERE seq = 4", forged)
    report = api.check(journal, lm=lm(bytelevel_tokenizer))
    assert not report.ok and report.last_good == 3
    assert report.problems == [f"edit 4: field {column} holds NaN or infinite values"]


@pytest.mark.parametrize("layer", [3, 99])
def test_a_refused_layer_leaves_no_journal(tmp_path, bytelevel_tokenizer, layer):
    target = tmp_path / "new" / "j"
    with pytest.raises(UserError, match=f"--layer {layer}: this model has layers 0..2"):
        Editor(target, lm=lm(bytelevel_tokenizer), hparams=HParams(**TINY_HPARAMS, layer=layer), log=quiet)
    assert not (tmp_path / "new").exists()


def test_a_failed_first_run_leaves_no_journal_but_an_existing_one_stays(tmp_path, journal, bytelevel_tokenizer):
    target = tmp_path / "j2"
    with pytest.raises(RuntimeError, match="boom"):
        with Editor(target, lm=lm(bytelevel_tokenizer), hparams=HParams(**TINY_HPARAMS, layer=1), log=quiet):
            raise RuntimeError("boom")  # a failure before the first commit
    assert not target.exists()
    before = (journal / "journal.sqlite").read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with Editor(journal, lm=lm(bytelevel_tokenizer), log=quiet):
            raise RuntimeError("boom")
    assert (journal / "journal.sqlite").read_bytes() == before


def test_hparams_of_the_wrong_type_are_never_recorded(tmp_path, bytelevel_tokenizer):
    hp = HParams(**TINY_HPARAMS, layer=1)
    object.__setattr__(hp, "v_lr", "x")  # set after construction, past __post_init__
    target = tmp_path / "j"
    with pytest.raises(UserError, match="v_lr"):
        Editor(target, lm=lm(bytelevel_tokenizer), hparams=hp, log=quiet)
    assert not target.exists()


def test_a_float_or_bool_head_is_refused_and_not_written(journal):
    before = (journal / "journal.sqlite").read_bytes()
    with Journal(journal, write=True) as j:
        for bad in (1.0, True, "1", -1):
            with pytest.raises(UserError, match="not an edit number"):
                j.move_head(bad)
        assert j.head == 4
    assert (journal / "journal.sqlite").read_bytes() == before
    with pytest.raises(UserError, match="1.0|float"):
        api.rollback(journal, to=1.0)
    with pytest.raises(UserError, match="--to 1.0: not a whole number"):
        with Journal(journal) as j:
            rollback_target(j, to=1.0)
    assert (journal / "journal.sqlite").read_bytes() == before


@pytest.mark.parametrize("key", ["weights_hash", "tokenizer_hash"])
def test_a_mistyped_identity_hash_is_named_by_check(journal, bytelevel_tokenizer, key):
    with sqlite3.connect(journal / "journal.sqlite") as db:
        db.execute("UPDATE meta SET value = '5' WHERE key = ?", (key,))
    report = api.check(journal, lm=lm(bytelevel_tokenizer))
    assert not report.ok
    assert f"meta key '{key}': 5 is not a hash" in report.problems


def test_a_different_module_template_is_named(journal, built, bytelevel_tokenizer):
    template = "transformer.h.{}.attn.c_proj"
    with pytest.raises(UserError, match=r"was written with module template None, not 'transformer\.h\.\{\}\.attn"):
        Editor(journal, model=str(built[0]), module_template=template, log=quiet)


# -- bundles -------------------------------------------------------------------------------
def rewrite(bundle: Path, out: Path, change) -> None:
    """A bundle with `change(doc)` applied and every checksum recomputed."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(bundle), framework="numpy") as f:
        doc = json.loads(f.metadata()[DOC_KEY])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    change(doc)
    text = json.dumps(doc)
    save_file(
        tensors, str(out), metadata={DOC_KEY: text, DIGEST_KEY: "sha256:" + hashlib.sha256(text.encode()).hexdigest()}
    )


def set_cell(column: str, value):
    def change(doc):
        table = doc["edits"]
        table["rows"][0][table["columns"].index(column)] = value

    return change


def set_meta(path: tuple, value):
    def change(doc):
        where = doc["meta"]
        for key in path[:-1]:
            where = where[key]
        if value is KeyError:
            del where[path[-1]]
        else:
            where[path[-1]] = value

    return change


@pytest.fixture(scope="module")
def bundled(built, tmp_path_factory, bytelevel_tokenizer):
    """A bundle of J's edits 3..4, and a journal at J's state 2 to apply it to."""
    root = tmp_path_factory.mktemp("bundled")
    bundle = root / "b.rbundle"
    write_bundle(built[1], bundle, first=3)
    target = root / "T"
    shutil.copytree(built[1], target)
    with Editor(target, lm=lm(bytelevel_tokenizer), log=quiet) as editor:
        editor.rollback(to=2)
        editor.prune()
    return bundle, target


def files(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("journal.sqlite*"))}


@pytest.mark.parametrize(
    "change, message",
    [
        (set_cell("fact_id", "other"), r"edit 1 \(seq 3\): field fact_id 'other' is not the stored fact's id"),
        (set_cell("fact_hash", "sha256:" + "0" * 64), "field fact_hash does not match the fact it stores"),
        (set_cell("fact_json", "not json"), "field fact_json is not a valid fact"),
        (set_meta(("dtype",), "int8"), "field meta.dtype: 'int8' is not one of"),
        (set_meta(("hparams",), {}), "field meta.hparams: no layer"),
        (set_meta(("hparams", "layer"), -4), r"b2.rbundle: meta.hparams: layer"),
        (set_meta(("weights_hash",), 7), "field meta.weights_hash: not a hash"),
    ],
)
def test_a_bundle_check_would_call_damaged_is_refused(bundled, tmp_path, bytelevel_tokenizer, change, message):
    bundle, target_original = bundled
    target = tmp_path / "T"
    shutil.copytree(target_original, target)
    forged = tmp_path / "b2.rbundle"
    rewrite(bundle, forged, change)
    before = files(target)
    with pytest.raises(UserError, match=message):
        apply_bundles([forged], target, lm=lm(bytelevel_tokenizer))
    assert files(target) == before
    fresh = tmp_path / "fresh"
    with pytest.raises(UserError, match=message):
        apply_bundles([forged], fresh, lm=lm(bytelevel_tokenizer))
    assert not fresh.exists()


def test_a_bundle_recorded_under_another_tokenizer_is_refused(bundled, tmp_path, bytelevel_tokenizer):
    bundle, target_original = bundled
    target = tmp_path / "T"
    shutil.copytree(target_original, target)
    forged = tmp_path / "b2.rbundle"
    rewrite(bundle, forged, set_meta(("tokenizer_hash",), "sha256:" + "0" * 64))
    before = dump(target)
    with pytest.raises(UserError, match="b2.rbundle: made on base model .* another tokenizer"):
        apply_bundles([forged], target, lm=lm(bytelevel_tokenizer))
    # Refused after the journal was read (a read folds SQLite's WAL into the file): the same rows.
    assert dump(target) == before


def dump(directory: Path) -> list[str]:
    db = sqlite3.connect(str(directory / "journal.sqlite"))
    try:
        return list(db.iterdump())
    finally:
        db.close()


def test_the_untouched_bundle_applies_and_checks(bundled, tmp_path, bytelevel_tokenizer):
    bundle, target_original = bundled
    target = tmp_path / "T"
    shutil.copytree(target_original, target)
    apply_bundles([bundle], target, lm=lm(bytelevel_tokenizer))
    assert api.check(target, lm=lm(bytelevel_tokenizer)).ok
