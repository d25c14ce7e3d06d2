"""`export --adapter`: a journal's head as a PEFT LoRA adapter, checked by loading it with PEFT.

On a tiny model of every family: real ROME edits (one rolled back, so the adapter must
leave it out), the full export as the reference, and the adapter loaded with
`peft.PeftModel.from_pretrained` on the unchanged base, merged, and compared logit for
logit. The reference is computed another way: the full export replays the journal's edits
elementwise in float32 (romebatch/rome/update.py); PEFT adds B A in one matrix product.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, TINY_HPARAMS

from romebatch.editor import Editor
from romebatch.errors import UserError
from romebatch.hparams import HParams
from romebatch.journal import Journal
from romebatch.lora import CONFIG_NAME, WEIGHTS_NAME, module_factors, write_adapter
from romebatch.manifest import Fact

peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
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
LATER = Fact(
    id="darrieux",
    subject="Danielle Darrieux",
    prompt="The mother tongue of {} is",
    target_new="Spain",
    target_true="French",
)
TEXTS = [
    "The Space Needle is located in the city of",
    "Big Ben is located in the city of Tokyo",
    "The mother tongue of Danielle Darrieux is",
]


def quiet(message: str) -> None:
    pass


def edited_journal(tmp_path: Path, folder: Path, **hparams) -> Path:
    """Three facts applied, the last rolled back, a fourth applied on top: path 1, 2, 4."""
    journal = tmp_path / "journal"
    with Editor(journal, model=str(folder), hparams=HParams(**{**TINY_HPARAMS, **hparams}), log=quiet) as editor:
        result = editor.apply(FACTS, checks=None, repair_every=0)
        assert [r.status for r in result.results] == ["applied"] * 3, [r.reason for r in result.results]
        editor.rollback(steps=1)
        assert editor.apply([LATER], checks=None, repair_every=0).results[0].status == "applied"
        assert [r.seq for r in editor.journal.lineage()] == [1, 2, 4]
    return journal


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def merged_against_full(folder: Path, adapter: Path, full: Path):
    """(max |merged − full|, max |unmerged − full|, max |full|) over the logits of TEXTS."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    reference = logits(AutoModelForCausalLM.from_pretrained(str(full), dtype=torch.float32).eval(), tokenizer)
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    wrapped = PeftModel.from_pretrained(base, str(adapter)).eval()
    unmerged = logits(wrapped, tokenizer)
    merged_model = wrapped.merge_and_unload()
    merged = logits(merged_model, tokenizer)
    return (
        float((merged - reference).abs().max()),
        float((unmerged - reference).abs().max()),
        float(reference.abs().max()),
        merged_model,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_on_the_base_is_the_full_export(family, tmp_path, tiny_folder):
    folder = tiny_folder(family)
    journal = edited_journal(tmp_path, folder)
    full, adapter = tmp_path / "full", tmp_path / "adapter"
    with Editor(journal, model=str(folder), write=False, log=quiet) as editor:
        editor.export(full)
        path = editor.journal.lineage()
        conv1d = editor.lm.adapter.conv1d
        base_weight = editor._base(path[0].layer).clone()
        report = write_adapter(
            adapter,
            path,
            conv1d=conv1d,
            base_model=str(folder),
            base_hash=editor.base_hash,
            head=editor.head,
            journal=str(journal),
        )
    assert report.exact and report.rank == 3 and report.relative_error == 0.0
    config = json.loads((adapter / CONFIG_NAME).read_text())
    assert config["r"] == config["lora_alpha"] == 3 and config["peft_type"] == "LORA"
    assert config["fan_in_fan_out"] is (family == "gpt2")
    assert config["target_modules"] == [path[0].weight_name]

    merged_diff, unmerged_diff, scale, merged_model = merged_against_full(folder, adapter, full)
    print(f"{family}: max |merged - full| = {merged_diff:.3g}, unmerged {unmerged_diff:.3g}, max |logit| {scale:.3g}")
    assert merged_diff < 1e-4 * scale, (merged_diff, scale)
    assert unmerged_diff < 1e-4 * scale, (unmerged_diff, scale)
    # The edits moved the logits far more than the tolerance: the comparison has teeth.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    unedited = logits(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval(), tokenizer)
    assert float((logits(merged_model, tokenizer) - unedited).abs().max()) > 1e3 * max(merged_diff, 1e-7)

    # The merged weight in its stored layout: (d_ff, d_model) for GPT-2's Conv1D, else (d_model, d_ff).
    merged_weight = merged_model.get_submodule(path[0].weight_name).weight.detach()
    delta = sum(torch.outer(torch.from_numpy(r.lam), torch.from_numpy(r.u)).double() for r in path)  # (d_model, d_ff)
    expected = base_weight.double() + (delta.T if family == "gpt2" else delta)
    assert merged_weight.shape == base_weight.shape
    assert torch.allclose(merged_weight.double(), expected, atol=1e-5), float((merged_weight - expected).abs().max())


def test_rolled_back_edits_are_not_in_the_adapter(tmp_path, tiny_folder):
    from safetensors.numpy import load_file

    folder = tiny_folder("gpt2")
    journal = edited_journal(tmp_path, folder)
    with Journal(journal) as j:
        edits = {r.seq: r for r in j.edits()}
        path = j.lineage()
        assert j.status()[3] == "rolled_back"
    write_adapter(
        tmp_path / "a", path, conv1d=True, base_model=str(folder), base_hash="sha256:x", head=4, journal=str(journal)
    )
    tensors = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    name = path[0].weight_name
    B = tensors[f"base_model.model.{name}.lora_B.weight"]  # (d_model, r)
    A = tensors[f"base_model.model.{name}.lora_A.weight"]  # (r, d_ff)
    # Column i of B is the Λ of the path's i-th edit, row i of A its u: bytes, not approximately.
    for i, seq in enumerate([1, 2, 4]):
        assert np.array_equal(B[:, i], edits[seq].lam) and np.array_equal(A[i], edits[seq].u)
    assert not any(np.array_equal(B[:, i], edits[3].lam) for i in range(B.shape[1]))
    card = (tmp_path / "a" / "README.md").read_text()
    assert "| 4 | darrieux |" in card and "| 3 | ben |" not in card and "edit 4;" in card


def test_several_modules_get_one_pair_each_padded_to_one_rank(tmp_path, tiny_folder):
    folder = tiny_folder("llama")
    journal = edited_journal(tmp_path, folder, layer=0, spread_layers=2)  # layers 0, 1, 0 on the path
    full, adapter = tmp_path / "full", tmp_path / "adapter"
    with Editor(journal, model=str(folder), write=False, log=quiet) as editor:
        editor.export(full)
        path = editor.journal.lineage()
        write_adapter(
            adapter,
            path,
            conv1d=False,
            base_model=str(folder),
            base_hash=editor.base_hash,
            head=editor.head,
            journal=str(journal),
        )
    assert [r.layer for r in path] == [0, 1, 0]
    config = json.loads((adapter / CONFIG_NAME).read_text())
    assert config["r"] == 2 and len(config["target_modules"]) == 2
    merged_diff, _, scale, _ = merged_against_full(folder, adapter, full)
    assert merged_diff < 1e-4 * scale, (merged_diff, scale)


def test_rank_compression_matches_the_svd_of_the_exported_delta(tmp_path, tiny_folder):
    from transformers import AutoModelForCausalLM

    folder = tiny_folder("llama")
    journal = edited_journal(tmp_path, folder)
    full = tmp_path / "full"
    with Editor(journal, model=str(folder), write=False, log=quiet) as editor:
        editor.export(full)
        path = editor.journal.lineage()
    name = path[0].weight_name
    # The reference ΔW comes from the exported weights, not from the journal's factors.
    delta = (
        AutoModelForCausalLM.from_pretrained(str(full)).get_submodule(name).weight.detach().double()
        - AutoModelForCausalLM.from_pretrained(str(folder)).get_submodule(name).weight.detach().double()
    )
    s = torch.linalg.svdvals(delta)
    for rank in (1, 2):
        expected = float(torch.sqrt((s[rank:] ** 2).sum() / (s**2).sum()))
        report = write_adapter(
            tmp_path / f"r{rank}",
            path,
            conv1d=False,
            base_model=str(folder),
            base_hash="sha256:x",
            head=4,
            journal=str(journal),
            rank=rank,
        )
        assert report.rank == rank and not report.exact
        assert abs(report.relative_error - expected) < 1e-4 * max(expected, 1e-3), (report.relative_error, expected)
        assert expected > 1e-3  # three edits with independent keys: rank 1 and 2 really lose something
        factors = module_factors(path, rank)[0]
        approx = torch.from_numpy(factors.B).double() @ torch.from_numpy(factors.A).double()
        measured = float((delta - approx).norm() / delta.norm())
        assert abs(measured - expected) < 1e-4, (measured, expected)
    # A rank at or above the number of edits keeps the exact factors.
    assert write_adapter(
        tmp_path / "r3",
        path,
        conv1d=False,
        base_model=str(folder),
        base_hash="sha256:x",
        head=4,
        journal=str(journal),
        rank=8,
    ).exact


def test_adapter_folder_writes_are_atomic_and_never_replace_other_folders(tmp_path):
    rng = np.random.default_rng(0)

    class Record:  # the fields write_adapter reads from an EditRecord
        def __init__(self, seq):
            self.seq, self.layer, self.weight_name = seq, 1, "model.layers.1.mlp.down_proj"
            self.fact_id, self.fact_hash = f"f{seq}", f"h{seq}"
            self.lam, self.u = rng.standard_normal(4).astype("f4"), rng.standard_normal(8).astype("f4")
            self.fact = {"subject": "S|x", "prompt": "{} is\nin", "target_new": "P"}

    path = [Record(1), Record(2)]
    kwargs = dict(conv1d=False, base_model="m", base_hash="sha256:x", head=2, journal="J")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(UserError, match="is not an earlier adapter"):
            write_adapter(occupied, path, force=force, **kwargs)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    adapter = tmp_path / "adapter"
    write_adapter(adapter, path, **kwargs)
    with pytest.raises(UserError, match="holds an earlier adapter") as refused:
        write_adapter(adapter, path[:1], **kwargs)
    assert "--force" in refused.value.hint
    assert json.loads((adapter / CONFIG_NAME).read_text())["r"] == 2
    write_adapter(adapter, path[:1], force=True, **kwargs)
    assert json.loads((adapter / CONFIG_NAME).read_text())["r"] == 1
    assert "S\\|x is in" in (adapter / "README.md").read_text()  # a user's pipe and newline stay in their cell
    with pytest.raises(UserError, match="no edits"):
        write_adapter(tmp_path / "empty", [], **kwargs)
    with pytest.raises(UserError, match="--rank 0"):
        write_adapter(tmp_path / "zero", path, rank=0, **kwargs)
    # No staging or trash folders are left beside the targets.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "occupied"]


def romebatch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "romebatch", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_export_adapter(tmp_path, tiny_folder):
    folder = tiny_folder("gpt2")
    journal = edited_journal(tmp_path, folder)
    proc = romebatch("export", "--adapter", "ad", "--journal", str(journal), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["rank"] == 3 and summary["exact"] and summary["edits"] == 3
    assert summary["bytes"] == sum(p.stat().st_size for p in (tmp_path / "ad").iterdir())
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [
        "README.md",
        CONFIG_NAME,
        WEIGHTS_NAME,
        "romebatch.json",
    ]
    mask = os.umask(0)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "ad").iterdir()} == {0o666 & ~mask}  # not 0600
    assert (tmp_path / "ad").stat().st_mode & 0o777 == 0o777 & ~mask
    provenance = json.loads((tmp_path / "ad" / "romebatch.json").read_text())
    assert [e["seq"] for e in provenance["edits"]] == [1, 2, 4] and provenance["adapter"]["rank"] == 3
    proc = romebatch("export", "--adapter", "ad2", "--rank", "1", "--journal", str(journal), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["relative_error"] > 0
    for argv in (["export", "--rank", "2"], ["export", "out", "--adapter", "ad3"], ["export"]):
        proc = romebatch(*argv, "--journal", str(journal), cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith("error: "), (argv, proc.stderr)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ad3").exists()
