"""Which applied facts no longer hold: what a repair pass edits again.

Every ROME edit leaks a small share of its write into every other key (RESULTS.md, "Where
NS goes"), so over hundreds of sequential edits the earlier ones wear down: with the
Gemma-3-270M default, 94% of 516 applied facts still held at edit 516, and 88 of the first
100 at 500. A smaller write leaks less but also leaves each edit a smaller margin, so a
smaller clamp does not stop this. Checking does: every fact on the head's path is scored on
its own prompt (two short sequences each, ~0.04 s a fact on one CPU thread), and a fact
that no longer holds is edited again on the current weights. The repair
is an ordinary journal entry for the same fact (guards included), so replay, rollback and
export treat it like any other edit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import exp

from .journal_records import EditRecord
from .manifest import Fact, fact_from_dict
from .model import LoadedModel
from .scores import answer_nll, edit_holds

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


def standings(
    lm: LoadedModel, path: list[EditRecord], rejected: dict[str, int] | None = None, batch_size: int = 32
) -> list[Standing]:
    """Score every distinct fact on `path` (oldest first) on its own prompt, on the current weights.

    `rejected` counts, per fact hash, the edits of it a guard refused on states of the path:
    they count as tries, or a repair the guard always refuses would be tried forever.
    """
    latest: dict[str, EditRecord] = {}
    edits: dict[str, int] = dict(rejected or {})
    for record in path:
        latest[record.fact_hash] = record
        edits[record.fact_hash] = edits.get(record.fact_hash, 0) + 1
    facts = [fact_from_dict(json.loads(r.fact_json)) for r in latest.values()]
    pairs, index = [], []
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
    lm: LoadedModel, path: list[EditRecord], rejected: dict[str, int] | None = None, max_edits: int = MAX_EDITS_PER_FACT
) -> list[Standing]:
    """The facts on `path` that no longer hold and may still be edited again, oldest first."""
    return [s for s in standings(lm, path, rejected) if not s.holds and s.edits < max_edits]
