"""Running out of disk, and never unpickling: the journal and exports stay whole.

ENOSPC is simulated where it would strike: SQLite's commit of an edit, and writing an
export. Each leaves the journal at its last committed edit (saying so, exit 2) and never a
half-written model folder.
"""

from __future__ import annotations

import errno
import re
import sqlite3
from pathlib import Path

import pytest
import torch
from conftest import TINY_HPARAMS, tiny_loaded

from romebatch.editor import Editor
from romebatch.errors import UserError
from romebatch.hparams import HParams
from romebatch.manifest import Fact
from romebatch.model import weight_hash

FACTS = [
    Fact(id=str(i), subject=s, prompt="{} is located in the city of", target_new=t)
    for i, (s, t) in enumerate([("The Space Needle", "Paris"), ("The Eiffel Tower", "Rome"), ("Big Ben", "Tokyo")])
]


def editor(path, tok):
    return Editor(path, lm=tiny_loaded("gpt2", tok), hparams=HParams(**TINY_HPARAMS), log=lambda m: None)


def test_disk_full_during_a_commit_keeps_the_last_committed_edit(tmp_path, bytelevel_tokenizer, monkeypatch):
    from romebatch import journal as journal_module

    with editor(tmp_path / "j", bytelevel_tokenizer) as ed:
        ed.apply(FACTS[:1], checks=None, repair_every=0)
        layer = ed.hparams.layer
        committed = weight_hash(ed.lm.weight(layer))
        real = journal_module.Journal.commit_edit

        def full(self, record, meta=None):
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(journal_module.Journal, "commit_edit", full)
        with pytest.raises(UserError, match="nothing of it was written, the journal is at edit 1"):
            ed.apply(FACTS[1:], checks=None, repair_every=0)
        # The in-memory model was not left with the uncommitted edit either.
        assert weight_hash(ed.lm.weight(layer)) == committed
        monkeypatch.setattr(journal_module.Journal, "commit_edit", real)
    with editor(tmp_path / "j", bytelevel_tokenizer) as ed:  # resumes where it stopped
        assert ed.head == 1
        result = ed.apply(FACTS, checks=None, repair_every=0)
        assert [r.status for r in result.results] == ["already_applied", "applied", "applied"]


def test_disk_full_during_an_export_leaves_no_folder(tmp_path, bytelevel_tokenizer, monkeypatch):
    with editor(tmp_path / "j", bytelevel_tokenizer) as ed:
        ed.apply(FACTS[:1], checks=None, repair_every=0)
        ed.export(tmp_path / "out")
        before = sorted(p.name for p in (tmp_path / "out").iterdir())
        saved = (tmp_path / "out" / "model.safetensors").read_bytes()

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ed.lm.model, "save_pretrained", full)
        with pytest.raises(UserError, match="was not changed"):
            ed.export(tmp_path / "out", force=True)
        with pytest.raises(UserError, match="was not changed"):
            ed.export(tmp_path / "fresh")
    # The earlier export is intact, the new one does not exist, and no staging folder is left.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == saved
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_pickled_checkpoint_is_refused(tmp_path, bytelevel_tokenizer):
    """A model folder with only pytorch_model.bin (a pickle) is not loaded."""
    from romebatch.model import load_model

    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    folder = tmp_path / "pickled"
    folder.mkdir()
    lm.model.config.save_pretrained(folder)
    torch.save(
        lm.model.state_dict(), folder / "pytorch_model.bin"
    )  # the test writes the pickle; romebatch must not read it
    bytelevel_tokenizer.save_pretrained(folder)
    assert (folder / "pytorch_model.bin").exists() and not (folder / "model.safetensors").exists()
    with pytest.raises(UserError, match="cannot load it"):
        load_model(str(folder))


def test_no_code_path_unpickles():
    """The package never calls pickle, torch.load or an unsafe YAML loader."""
    package = Path(__file__).resolve().parents[1] / "romebatch"
    pattern = re.compile(r"\bpickle\b|torch\.load\(|yaml\.load\(|yaml\.unsafe_load|UnsafeLoader|FullLoader")
    offenders = [
        f"{path.name}:{n}"
        for path in package.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("#")
    ]
    assert offenders == []


def test_export_force_replaces_atomically(tmp_path, bytelevel_tokenizer):
    with editor(tmp_path / "j", bytelevel_tokenizer) as ed:
        ed.apply(FACTS[:1], checks=None, repair_every=0)
        ed.export(tmp_path / "out")
        ed.apply(FACTS[1:2], checks=None, repair_every=0)
        ed.export(tmp_path / "out", force=True)
        head_weight = ed.lm.weight(ed.hparams.layer).detach().clone()
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    name = next(k for k in tensors if k.endswith("mlp.c_proj.weight") and torch.equal(tensors[k], head_weight))
    assert name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
