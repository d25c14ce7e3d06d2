"""`romebatch log`: a summary plus the last 20, filters, --json's whole record, literal user strings.

A real journal file with synthetic edits (no model): 30 edits, the head at 25 (26..30 rolled
back), edit 7 a repair of edit 3's fact, warnings on 4 and 9, two rejections (on states 3, 20).
"""

from __future__ import annotations

import json
import re
import sys

import pytest
from typer.testing import CliRunner

from romebatch import api
from romebatch.cli import app
from romebatch.journal import Journal
from romebatch.journal_records import EditRecord
from romebatch.manifest import Fact

MARKUP = "[bold red]Subject 5[/bold red]"


@pytest.fixture
def journal(tmp_path):
    """Written only through the journal's own API (commit_edit, record_rejection, move_head)."""
    import numpy as np

    directory = tmp_path / "J"
    with Journal(directory, write=True, create=True) as j:
        j.set_many({"model": "tiny-test-model", "base_hash": "sha256:base", "head": 0})
        for i in range(1, 31):
            if i == 4:  # rejected on state 3
                j.record_rejection(Fact(id="rej1", subject="S", prompt="{} is", target_new="T1"), 1, "why 1", 9.0, 0.1)
            if i == 21:  # rejected on state 20
                j.record_rejection(Fact(id="rej2", subject="S", prompt="{} is", target_new="T2"), 1, "why 2", 9.0, 0.1)
            rng = np.random.default_rng(i)
            fact = {
                "id": f"id{i}",
                "subject": MARKUP if i == 5 else f"Subject {i}",
                "prompt": "{} is in",
                "target_new": "[link]x" if i == 5 else f"Target {i}",
            }
            j.commit_edit(
                EditRecord(
                    seq=0,
                    parent=i - 1,
                    fact_id=f"id{i}",
                    fact_hash="sha256:3" if i == 7 else f"sha256:{i}",  # edit 7 edits edit 3's fact again: a repair
                    fact_json=json.dumps(fact),
                    layer=1,
                    weight_name="w",
                    lam=rng.normal(size=4),
                    u=rng.normal(size=8),
                    update_norm=float(i),
                    denominator=0.5,
                    weight_hash_before=f"sha256:{i - 1}",
                    weight_hash_after=f"sha256:{i}",
                    warning="regression: neighbourhood 100% flipped" if i in (4, 9) else None,
                )
            )
        j.move_head(25)
    return directory


def seqs(data):
    return [e["seq"] for e in data["edits"]]


def test_filters_in_the_library(journal):
    data = api.log(journal)
    assert seqs(data) == list(range(1, 31)) and len(data["rejections"]) == 2  # no limit: everything
    assert data["summary"] == {
        "edits": 30,
        "on_path": 25,
        "rolled_back": 5,
        "repairs": 1,
        "warned": 2,
        "rejected": 2,
        "efficacy_when_made": None,
    }
    assert seqs(api.log(journal, limit=5)) == [26, 27, 28, 29, 30]
    assert seqs(api.log(journal, status="applied")) == list(range(1, 26))
    assert seqs(api.log(journal, status="rolled_back")) == [26, 27, 28, 29, 30]
    assert seqs(api.log(journal, status="repaired")) == [7]
    assert seqs(api.log(journal, status="warned")) == [4, 9]
    rejected = api.log(journal, status="rejected")
    assert seqs(rejected) == [] and [r["fact_id"] for r in rejected["rejections"]] == ["rej1", "rej2"]
    assert seqs(api.log(journal, fact="id12")) == [12]
    since = api.log(journal, since=27)
    assert seqs(since) == [28, 29, 30] and [r["fact_id"] for r in since["rejections"]] == []
    assert [r["fact_id"] for r in api.log(journal, since=20)["rejections"]] == ["rej2"]
    both = api.log(journal, status="applied", since=20, limit=2)
    assert seqs(both) == [24, 25] and both["filter"]["matched"] == {"edits": 5, "rejections": 0}
    # The summary always counts the whole journal.
    assert both["summary"] == data["summary"]


def test_human_default_is_a_summary_and_the_last_20_printed_literally(journal):
    result = CliRunner().invoke(app, ["log", "--journal", str(journal)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "30 edit(s): 25 on the head's path (1 repairs, 2 warned), 5 rolled back; 2 rejected" in out
    shown = [int(m) for m in re.findall(r"^│ (\d+) +│", out, re.M)]
    assert shown == list(range(11, 31))
    assert "the last 20 of 30 matching edit(s)" in out
    assert "regression: neighbourhood 100% flipped" not in out  # edits 4 and 9 are older than the last 20
    everything = CliRunner().invoke(app, ["log", "--journal", str(journal), "-n", "0"], env={"COLUMNS": "300"})
    assert [int(m) for m in re.findall(r"^│ (\d+) +│", everything.output, re.M)] == list(range(1, 31))
    assert MARKUP in everything.output and "[link]x" in everything.output  # not read as markup
    assert "rej1: why 1 (computed on state 3)" in everything.output


def test_json_keeps_the_whole_record_and_filters_apply(journal):
    runner = CliRunner()
    data = json.loads(runner.invoke(app, ["log", "-j", str(journal), "--json"]).stdout.splitlines()[-1])
    assert seqs(data) == list(range(1, 31))  # no default limit for scripts
    assert data["edits"][4]["fact"] == {"id": "id5", "subject": MARKUP, "prompt": "{} is in", "target_new": "[link]x"}
    assert data["edits"][3]["warning"] == "regression: neighbourhood 100% flipped"
    warned = json.loads(
        runner.invoke(app, ["log", "-j", str(journal), "--json", "--status", "warned", "-n", "1"]).stdout.splitlines()[
            -1
        ]
    )
    assert seqs(warned) == [9] and warned["filter"]["matched"]["edits"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--status", "done"], "--status 'done': choose one of applied, rolled_back, repaired, warned, rejected"),
        (["--since", "-1"], "--since -1: give an edit number (0 = the base)"),
        (["-n", "-3"], "--limit -3: give a number of entries, or 0 for all"),
    ],
)
def test_bad_filters_are_one_line_and_exit_2(journal, args, message, monkeypatch, capsys):
    from romebatch.cli import main

    monkeypatch.setattr(sys, "argv", ["romebatch", "log", "--journal", str(journal), *args])
    with pytest.raises(SystemExit) as exit:
        main()
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == f"error: {message}"
