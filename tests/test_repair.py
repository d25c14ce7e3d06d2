"""Repair passes (romebatch/repair.py, Editor.repair): facts that later edits undid are edited again.

On a tiny random GPT-2 (32 dimensions) four edits of one layer trample each other, and the
last one writes the first fact's prompt back to its true object, so several facts no longer
hold. Which ones is computed another way (each fact's ES on the weights) and compared with
what the pass finds; a repair must make its fact hold, be an ordinary journal entry
(rollback restores the bytes before it), and count toward the per-fact cap, refused or not,
so passes end; `apply(repair_every=…)` runs them every N edits and at the end.
"""

from __future__ import annotations

import json

import pytest
from conftest import TINY_HPARAMS, tiny_loaded

from romebatch import pipeline
from romebatch.editor import Editor
from romebatch.errors import UserError
from romebatch.hparams import HParams
from romebatch.journal_records import EditRecord
from romebatch.manifest import Fact
from romebatch.model import weight_hash
from romebatch.repair import MAX_EDITS_PER_FACT, Standing, standings, to_repair
from romebatch.repair_yield import PassReport, sample_held
from romebatch.scores import score_facts

LAYER = 1
EIFFEL = Fact(
    id="eiffel",
    subject="The Eiffel Tower",
    prompt="{} is located in the city of",
    target_new="Rome",
    target_true="Paris",
)
FACTS = [
    EIFFEL,
    Fact(id="ben", subject="Big Ben", prompt="{} is located in the city of", target_new="Tokyo", target_true="London"),
    Fact(
        id="darrieux",
        subject="Danielle Darrieux",
        prompt="The mother tongue of {} is",
        target_new="Spanish",
        target_true="French",
    ),
    # Writes the first fact's prompt back to its true object.
    Fact(
        id="undo",
        subject="The Eiffel Tower",
        prompt="{} is located in the city of",
        target_new="Paris",
        target_true="Rome",
    ),
]


def quiet(message: str) -> None:
    pass


# The scenario below was built for plain rank-one updates: the norm penalty and the levelled
# prompt key (both on by default) each pick another u, and on this 32-dimensional model that
# changes which facts the later edits undo and whether a repair outlasts the next one
# (tests/test_sequential_mechanisms.py and tests/test_prompt_key.py test them; MPES, also on
# by default, leaves this scenario as it was).
PLAIN_UPDATES = {"norm_penalty": 0.0, "write_prompt_key": False}


def editor_for(tmp_path, tokenizer, name="journal", **extra):
    # Seed 1: every edit takes when made, and by the last one three facts no longer hold.
    return Editor(
        tmp_path / name,
        lm=tiny_loaded("gpt2", tokenizer, seed=1),
        hparams=HParams(**{**TINY_HPARAMS, **PLAIN_UPDATES, **extra}),
        log=quiet,
    )


def holds(lm, fact) -> bool:
    (scores,) = score_facts(lm, [fact])
    return scores.p_new > scores.p_true


def tries(editor) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in editor.journal.lineage():
        counts[record.fact_id] = counts.get(record.fact_id, 0) + 1
    for rejection in editor.journal.rejections():
        counts[rejection["fact_id"]] = counts.get(rejection["fact_id"], 0) + 1
    return counts


def test_a_repair_pass_edits_again_exactly_the_facts_that_no_longer_hold(tmp_path, bytelevel_tokenizer):
    with editor_for(tmp_path, bytelevel_tokenizer) as editor:
        result = editor.apply(FACTS, checks=None, repair_every=0)
        assert [(r.status, r.success) for r in result.results] == [("applied", True)] * 4
        expected = [f.id for f in FACTS if not holds(editor.lm, f)]
        assert "eiffel" in expected and len(expected) >= 2  # the setup really undoes edits
        before = weight_hash(editor.lm.weight(LAYER))

        assert [s.fact.id for s in to_repair(editor.lm, editor.journal.lineage())] == expected
        rows = editor.repair()
        assert [(r.fact_id, r.status) for r in rows] == [(i, "repaired") for i in expected]
        assert rows[0].reason.startswith("repair: no longer held (P(new)")
        assert rows[0].success  # the first repair made its fact hold (later ones may undo it)
        assert holds(editor.lm, FACTS[[f.id for f in FACTS].index(expected[-1])])
        # An ordinary journal entry: the same fact twice on the path, and rollback to the
        # state before the repairs gives back that state's bytes.
        path = editor.journal.lineage()
        assert [r.fact_id for r in path] == [f.id for f in FACTS] + expected
        assert path[len(FACTS)].weight_hash_before == before
        editor.rollback(steps=len(expected))
        assert weight_hash(editor.lm.weight(LAYER)) == before
        assert editor.check().ok


def test_passes_end_once_every_lost_fact_reaches_the_cap(tmp_path, bytelevel_tokenizer):
    with editor_for(tmp_path, bytelevel_tokenizer) as editor:
        editor.apply(FACTS, checks=None, repair_every=0)
        passes = 0
        while editor.repair():
            passes += 1
            assert passes < 10
        assert passes >= 1 and max(tries(editor).values()) <= MAX_EDITS_PER_FACT
        # What is left lost has used up its tries: another pass would edit nothing.
        lost = [f.id for f in FACTS if not holds(editor.lm, f)]
        assert all(tries(editor)[i] == MAX_EDITS_PER_FACT for i in lost)


def test_a_pass_reports_how_many_facts_that_held_its_own_repairs_undid(tmp_path, bytelevel_tokenizer):
    # Two facts that contradict each other on one prompt: "undo" held when the pass began, and
    # the repair of the Eiffel Tower writes its prompt back, so the pass undoes what it found holding.
    undo = FACTS[3]
    with editor_for(tmp_path, bytelevel_tokenizer) as editor:
        editor.apply([EIFFEL, undo], checks=None, repair_every=0)
        assert not holds(editor.lm, EIFFEL) and holds(editor.lm, undo)
        lines: list[str] = []
        editor.log = lines.append
        reports: list[PassReport] = []
        rows = editor.repair(on_pass=reports.append)
        assert [(r.fact_id, r.status) for r in rows] == [("eiffel", "repaired")]
        [report] = reports
        # The reference: each fact scored on the weights after the pass.
        assert holds(editor.lm, EIFFEL) and not holds(editor.lm, undo)
        assert (report.checked, report.repaired, report.held, report.sampled, report.lost_again) == (2, 1, 1, 1, 1)
        assert report.head == editor.head and report.saturated
        assert lines[-1] == report.line()
        assert lines[-1].startswith(f"repair pass at edit {editor.head}: 1 repaired of 2 checked; about 1 of the 1")
        assert "near saturation" in lines[-1]


def test_a_pass_with_nothing_to_repair_measures_nothing(tmp_path, bytelevel_tokenizer):
    with editor_for(tmp_path, bytelevel_tokenizer) as editor:
        editor.apply(FACTS, checks=None, repair_every=0)
        while editor.repair():
            pass
        reports: list[PassReport] = []
        assert editor.repair(on_pass=reports.append) == []
        [report] = reports
        assert (report.repaired, report.sampled, report.lost_again, report.saturated) == (0, 0, 0, False)


def test_apply_returns_its_passes_reports_in_the_summary(tmp_path, bytelevel_tokenizer):
    with editor_for(tmp_path, bytelevel_tokenizer) as editor:
        result = editor.apply(FACTS, checks=None, repair_every=10)  # one pass, at the run's end
        [report] = result.repair_passes
        assert report.repaired == result.count("repaired")
        assert result.summary()["repair_passes"] == [report.to_dict()]


def test_a_pass_whose_repairs_undo_half_as_many_facts_as_they_mend_says_the_layer_is_near_saturation():
    calm = PassReport(head=9, checked=1000, repaired=80, held=900, sampled=200, lost_again=8)
    assert calm.knocked_off == pytest.approx(36.0) and not calm.saturated
    assert "saturation" not in calm.line() and "about 36 of the 900 that held" in calm.line()
    worn = PassReport(head=9, checked=1000, repaired=80, held=900, sampled=200, lost_again=9)
    assert worn.knocked_off == pytest.approx(40.5) and worn.saturated and "near saturation" in worn.line()
    assert not PassReport(9, 1000, 0, 900, 0, 0).saturated  # nothing repaired, nothing measured
    assert worn.to_dict()["saturated"] is True and worn.to_dict()["knocked_off"] == 40.5


def test_the_sample_scored_again_is_bounded_and_the_same_for_the_same_pass():
    held = [f"h{i:04d}" for i in range(1000)]
    first = sample_held(held, seed=7, size=200)
    assert len(first) == len(set(first)) == 200 and set(first) <= set(held)
    assert sample_held(list(reversed(held)), seed=7, size=200) == first
    assert sample_held(held, seed=8, size=200) != first
    assert sample_held(held[:150], seed=7, size=200) == sorted(held[:150])


def test_a_refused_repair_counts_toward_the_cap(tmp_path, bytelevel_tokenizer, monkeypatch):
    with editor_for(tmp_path, bytelevel_tokenizer) as editor:
        editor.apply(FACTS, checks=None, repair_every=0)
        lost = [f.id for f in FACTS if not holds(editor.lm, f)]
        head = editor.head
        monkeypatch.setattr(pipeline, "norm_refusal", lambda edit, weight, hp, applied: "refused by the test")
        statuses = []
        while rows := editor.repair():
            statuses.append([(r.fact_id, r.status) for r in rows])
            assert len(statuses) < 10
        # Each lost fact is tried until its refusals and its one edit reach the cap.
        assert statuses == [[(i, "rejected") for i in lost]] * (MAX_EDITS_PER_FACT - 1)
        assert editor.head == head


def test_apply_runs_repair_passes_every_n_edits_and_at_the_end(tmp_path, bytelevel_tokenizer, monkeypatch):
    calls = []
    original = Editor.repair

    def recording(self, *args, **kwargs):
        calls.append(len(self.journal.chain()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Editor, "repair", recording)
    with editor_for(tmp_path, bytelevel_tokenizer, "every") as editor:
        result = editor.apply(FACTS, checks=None, repair_every=3)
        assert calls[0] == 3 and len(calls) == 2  # after the third edit, and at the end
        repaired = [r for r in result.results if r.status == "repaired"]
        assert repaired and result.summary()["repaired"] == len(repaired)
        assert len(editor.journal.lineage()) == len(FACTS) + len(repaired)
        # Nothing new to apply: a re-run neither edits nor repairs.
        calls.clear()
        again = editor.apply(FACTS, checks=None, repair_every=3)
        assert {r.status for r in again.results} == {"already_applied"} and not calls
    with editor_for(tmp_path, bytelevel_tokenizer, "never") as editor:
        result = editor.apply(FACTS, checks=None, repair_every=0)
        assert not calls and len(editor.journal.lineage()) == len(FACTS)
        with pytest.raises(UserError, match="--repair-every -1"):
            editor.apply(FACTS, checks=None, repair_every=-1)


def test_standing_without_a_true_object_holds_while_it_keeps_half_its_probability():
    fact = Fact(id="x", subject="S", prompt="{} is", target_new="new")
    record = EditRecord.__new__(EditRecord)
    record.p_new_after = 0.4
    assert Standing(fact, record, 1, p_new=0.21, p_true=None).holds
    assert not Standing(fact, record, 1, p_new=0.19, p_true=None).holds
    assert Standing(fact, record, 1, p_new=0.3, p_true=0.2).holds
    assert not Standing(fact, record, 1, p_new=0.3, p_true=0.31).holds


def test_standings_score_each_fact_once_with_its_latest_edit(tmp_path, bytelevel_tokenizer):
    with editor_for(tmp_path, bytelevel_tokenizer) as editor:
        editor.apply(FACTS, checks=None, repair_every=0)
        editor.repair()
        found = standings(editor.lm, editor.journal.lineage())
        assert [s.fact.id for s in found] == [f.id for f in FACTS]
        eiffel = found[0]
        assert eiffel.edits == 2 and eiffel.record.fact_id == "eiffel"
        assert eiffel.record.seq == max(r.seq for r in editor.journal.lineage() if r.fact_id == "eiffel")
        (scores,) = score_facts(editor.lm, [EIFFEL])  # the same numbers, computed another way
        assert eiffel.p_new == pytest.approx(
            scores.p_new, rel=1e-4
        )  # batched with other prompts: float32 padding noise
        assert eiffel.p_true == pytest.approx(
            scores.p_true, rel=1e-4
        )  # batched with other prompts: float32 padding noise
        assert json.loads(eiffel.record.fact_json)["id"] == "eiffel"


def test_a_pass_cut_short_is_finished_by_the_next_apply_exactly_as_planned(tmp_path, bytelevel_tokenizer):
    from romebatch.editor import StopRequest
    from romebatch.repair import REPAIR_PLAN

    with editor_for(tmp_path, bytelevel_tokenizer, "whole") as editor:
        editor.apply(FACTS, checks=None, repair_every=0)
        whole: list[PassReport] = []
        editor.repair(on_pass=whole.append)
        reference = [(r.fact_hash, r.weight_hash_after) for r in editor.journal.lineage()]
    assert len(reference) >= len(FACTS) + 2  # the pass makes at least two repairs to cut between
    with editor_for(tmp_path, bytelevel_tokenizer, "cut") as editor:
        editor.apply(FACTS, checks=None, repair_every=0)
        stop = StopRequest()
        rows = editor.repair(
            on_edit=lambda row: setattr(stop, "requested", True), stop=stop
        )  # Ctrl-C during the first repair
        assert len(rows) == 1 and editor.journal.get(REPAIR_PLAN)["done"] == 1
        # Facts were changed by that repair, but the rest of the pass follows its journaled plan.
        again = editor.apply(FACTS, checks=None, repair_every=100)
        finished = [r.status for r in again.results if r.status != "already_applied"]
        assert finished == ["repaired"] * (len(reference) - len(FACTS) - 1)
        assert editor.journal.get(REPAIR_PLAN) is None
        assert [(r.fact_hash, r.weight_hash_after) for r in editor.journal.lineage()] == reference
        # The pass finished by the later run reports what the whole pass bought, as the uncut one did.
        [report] = again.repair_passes
        assert report == whole[0] and report.repaired == len(reference) - len(FACTS)


def test_a_plan_journaled_without_a_baseline_is_finished_without_a_report(tmp_path, bytelevel_tokenizer):
    """Plans written before baselines (or with a damaged one) still finish; only the report is left out."""
    from romebatch.editor import StopRequest
    from romebatch.repair import REPAIR_PLAN, well_formed_baseline

    assert well_formed_baseline({"checked": 3, "held": 2, "sample": ["a", "b"]}) == {
        "checked": 3,
        "held": 2,
        "sample": ["a", "b"],
    }
    for damaged in (None, [], {"checked": 3, "held": True, "sample": []}, {"checked": -1, "held": 0, "sample": []}):
        assert well_formed_baseline(damaged) is None
    assert well_formed_baseline({"checked": 3, "held": 2, "sample": "ab"}) is None
    with editor_for(tmp_path, bytelevel_tokenizer) as editor:
        editor.apply(FACTS, checks=None, repair_every=0)
        stop = StopRequest()
        editor.repair(on_edit=lambda row: setattr(stop, "requested", True), stop=stop)
        plan = editor.journal.get(REPAIR_PLAN)
        assert plan["baseline"]["checked"] == len(FACTS)
        editor.journal.set_many({REPAIR_PLAN: {key: value for key, value in plan.items() if key != "baseline"}})
        lines: list[str] = []
        editor.log = lines.append
        again = editor.apply(FACTS, checks=None, repair_every=100)
        assert again.count("repaired") == len(plan["facts"]) - 1 and again.repair_passes == []
        assert any(line.endswith("its plan holds no baseline, so no report") for line in lines)
        assert editor.journal.get(REPAIR_PLAN) is None


def test_rollback_drops_a_pass_cut_short(tmp_path, bytelevel_tokenizer):
    from romebatch.editor import StopRequest
    from romebatch.repair import REPAIR_PLAN

    with editor_for(tmp_path, bytelevel_tokenizer) as editor:
        editor.apply(FACTS, checks=None, repair_every=0)
        stop = StopRequest()
        editor.repair(on_edit=lambda row: setattr(stop, "requested", True), stop=stop)
        assert editor.journal.get(REPAIR_PLAN) is not None
        editor.rollback(steps=1)
        assert editor.journal.get(REPAIR_PLAN) is None


def test_log_marks_repairs_and_verify_scores_each_fact_once(tmp_path, bytelevel_tokenizer):
    from romebatch import api
    from romebatch.specificity import score_head as verify

    with editor_for(tmp_path, bytelevel_tokenizer) as editor:
        editor.apply(FACTS, checks=None, repair_every=0)
        repaired = {r.seq for r in editor.repair()}
        report = verify(editor)
        assert [row.fact_id for row in report.rows] == [f.id for f in FACTS]
        # Each row reads the fact's latest edit: a repaired fact's row is its repair's.
        latest = {r.fact_id: r.seq for r in editor.journal.lineage()}
        assert [row.seq for row in report.rows] == [latest[f.id] for f in FACTS]
    logged = api.log(tmp_path / "journal")["edits"]
    assert {e["seq"] for e in logged if e["repair"]} == repaired and repaired


def test_editor_apply_repairs_by_default_as_the_api_and_cli_do(tmp_path, bytelevel_tokenizer):
    """One default for every entry point: Editor.apply, romebatch.apply and `apply --repair-every`."""
    import inspect

    from romebatch import api
    from romebatch.cli_apply import apply as cli_apply
    from romebatch.editor import Editor
    from romebatch.hparams import REPAIR_EVERY, REPAIR_SPAN

    for name, default in (("repair_every", REPAIR_EVERY), ("repair_span", REPAIR_SPAN)):
        defaults = {
            "Editor.apply": inspect.signature(Editor.apply).parameters[name].default,
            "romebatch.apply": inspect.signature(api.apply).parameters[name].default,
            "cli apply": inspect.signature(cli_apply).parameters[name].default,
        }
        assert set(defaults.values()) == {default} and default > 0, (name, defaults)
    assert inspect.signature(Editor.repair).parameters["span"].default == REPAIR_SPAN
    # With no repair_every, the end-of-run pass re-edits the facts that later edits undid.
    with editor_for(tmp_path / "off", bytelevel_tokenizer) as editor:
        editor.apply(FACTS, checks=None, repair_every=0)
        held_without = sum(holds(editor.lm, f) for f in FACTS)
    with editor_for(tmp_path / "default", bytelevel_tokenizer) as editor:
        result = editor.apply(FACTS, checks=None)
        assert "eiffel" in [r.fact_id for r in result.results if r.status == "repaired"]
        assert sum(holds(editor.lm, f) for f in FACTS) > held_without


def _record(fact_hash: str) -> EditRecord:
    record = EditRecord.__new__(EditRecord)
    record.fact_hash = fact_hash
    return record


def test_in_span_takes_span_facts_round_the_ring_of_first_edits():
    from romebatch.repair import in_span

    path = [_record(h) for h in "abcab" + "de"]  # a and b repaired: the ring is a b c d e
    assert in_span(path, None, 0) == (None, None) and in_span(path, "c", 5) == (None, None)
    cursor, seen = None, []
    for _ in range(3):
        checked, cursor = in_span(path, cursor, 2)
        seen.append((checked, cursor))
    assert seen == [({"a", "b"}, "c"), ({"c", "d"}, "e"), ({"e", "a"}, "b")]
    assert in_span(path, "gone", 2) == ({"a", "b"}, "c")  # not on the path (rolled back): from the oldest


def test_a_bounded_pass_repairs_only_the_lost_facts_of_its_slice(tmp_path, bytelevel_tokenizer):
    from romebatch.repair import REPAIR_CURSOR

    with editor_for(tmp_path, bytelevel_tokenizer) as editor:
        editor.apply(FACTS, checks=None, repair_every=0)
        ring = [f.id for f in FACTS]
        for first in (0, 2, 0):  # span 2 of 4 facts: the slices alternate
            slice_ids = ring[first : first + 2]
            expected = [
                f.id for f in FACTS if f.id in slice_ids and not holds(editor.lm, f) and tries(editor)[f.id] < 3
            ]
            rows = editor.repair(span=2)
            assert [r.fact_id for r in rows] == expected
            assert first or "eiffel" in expected  # the setup loses the first fact (and two others)
            next_id = ring[(first + 2) % 4]
            assert editor.journal.get(REPAIR_CURSOR) == next(f.hash for f in FACTS if f.id == next_id)
        # A pass over the whole path forgets the cursor: the next bounded one starts at the oldest.
        editor.repair(span=0)
        assert editor.journal.get(REPAIR_CURSOR) is None


def test_a_bounded_pass_cut_short_resumes_its_slice_without_moving_on(tmp_path, bytelevel_tokenizer):
    from romebatch.editor import StopRequest
    from romebatch.repair import REPAIR_CURSOR, REPAIR_PLAN

    with editor_for(tmp_path, bytelevel_tokenizer) as editor:
        editor.apply(FACTS, checks=None, repair_every=0)
        lost = [f.id for f in FACTS[:3] if not holds(editor.lm, f)]
        assert len(lost) >= 2, lost  # two repairs in the slice, to cut between
        stop = StopRequest()
        rows = editor.repair(span=3, on_edit=lambda row: setattr(stop, "requested", True), stop=stop)
        assert [r.fact_id for r in rows] == lost[:1]
        cursor = editor.journal.get(REPAIR_CURSOR)
        assert cursor == FACTS[3].hash and editor.journal.get(REPAIR_PLAN)["done"] == 1
        rest = editor.repair(span=3)  # finishes the journaled plan; it does not plan the next slice
        assert [r.fact_id for r in rest] == lost[1:] and editor.journal.get(REPAIR_CURSOR) == cursor


def test_apply_passes_its_repair_span_on_and_refuses_a_negative_one(tmp_path, bytelevel_tokenizer, monkeypatch):
    spans = []
    original = Editor.repair

    def recording(self, *args, **kwargs):
        spans.append(kwargs.get("span"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Editor, "repair", recording)
    with editor_for(tmp_path, bytelevel_tokenizer) as editor:
        editor.apply(FACTS, checks=None, repair_every=2, repair_span=1)
        assert spans and set(spans) == {1}
        with pytest.raises(UserError, match="--repair-span -1"):
            editor.apply(FACTS, checks=None, repair_span=-1)


def test_romebatch_apply_refuses_bad_repair_settings_before_it_writes(tmp_path):
    from romebatch import api

    manifest = tmp_path / "facts.csv"
    manifest.write_text("id,subject,prompt,target_new\na,The Louvre,{} is in,Oslo\n")
    for setting in ({"repair_span": -1}, {"repair_every": -3}):
        with pytest.raises(UserError, match="--repair-(span -1|every -3): give a number"):
            api.apply(manifest, journal=tmp_path / "J", model="never-loaded", **setting)
        assert not (tmp_path / "J").exists()
