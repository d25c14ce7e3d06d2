"""A genuinely full disk, not a patched function: every write path ends cleanly and resumes.

Each test mounts a small tmpfs (root only; skipped, with the reason, elsewhere), fills it to
the last byte, and runs one write path: an edit's commit, a rejection, meta writes (context
prefixes, a repair pass's plan), a migration, the key-statistics cache and export. Each must
end in one clear UserError (or, for the cache, a warning and a finished run), leave the
journal at its last good state (the audit passes, the head is unchanged), and, once space is
freed, the same call must succeed and reach the state a run on a roomy disk reaches.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_HPARAMS, tiny_loaded

from romebatch.audit import audit
from romebatch.editor import Editor
from romebatch.errors import UserError
from romebatch.hparams import HParams
from romebatch.journal import DB_NAME, Journal
from romebatch.journal_schema import migrate
from romebatch.manifest import Fact

REPO = Path(__file__).resolve().parents[1]
FACTS = [
    Fact(id=f"f{i}", subject=s, prompt="{} is located in the city of", target_new=new, target_true=true)
    for i, (s, new, true) in enumerate(
        [
            ("The Space Needle", "Paris", "Seattle"),
            ("The Eiffel Tower", "Rome", "Paris"),
            ("Big Ben", "Tokyo", "London"),
        ]
    )
]


class Disk:
    def __init__(self, root: Path):
        self.root = root
        self.filler = root / ".filler"

    def fill(self) -> None:
        """Write until the filesystem refuses another byte."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for size in (1 << 20, 1 << 12, 1):
                while True:
                    try:
                        os.write(fd, b"\0" * size)
                    except OSError as error:
                        assert error.errno == errno.ENOSPC
                        break
        finally:
            os.close(fd)
        assert os.statvfs(self.root).f_bavail == 0

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode:
        pytest.skip(f"a small tmpfs cannot be mounted here ({done.stderr.strip()}); these tests need root")
    try:
        yield Disk(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture
def lm(bytelevel_tokenizer):
    return lambda: tiny_loaded("gpt2", bytelevel_tokenizer)


def editor(path, lm, **hp):
    return Editor(path, lm=lm(), hparams=HParams(**{**TINY_HPARAMS, **hp}), log=lambda m: None)


def head_hash(path) -> tuple[int, str]:
    with Journal(path) as j:
        assert audit(j.db) == [], "the journal is not at a good state"
        path_ = j.lineage()
        return j.head, path_[-1].weight_hash_after if path_ else ""


@pytest.fixture
def reference(tmp_path, lm):
    path = tmp_path / "reference"
    with editor(path, lm) as ed:
        ed.apply(FACTS, checks=None, repair_every=0)
    return head_hash(path)


def test_an_edits_commit(disk, lm, reference):
    path = disk.root / "journal"
    with editor(path, lm) as ed:
        ed.apply(FACTS[:1], checks=None, repair_every=0)
        disk.fill()
        with pytest.raises(UserError, match="could not commit the edit of fact f1") as error:
            ed.apply(FACTS, checks=None, repair_every=0)
        assert "\n" not in error.value.message and "resumes" in error.value.hint
        assert ed.head == 1
        disk.free()
        assert head_hash(path)[0] == 1
        ed.apply(FACTS, checks=None, repair_every=0)  # the same call again: it resumes
    assert head_hash(path) == reference


def test_a_rejection_record(disk, lm):
    path = disk.root / "journal"
    with editor(path, lm, guard_max_relative=1e-9) as ed:  # every edit is refused by the guard
        ed.prefixes(), ed.stats(ed.hparams.layer)
        disk.fill()
        with pytest.raises(UserError, match="could not write to journal"):
            ed.apply(FACTS[:1], checks=None, repair_every=0)
        disk.free()
        with Journal(path) as j:
            assert j.rejections() == [] and audit(j.db) == []
        result = ed.apply(FACTS[:1], checks=None, repair_every=0)
    assert [r.status for r in result.results] == ["rejected"]
    with Journal(path) as j:
        assert [r["fact_id"] for r in j.rejections()] == ["f0"]


def test_meta_writes_prefixes_and_a_repair_plan(disk, lm, reference):
    path = disk.root / "journal"
    with editor(path, lm) as ed:
        disk.fill()
        with pytest.raises(UserError, match="could not write to journal"):
            ed.prefixes()
        disk.free()
        ed.apply(FACTS, checks=None, repair_every=0)
        disk.fill()
        with pytest.raises(UserError, match="could not write to journal"):
            ed.repair()  # its plan is journaled before its first repair
        disk.free()
        with Journal(path) as j:
            assert j.get("repair_plan") is None and audit(j.db) == []
        ed.repair()
    assert head_hash(path)[1] == reference[1] or head_hash(path)[0] > reference[0]


def test_a_migration(disk):
    path = disk.root / "old"
    path.mkdir()
    db = sqlite3.connect(str(path / DB_NAME), isolation_level=None)
    migrate(db, stop_before="m004_row_hashes")
    rng = np.random.default_rng(0)
    for seq in range(1, 200):  # enough rows that hashing them all needs new pages
        db.execute(
            "INSERT INTO edits (seq, parent, status, fact_id, fact_hash, fact_json, layer, weight_name, lam, "
            "u, update_norm, denominator, weight_hash_before, weight_hash_after, created_at) VALUES "
            "(?, ?, 'applied', ?, ?, ?, 1, 'w', ?, ?, 1.0, 1.0, 'a', 'b', 'now')",
            (
                seq,
                seq - 1,
                f"f{seq}",
                f"h{seq}",
                json.dumps({"subject": "S", "prompt": "{} is", "target_new": f"T{seq}", "id": f"f{seq}"}),
                rng.normal(size=8).astype("<f4").tobytes(),
                rng.normal(size=16).astype("<f4").tobytes(),
            ),
        )
    db.execute("INSERT INTO meta VALUES ('head', '199')")
    db.close()
    before = (path / DB_NAME).read_bytes()
    disk.fill()
    with pytest.raises(UserError, match="cannot update the journal") as error:
        Journal(path, write=True)
    assert "\n" not in error.value.message
    disk.free()
    with Journal(path) as reader:  # still the old journal, readable
        assert reader.head == 199 and "row_hash" not in {r[1] for r in reader.db.execute("PRAGMA table_info(edits)")}
    assert (path / DB_NAME).read_bytes() == before or not (path / f"{DB_NAME}-wal").exists()
    with Journal(path, write=True) as writer:
        assert all(r.row_hash for r in writer.edits())


def test_the_key_statistics_cache(disk, lm, reference, monkeypatch, tmp_path):
    monkeypatch.setenv("ROMEBATCH_HOME", str(disk.root / "home"))
    (disk.root / "home").mkdir()
    disk.fill()
    messages = []
    path = tmp_path / "journal"  # the journal has room; the cache has none
    with Editor(path, lm=lm(), hparams=HParams(**TINY_HPARAMS), log=messages.append) as ed:
        ed.apply(FACTS, checks=None, repair_every=0)
    assert any("Could not cache the key statistics" in m for m in messages), messages
    assert head_hash(path) == reference
    assert not [p for p in (disk.root / "home").rglob("*") if p.is_file()], "a partial cache file was left"


def test_export(disk, lm, tmp_path):
    path = tmp_path / "journal"
    with editor(path, lm) as ed:
        ed.apply(FACTS[:1], checks=None, repair_every=0)
        ed.export(disk.root / "earlier")  # fits: the tiny model is well under the disk's size
        disk.fill()
        out = disk.root / "out"
        with pytest.raises(UserError, match="could not write the export") as error:
            ed.export(out)
        assert "\n" not in error.value.message
        assert not out.exists()
        with pytest.raises(UserError, match="could not write the export"):
            ed.export(disk.root / "earlier", force=True)
        assert (disk.root / "earlier" / "romebatch.json").is_file()  # the earlier export is intact
        assert sorted(p.name for p in disk.root.iterdir()) == [".filler", "earlier"], "staging left behind"
        disk.free()
        ed.export(out)
    assert (out / "romebatch.json").is_file()


def test_the_cli_on_a_full_disk_says_one_line(disk, tiny_folder, tmp_path):
    """A journal that cannot even be created: one line, exit 2, as a user sees it."""
    model = tiny_folder("gpt2")
    manifest = tmp_path / "facts.csv"
    manifest.write_text("id,subject,prompt,target_new\nneedle,The Space Needle,{} is located in the city of,Paris\n")
    hp = tmp_path / "hp.yaml"
    hp.write_text(json.dumps({**TINY_HPARAMS, "prefixes": [list(p) for p in TINY_HPARAMS["prefixes"]]}))
    disk.fill()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "romebatch",
            "apply",
            str(manifest),
            "--model",
            str(model),
            "--hparams",
            str(hp),
            "--journal",
            str(disk.root / "J"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert lines[-2].startswith("error: ") and lines[-1].startswith("hint: "), lines
