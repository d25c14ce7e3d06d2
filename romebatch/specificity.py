"""`romebatch verify`: specificity regression of the journal's head against the base model.

Scores every applied fact on the head state and on the base state (swapped in by
`Editor.at(0)` in the same process): the edit prompt (efficacy), paraphrases and neighbourhood prompts, with
the CounterFact conventions of `scores`. A regression is a neighbourhood score that fell
more than `max_ns_drop` points below the base model's, or edits that no longer hold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .applied_cache import held_when_applied
from .editor import Editor
from .manifest import Fact, fact_from_dict
from .scores import FactScores, edit_holds, score_facts, summarize


@dataclass(frozen=True)
class VerifyThresholds:
    max_ns_drop: float = 5.0  # NS may fall at most this many points (0..100) below the base model's
    # Shares (0..1), like apply's thresholds (probes.Thresholds): one meaning per option name.
    min_retention: float = 0.9  # share of edits that took when applied and must still hold at the head
    min_efficacy: float = 0.0  # share of applied facts whose new object must win at the head

    def __post_init__(self):
        from .probes import check_share

        check_share("--min-retention", self.min_retention)
        check_share("--min-efficacy", self.min_efficacy)
        if not 0.0 <= self.max_ns_drop <= 100.0:
            from .errors import UserError

            raise UserError(f"--max-ns-drop {self.max_ns_drop:g}: give points of NS between 0 and 100")


@dataclass
class VerifyRow:
    fact_id: str
    seq: int
    subject: str
    target_new: str
    p_new_base: float
    p_new_head: float
    p_true_base: float | None
    p_true_head: float | None
    efficacy: float | None
    paraphrase: float | None
    neighborhood_base: float | None
    neighborhood_head: float | None
    held_when_applied: bool | None
    holds_now: bool | None

    @property
    def neighborhood_drop(self) -> float | None:
        if self.neighborhood_base is None or self.neighborhood_head is None:
            return None
        return self.neighborhood_base - self.neighborhood_head


@dataclass
class VerifyReport:
    journal: str
    head: int
    base: dict
    edited: dict
    retention: float | None
    rows: list[VerifyRow]
    problems: list[str] = field(default_factory=list)
    worst: list[VerifyRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict:
        return {
            "journal": self.journal,
            "head": self.head,
            "facts": len(self.rows),
            "base": self.base,
            "edited": self.edited,
            "retention": self.retention,
            "ok": self.ok,
            "problems": self.problems,
            "worst": [r.fact_id for r in self.worst],
        }


def score_head(
    editor: Editor, thresholds: VerifyThresholds = VerifyThresholds(), facts: list[Fact] | None = None, progress=None
) -> VerifyReport:
    """The head against the base model on the applied facts (`facts`: a manifest's probes for them)."""
    path = editor.journal.lineage()
    stored = {r.fact_hash: r for r in path}
    if facts is not None:
        facts = [f for f in facts if f.hash in stored]  # the manifest's probes for applied facts
    else:
        # A repaired fact has several edits on the path (the last one is `stored`): score it once.
        facts = [fact_from_dict(json.loads(r.fact_json)) for r in stored.values()]
    records = [stored[f.hash] for f in facts]
    head_scores = score_facts(editor.lm, facts)
    if progress:
        progress(1, 2)
    with editor.at(0):
        base_scores = score_facts(editor.lm, facts)
    if progress:
        progress(2, 2)

    rows = [_row(f, r, head, base) for f, r, head, base in zip(facts, records, head_scores, base_scores)]
    report = VerifyReport(
        journal=str(editor.journal.directory),
        head=editor.head,
        base=summarize(base_scores),
        edited=summarize(head_scores),
        retention=None,
        rows=rows,
    )
    took = [r for r in rows if r.held_when_applied]
    if took:
        report.retention = 100.0 * sum(bool(r.holds_now) for r in took) / len(took)
    t = thresholds
    ns_base, ns_head = report.base["NS"], report.edited["NS"]
    if ns_base is not None and ns_head is not None and ns_base - ns_head > t.max_ns_drop:
        report.problems.append(
            f"neighbourhood score fell {ns_base - ns_head:.1f} points "
            f"({ns_base:.1f} -> {ns_head:.1f}; max {t.max_ns_drop:g})"
        )
    if report.retention is not None and report.retention < 100.0 * t.min_retention:
        report.problems.append(
            f"only {report.retention:.1f}% of the edits that took still hold (min {100.0 * t.min_retention:g}%)"
        )
    es = report.edited["ES"]
    if es is not None and es < 100.0 * t.min_efficacy:
        report.problems.append(f"efficacy {es:.1f}% is below {100.0 * t.min_efficacy:g}%")
    ranked = sorted(
        (r for r in rows if (r.neighborhood_drop or 0) > 0), key=lambda r: r.neighborhood_drop or 0, reverse=True
    )
    report.worst = ranked[:5]
    return report


def _row(fact: Fact, record, head: FactScores, base: FactScores) -> VerifyRow:
    held = holds = None
    if record.p_new_after is not None:
        held = held_when_applied(record.p_new_after, record.p_true_after)
        holds = edit_holds(head.p_new, head.p_true, record.p_new_after)
    return VerifyRow(
        fact_id=fact.id,
        seq=record.seq,
        subject=fact.subject,
        target_new=fact.target_new,
        p_new_base=base.p_new,
        p_new_head=head.p_new,
        p_true_base=base.p_true,
        p_true_head=head.p_true,
        efficacy=head.efficacy,
        paraphrase=head.paraphrase_success,
        neighborhood_base=base.neighborhood_success,
        neighborhood_head=head.neighborhood_success,
        held_when_applied=held,
        holds_now=holds,
    )
