"""Repair passes: which applied facts no longer hold, when to check, and the journaled plan.

Every ROME edit leaks a small share of its write into every other key (RESULTS.md, "Where
NS goes"), so over hundreds of sequential edits the earlier ones wear down (measured in
benchmarks/RESULTS.md, "Sequential editing, session 6"). A smaller write leaks less but also
leaves each edit a smaller margin, so a smaller clamp does not stop this. Checking does:
every fact on the head's path is scored on its own prompt (two short sequences each), and a
fact that no longer holds is edited again on the current weights. The repair is an ordinary
journal entry for the same fact (guards included), so replay, rollback and export treat it
like any other edit.

A pass runs after every `REPAIR_EVERY` first edits of facts and once at the end of a run.
It checks at most `REPAIR_SPAN` facts, in rotation over the path (oldest first, then
round again from where the last pass stopped), so its cost does not grow with the journal
while every fact is still checked once every ceil(N / span) passes.
Its plan (which facts, from which state, how far it got) is journaled before its first
repair, in the same transaction as each repair's outcome, so a pass that a crash or Ctrl-C
cut short is finished, not planned afresh, by the next run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from math import exp
from typing import TYPE_CHECKING

from .hparams import REPAIR_EVERY, REPAIR_SPAN  # noqa: F401 (declared once, with every other default)
from .journal import Journal
from .journal_records import EditRecord
from .journal_schema import REPAIR_CURSOR, REPAIR_MARKS, REPAIR_PLAN
from .manifest import Fact, fact_from_dict
from .model import LoadedModel
from .repair_yield import PassReport, sample_held
from .scores import answer_nll, edit_holds

if TYPE_CHECKING:
    from .editor import Editor
    from .outcomes import FactResult, StopRequest


# Edits of one fact on a path, the first included: a fact the method cannot make hold
# (or keep holding) is not edited again and again, each time leaking into the others.
MAX_EDITS_PER_FACT = 3


@dataclass
class Standing:
    """One fact on the head's path, as it stands now."""

    fact: Fact
    record: EditRecord  # its latest edit on the path
    edits: int  # how many edits of it were tried on the path: committed, or rejected by a guard
    p_new: float
    p_true: float | None

    @property
    def holds(self) -> bool:
        return edit_holds(self.p_new, self.p_true, self.record.p_new_after)


def in_span(path: list[EditRecord], cursor: str | None, span: int | None) -> tuple[set[str] | None, str | None]:
    """The fact hashes a pass checks (None: all of them) and the cursor for the next pass.

    The distinct facts of `path` in the order of their first edit form a ring; a pass takes
    `span` of them from `cursor` on (from the oldest when `cursor` is not on the path, after
    a rollback say), and the next pass starts where it stopped. Facts edited since join the
    ring's end, so the rotation reaches them after the older ones it has not checked.
    """
    ring = list(dict.fromkeys(record.fact_hash for record in path))
    if not span or len(ring) <= span:
        return None, None
    start = ring.index(cursor) if cursor in ring else 0
    return {ring[(start + i) % len(ring)] for i in range(span)}, ring[(start + span) % len(ring)]


def standings(
    lm: LoadedModel,
    path: list[EditRecord],
    rejected: dict[str, int] | None = None,
    batch_size: int = 32,
    only: set[str] | None = None,
) -> list[Standing]:
    """Score every distinct fact on `path` (oldest first) on its own prompt, on the current weights.

    `rejected` counts, per fact hash, the edits of it a guard refused on states of the path:
    they count as tries, or a repair the guard always refuses would be tried forever.
    `only` limits the scoring to those fact hashes (a bounded pass, `in_span`).
    """
    latest: dict[str, EditRecord] = {}
    edits: dict[str, int] = dict(rejected or {})
    for record in path:
        latest[record.fact_hash] = record
        edits[record.fact_hash] = edits.get(record.fact_hash, 0) + 1
    chosen = [r for h, r in latest.items() if only is None or h in only]
    facts = [fact_from_dict(json.loads(r.fact_json)) for r in chosen]
    pairs: list[tuple[str, str]] = []
    index: list[tuple[int, int | None]] = []  # (P(new) pair, P(true) pair when target_true is known)
    for fact in facts:
        index.append((len(pairs), len(pairs) + 1 if fact.target_true is not None else None))
        pairs.append((fact.text, fact.target_new))
        if fact.target_true is not None:
            pairs.append((fact.text, fact.target_true))
    nll = answer_nll(lm, pairs, batch_size) if pairs else []
    return [
        Standing(fact, latest[fact.hash], edits[fact.hash], exp(-nll[new]), None if true is None else exp(-nll[true]))
        for fact, (new, true) in zip(facts, index)
    ]


def to_repair(
    lm: LoadedModel,
    path: list[EditRecord],
    rejected: dict[str, int] | None = None,
    max_edits: int = MAX_EDITS_PER_FACT,
    only: set[str] | None = None,
) -> list[Standing]:
    """The facts on `path` (of `only`, if given) that no longer hold and may still be edited again, oldest first."""
    return repairable(standings(lm, path, rejected, only=only), max_edits)


def repairable(scored: list[Standing], max_edits: int = MAX_EDITS_PER_FACT) -> list[Standing]:
    """Of `scored`, the facts that no longer hold and may still be edited again."""
    return [s for s in scored if not s.holds and s.edits < max_edits]


def why_lost(standing: Standing) -> str:
    if standing.p_true is not None:
        return f"P(new) {standing.p_new:.3g} <= P(true) {standing.p_true:.3g}"
    return (
        f"P(new) {standing.p_new:.3g}, under half its {standing.record.p_new_after:.3g} "
        f"after edit {standing.record.seq}"
    )


@dataclass
class PlanEntry:
    fact: Fact
    was: str  # why it no longer held when the pass was planned


@dataclass
class RepairPlan:
    """The journaled plan of a repair pass: the head it began on, its facts, the entries tried."""

    at: int
    entries: list[PlanEntry]
    done: int = 0
    # What the pass's report measures against, kept with the plan so that a pass finished by
    # a later run reports too: {"checked": facts scored, "held": how many held, "sample":
    # the hashes of those held that are scored again after the repairs}.
    baseline: dict | None = None

    def to_meta(self) -> dict:
        facts = [{"fact": e.fact.to_dict(), "was": e.was} for e in self.entries]
        return {REPAIR_PLAN: {"at": self.at, "facts": facts, "done": self.done, "baseline": self.baseline}}

    @classmethod
    def load(cls, journal: Journal) -> RepairPlan | None:
        stored = journal.get(REPAIR_PLAN)
        if stored is None:
            return None
        entries = [PlanEntry(fact_from_dict(e["fact"]), e["was"]) for e in stored["facts"]]
        return cls(stored["at"], entries, stored["done"], well_formed_baseline(stored.get("baseline")))


def well_formed_baseline(stored: object) -> dict | None:
    """A journaled plan's baseline, or None for a plan written before baselines (or a damaged one):
    the pass is still finished, it only goes without its report."""
    if not isinstance(stored, dict):
        return None
    counts = [stored.get("checked"), stored.get("held")]
    sample = stored.get("sample")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        return None
    if not isinstance(sample, list) or not all(isinstance(h, str) for h in sample):
        return None
    return {"checked": counts[0], "held": counts[1], "sample": sample}


def pass_report(editor: Editor, plan: RepairPlan, path: list[EditRecord] | None) -> PassReport | None:
    """What a finished pass bought (repair_yield.py), whether this call planned it or resumed it."""
    if plan.baseline is None:
        return None  # a plan journaled before baselines were
    chain = editor.journal.chain()
    repaired = len(chain) - (chain.index(plan.at) + 1 if plan.at else 0)  # a pass's only edits are its repairs
    sampled = lost_again = 0
    if repaired:
        editor.stage("repair yield")
        # The held facts were not repaired, so their latest edits are those the plan scored.
        again = standings(editor.lm, path or editor.journal.lineage(), only=set(plan.baseline["sample"]))
        sampled, lost_again = len(again), sum(not s.holds for s in again)
    return PassReport(editor.head, plan.baseline["checked"], repaired, plan.baseline["held"], sampled, lost_again)


def pending_plan(journal: Journal) -> RepairPlan | None:
    """The journaled plan of a pass that was cut short, if the head is still inside it."""
    plan = RepairPlan.load(journal)
    if plan is None:
        return None
    chain = journal.chain()
    at = plan.at
    if (at == 0 or at in chain) and len(chain) - (chain.index(at) + 1 if at else 0) <= plan.done:
        return plan
    # Rolled back past it, or edited elsewhere since: the pass no longer describes this path.
    journal.set_many({REPAIR_PLAN: None})
    return None


def end_pass(journal: Journal) -> None:
    marks = journal.get(REPAIR_MARKS) or []
    journal.set_many({REPAIR_MARKS: marks + [journal.head], REPAIR_PLAN: None})


def edits_since_pass(journal: Journal) -> int:
    """First edits of a fact on the head's path since the last repair pass ended on it."""
    marks = set(journal.get(REPAIR_MARKS) or [])
    seen, since = set(), 0
    for seq, fact_hash in journal.lineage_facts():
        if fact_hash not in seen:
            seen.add(fact_hash)
            since += 1
        if seq in marks:
            since = 0
    return since


def rejected_on_path(journal: Journal) -> dict[str, int]:
    """Per fact hash, the edits of it a guard refused on states of the head's path."""
    on_path = {0, *journal.chain()}
    rejected: dict[str, int] = {}
    for rejection in journal.rejections():
        if rejection["parent"] in on_path:
            rejected[rejection["fact_hash"]] = rejected.get(rejection["fact_hash"], 0) + 1
    return rejected


def run_pass(
    editor: Editor,
    window: list[int],
    max_edits: int = MAX_EDITS_PER_FACT,
    on_edit: Callable[[FactResult], None] | None = None,
    stop: StopRequest | None = None,
    span: int | None = REPAIR_SPAN,
    on_pass: Callable[[PassReport], None] | None = None,
) -> list[FactResult]:
    """One repair pass (or the rest of a journaled one): `Editor.repair`."""
    from .pipeline import apply_one, next_layer

    journal = editor.journal
    plan = pending_plan(journal)
    path = None  # the head's path when this call plans the pass (a resumed one reads it again)
    if plan is None:
        editor.stage("repair scoring")
        path = journal.lineage()
        checked, cursor = in_span(path, journal.get(REPAIR_CURSOR), span)
        scored = standings(editor.lm, path, rejected_on_path(journal), only=checked)
        lost = repairable(scored, max_edits)
        held = [s.fact.hash for s in scored if s.holds]
        baseline = {"checked": len(scored), "held": len(held), "sample": sample_held(held, seed=editor.head)}
        # The cursor moves in the plan's transaction: a resumed pass neither skips nor repeats a slice.
        plan_meta = RepairPlan(editor.head, [PlanEntry(s.fact, why_lost(s)) for s in lost], 0, baseline).to_meta()
        journal.set_many({**plan_meta, REPAIR_CURSOR: cursor})
        plan = RepairPlan.load(journal)
        assert plan is not None
    rows: list[FactResult] = []
    for index in range(plan.done, len(plan.entries)):
        if stop:
            return rows  # the plan stays journaled: the next run finishes it
        entry = plan.entries[index]
        # The plan's progress is written in the same transaction as the repair (or its
        # rejection), so a crash can neither lose a repair nor make one twice.
        plan.done = index + 1
        progress = plan.to_meta()
        editor.stage("repairing", entry.fact.id)
        row = apply_one(editor, entry.fact, next_layer(editor, window), meta=progress)
        if row.status == "failed":
            journal.set_many(progress)  # nothing was written; a retry would fail alike
        if row.status == "applied":
            row.status = "repaired"
        row.reason = f"repair: no longer held ({entry.was})" + (f"; {row.reason}" if row.reason else "")
        rows.append(row)
        if on_edit:
            on_edit(row)
    report = pass_report(editor, plan, path)
    end_pass(journal)
    if report is not None:
        editor.log(report.line())
        if on_pass:
            on_pass(report)
    else:  # said, not skipped silently
        editor.log(f"repair pass at edit {editor.head}: finished; its plan holds no baseline, so no report")
    return rows
