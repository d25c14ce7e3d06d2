"""Journal bundles (romebatch/bundle_file.py): made from one journal, applied to another without recomputing.

A tiny GPT-2 journal with a real history (an edit rolled back, a rejection, a repair-pass
mark) is bundled; applying the bundle to a fresh journal on the same base must give the
same rows, the same head weights byte for byte, and a journal `check` passes. A flipped
byte anywhere in the file, the wrong base model, the wrong starting state, or a bundle
whose checksums were recomputed over a wrong vector are each refused with nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_HPARAMS, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from romebatch import journal_schema as journal_module
from romebatch.api import check
from romebatch.bundle_apply import apply_bundles
from romebatch.bundle_file import DIGEST_KEY, DOC_KEY, write_bundle
from romebatch.bundle_read import read_bundle
from romebatch.editor import Editor
from romebatch.errors import BaseModelMismatchError, UserError
from romebatch.hparams import HParams
from romebatch.journal import DB_NAME, Journal
from romebatch.manifest import Fact
from romebatch.model import weight_hash

REPO = Path(__file__).resolve().parents[1]
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
]
LATER = [
    Fact(
        id="darrieux",
        subject="Danielle Darrieux",
        prompt="The mother tongue of {} is",
        target_new="Spain",
        target_true="French",
    ),
    Fact(
        id="rocard",
        subject="Michel Rocard",
        prompt="{} is a native speaker of",
        target_new="London",
        target_true="French",
    ),
]
LAST = Fact(
    id="colosseum",
    subject="The Colosseum",
    prompt="{} is located in the city of",
    target_new="Berlin",
    target_true="Rome",
)


def quiet(message: str) -> None:
    pass


class Source:
    """A journal with path 1, 2, 4, 5 (edit 3 rolled back) and a rejection on state 4."""

    def __init__(self, root: Path, tokenizer):
        self.root = root
        self.folder = root / "tiny-gpt2"
        tiny_model("gpt2", tokenizer).save_pretrained(self.folder)
        tokenizer.save_pretrained(self.folder)
        self.other = root / "tiny-gpt2-other"  # another base: same architecture, other weights
        tiny_model("gpt2", tokenizer, seed=1).save_pretrained(self.other)
        tokenizer.save_pretrained(self.other)
        self.journal = root / "source"
        hp = HParams(**{**TINY_HPARAMS, "layer": LAYER})
        with Editor(self.journal, model=str(self.folder), hparams=hp, log=quiet) as editor:
            assert [r.status for r in editor.apply(FACTS, checks=None, repair_every=0).results] == ["applied"] * 3
            editor.rollback(steps=1)
            assert editor.apply(LATER[:1], checks=None, repair_every=0).results[0].status == "applied"
        strict = hp.replace(guard_max_relative=1e-9)  # not an edit-defining setting: the guard refuses it
        with Editor(self.journal, model=str(self.folder), hparams=strict, log=quiet) as editor:
            assert editor.apply(LATER[1:], checks=None, repair_every=0).results[0].status == "rejected"
        with Editor(self.journal, model=str(self.folder), log=quiet) as editor:
            assert editor.apply([LAST], checks=None, repair_every=0).results[0].status == "applied"
            editor.journal.set_many({"repair_passes": [4]})
            self.head_hash = weight_hash(editor.lm.weight(LAYER))
        with Journal(self.journal) as j:
            assert [r.seq for r in j.lineage()] == [1, 2, 4, 5]
            assert [(r["fact_id"], r["parent"]) for r in j.rejections()] == [("rocard", 4)]


@pytest.fixture(scope="module")
def source(tmp_path_factory, bytelevel_tokenizer):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ROMEBATCH_HOME", str(tmp_path_factory.getbasetemp() / "home"))
        return Source(tmp_path_factory.mktemp("bundle"), bytelevel_tokenizer)


def rows(directory: Path, table: str) -> list[dict]:
    db = sqlite3.connect(str(directory / DB_NAME))
    db.row_factory = sqlite3.Row
    try:
        key = "seq" if table == "edits" else "id"
        return [dict(r) for r in db.execute(f"SELECT * FROM {table} ORDER BY {key}")]
    finally:
        db.close()


def meta(directory: Path) -> dict:
    with Journal(directory) as j:
        return {k: json.loads(v) for k, v in j.db.execute("SELECT key, value FROM meta")}


def apply(source: Source, paths, journal: Path, **kwargs):
    return apply_bundles(paths, journal, model=kwargs.pop("model", str(source.folder)), log=quiet, **kwargs)


def test_round_trip_gives_the_same_journal(source, tmp_path):
    out = tmp_path / "all.rbundle"
    info = write_bundle(source.journal, out)
    assert (info["edits"], info["from"], info["to"], info["rejections"]) == (4, 1, 5, 1)
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    write_bundle(source.journal, tmp_path / "again.rbundle")
    assert (tmp_path / "again.rbundle").read_bytes() == out.read_bytes()  # the same edits, the same bytes
    target = tmp_path / "copy"
    [done] = apply(source, [out], target)
    assert (done.edits, done.first, done.last, done.head, done.renumbered) == (4, 1, 5, 5, False)
    # Every column of every edit on the path, as the source has it (edit 3 was rolled back: not carried).
    source_rows = [r for r in rows(source.journal, "edits") if r["seq"] != 3]
    assert rows(target, "edits") == source_rows
    assert [{k: v for k, v in r.items() if k != "id"} for r in rows(target, "rejections")] == [
        {k: v for k, v in r.items() if k != "id"} for r in rows(source.journal, "rejections")
    ]
    ours, theirs = meta(target), meta(source.journal)
    for key in ("model", "base_hash", "hparams", "prefixes", "head", "max_seq", "repair_passes", "model_type"):
        assert ours[key] == theirs[key], key
    # The head's weights, rebuilt from the copy, byte for byte; `check` replays every edit.
    with Editor(target, model=str(source.folder), write=False, log=quiet) as editor:
        assert weight_hash(editor.lm.weight(LAYER)) == source.head_hash
        # Resuming skips what the source settled (rocard's rejection included); ben was rolled back.
        assert [f.id for f in editor.pending(FACTS + LATER + [LAST])] == ["ben"]
    report = check(target, model=str(source.folder), log=quiet)
    assert report.ok and report.edits == 4, report.problems


def test_ranges_chain_and_are_refused_out_of_order(source, tmp_path):
    first, second = tmp_path / "a.rbundle", tmp_path / "b.rbundle"
    write_bundle(source.journal, first, last=2)
    write_bundle(source.journal, second, first=4)
    assert read_bundle(second).start == {"seq": 2, "weights": read_bundle(first).end["weights"]}
    target = tmp_path / "chained"
    with pytest.raises(UserError, match="starts from the state of its edit 2"):
        apply(source, [second], target)
    assert not target.exists()
    apply(source, [first], target)
    again = apply(source, [first], target)[0]
    assert again.already and again.edits == 0
    apply(source, [second], target)
    assert rows(target, "edits") == [r for r in rows(source.journal, "edits") if r["seq"] != 3]
    assert len(rows(target, "rejections")) == 1
    assert check(target, model=str(source.folder), log=quiet).ok


def test_onto_a_journal_with_its_own_history_seqs_are_renumbered(source, tmp_path):
    tail = tmp_path / "tail.rbundle"
    write_bundle(source.journal, tail, first=4)
    target = tmp_path / "own"
    # A journal at the tail's starting state (edits 1, 2) that had used seqs up to 9 (pruned
    # since): seqs are never reused, so the tail's 4 and 5 cannot be kept.
    write_bundle(source.journal, tmp_path / "head.rbundle", last=2)
    apply(source, [tmp_path / "head.rbundle"], target)
    with Journal(target, write=True) as j:
        j.set_many({"max_seq": 9})
    [done] = apply(source, [tail], target)
    assert done.renumbered and (done.first, done.last) == (10, 11)
    with Journal(target) as j:
        assert [(r.seq, r.parent) for r in j.lineage()] == [(1, 0), (2, 1), (10, 2), (11, 10)]
        assert [r["parent"] for r in j.rejections()] == [10]  # the rejection on source state 4 is on state 10
        assert j.get("repair_passes") == [10]
    assert check(target, model=str(source.folder), log=quiet).ok


def test_a_journal_rebuilt_from_bundles_resumes_the_repair_rotation_where_its_source_was(source, tmp_path):
    # A bounded repair pass starts from the journal's cursor (romebatch/repair.py). Bundles
    # packed at different times carry different cursors; a journal rebuilt from all of them
    # must take the last one, or its next pass would start over from the oldest facts.
    journal = tmp_path / "source"
    shutil.copytree(source.journal, journal)
    hashes = [f.hash for f in FACTS]
    with Journal(journal, write=True) as j:
        j.set_many({"repair_cursor": hashes[0]})
    write_bundle(journal, tmp_path / "a.rbundle", last=2)
    with Journal(journal, write=True) as j:
        j.set_many({"repair_cursor": hashes[1]})
    write_bundle(journal, tmp_path / "b.rbundle", first=4)
    target = tmp_path / "rebuilt"
    apply(source, [tmp_path / "a.rbundle"], target)
    assert meta(target)["repair_cursor"] == hashes[0]
    apply(source, [tmp_path / "b.rbundle"], target)
    assert meta(target)["repair_cursor"] == hashes[1]


def test_every_flipped_byte_is_refused(source, tmp_path):
    out = tmp_path / "b.rbundle"
    write_bundle(source.journal, out, first=4)
    data = out.read_bytes()
    damaged = tmp_path / "damaged.rbundle"
    refused = 0
    for position in range(len(data)):
        damaged.write_bytes(data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :])
        with pytest.raises(UserError):
            read_bundle(damaged)
        refused += 1
    assert refused == len(data) > 1000
    read_bundle(out)  # the undamaged file reads


def rewrite(bundle: Path, out: Path, change) -> None:
    """A bundle with `change(doc, tensors)` applied and every checksum recomputed: a consistent forgery."""
    import hashlib

    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(bundle), framework="numpy") as f:
        doc = json.loads(f.metadata()[DOC_KEY])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    change(doc, tensors)
    doc["tensors"] = {n: "sha256:" + hashlib.sha256(t.tobytes()).hexdigest() for n, t in tensors.items()}
    text = json.dumps(doc)
    save_file(
        tensors, str(out), metadata={DOC_KEY: text, DIGEST_KEY: "sha256:" + hashlib.sha256(text.encode()).hexdigest()}
    )


def test_a_wrong_vector_is_refused_by_the_weight_hashes(source, tmp_path):
    out = tmp_path / "all.rbundle"
    write_bundle(source.journal, out)

    def nudge(doc, tensors):
        tensors["edits.u"] = tensors["edits.u"].copy()
        tensors["edits.u"][-1] += 1e-3  # the last edit's u, one element

    forged = tmp_path / "forged.rbundle"
    rewrite(out, forged, nudge)
    read_bundle(forged)  # consistent checksums: only the weights can tell
    target = tmp_path / "target"
    with pytest.raises(UserError, match=r"edit 4 \(seq 5, fact colosseum\): its factors give weight"):
        apply(source, [forged], target)
    assert not target.exists()


def test_a_base_with_other_weights_beyond_the_down_projections_is_refused(source, tmp_path):
    out = tmp_path / "all.rbundle"
    write_bundle(source.journal, out)
    assert read_bundle(out).meta["weights_hash"] == meta(source.journal)["weights_hash"]
    # The same down-projections, another embedding: the base hash alone would accept it.
    changed = tmp_path / "changed-embedding"
    model = AutoModelForCausalLM.from_pretrained(source.folder)
    with torch.no_grad():
        model.get_input_embeddings().weight[0, 0] += 1.0
    model.save_pretrained(changed)
    AutoTokenizer.from_pretrained(source.folder).save_pretrained(changed)
    fresh = tmp_path / "fresh"
    with pytest.raises(BaseModelMismatchError, match="other weights"):
        apply(source, [out], fresh, model=str(changed))
    assert not fresh.exists()


def test_a_fresh_journal_from_an_older_journals_bundle_records_its_base_identity(source, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(source.journal, older)
    with sqlite3.connect(older / DB_NAME) as db:
        db.execute("DELETE FROM meta WHERE key IN ('weights_hash', 'tokenizer_hash')")
    out = tmp_path / "older.rbundle"
    write_bundle(older, out)
    assert "weights_hash" not in read_bundle(out).meta
    fresh = tmp_path / "fresh"
    apply(source, [out], fresh)
    # The hashes of the model it was applied on, taken at its base weights, not after the edits.
    wanted = {key: meta(source.journal)[key] for key in ("weights_hash", "tokenizer_hash")}
    assert {key: meta(fresh)[key] for key in wanted} == wanted


def test_wrong_base_and_wrong_state_are_refused_and_write_nothing(source, tmp_path):
    out = tmp_path / "all.rbundle"
    write_bundle(source.journal, out)
    fresh = tmp_path / "fresh"
    with pytest.raises(BaseModelMismatchError, match="different weights"):
        apply(source, [out], fresh, model=str(source.other))
    assert not fresh.exists()
    # A journal on the right base whose head is another state.
    elsewhere = tmp_path / "elsewhere"
    with Editor(
        elsewhere, model=str(source.folder), hparams=HParams(**{**TINY_HPARAMS, "layer": LAYER}), log=quiet
    ) as editor:
        editor.apply([LAST], checks=None, repair_every=0)
    before = rows(elsewhere, "edits"), meta(elsewhere)
    with pytest.raises(UserError, match="is another state"):
        apply(source, [out], elsewhere)
    assert (rows(elsewhere, "edits"), meta(elsewhere)) == before
    # A journal of other edit-defining settings is refused too, before any weight is touched.
    other = tmp_path / "other-hparams"
    with Editor(
        other, model=str(source.folder), hparams=HParams(**{**TINY_HPARAMS, "layer": LAYER, "v_lr": 1.0}), log=quiet
    ):
        pass
    with pytest.raises(UserError, match="v_lr"):
        apply(source, [out], other)
    assert rows(other, "edits") == []


def test_dry_run_verifies_and_writes_nothing(source, tmp_path):
    out = tmp_path / "all.rbundle"
    write_bundle(source.journal, out)
    [done] = apply(source, [out], tmp_path / "dry", dry_run=True)
    assert done.dry_run and done.edits == 4 and done.first is None
    assert not (tmp_path / "dry").exists()


def test_a_column_added_by_a_later_migration_is_carried(source, tmp_path, monkeypatch):
    src = tmp_path / "src"
    import shutil

    shutil.copytree(source.journal, src)

    def m999_warnings(db):
        if "warnings" not in {row[1] for row in db.execute("PRAGMA table_info(edits)")}:
            db.execute("ALTER TABLE edits ADD COLUMN warnings TEXT")

    monkeypatch.setattr(journal_module, "MIGRATIONS", [*journal_module.MIGRATIONS, m999_warnings])
    with Journal(src, write=True) as j:
        j.db.execute("UPDATE edits SET warnings = 'w' || seq")
    out = tmp_path / "w.rbundle"
    write_bundle(src, out)
    apply(source, [out], tmp_path / "carried")
    assert [r["warnings"] for r in rows(tmp_path / "carried", "edits")] == ["w1", "w2", "w4", "w5"]
    # A journal without the column cannot take it: refused, not silently dropped.
    monkeypatch.setattr(journal_module, "MIGRATIONS", journal_module.MIGRATIONS[:-1])
    with pytest.raises(UserError, match="carries column edits.warnings"):
        apply(source, [out], tmp_path / "older")
    assert not (tmp_path / "older").exists()


def romebatch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "romebatch", *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=300
    )


def test_cli_bundle_apply_check_and_refusals(source, tmp_path):
    proc = romebatch("bundle", "all.rbundle", "--journal", str(source.journal), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["edits"] == 4
    proc = romebatch("bundle", "x.rbundle", "--journal", str(source.journal), "--from", "3", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --from 3: not an edit on the head's path"), (
        proc.stderr
    )
    assert not (tmp_path / "x.rbundle").exists()
    data = (tmp_path / "all.rbundle").read_bytes()
    middle = len(data) - 100  # inside the last tensor
    (tmp_path / "flipped.rbundle").write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    proc = romebatch("apply", "flipped.rbundle", "--journal", "K", "--model", str(source.folder), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: flipped.rbundle: damaged"), proc.stderr
    assert not (tmp_path / "K").exists()
    proc = romebatch("apply", "all.rbundle", "--journal", "K", "--model", str(source.folder), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["head"] == 5
    proc = romebatch("check", "--journal", "K", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


# `romebatch` killed (SIGKILL) at the journal's "append" fault point: inside the transaction,
# after every row is inserted and before it commits. Arms the seam both ways it has had:
# the ROMEBATCH_FAULT variable and the FAULT_HOOK a test installs.
CRASH_AT_APPEND = """
import os, sys
from romebatch import journal
from romebatch.cli import main
if hasattr(journal, "FAULT_HOOK"):
    journal.FAULT_HOOK = lambda name: os.kill(os.getpid(), 9) if name == "append" else None
sys.argv = ["romebatch", *sys.argv[1:]]
main()
"""


def test_a_crash_inside_the_append_leaves_no_edit(source, tmp_path):
    out = tmp_path / "all.rbundle"
    write_bundle(source.journal, out)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ROMEBATCH_FAULT": "append:1"}
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_AT_APPEND, "apply", str(out), "--journal", "K", "--model", str(source.folder)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr
    assert rows(tmp_path / "K", "edits") == []
    proc = romebatch("apply", str(out), "--journal", "K", "--model", str(source.folder), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(rows(tmp_path / "K", "edits")) == 4


def test_benchmark_runs_pack_in_chunks_and_restore(source, tmp_path):
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("bench_bundles", REPO / "benchmarks" / "bundles.py")
    bundles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bundles)
    run = tmp_path / "seq-x-journal"
    shutil.copytree(source.journal, run)
    written = bundles.pack(run, chunk=3, log=quiet)
    assert [p.name for p in written] == ["00001-00004.rbundle", "00005-00005.rbundle"]
    assert bundles.pack(run, chunk=3, log=quiet) == []  # nothing new: no file is rewritten
    original = rows(run, "edits")
    shutil.rmtree(run)  # what a clone has: the bundles, no journal
    from romebatch.model import load_model

    lm = load_model(str(source.folder), log=quiet)
    base = lm.weight(LAYER).detach().clone()
    assert bundles.restore(run, lm, log=quiet) == 4
    assert torch.equal(lm.weight(LAYER), base)  # the caller's model is given back at its base weights
    assert rows(run, "edits") == [r for r in original if r["seq"] != 3]
    assert bundles.restore(run, lm, log=quiet) == 0
    assert check(run, model=str(source.folder), log=quiet).ok
