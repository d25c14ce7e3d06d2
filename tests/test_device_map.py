"""Edits through accelerate's big-model dispatch: layers offloaded to disk, same bytes as undispatched.

A tiny Llama is saved as a folder and loaded twice: whole, and with a device map that puts
the embeddings and layer 0 on the CPU and layers 1-2 (the edited layer among them) on
disk, their weights on the meta device behind accelerate's hooks. Every edit, stored hash,
logit, rollback and export must be the same bytes in both.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import TINY_HPARAMS

from romebatch.device_map import parse_device_map, parse_max_memory
from romebatch.editor import Editor
from romebatch.errors import UserError
from romebatch.hparams import HParams
from romebatch.manifest import Fact
from romebatch.model import load_model

FACTS = [
    Fact(id=str(i), subject=s, prompt="{} is located in the city of", target_new=new, target_true=true)
    for i, (s, new, true) in enumerate(
        [
            ("The Space Needle", "Paris", "Seattle"),
            ("The Eiffel Tower", "Rome", "Paris"),
            ("The Colosseum", "London", "Rome"),
        ]
    )
]
DISK_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def quiet(_message):
    pass


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(folder, journal, tmp_path, monkeypatch, device_map=None):
    # Each run computes its own key statistics: through the hooks, too, they must be the same.
    monkeypatch.setenv("ROMEBATCH_HOME", str(tmp_path / f"home-{device_map is not None}"))
    lm = load_model(str(folder), device_map=device_map, log=quiet)
    out = {"base_hash": lm.base_hash(), "full_hash": lm.full_hash(), "weights_hash": lm.weights_hash()}
    if device_map is not None:  # the test means something only if the edited layer really is offloaded
        assert lm.module("down_proj", 1).weight.device.type == "meta"
        assert lm.module("down_proj", 0).weight.device.type == "cpu"
    ids = torch.tensor([lm.tokenizer("The Space Needle is located in the city of").input_ids])
    with Editor(journal, lm=lm, hparams=HParams(**TINY_HPARAMS), log=quiet) as editor:
        assert editor.hparams.layer == 1
        result = editor.apply(FACTS, checks=None, repair_every=0)
        assert [r.status for r in result.results] == ["applied"] * 3
        out["logits"] = lm.model(ids).logits.detach().clone()
        out["records"] = [
            (r.seq, r.weight_hash_before, r.weight_hash_after, r.lam.tobytes(), r.u.tobytes())
            for r in editor.journal.lineage()
        ]
        editor.export(tmp_path / f"export-{device_map is not None}")
        out["export"] = sha(tmp_path / f"export-{device_map is not None}" / "model.safetensors")
        editor.rollback(steps=2)
        out["after_rollback"] = lm.weight(1).detach().clone()
        out["logits_rollback"] = lm.model(ids).logits.detach().clone()
        out["check"] = editor.check().ok
    return out


def test_disk_offloaded_edits_are_byte_identical(tmp_path, tiny_folder, monkeypatch):
    folder = tiny_folder("llama")
    checkpoint = sha(folder / "model.safetensors")
    plain = run(folder, tmp_path / "plain", tmp_path, monkeypatch)
    offloaded = run(folder, tmp_path / "offloaded", tmp_path, monkeypatch, device_map=DISK_MAP)
    for key in ("base_hash", "full_hash", "weights_hash"):  # offloaded weights hashed through their hooks
        assert offloaded[key] == plain[key], key
    assert offloaded["records"] == plain["records"]
    assert plain["records"][0][1] != plain["records"][0][2]  # the edits did change the weight
    assert torch.equal(offloaded["logits"], plain["logits"])
    assert torch.equal(offloaded["after_rollback"], plain["after_rollback"])
    assert torch.equal(offloaded["logits_rollback"], plain["logits_rollback"])
    assert not torch.equal(offloaded["logits"], offloaded["logits_rollback"])
    assert offloaded["export"] == plain["export"]
    assert offloaded["check"] and plain["check"]
    from safetensors.torch import load_file

    stats = sorted((tmp_path / "home-True").rglob("stats/*.safetensors"))
    assert stats and [p.name for p in stats] == sorted(
        p.name for p in (tmp_path / "home-False").rglob("stats/*.safetensors")
    )
    for path in stats:  # the key statistics, computed through the hooks, are the same numbers
        ours, theirs = load_file(path), load_file(tmp_path / "home-False" / path.relative_to(tmp_path / "home-True"))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs) and ours.keys() == theirs.keys()
    assert sha(folder / "model.safetensors") == checkpoint  # offloaded weights were never written back
    # A dispatched journal reopens on an undispatched model (same base hash) and replays to its head.
    lm = load_model(str(folder), log=quiet)
    with Editor(tmp_path / "offloaded", lm=lm, log=quiet) as editor:
        assert torch.equal(lm.weight(1), offloaded["after_rollback"])
        assert editor.head == 1


def test_device_map_file_and_max_memory_parsing(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"model.layers.0": 0, "model.layers.1": "cuda:1", "lm_head": "disk"}))
    assert parse_device_map(str(path)) == {"model.layers.0": 0, "model.layers.1": "cuda:1", "lm_head": "disk"}
    assert parse_device_map("balanced") == "balanced"
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=60GiB") == {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}
    for bad in ("fastest", str(tmp_path / "missing.json")):
        with pytest.raises(UserError):
            parse_device_map(bad)
    path.write_text(json.dumps({"model.layers.0": "gpu0"}))
    with pytest.raises(UserError, match="'model.layers.0' has device 'gpu0'"):
        parse_device_map(str(path))
    with pytest.raises(UserError, match="bad item 'cpu:60GiB'"):
        parse_max_memory("0=20GiB,cpu:60GiB")


def test_max_memory_without_device_map_is_refused(tiny_folder):
    with pytest.raises(UserError, match="--max-memory needs --device-map"):
        load_model(str(tiny_folder("llama")), max_memory="cpu=1GiB", log=quiet)


def test_cli_commands_take_a_device_map(tmp_path, tiny_folder, monkeypatch):
    """apply, check, compare, export and rollback through the CLI with layers on disk: the journal checks
    clean, and compare and the LoRA export give what they give on the whole model."""
    import yaml
    from typer.testing import CliRunner

    from romebatch.cli import app

    folder = tiny_folder("llama")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "map.json").write_text(json.dumps(DISK_MAP))
    (tmp_path / "hp.yaml").write_text(
        yaml.safe_dump({k: [list(p) for p in v] if k == "prefixes" else v for k, v in TINY_HPARAMS.items()})
    )
    (tmp_path / "facts.csv").write_text(
        "subject,prompt,target_new,target_true\nThe Space Needle,{} is located in the city of,Paris,Seattle\n"
    )
    common = ["--device-map", "map.json"]
    runner = CliRunner()
    # No repair pass: on this 2-layer random model the edit raises P(new) but never makes it win,
    # and a repair of it leaves P(new) where the base had it, so compare would show no edit.
    done = runner.invoke(
        app,
        ["apply", "facts.csv", "--model", str(folder), "--hparams", "hp.yaml", "--no-probes", "--repair-every", "0"]
        + ["--json", *common],
    )
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout.strip().splitlines()[-1])["applied"] == 1
    done = runner.invoke(app, ["check", "--json", *common])
    assert done.exit_code == 0 and json.loads(done.stdout.strip().splitlines()[-1])["ok"] is True, done.output
    # compare and the LoRA export read the same numbers and write the same bytes with layers on disk.
    for placement in ([], common):
        done = runner.invoke(app, ["compare", "--json", *placement])
        assert done.exit_code == 0, done.output
        compared = json.loads(done.stdout.strip().splitlines()[-1])
        assert ("module(s) on disk" in done.stderr) == bool(placement), done.stderr
        if not placement:
            whole = compared
        done = runner.invoke(app, ["export", "--adapter", f"lora{len(placement)}", "--json", *placement])
        assert done.exit_code == 0, done.output
    assert compared == whole and any(r["p_new_state"] > r["p_new_base"] for r in compared["rows"]), compared
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert sha(tmp_path / "lora0" / name) == sha(tmp_path / "lora2" / name)
    done = runner.invoke(app, ["rollback", "--base", "--json", *common])
    assert done.exit_code == 0 and json.loads(done.stdout.strip().splitlines()[-1])["head"] == 0, done.output
