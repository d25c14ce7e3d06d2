"""Conventions users expect, each through the CLI: --version, environment defaults, one unit for
--min-retention, real defaults in --help, the journal's dtype, export --dtype and its model card,
--retry-rejected, and the one-call `romebatch.edit`.

Real journals are built on the tiny GPT-2 of conftest (a model folder the CLI opens with
--model); where only parsing matters, the library call is replaced by a recorder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_HPARAMS
from test_cli import Recorder, write_journal
from typer.testing import CliRunner

import romebatch
from romebatch import api
from romebatch.cli import app
from romebatch.errors import UserError
from romebatch.hparams import HParams
from romebatch.journal import Journal
from romebatch.manifest import Fact, Neighbor
from romebatch.probes import Thresholds

BEN = Fact(id="ben", subject="Big Ben", prompt="{} is located in the city of", target_new="Tokyo", target_true="London")
HARMFUL = Fact(
    id="harmful",
    subject="Toko Yasuda",
    prompt="{} is located in the city of",
    target_new="Paris",
    target_true="guitar",
    neighborhood=(Neighbor("Toko Yasuda is located in the city of", "guitar"),),
)


def quiet(_message):
    pass


def main_exit(monkeypatch, capsys, *argv) -> tuple[int, str]:
    """cli.main() in process: (exit status, stderr)."""
    from romebatch.cli import main

    monkeypatch.setattr(sys, "argv", ["romebatch", *map(str, argv)])
    try:
        main()
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    return code, capsys.readouterr().err


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    for where in ("romebatch.model.load_model", "romebatch.editor.load_model"):
        monkeypatch.setattr(where, refuse)


def write_manifest(path: Path, facts) -> Path:
    path.write_text("".join(json.dumps({k: v for k, v in f.to_dict().items() if k != "source"}) + "\n" for f in facts))
    return path


def write_hparams(path: Path) -> Path:
    path.write_text(
        yaml.safe_dump({k: [list(p) for p in v] if k == "prefixes" else v for k, v in TINY_HPARAMS.items()})
    )
    return path


# ----------------------------------------------------------------------------- --version, env
def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"romebatch {romebatch.__version__}\n"


def test_environment_defaults_for_journal_and_model(tmp_path, monkeypatch):
    directory = tmp_path / "EnvJ"
    write_journal(directory, ["sha256:a"])
    runner = CliRunner()
    data = json.loads(
        runner.invoke(app, ["log", "--json"], env={"ROMEBATCH_JOURNAL": str(directory)}).stdout.splitlines()[-1]
    )
    assert data["journal"] == str(directory) and [e["seq"] for e in data["edits"]] == [1]
    # An explicit --journal wins over the environment.
    other = tmp_path / "Other"
    write_journal(other, ["sha256:a", "sha256:b"])
    data = json.loads(
        runner.invoke(
            app, ["log", "--json", "-j", str(other)], env={"ROMEBATCH_JOURNAL": str(directory)}
        ).stdout.splitlines()[-1]
    )
    assert data["journal"] == str(other)

    recorder = Recorder(lambda outdir, **kwargs: Path(outdir))
    monkeypatch.setattr("romebatch.api.export", recorder)
    assert (
        runner.invoke(app, ["export", "OUT"], env={"ROMEBATCH_MODEL": "some/model", "ROMEBATCH_JOURNAL": "J"}).exit_code
        == 0
    )
    assert recorder.calls[-1][1]["model"] == "some/model" and recorder.calls[-1][1]["journal"] == Path("J")
    assert runner.invoke(app, ["export", "OUT", "--model", "x/y"], env={"ROMEBATCH_MODEL": "some/model"}).exit_code == 0
    assert recorder.calls[-1][1]["model"] == "x/y"


# ----------------------------------------------------------------------------- one unit, checked ranges
def test_min_retention_is_a_share_in_verify_as_in_apply(tmp_path, monkeypatch, capsys, no_model):
    recorder = Recorder(lambda journal, **kwargs: (_ for _ in ()).throw(UserError("stop here")))
    monkeypatch.setattr("romebatch.api.verify", recorder)
    code, err = main_exit(monkeypatch, capsys, "verify", "--min-retention", "0.75", "--min-efficacy", "0.5")
    assert code == 2 and "stop here" in err
    thresholds = recorder.calls[-1][1]["thresholds"]
    assert thresholds.min_retention == 0.75 and thresholds.min_efficacy == 0.5

    code, err = main_exit(monkeypatch, capsys, "verify", "--min-retention", "90")
    assert code == 2 and err.splitlines()[0] == "error: --min-retention 90: give a share between 0 and 1 (0.9 for 90%)"
    manifest = write_manifest(tmp_path / "f.jsonl", [BEN])
    for option, value in (
        ("--min-retention", "80"),
        ("--max-neighborhood-drop", "1.5"),
        ("--max-probe-regression", "-0.1"),
        ("--probe-budget", "0"),
    ):
        code, err = main_exit(monkeypatch, capsys, "apply", manifest, "--journal", tmp_path / "J", option, value)
        assert code == 2 and err.startswith(f"error: {option} "), (option, err)
    assert not (tmp_path / "J").exists()  # nothing written
    assert Thresholds(min_retention=1.0).min_retention == 1.0  # the ends of the range are valid


def test_help_shows_the_real_defaults_of_the_rome_settings():
    hp = HParams()
    text = CliRunner().invoke(app, ["apply", "--help"], env={"COLUMNS": "400"}).output
    text = " ".join(text.split())  # undo rich's wrapping
    for expected in (
        f"Adam learning rate for v*; default {hp.v_lr:g}.",
        f"Weight of the essence KL term; default {hp.kl_factor:g}.",
        f"Corpus tokens for the key statistics; default {hp.stats_tokens:,}.",
        f"default {hp.preserve}.",
        f"λ for --preserve covariance; default {hp.preserve_weight:g}.",
        f"layers from --layer; default {hp.spread_layers}.",
        "default 20, 25 for Llama-style models",
        "(1 on Gemma-3-270M), else a quarter of its depth",
    ):
        assert expected in text, expected


# ----------------------------------------------------------------------------- dtype, export
def test_a_bfloat16_journal_reopens_in_bfloat16(tmp_path, tiny_folder):
    folder = tiny_folder("gpt2")
    journal = tmp_path / "J"
    result = api.apply(
        write_manifest(tmp_path / "f.jsonl", [BEN]),
        journal=journal,
        model=str(folder),
        dtype="bfloat16",
        hparams=HParams(**TINY_HPARAMS),
        checks=None,
        repair_every=0,
        log=quiet,
    )
    assert [r.status for r in result.results] == ["applied"]
    with Journal(journal) as j:
        assert j.get("dtype") == "bfloat16"
    # No --dtype anywhere: check, verify, export and rollback all open it in its own dtype.
    assert api.check(journal, model=str(folder), log=quiet).ok
    assert api.verify(journal, model=str(folder), log=quiet).rows[0].fact_id == "ben"
    out = api.export(tmp_path / "out", journal=journal, model=str(folder), log=quiet)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert api.rollback(journal, steps=1, model=str(folder), log=quiet) == 0
    with pytest.raises(UserError, match="computed in bfloat16, but the model was loaded in float32"):
        romebatch.Editor(journal, model=str(folder), dtype="float32", log=quiet)


def test_export_dtype_casts_the_written_weights_only_and_writes_a_model_card(tmp_path, tiny_folder):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = tiny_folder("gpt2")
    journal = tmp_path / "J"
    api.apply(
        write_manifest(tmp_path / "f.jsonl", [BEN]),
        journal=journal,
        model=str(folder),
        hparams=HParams(**TINY_HPARAMS),
        checks=None,
        repair_every=0,
        log=quiet,
    )
    runner = CliRunner()
    for dtype in ("float32", "bfloat16"):
        result = runner.invoke(
            app,
            ["export", str(tmp_path / dtype), "-j", str(journal), "-m", str(folder)]
            + (["--dtype", dtype] if dtype != "float32" else []),
        )
        assert result.exit_code == 0, result.output
    full = load_file(tmp_path / "float32" / "model.safetensors")
    half = load_file(tmp_path / "bfloat16" / "model.safetensors")
    assert full.keys() == half.keys()
    for name, tensor in full.items():
        assert tensor.dtype == torch.float32 and half[name].dtype == torch.bfloat16, name
        assert torch.equal(half[name], tensor.to(torch.bfloat16)), name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bfloat16")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    # The journal's float32 state was not touched by the cast: a second float32 export is the same.
    assert runner.invoke(app, ["export", str(tmp_path / "again"), "-j", str(journal), "-m", str(folder)]).exit_code == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        tmp_path / "float32" / "model.safetensors"
    ).read_bytes()

    card = (tmp_path / "bfloat16" / "README.md").read_text()
    provenance = json.loads((tmp_path / "bfloat16" / "romebatch.json").read_text())
    assert provenance["dtype"] == "bfloat16" and provenance["head"] == 1
    assert card.startswith("---\n") and "- model-editing" in card
    assert f"`{folder}` with 1 [ROME]" in card and "head 1" in card and "| weights | bfloat16 |" in card
    assert "| ben | Big Ben is located in the city of | Tokyo |" in card
    assert "--dtype bfloat16" in card
    assert (tmp_path / "float32" / "README.md").exists()
    with pytest.raises(UserError, match="--dtype 'int8'"):
        api.export(tmp_path / "x", journal=journal, model=str(folder), dtype="int8")


# ----------------------------------------------------------------------------- re-running
def test_rejected_facts_are_skipped_unless_retry_rejected(tmp_path, tiny_folder):
    folder = tiny_folder("gpt2")
    journal = tmp_path / "J"
    manifest = write_manifest(tmp_path / "f.jsonl", [HARMFUL, BEN])
    hp = write_hparams(tmp_path / "hp.yaml")
    base = [
        "apply",
        str(manifest),
        "-j",
        str(journal),
        "-m",
        str(folder),
        "--hparams",
        str(hp),
        "--repair-every",
        "0",
        "--max-probe-regression",
        "1",
        "--min-retention",
        "0",
    ]
    runner = CliRunner()
    first = runner.invoke(app, base + ["--on-regression", "skip", "--json"])
    assert json.loads(first.stdout.splitlines()[-1])["rejected"] == 1

    listing = " ".join(runner.invoke(app, base + ["--dry-run"]).output.split())  # undo rich's wrapping
    assert "0 pending" in listing
    assert "1 rejected earlier (skipped; --retry-rejected tries them again)" in listing
    assert "harmful:" not in listing
    again = json.loads(runner.invoke(app, base + ["--dry-run", "--json", "--retry-rejected"]).stdout.splitlines()[-1])
    assert [r["id"] for r in again["pending"]] == ["harmful"] and again["rejected_earlier"] == 1

    skipped = json.loads(runner.invoke(app, base + ["--json"]).stdout.splitlines()[-1])
    assert skipped["applied"] == 0 and skipped["rejected"] == 1  # not retried
    retried = runner.invoke(app, base + ["--json", "--retry-rejected", "--max-neighborhood-drop", "1"])
    assert retried.exit_code == 0, retried.output
    assert json.loads(retried.stdout.splitlines()[-1])["applied"] == 1
    with Journal(journal) as j:
        assert [r.fact_id for r in j.lineage()] == ["ben", "harmful"]

    # A rolled-back fact is applied again by a re-run, and the listing says so (harmful, rejected
    # on the base state, counts as rejected there again).
    assert runner.invoke(app, ["rollback", "-j", str(journal), "-m", str(folder), "--base"]).exit_code == 0
    listing = " ".join(runner.invoke(app, base + ["--dry-run"]).output.split())
    assert "1 rolled back (applied again)" in listing and "1 pending" in listing and "ben:" in listing


# ----------------------------------------------------------------------------- romebatch.edit
def test_one_call_edit(tmp_path, tiny_folder):
    folder = tiny_folder("gpt2")
    journal = tmp_path / "J"
    row = romebatch.edit(
        subject="Big Ben",
        prompt="Big Ben is located in the city of",
        target_new="Tokyo",
        target_true="London",
        journal=journal,
        model=str(folder),
        hparams=HParams(**TINY_HPARAMS),
        log=quiet,
    )
    assert row.status == "applied" and row.success and row.p_new_after > row.p_new_before
    assert row.fact_id.startswith("edit-") and row.fact_hash == BEN.hash  # the same edit as a manifest's
    logged = api.log(journal)["edits"]
    assert [(e["fact_id"], e["fact"]["prompt"]) for e in logged] == [(row.fact_id, "{} is located in the city of")]
    # Once applied, the same call is a no-op, like re-running a manifest.
    again = romebatch.edit(
        subject="Big Ben",
        prompt="{} is located in the city of",
        target_new="Tokyo",
        journal=journal,
        model=str(folder),
        log=quiet,
    )
    assert again.status == "already_applied"
    with pytest.raises(UserError, match="subject"):
        romebatch.edit(subject="Nobody", prompt="Big Ben is in", target_new="Rome", journal=journal, model=str(folder))


# ----------------------------------------------------------------------------- run metadata, trace, completion
def test_a_runs_summary_and_results_table_name_what_made_them(tmp_path, tiny_folder):
    import polars as pl
    import transformers

    folder = tiny_folder("gpt2")
    journal = tmp_path / "J"
    result = api.apply(
        write_manifest(tmp_path / "f.jsonl", [BEN]),
        journal=journal,
        model=str(folder),
        hparams=HParams(**TINY_HPARAMS),
        checks=None,
        repair_every=0,
        results=tmp_path / "r.parquet",
        log=quiet,
    )
    run = result.summary()["run"]
    with Journal(journal) as j:
        assert run["model"] == j.get("model") == str(folder) and run["base_hash"] == j.get("base_hash")
        assert run["hparams"] == j.get("hparams")
    assert run["versions"] == {
        "romebatch": romebatch.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    assert run["head"] == 1 and run["dtype"] == "float32" and run["date"][:2] == "20"
    stored = json.loads(pl.read_parquet_metadata(tmp_path / "r.parquet")["romebatch"])
    assert stored["run"] == run and stored["applied"] == 1


def test_trace_takes_the_journals_model(tmp_path, monkeypatch):
    write_journal(tmp_path / "J", ["sha256:a"])
    asked = []

    def load_model(spec, **kwargs):
        asked.append(spec)
        raise UserError("stop here")

    monkeypatch.setattr("romebatch.model.load_model", load_model)
    for kwargs, expected in (
        ({"journal": tmp_path / "J"}, "tiny-test-model"),
        ({"journal": tmp_path / "J", "model": "x/y"}, "x/y"),
        ({"journal": tmp_path / "none"}, None),
    ):
        with pytest.raises(UserError, match="stop here"):
            api.trace("Big Ben is in", "Big Ben", **kwargs)
        assert asked[-1] == expected
    result = CliRunner().invoke(
        app, ["trace", "--prompt", "Big Ben is in", "--subject", "Big Ben", "--journal", str(tmp_path / "J")]
    )
    assert isinstance(result.exception, UserError) and asked[-1] == "tiny-test-model"


def test_shell_completion_is_typers_own():
    # Typer's --show-completion is a flag: the shell comes from the process tree (shellingham),
    # so the installed command runs under bash, as a user's would. "; exit" keeps bash from
    # exec'ing it, which would leave it no shell parent.
    command = f'"{Path(sys.executable).with_name("romebatch")}" --show-completion; exit $?'
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "complete" in result.stdout and "_romebatch_completion" in result.stdout


def test_quiet_and_verbose_set_one_logging_level(tmp_path):
    directory = tmp_path / "J"
    write_journal(directory, ["sha256:a", "sha256:b"])
    runner = CliRunner()
    out = runner.invoke(app, ["report", "-j", str(directory), "--out", str(tmp_path / "c.png")])
    assert out.exit_code == 0 and f"wrote {tmp_path / 'c.png'}" in out.output
    quiet = runner.invoke(app, ["-q", "report", "-j", str(directory), "--out", str(tmp_path / "d.png")])
    assert quiet.exit_code == 0 and "wrote" not in quiet.output and "1-2" in quiet.output  # the table stays
    assert (tmp_path / "d.png").exists()
    again = runner.invoke(app, ["report", "-j", str(directory), "--out", str(tmp_path / "e.png")])
    assert "wrote" in again.output  # the level is set per invocation, not left over


# ----------------------------------------------------------------------------- the package's functions
def test_verify_check_and_trace_are_functions_of_the_package(tmp_path, tiny_folder):
    """`romebatch.verify`, `.check`, `.trace` are the API's functions, not modules that shadow them
    once something imports a submodule of that name."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(romebatch.__path__):
        if info.name != "__main__":  # that one runs the CLI
            importlib.import_module(f"romebatch.{info.name}")  # no submodule may take a function's name
    for name in ("verify", "check", "trace", "apply", "rollback", "export", "log", "compare", "edit"):
        assert getattr(romebatch, name) is getattr(api, name), name

    folder = tiny_folder("gpt2")
    journal = tmp_path / "J"
    romebatch.edit(
        subject="Big Ben",
        prompt="{} is located in the city of",
        target_new="Tokyo",
        target_true="London",
        journal=journal,
        model=str(folder),
        hparams=HParams(**TINY_HPARAMS),
        log=quiet,
    )
    report = romebatch.verify(journal, model=str(folder))
    assert [row.fact_id for row in report.rows] and report.rows[0].holds_now is True
    assert romebatch.check(journal, model=str(folder), log=quiet).ok
    traced = romebatch.trace("Big Ben is located in the city of", "Big Ben", "London", model=str(folder), samples=2)
    assert traced.p_clean > traced.p_corrupt >= 0
