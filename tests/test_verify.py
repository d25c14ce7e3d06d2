"""`romebatch verify`: the journal's head scored against the base model (romebatch.specificity, api, CLI).

Journals are built for real on the tiny GPT-2 of conftest, saved as a model folder so that the
CLI can open them with `--model`. "Healthy" facts have neighbourhood prompts about nothing
edited, with a wide base margin that the tests check survives the edits; "broken" facts have
their own edit prompt as neighbourhood prompt, expecting the old answer, so an edit that
holds necessarily breaks it.
"""

from __future__ import annotations

import json
import math
import sys

import polars as pl
import pytest
import torch
from conftest import TINY_HPARAMS

from romebatch import api
from romebatch.editor import Editor
from romebatch.hparams import HParams
from romebatch.manifest import Fact, Neighbor
from romebatch.model import load_model
from romebatch.probes import Thresholds
from romebatch.report import VERIFY_SCHEMA, write_verify_results
from romebatch.scores import FactScores, answer_nll, score_facts, summarize
from romebatch.specificity import VerifyThresholds
from romebatch.specificity import score_head as verify

TEMPLATE = "{} is located in the city of"
UNRELATED = (
    Neighbor("Autonomous University of Madrid is in", "French"),
    Neighbor("The lazy dog sleeps in the", "French"),
)


def make(fid, subject, new, true, neighborhood=UNRELATED, prompt=TEMPLATE, paraphrases=()):
    return Fact(
        id=fid,
        subject=subject,
        prompt=prompt,
        target_new=new,
        target_true=true,
        paraphrases=tuple(paraphrases),
        neighborhood=tuple(neighborhood),
    )


GOOD_1 = make("good-1", "Big Ben", "Tokyo", "London", paraphrases=("Where is Big Ben? It is in",))
GOOD_2 = make("good-2", "The Colosseum", "Madrid", "Rome", paraphrases=("The Colosseum is in",))
# The same edit as GOOD_1 (same hash), with its own prompt as neighbourhood probe.
BROKEN_1 = make("good-1", "Big Ben", "Tokyo", "London", neighborhood=(Neighbor(GOOD_1.text, "London"),))
HARMFUL = make(
    "harmful",
    "Toko Yasuda",
    "Paris",
    "guitar",
    neighborhood=(Neighbor("Toko Yasuda is located in the city of", "guitar"),),
)
UNAPPLIED = make("unapplied", "The Space Needle", "Berlin", "Seattle")


def quiet(_message):
    pass


@pytest.fixture
def folder(tiny_folder):
    return tiny_folder("gpt2")


def open_editor(journal, folder, **kwargs) -> Editor:
    kwargs.setdefault("hparams", HParams(**TINY_HPARAMS))
    return Editor(journal, lm=load_model(str(folder), log=quiet), log=quiet, **kwargs)


def build(journal, folder, facts, **apply_kwargs):
    apply_kwargs.setdefault("checks", None)
    apply_kwargs.setdefault("repair_every", 0)  # the protocol these tests were written for
    with open_editor(journal, folder) as ed:
        result = ed.apply(facts, **apply_kwargs)
    assert all(r.status == "applied" for r in result.results), result.results
    return result


def p(lm, prompt, answer) -> float:
    return math.exp(-answer_nll(lm, [(prompt, answer)])[0])


def state(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_main(monkeypatch, argv: list[str]) -> int:
    """cli.main() in process, as the console script runs it: its exit status."""
    from romebatch.cli import main

    monkeypatch.setattr(sys, "argv", ["romebatch", *map(str, argv)])
    try:
        main()
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 1
    return 0


def last_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "nothing on stdout"
    return json.loads(lines[-1])


def write_jsonl(path, facts):
    keys = ("id", "subject", "prompt", "target_new", "target_true", "paraphrases", "neighborhood")
    path.write_text("".join(json.dumps({k: v for k, v in f.to_dict().items() if k in keys}) + "\n" for f in facts))
    return path


# ----------------------------------------------------------------------------- a healthy journal
def test_a_healthy_journal_verifies_ok_with_its_table_and_exit_0(tmp_path, folder, monkeypatch, capsys):
    journal = tmp_path / "j"
    result = build(journal, folder, [GOOD_1, GOOD_2])
    assert all(r.success for r in result.results)  # both edits took

    report = api.verify(journal, model=str(folder))
    assert report.ok, report.problems
    assert report.problems == [] and report.worst == []
    assert [(r.fact_id, r.seq) for r in report.rows] == [("good-1", 1), ("good-2", 2)]
    # The check: the edits did not move these neighbourhoods, on the base or at the head.
    for row in report.rows:
        assert row.neighborhood_base == row.neighborhood_head == 1.0
        assert row.held_when_applied is True and row.holds_now is True and row.efficacy == 1.0
    assert report.base["NS"] == report.edited["NS"] == 100.0
    assert report.edited["ES"] == 100.0 and report.retention == 100.0
    summary = report.summary()
    assert summary["ok"] is True and summary["facts"] == 2 and summary["head"] == 2

    # The per-fact table: one row per applied fact, the columns and dtypes of VERIFY_SCHEMA.
    expected_dtypes = {name: getattr(pl, dtype) for name, (dtype, _) in VERIFY_SCHEMA.items()}
    for suffix in (".csv", ".parquet"):
        path = write_verify_results(report.rows, tmp_path / f"verify{suffix}")
        frame = pl.read_csv(path) if suffix == ".csv" else pl.read_parquet(path)
        assert frame.columns == list(VERIFY_SCHEMA)
        assert dict(frame.schema) == expected_dtypes, suffix
        assert frame.height == 2
        assert frame["fact_id"].to_list() == ["good-1", "good-2"] and frame["seq"].to_list() == [1, 2]
        assert frame["neighborhood_drop"].to_list() == [0.0, 0.0]
        assert frame["p_new_head"].to_list() == pytest.approx([r.p_new_head for r in report.rows], rel=1e-9)
        assert frame["p_new_base"].to_list() == pytest.approx([r.p_new_base for r in report.rows], rel=1e-9)
        assert frame["holds_now"].to_list() == [True, True]

    # The command: exit 0, and --json's last line is the summary.
    assert run_main(monkeypatch, ["verify", "--journal", journal, "--model", folder]) == 0
    assert "within thresholds" in capsys.readouterr().err
    out = tmp_path / "cli.parquet"
    assert run_main(monkeypatch, ["verify", "--journal", journal, "--model", folder, "--json", "--results", out]) == 0
    data = last_json(capsys.readouterr().out)
    assert data["ok"] is True and data["facts"] == 2 and data["problems"] == [] and data["worst"] == []
    assert pl.read_parquet(out)["fact_id"].to_list() == ["good-1", "good-2"]


# ----------------------------------------------------------------------------- a broken journal
def broken_journal(journal, folder):
    result = build(journal, folder, [BROKEN_1, HARMFUL], checks=Thresholds(), on_regression="warn")
    for row in result.results:  # committed although they broke their neighbourhood
        assert row.neighborhood_drop == 1.0 and row.reason.startswith("regression"), row
    return result


def test_a_journal_that_broke_its_neighbourhoods_fails_verify_and_exits_1(tmp_path, folder, monkeypatch, capsys):
    journal = tmp_path / "j"
    broken_journal(journal, folder)

    report = api.verify(journal, model=str(folder))
    assert not report.ok
    assert report.base["NS"] == 100.0  # on the base model every neighbourhood answer wins
    assert report.edited["NS"] < 95.0
    assert any(problem.startswith("neighbourhood score fell") for problem in report.problems), report.problems
    # The worst facts are named, most broken first, and they are the ones whose neighbourhood fell.
    broken_now = {r.fact_id for r in report.rows if r.neighborhood_drop and r.neighborhood_drop > 0}
    assert broken_now and {r.fact_id for r in report.worst} == broken_now
    drops = [r.neighborhood_drop for r in report.worst]
    assert drops == sorted(drops, reverse=True) and all(d > 0 for d in drops)
    assert report.summary()["worst"] == [r.fact_id for r in report.worst]

    assert run_main(monkeypatch, ["verify", "--journal", journal, "--model", folder]) == 1
    err = capsys.readouterr().err
    assert "regression" in err and all(f"worst: {fid}" in err for fid in broken_now)
    assert run_main(monkeypatch, ["verify", "--journal", journal, "--model", folder, "--json"]) == 1
    data = last_json(capsys.readouterr().out)
    assert data["ok"] is False and data["problems"] == report.problems
    assert data["worst"] == [r.fact_id for r in report.worst]
    assert data["base"]["NS"] == 100.0 and data["facts"] == 2

    # A looser threshold accepts the same journal.
    assert (
        run_main(
            monkeypatch,
            ["verify", "--journal", journal, "--model", folder, "--max-ns-drop", "100", "--min-retention", "0"],
        )
        == 0
    )


def test_retention_at_the_head_counts_only_edits_that_took(tmp_path, folder):
    first = make("undo-1", "Big Ben", "Tokyo", "London", neighborhood=())
    # Fact objects given to Editor.apply directly are not validated: the same prompt edited back.
    second = make("undo-2", "Big Ben", "London", "Tokyo", neighborhood=())
    journal = tmp_path / "j"
    result = build(journal, folder, [first, second])
    assert all(r.success for r in result.results)
    report = api.verify(journal, model=str(folder))
    rows = {r.fact_id: r for r in report.rows}
    assert rows["undo-1"].held_when_applied is True and rows["undo-1"].holds_now is False
    assert rows["undo-2"].held_when_applied is True and rows["undo-2"].holds_now is True
    assert report.retention == 50.0
    assert any("still hold" in problem for problem in report.problems)
    # --min-retention is a share, as in apply: 0.5 admits 50% retention, 0.51 does not.
    assert api.verify(journal, model=str(folder), thresholds=VerifyThresholds(min_retention=0.5)).ok
    strict = api.verify(journal, model=str(folder), thresholds=VerifyThresholds(min_retention=0.51))
    assert strict.problems == ["only 50.0% of the edits that took still hold (min 51%)"]


# ----------------------------------------------------------------------------- --manifest
def test_a_manifest_restricts_scoring_to_applied_facts_and_brings_its_probes(tmp_path, folder, monkeypatch, capsys):
    journal = tmp_path / "j"
    build(journal, folder, [GOOD_1, GOOD_2])
    assert api.verify(journal, model=str(folder)).ok  # with the stored probes

    # good-1 again, with its own prompt as neighbourhood probe; good-2 unchanged; one fact never applied.
    manifest = write_jsonl(tmp_path / "probes.jsonl", [UNAPPLIED, BROKEN_1, GOOD_2])
    report = api.verify(journal, manifest=manifest, model=str(folder))
    assert [r.fact_id for r in report.rows] == ["good-1", "good-2"]  # the unapplied fact is not scored
    rows = {r.fact_id: r for r in report.rows}
    assert rows["good-1"].seq == 1 and rows["good-2"].seq == 2
    assert rows["good-1"].holds_now is True
    assert (rows["good-1"].neighborhood_base, rows["good-1"].neighborhood_head) == (1.0, 0.0)  # the manifest's probe
    assert (rows["good-2"].neighborhood_base, rows["good-2"].neighborhood_head) == (1.0, 1.0)
    assert not report.ok and any(p.startswith("neighbourhood score fell") for p in report.problems)
    assert [r.fact_id for r in report.worst] == ["good-1"]

    assert (
        run_main(monkeypatch, ["verify", "--journal", journal, "--model", folder, "--manifest", manifest, "--json"])
        == 1
    )
    data = last_json(capsys.readouterr().out)
    assert data["facts"] == 2 and data["worst"] == ["good-1"]

    # A manifest with none of the applied facts scores nothing.
    only_new = write_jsonl(tmp_path / "new.jsonl", [UNAPPLIED])
    assert api.verify(journal, manifest=only_new, model=str(folder)).rows == []


def test_a_bad_manifest_exits_2(tmp_path, folder, monkeypatch, capsys):
    journal = tmp_path / "j"
    build(journal, folder, [GOOD_1])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "subject": "Big Ben", "prompt": "{} is in"}) + "\n")  # no target_new
    assert run_main(monkeypatch, ["verify", "--journal", journal, "--model", folder, "--manifest", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl" in err and "target_new" in err
    assert "Traceback" not in err
    assert (
        run_main(
            monkeypatch, ["verify", "--journal", journal, "--model", folder, "--manifest", tmp_path / "missing.csv"]
        )
        == 2
    )
    assert run_main(monkeypatch, ["verify", "--journal", tmp_path / "nowhere", "--model", folder]) == 2


# ----------------------------------------------------------------------------- what is compared
def test_rolled_back_edits_are_not_scored(tmp_path, folder):
    journal = tmp_path / "j"
    build(journal, folder, [GOOD_1, GOOD_2, HARMFUL])
    with open_editor(journal, folder) as ed:
        assert ed.rollback(steps=1) == 2
    with open_editor(journal, folder, write=False, hparams=None) as ed:
        assert ed.journal.status() == {1: "applied", 2: "applied", 3: "rolled_back"}
        head_state = state(ed.lm)
        report = verify(ed)
        assert same_state(state(ed.lm), head_state)  # verify leaves the model at the head
        assert [r.fact_id for r in report.rows] == ["good-1", "good-2"]
        assert report.head == 2
        assert report.edited == summarize(score_facts(ed.lm, [GOOD_1, GOOD_2]))
        # Even named in a manifest, the rolled-back fact is not scored.
        with_manifest = verify(ed, facts=[GOOD_1, GOOD_2, HARMFUL])
        assert [r.fact_id for r in with_manifest.rows] == ["good-1", "good-2"]


def test_the_base_row_is_the_pristine_model_and_the_edited_row_the_head(tmp_path, folder):
    journal = tmp_path / "j"
    broken_journal(journal, folder)
    facts = [BROKEN_1, HARMFUL]
    pristine = load_model(str(folder), log=quiet)
    base_scores = score_facts(pristine, facts)
    with open_editor(journal, folder, write=False, hparams=None) as ed:
        head_scores = score_facts(ed.lm, facts)
        head_state = state(ed.lm)
        report = verify(ed)
        assert same_state(state(ed.lm), head_state)
    assert report.base == summarize(base_scores)
    assert report.edited == summarize(head_scores)
    assert report.base != report.edited  # the edits changed the scores: base and head really differ
    assert report.base["ES"] == 0.0  # every true object wins on the base model
    for row, base, head in zip(report.rows, base_scores, head_scores):
        assert row.p_new_base == pytest.approx(base.p_new, rel=1e-9)
        assert row.p_true_base == pytest.approx(base.p_true, rel=1e-9)
        assert row.p_new_head == pytest.approx(head.p_new, rel=1e-9)
        assert row.p_true_head == pytest.approx(head.p_true, rel=1e-9)
        assert row.neighborhood_base == base.neighborhood_success
        assert row.neighborhood_head == head.neighborhood_success
        assert row.p_new_base != pytest.approx(row.p_new_head, rel=1e-3)


# ----------------------------------------------------------------------------- the worst list
def test_worst_names_only_facts_whose_neighbourhood_fell(tmp_path, folder, monkeypatch):
    journal = tmp_path / "j"
    build(journal, folder, [GOOD_1, GOOD_2])
    better, fine, worse = (0.3, 0.2), (0.3, 0.2), (0.1, 0.2)  # (P(expected), P(new)) of one neighbour

    def scores(good_1, good_2):
        return [FactScores(0.5, 0.1, [], [good_1]), FactScores(0.5, 0.1, [], [good_2])]

    calls = iter([scores(better, worse), scores((0.1, 0.2), fine)])  # head first, then base
    monkeypatch.setattr("romebatch.specificity.score_facts", lambda lm, facts, *a, **k: next(calls))
    with open_editor(journal, folder, write=False, hparams=None) as ed:
        report = verify(ed)
    drops = {r.fact_id: r.neighborhood_drop for r in report.rows}
    assert drops == {"good-1": -1.0, "good-2": 1.0}
    assert [r.fact_id for r in report.worst] == ["good-2"]
