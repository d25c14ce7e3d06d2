"""Regression probes during `apply` (romebatch.probes, Editor.apply's checks / on_regression).

The tiny random GPT-2 of conftest is edited for real. A "harmful" fact is made harmful by
construction: its neighbourhood prompt is its own edit prompt, expecting its old answer, so
an edit that takes necessarily breaks it. "Harmless" facts have neighbourhood prompts about
nothing that is edited, whose expected answer beats the new object by a wide margin on the
base model; the tests check that these margins survive the edits before relying on them.
"""

from __future__ import annotations

import math
import sqlite3

import pytest
import torch
from conftest import TINY_HPARAMS, tiny_loaded

import romebatch.probes as probes_module
from romebatch.editor import Editor
from romebatch.hparams import HParams
from romebatch.manifest import Fact, Neighbor
from romebatch.probes import RegressionProbes, Thresholds
from romebatch.scores import answer_nll
from romebatch.specificity import VerifyThresholds
from romebatch.specificity import score_head as verify

TEMPLATE = "{} is located in the city of"
# Prompts about nothing any fact here edits; on the base model their answer beats every new object below.
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


GOOD_1 = make("good-1", "Big Ben", "Tokyo", "London")
GOOD_2 = make("good-2", "The Colosseum", "Madrid", "Rome")
# Its only neighbourhood prompt is its own edit prompt, expecting the old answer.
HARMFUL = make(
    "harmful",
    "Toko Yasuda",
    "Paris",
    "guitar",
    neighborhood=(Neighbor("Toko Yasuda is located in the city of", "guitar"),),
)

# Only the neighbourhood check can fail: the probe-sample and retention checks are switched off.
NEIGHBOURHOOD_ONLY = Thresholds(max_probe_regression=1.0, min_retention=0.0)


def quiet(_message):
    pass


@pytest.fixture
def tok(bytelevel_tokenizer):
    return bytelevel_tokenizer


def editor(path, tok, **kwargs):
    kwargs.setdefault("hparams", HParams(**TINY_HPARAMS))
    return Editor(path, lm=tiny_loaded("gpt2", tok), log=quiet, **kwargs)


def p(lm, prompt, answer) -> float:
    return math.exp(-answer_nll(lm, [(prompt, answer)])[0])


def state(ed) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ed.lm.model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_wide_margins(lm, facts, factor=5.0):
    """Each harmless fact's neighbourhood answer beats its new object by `factor` on this model."""
    for f in facts:
        for n in f.neighborhood:
            ratio = p(lm, n.prompt, n.answer) / p(lm, n.prompt, f.target_new)
            assert ratio > factor, f"{f.id}: {n.prompt!r} -> {n.answer!r} only {ratio:.2f}x above {f.target_new!r}"


def test_the_test_facts_are_what_they_claim(tok):
    """Preconditions on the base model: harmless neighbourhood answers beat the new object 4x; the harmful one wins too."""
    lm = tiny_loaded("gpt2", tok)
    assert_wide_margins(lm, [GOOD_1, GOOD_2], factor=4.0)
    (n,) = HARMFUL.neighborhood
    assert n.prompt == HARMFUL.text and n.answer == HARMFUL.target_true
    assert p(lm, HARMFUL.text, HARMFUL.target_true) > p(lm, HARMFUL.text, HARMFUL.target_new)


# ----------------------------------------------------------------------------- on_regression
def test_a_harmful_fact_is_rejected_under_skip_and_leaves_no_trace(tmp_path, tok):
    snapshots = {}
    with editor(tmp_path / "j", tok) as ed:
        base_state = state(ed)

        def on_edit(row):
            snapshots[row.fact_id] = (state(ed), ed.head)

        result = ed.apply(
            [GOOD_1, HARMFUL, GOOD_2], checks=NEIGHBOURHOOD_ONLY, on_regression="skip", on_edit=on_edit, repair_every=0
        )
        good_1, harmful, good_2 = result.results
        assert (good_1.status, harmful.status, good_2.status) == ("applied", "rejected", "applied"), result.results
        assert not result.interrupted

        # The harmful edit took (that is what breaks its neighbourhood) and was refused for it.
        assert harmful.success is True
        assert harmful.neighborhood_drop == 1.0
        assert harmful.reason.startswith("regression"), harmful.reason
        assert "neighbourhood" in harmful.reason
        assert harmful.seq is None

        # The weights after the rejection are byte-identical to those before it, and the head did not move.
        after_good_1, head_after_good_1 = snapshots["good-1"]
        after_harmful, head_after_harmful = snapshots["harmful"]
        assert not same_state(after_good_1, base_state)  # the first edit did change something
        assert same_state(after_harmful, after_good_1)
        assert head_after_harmful == head_after_good_1 == good_1.seq
        assert ed.journal.edit(good_2.seq).parent == good_1.seq  # the next edit builds on good-1
        assert [r.fact_id for r in ed.journal.lineage()] == ["good-1", "good-2"]

        rejections = ed.journal.rejections()
        assert [(r["fact_id"], r["parent"]) for r in rejections] == [("harmful", good_1.seq)]
        assert rejections[0]["reason"] == harmful.reason
        assert HARMFUL.hash in ed.journal.rejected_hashes()

        # The harmless edits kept their neighbourhoods.
        assert good_1.neighborhood_drop == 0.0 and good_2.neighborhood_drop == 0.0
        assert_wide_margins(ed.lm, [GOOD_1, GOOD_2], factor=2.0)

        # What is in the journal passes `verify`: the neighbourhood score stayed within the threshold.
        report = verify(ed, VerifyThresholds(max_ns_drop=5.0))
        assert [r.fact_id for r in report.rows] == ["good-1", "good-2"]
        assert report.base["NS"] == report.edited["NS"] == 100.0
        assert report.ok, report.problems

        # A re-run does not try the rejected fact again.
        again = ed.apply([GOOD_1, HARMFUL, GOOD_2], checks=NEIGHBOURHOOD_ONLY, on_regression="skip", repair_every=0)
        assert [r.status for r in again.results] == ["already_applied", "rejected", "already_applied"]


def test_under_warn_the_harmful_edit_is_applied_with_its_reason(tmp_path, tok):
    with editor(tmp_path / "j", tok) as ed:
        result = ed.apply([GOOD_1, HARMFUL, GOOD_2], checks=NEIGHBOURHOOD_ONLY, on_regression="warn", repair_every=0)
        assert [r.status for r in result.results] == ["applied"] * 3
        good_1, harmful, good_2 = result.results
        assert harmful.neighborhood_drop == 1.0
        assert harmful.reason.startswith("regression") and "neighbourhood" in harmful.reason
        assert good_1.reason == "" and good_2.reason == ""
        assert [r.fact_id for r in ed.journal.lineage()] == ["good-1", "harmful", "good-2"]
        assert ed.journal.edit(harmful.seq).neighborhood_drop == 1.0
        assert ed.journal.rejections() == []


def test_under_stop_the_run_ends_at_the_harmful_edit(tmp_path, tok):
    with editor(tmp_path / "j", tok) as ed:
        before = None

        def on_edit(row):
            nonlocal before
            if row.fact_id == "good-1":
                before = state(ed)

        result = ed.apply(
            [GOOD_1, HARMFUL, GOOD_2], checks=NEIGHBOURHOOD_ONLY, on_regression="stop", on_edit=on_edit, repair_every=0
        )
        assert result.interrupted
        assert [(r.fact_id, r.status) for r in result.results] == [("good-1", "applied"), ("harmful", "rejected")]
        assert result.results[1].reason.startswith("regression")
        assert result.head == result.results[0].seq == ed.head
        assert ed.journal.applied_hashes() == {GOOD_1.hash}  # good-2 was never attempted
        assert same_state(state(ed), before)  # nothing of the harmful edit remains in memory
        assert [r["fact_id"] for r in ed.journal.rejections()] == ["harmful"]


def test_without_checks_the_harmful_edit_is_applied_silently(tmp_path, tok):
    with editor(tmp_path / "j", tok) as ed:
        result = ed.apply([HARMFUL], checks=None, on_regression="skip", repair_every=0)
        (row,) = result.results
        assert row.status == "applied" and row.reason == ""
        assert row.neighborhood_drop is None and row.probe_regression is None and row.retention is None


# ----------------------------------------------------------------------------- retention
UNDONE = make("undo-1", "Big Ben", "Tokyo", "London", neighborhood=())
# The same subject and prompt edited back to the old object: it undoes undo-1. (A manifest would
# refuse these conflicting targets; Fact objects given to Editor.apply directly are not checked.)
REDO = make("undo-2", "Big Ben", "London", "Tokyo", neighborhood=())
# The same subject under another prompt: leaves undo-1 in place.
OTHER_PROMPT = make("other-prompt", "Big Ben", "London", "Tokyo", neighborhood=(), prompt="Where is {}? It is in")
RETENTION_ONLY = Thresholds(max_probe_regression=1.0, max_neighborhood_drop=1.0)


def test_an_edit_that_undoes_an_earlier_one_is_reported_by_retention(tmp_path, tok):
    with editor(tmp_path / "j", tok) as ed:
        result = ed.apply([UNDONE, REDO], checks=RETENTION_ONLY, on_regression="warn", repair_every=0)
        first, second = result.results
        assert first.status == second.status == "applied"
        assert first.success and second.success  # both took: the second one really undid the first
        assert p(ed.lm, UNDONE.text, UNDONE.target_new) < p(ed.lm, UNDONE.text, UNDONE.target_true)
        assert first.retention is None  # nothing earlier to retain
        assert second.retention is not None and second.retention < 1.0
        assert second.retention == 0.0  # the only earlier edit no longer holds
        assert second.reason.startswith("regression") and "earlier edits still hold" in second.reason
        assert ed.journal.edit(second.seq).retention == 0.0


def test_retention_holds_when_a_later_edit_leaves_the_earlier_one(tmp_path, tok):
    with editor(tmp_path / "j", tok) as ed:
        result = ed.apply([UNDONE, OTHER_PROMPT], checks=RETENTION_ONLY, on_regression="warn", repair_every=0)
        first, second = result.results
        assert first.success and second.status == "applied"
        assert p(ed.lm, UNDONE.text, UNDONE.target_new) > p(ed.lm, UNDONE.text, UNDONE.target_true)
        assert second.retention == 1.0 and "earlier edits" not in second.reason


def test_under_skip_an_edit_that_undoes_an_earlier_one_is_rejected(tmp_path, tok):
    with editor(tmp_path / "j", tok) as ed:
        result = ed.apply([UNDONE, REDO], checks=RETENTION_ONLY, on_regression="skip", repair_every=0)
        assert [r.status for r in result.results] == ["applied", "rejected"]
        assert result.results[1].retention == 0.0
        # The first edit still holds: the rejected one was undone.
        assert p(ed.lm, UNDONE.text, UNDONE.target_new) > p(ed.lm, UNDONE.text, UNDONE.target_true)


# ----------------------------------------------------------------------------- sample sizes
def many_facts(n=6):
    """n facts with two neighbourhood prompts each; all but the first have a true object (an own-prompt probe).

    The first one is the fact the checks below run for: without a true object it has no probe
    of its own, so the counts do not depend on whether a check samples the checked fact's own prompt.
    """
    subjects = [
        "Big Ben",
        "The Colosseum",
        "Toko Yasuda",
        "Michel Rocard",
        "The Space Needle",
        "The Eiffel Tower",
        "Danielle Darrieux",
        "The quick brown fox",
    ]
    return [
        make(
            f"m{i}",
            subjects[i],
            "Tokyo",
            None if i == 0 else "London",
            neighborhood=(Neighbor(f"{subjects[i]} is near", "Paris"), Neighbor(f"{subjects[i]} is in", "Rome")),
        )
        for i in range(n)
    ]


class PairRecorder:
    """Wraps probes.answer_nll to record what each check scores."""

    def __init__(self, monkeypatch):
        self.calls: list[list[tuple[str, str]]] = []
        real = probes_module.answer_nll

        def record(lm, pairs, *args, **kwargs):
            self.calls.append(list(pairs))
            return real(lm, pairs, *args, **kwargs)

        monkeypatch.setattr(probes_module, "answer_nll", record)


def sampled(recorder, fact):
    """The probe-sample part of the last check's pairs (after the fact's own neighbourhood pairs)."""
    return recorder.calls[-1][2 * len(fact.neighborhood) :]


def test_the_sample_grows_with_the_edit_time(tok, monkeypatch):
    facts = many_facts(6)
    lm = tiny_loaded("gpt2", tok)
    probes = RegressionProbes(lm, facts, Thresholds(min_sample=4, probe_budget=0.25))
    probes.capture_base()
    total = 6 * 2 + 5  # two neighbours per fact, one own prompt per fact with a true object
    assert len(probes._probes) == total

    assert probes._budget_pairs(100.0) > probes._budget_pairs(1.0) > probes._budget_pairs(0.0) == 0
    short = probes.check(facts[0], [], edit_seconds=0.0)
    assert short.probes_checked == 4  # the floor: min_sample
    long = probes.check(facts[0], [], edit_seconds=1e4)
    assert long.probes_checked == total  # the whole probe set fits the budget
    assert long.probes_checked > short.probes_checked
    assert long.probe_regression is not None and short.probe_regression is not None

    # A larger share of the edit's time buys a larger sample for the same edit time.
    generous = RegressionProbes(lm, facts, Thresholds(min_sample=4, probe_budget=1e6))
    generous.capture_base()
    assert generous.check(facts[0], [], edit_seconds=0.01).probes_checked == total

    # Earlier edits are sampled the same way: few with a short edit, many with a long one.
    earlier = [
        {"text": f.text, "target_new": f.target_new, "target_true": f.target_true, "p_new_after": 0.5}
        for f in facts[1:]
    ]
    assert probes.check(facts[0], earlier, edit_seconds=0.0).edits_checked == 4
    assert probes.check(facts[0], earlier, edit_seconds=1e4).edits_checked == 5


def test_the_sample_rotates_through_the_probe_set(tok, monkeypatch):
    facts = many_facts(4)
    lm = tiny_loaded("gpt2", tok)
    probes = RegressionProbes(lm, facts, Thresholds(min_sample=4))
    probes.capture_base()
    everything = [(pr.prompt, pr.answer) for pr in probes._probes]
    assert len(everything) == len(set(everything)) == 11
    recorder = PairRecorder(monkeypatch)
    seen = []
    for _ in range(3):  # 3 x 4 = 12: the whole set once, then it starts over
        probes.check(facts[0], [], edit_seconds=0.0)
        seen += sampled(recorder, facts[0])
    assert sorted(seen[:11]) == sorted(everything)
    assert seen[11] == seen[0]


def test_own_prompts_of_applied_facts_are_never_sampled(tok, monkeypatch):
    facts = many_facts(6)
    lm = tiny_loaded("gpt2", tok)
    probes = RegressionProbes(lm, facts, Thresholds(min_sample=4))
    probes.capture_base()
    probes.applied = {facts[1].hash, facts[2].hash}
    recorder = PairRecorder(monkeypatch)
    checked = facts[0]
    samples = []
    for seconds in (0.0, 0.0, 0.0, 1e4, 0.0, 1e4):  # short and long checks, all around the rotation
        out = probes.check(checked, [], edit_seconds=seconds)
        samples.append(sampled(recorder, checked))
        assert len(samples[-1]) == out.probes_checked
    flat = {pair for s in samples for pair in s}
    for f in facts[1:3]:
        assert (f.text, f.target_true) not in flat  # applied: meant to move
    for f in facts[3:]:
        assert (f.text, f.target_true) in flat  # not yet applied: must not move
    assert max(len(s) for s in samples) == 6 * 2 + 5 - 2


def test_the_checked_facts_own_prompt_is_not_a_probe(tok, monkeypatch):
    facts = many_facts(3)
    lm = tiny_loaded("gpt2", tok)
    probes = RegressionProbes(lm, facts, Thresholds(min_sample=4))
    probes.capture_base()
    recorder = PairRecorder(monkeypatch)
    probes.check(facts[1], [], edit_seconds=1e4)  # facts[1] has just been edited
    assert (facts[1].text, facts[1].target_true) not in recorder.calls[-1]


def test_a_lone_fact_is_not_rejected_for_moving_its_own_prompt(tmp_path, tok):
    lone = make("lone", "The Eiffel Tower", "Spain", "Paris", neighborhood=())
    with editor(tmp_path / "j", tok) as ed:
        (row,) = ed.apply([lone], checks=Thresholds(), on_regression="skip", repair_every=0).results
        assert row.p_true_after < 0.5 * row.p_true_before  # the edit moved its own prompt, as meant
        assert row.status == "applied", row.reason


def test_in_a_run_applied_facts_own_prompts_are_never_sampled(tmp_path, tok, monkeypatch):
    facts = [GOOD_1, GOOD_2, make("no-neighbours", "Toko Yasuda", "Paris", "guitar", neighborhood=())]
    seen: list[tuple[set, list]] = []
    real = RegressionProbes._next_sample

    def spy(self, size):
        picked = real(self, size)
        seen.append((set(self.applied), picked))
        return picked

    monkeypatch.setattr(RegressionProbes, "_next_sample", spy)
    with editor(tmp_path / "j", tok) as ed:
        result = ed.apply(
            facts,
            checks=Thresholds(probe_budget=1e6, max_probe_regression=1.0, min_retention=0.0, max_neighborhood_drop=1.0),
            repair_every=0,
        )
    assert [r.status for r in result.results] == ["applied"] * 3
    assert len(seen) == 3  # one sample per edit
    every = {(pr.prompt, pr.answer, pr.own_of) for pr in seen[0][1]}
    # The first sample is the whole probe set (the budget is unlimited) but the checked fact's own prompt.
    assert len(seen[0][1]) == 2 * 2 + 3 - 1
    for k, (applied, picked) in enumerate(seen):
        assert {f.hash for f in facts[:k]} <= applied  # the facts edited before this one
        assert all(pr.own_of not in applied for pr in picked)
        # Everything else is in the sample: the exclusion is specific.
        expected = {e for e in every if e[2] is None or e[2] not in applied and e[2] != facts[k].hash}
        assert expected <= {(pr.prompt, pr.answer, pr.own_of) for pr in picked}


# ----------------------------------------------------------------------------- the journal's columns
def test_the_journal_stores_the_probe_outcomes(tmp_path, tok):
    with editor(tmp_path / "j", tok) as ed:
        result = ed.apply([GOOD_1, HARMFUL, GOOD_2], checks=NEIGHBOURHOOD_ONLY, on_regression="warn", repair_every=0)
        for row in result.results:
            record = ed.journal.edit(row.seq)
            assert record.neighborhood_drop == row.neighborhood_drop
            assert record.probe_regression == row.probe_regression
            assert record.retention == row.retention
            assert record.seconds_probes is not None and 0 < record.seconds_probes < record.seconds_total
        assert [ed.journal.edit(r.seq).neighborhood_drop for r in result.results] == [0.0, 1.0, 0.0]
        assert ed.journal.edit(result.results[0].seq).retention is None  # no earlier edit
        assert ed.journal.edit(result.results[2].seq).retention is not None
        # Without checks the columns stay empty.
        plain = ed.apply([make("plain", "The Eiffel Tower", "Spain", "Paris")], checks=None, repair_every=0).results[0]
    with sqlite3.connect(tmp_path / "j" / "journal.sqlite") as db:
        rows = db.execute(
            "SELECT fact_id, neighborhood_drop, probe_regression, retention, seconds_probes FROM edits ORDER BY seq"
        ).fetchall()
    assert [r[0] for r in rows] == ["good-1", "harmful", "good-2", "plain"]
    assert rows[1][1] == 1.0 and all(v is not None for v in rows[1][1:3]) and rows[1][4] > 0
    assert rows[3][1:] == (None, None, None, None) and plain.status == "applied"
