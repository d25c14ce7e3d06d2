"""`apply`'s ROME settings and thresholds are made from the dataclasses (romebatch/cli_settings.py).

Each HParams field with `help` is an option whose --help shows the field's default; `--set
name=value` reaches every field, checked against it; every entry point shares one set of
defaults. Parsing tests replace `api.apply` with a recorder; the last one edits a tiny model.
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import TINY_HPARAMS
from test_cli import GOOD_CSV, Recorder, fake_apply_result, runner
from test_conventions import main_exit, write_hparams

from romebatch import api
from romebatch.cli import app
from romebatch.cli_settings import setting_fields, threshold_fields
from romebatch.editor import Editor
from romebatch.hparams import REPAIR_EVERY, HParams, Thresholds
from romebatch.journal import Journal


@pytest.fixture
def fake_apply(monkeypatch):
    recorder = Recorder(fake_apply_result)
    monkeypatch.setattr("romebatch.api.apply", recorder)
    return recorder


@pytest.fixture
def facts(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    Path("facts.csv").write_text(GOOD_CSV)
    return Path("facts.csv")


def help_text(*argv) -> str:
    text = runner().invoke(app, [*argv, "--help"], env={"COLUMNS": "400"}).output
    return " ".join(text.split())  # undo rich's wrapping


def test_every_field_with_help_is_an_option_showing_its_default():
    text = help_text("apply")
    for f in setting_fields():
        assert "--" + f.name.replace("_", "-") in text, f.name
        assert " ".join(f.metadata["help"].format(default=f.default).split()) in text, f.name
    for f in threshold_fields():
        assert f"{f.metadata['help']} [default: {f.default}]" in text, f.name
    assert "--set" in text and "--set" in help_text("tune")


def test_every_entry_point_has_the_same_defaults():
    # The CLI's options leave HParams to the dataclass (None: not given) and take Thresholds' own.
    assert {f.name for f in threshold_fields()} == {
        "max_neighborhood_drop",
        "max_probe_regression",
        "min_retention",
        "probe_budget",
    }
    assert api.DEFAULT_CHECKS == Thresholds()
    assert inspect.signature(api.apply).parameters["repair_every"].default == REPAIR_EVERY
    assert inspect.signature(api.apply).parameters["hparams"].default is None  # HParams() or the journal's
    assert inspect.signature(Editor.apply).parameters["checks"].default == Thresholds()


def test_set_reaches_any_field_typed_by_it(facts, fake_apply):
    result = runner().invoke(
        app,
        [
            "apply",
            str(facts),
            "--set",
            "v_loss_stop=0.1",
            "--set",
            "prefixes=[[2, 3], [4, 1]]",
            "--set",
            "v_stop_argmax=true",
            "--set",
            "v_stop_on=loss",
            "--set",
            "clamp_norm_factor=1.5",
            "--set",
            "layer=2",
            "--v-lr",
            "0.25",
        ],
    )
    assert result.exit_code == 0, result.output
    ((_, kwargs),) = fake_apply.calls
    assert kwargs["hparams"] == HParams(
        v_loss_stop=0.1,
        prefixes=((2, 3), (4, 1)),
        v_stop_argmax=True,
        v_stop_on="loss",
        clamp_norm_factor=1.5,
        layer=2,
        v_lr=0.25,
    )
    assert kwargs["layer"] is None  # the layer travels in the hyper-parameters


def test_set_is_over_the_file_and_null_unsets(facts, fake_apply, tmp_path):
    write_hparams(tmp_path / "hp.yaml")
    result = runner().invoke(
        app, ["apply", str(facts), "--hparams", "hp.yaml", "--set", "stats_tokens=700", "--set", "stats_corpus=null"]
    )
    assert result.exit_code == 0, result.output
    ((_, kwargs),) = fake_apply.calls
    assert kwargs["hparams"] == HParams(**{**TINY_HPARAMS, "stats_tokens": 700})


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--set", "no_such=1"], "error: --set: unknown hyper-parameter 'no_such'; known: "),
        (["--set", "v_lr"], "error: --set 'v_lr': give NAME=VALUE"),
        (["--set", "v_lr=abc"], "error: --set: v_lr must be a positive finite number, got 'abc'"),
        (["--set", "v_steps=2.5"], "error: --set: v_steps must be a positive whole number"),
        (["--set", "mom2=diagonal"], "error: --set: mom2 must be one of second_moment, identity"),
        (["--set", "v_lr=1", "--set", "v_lr=2"], "error: --set v_lr: given twice"),
        (["--set", "v_lr=1", "--v-lr", "2"], "error: --set v_lr=...: --v-lr is given too; give it once"),
    ],
)
def test_bad_set_is_one_line_and_exit_2_before_anything_loads(facts, fake_apply, monkeypatch, capsys, argv, message):
    code, err = main_exit(monkeypatch, capsys, "apply", facts, "--journal", "J", *argv)
    assert code == 2 and err.startswith(message), err
    assert len(err.strip().splitlines()) == 1 and fake_apply.calls == []
    assert not Path("J").exists()


def test_tune_takes_set(facts, monkeypatch):
    seen = {}

    class Fake:
        def summary(self):
            return {}

    monkeypatch.setattr("romebatch.tuning.tune", lambda manifest, **kw: seen.update(kw) or Fake())
    result = runner().invoke(app, ["tune", str(facts), "--set", "v_lr=0.2", "--json"])
    assert result.exit_code == 0, result.output
    assert seen["hparams"] == HParams(v_lr=0.2)
    runner().invoke(app, ["tune", str(facts), "--json"])
    assert seen["hparams"] is None


def test_hparams_validate_is_the_fields_check():
    assert not hasattr(HParams, "check")  # "check" is the journal's integrity, "verify" specificity
    with pytest.raises(Exception, match="v_lr"):
        HParams(v_lr=-1.0).validate()
    assert [f.name for f in fields(HParams)][:3] == ["layer", "v_lr", "v_steps"]


def test_spread_layers_round_robin_through_the_option_and_set(tmp_path, tiny_folder):
    """`--spread-layers N` edits layers L, L+1, ..., L+N-1, L, ...; `--set spread_layers=N` is the same run."""
    folder = tiny_folder("gpt2")
    hp = write_hparams(tmp_path / "hp.yaml")
    manifest = tmp_path / "facts.csv"
    manifest.write_text(GOOD_CSV)
    heads = []
    for name, argv in (("option", ["--spread-layers", "2"]), ("set", ["--set", "spread_layers=2"])):
        journal = tmp_path / name
        result = runner().invoke(
            app,
            [
                "apply",
                str(manifest),
                "--journal",
                str(journal),
                "--model",
                str(folder),
                "--hparams",
                str(hp),
                "--layer",
                "0",
                "--no-probes",
                "--repair-every",
                "0",
                "--json",
                *argv,
            ],
        )
        assert result.exit_code == 0, result.output
        with Journal(journal) as j:
            layers = [r.layer for r in j.lineage()]
            assert j.get("hparams")["spread_layers"] == 2
            heads.append(j.lineage()[-1].weight_hash_after)
        assert layers == [0, 1, 0], layers
    assert heads[0] == heads[1]
