"""Regression warnings are journaled and visible: live progress, final report, `log --status warned`, results.

With `--on-regression warn` an edit that fails a check is kept; its reason is written into
the edit's own row (migration m005), in the same INSERT that commits the edit. The tiny
random GPT-2 of conftest is edited for real; HARMFUL's only neighbourhood prompt is its own
edit prompt expecting the old answer, so an edit of it that takes necessarily warns.
"""

from __future__ import annotations

import io
import json
import sqlite3

import polars as pl
import pytest
import yaml
from conftest import TINY_HPARAMS
from typer.testing import CliRunner

from romebatch import api
from romebatch.cli import app
from romebatch.editor import Editor
from romebatch.hparams import HParams
from romebatch.journal import DB_NAME, Journal
from romebatch.journal_schema import migrate
from romebatch.manifest import Fact, Neighbor
from romebatch.model import load_model
from romebatch.probes import Thresholds
from romebatch.report import RESULTS_SCHEMA, write_results

TEMPLATE = "{} is located in the city of"
UNRELATED = (
    Neighbor("Autonomous University of Madrid is in", "French"),
    Neighbor("The lazy dog sleeps in the", "French"),
)
GOOD_1 = Fact(
    id="good-1", subject="Big Ben", prompt=TEMPLATE, target_new="Tokyo", target_true="London", neighborhood=UNRELATED
)
GOOD_2 = Fact(
    id="good-2",
    subject="The Colosseum",
    prompt=TEMPLATE,
    target_new="Madrid",
    target_true="Rome",
    neighborhood=UNRELATED,
)
HARMFUL = Fact(
    id="harmful",
    subject="Toko Yasuda",
    prompt=TEMPLATE,
    target_new="Paris",
    target_true="guitar",
    neighborhood=(Neighbor("Toko Yasuda is located in the city of", "guitar"),),
)
FACTS = [GOOD_1, HARMFUL, GOOD_2]
NEIGHBOURHOOD_ONLY = Thresholds(max_probe_regression=1.0, min_retention=0.0)


def quiet(_message):
    pass


@pytest.fixture
def folder(tiny_folder):
    return tiny_folder("gpt2")


def test_a_warning_is_journaled_with_its_edit_and_in_the_results_table(tmp_path, folder):
    journal = tmp_path / "j"
    with Editor(journal, lm=load_model(str(folder), log=quiet), hparams=HParams(**TINY_HPARAMS), log=quiet) as ed:
        result = ed.apply(FACTS, checks=NEIGHBOURHOOD_ONLY, on_regression="warn", repair_every=0)
        good_1, harmful, good_2 = result.results
        assert [r.status for r in result.results] == ["applied"] * 3
        assert harmful.neighborhood_drop == 1.0 and harmful.warning.startswith("regression: ")
        assert "neighbourhood" in harmful.warning and good_1.warning == good_2.warning == ""
        assert result.summary()["warned"] == 1
    db = sqlite3.connect(journal / DB_NAME)
    rows = db.execute("SELECT fact_id, warning FROM edits ORDER BY seq").fetchall()
    assert rows == [("good-1", None), ("harmful", harmful.warning), ("good-2", None)]

    path = write_results(result.results, tmp_path / "r.parquet")
    frame = pl.read_parquet(path)
    assert frame.columns == list(RESULTS_SCHEMA) and frame.schema["warning"] == pl.String
    assert frame["warning"].to_list() == ["", harmful.warning, ""]

    # Rolled back and rolled forward again, the edit keeps its warning.
    with Editor(journal, lm=load_model(str(folder), log=quiet), log=quiet) as ed:
        ed.rollback(to=1)
        again = ed.apply(FACTS, checks=None, repair_every=0)
        assert [r.warning for r in again.results if r.fact_id == "harmful"] == [harmful.warning]


def test_m005_adds_the_column_to_an_older_journal(tmp_path):
    (tmp_path / "old").mkdir()
    db = sqlite3.connect(tmp_path / "old" / DB_NAME, isolation_level=None)
    migrate(db, stop_before="m005_warning_column")
    assert "warning" not in {r[1] for r in db.execute("PRAGMA table_info(edits)")}
    db.close()
    with Journal(tmp_path / "old", write=True) as j:
        assert "warning" in {r[1] for r in j.db.execute("PRAGMA table_info(edits)")}
        names = [r[0] for r in j.db.execute("SELECT name FROM _migrations")]
        assert "m005_warning_column" in names


def _apply_cli(tmp_path, folder, *root):
    manifest = tmp_path / "facts.jsonl"
    manifest.write_text(
        "".join(json.dumps({k: v for k, v in f.to_dict().items() if k != "source"}) + "\n" for f in FACTS)
    )
    hp = tmp_path / "hp.yaml"
    hp.write_text(yaml.safe_dump({k: [list(p) for p in v] if k == "prefixes" else v for k, v in TINY_HPARAMS.items()}))
    return CliRunner().invoke(
        app,
        [
            *root,
            "apply",
            str(manifest),
            "--journal",
            str(tmp_path / "j"),
            "--model",
            str(folder),
            "--hparams",
            str(hp),
            "--on-regression",
            "warn",
            "--max-probe-regression",
            "1.0",
            "--min-retention",
            "0.0",
            "--repair-every",
            "0",
            "--results",
            str(tmp_path / "r.csv"),
        ],
        env={"COLUMNS": "250"},
    )


def test_a_warned_edit_is_visible_live_in_the_report_the_log_and_the_table(tmp_path, folder, monkeypatch):
    from rich.console import Console

    import romebatch.cli as cli

    # A terminal, so that the live progress bar is drawn (into a buffer).
    screen = io.StringIO()
    monkeypatch.setattr(cli, "_console", lambda: Console(file=screen, force_terminal=True, width=250))
    result = _apply_cli(tmp_path, folder)
    assert result.exit_code == 0, result.output
    out = screen.getvalue()
    warning = api.log(tmp_path / "j", status="warned")["edits"][0]["warning"]
    # Live: the bar's description counts warnings and names the latest.
    assert "1 warned, latest harmful: regression:" in out
    # The final report: the warned edits, most damaging first, with their reason.
    assert "1 edit(s) kept with a regression warning" in out
    assert f"harmful (edit 2, damage 100%): {warning}" in out
    # The results table.
    frame = pl.read_csv(tmp_path / "r.csv")
    assert frame.filter(pl.col("fact_id") == "harmful")["warning"].to_list() == [warning]

    # log --status warned: only the warned edit, its warning in --json and in the table.
    runner = CliRunner()
    data = json.loads(
        runner.invoke(app, ["log", "-j", str(tmp_path / "j"), "--status", "warned", "--json"]).stdout.splitlines()[-1]
    )
    assert [e["fact_id"] for e in data["edits"]] == ["harmful"] and data["edits"][0]["warning"] == warning
    assert data["summary"]["warned"] == 1 and data["summary"]["on_path"] == 3
    screen.seek(0)
    screen.truncate()
    human = runner.invoke(app, ["log", "-j", str(tmp_path / "j"), "--status", "warned"])
    assert human.exit_code == 0, human.output
    table = screen.getvalue().split("efficacy when made")[1]  # below the summary line
    assert "harmful" in table and "good-1" not in table and "good-2" not in table
    assert "regression:" in table


def test_without_a_terminal_each_warned_edit_line_says_so(tmp_path, folder):
    result = _apply_cli(tmp_path, folder)  # CliRunner: not a terminal, per-edit lines
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith(("good-1:", "harmful:", "good-2:"))]
    assert [line.split(" ")[0:3] for line in lines] == [
        ["good-1:", "applied", "Big"],
        ["harmful:", "applied", "(warned)"],
        ["good-2:", "applied", "The"],
    ]


def test_the_live_bar_shows_elapsed_time_seconds_per_edit_and_the_current_stage(tmp_path, folder, monkeypatch):
    from rich.console import Console

    import romebatch.cli as cli

    screen = io.StringIO()
    monkeypatch.setattr(cli, "_console", lambda: Console(file=screen, force_terminal=True, width=250))
    stages = []
    real = api.apply

    def spy(*args, **kwargs):
        inner = kwargs["on_stage"]
        kwargs["on_stage"] = lambda stage, fact_id: (stages.append((stage, fact_id)), inner(stage, fact_id))
        return real(*args, **kwargs)

    monkeypatch.setattr("romebatch.api.apply", spy)
    result = _apply_cli(tmp_path, folder)
    assert result.exit_code == 0, result.output
    # The probes' base answers, then each fact as it starts.
    assert stages == [("probes", None), ("editing", "good-1"), ("editing", "harmful"), ("editing", "good-2")]
    out = screen.getvalue()
    assert "probes (base answers)" in out and "now harmful" in out
    assert " s/edit" in out and "good-2: applied" in out
    assert "0:00:0" in out  # the elapsed-time column
    assert "good-1: applied Big Ben -> Tokyo" not in out  # per-edit lines on a terminal: only with -v


def test_verbose_prints_every_edit_above_the_live_bar(tmp_path, folder, monkeypatch):
    from rich.console import Console

    import romebatch.cli as cli

    screen = io.StringIO()
    monkeypatch.setattr(cli, "_console", lambda: Console(file=screen, force_terminal=True, width=250))
    result = _apply_cli(tmp_path, folder, "-v")
    assert result.exit_code == 0, result.output
    out = screen.getvalue()
    assert "good-1: applied Big Ben -> Tokyo P(new)" in out and "harmful: applied (warned) Toko Yasuda" in out
