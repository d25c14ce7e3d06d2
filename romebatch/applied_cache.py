"""What the per-edit checks read about the applied edits, kept in memory instead of re-read.

The norm guard compares each new update with the median norm of the applied edits, and
the regression probes sample the most recent applied edits that took. Both used to re-read
every applied row (`Journal.applied_summaries`, fact JSON included) and re-parse it after
every edit: O(N) per edit, O(N²) over a run. This cache holds the same lists for one head
and, when the editor commits an edit on that head, appends it; any other move of the head
(rollback, roll-forward, another process's writes seen on reopening) makes the next read
reload from the journal. So the lists are always exactly what `applied_summaries` gives.

The applied rows are the edits on the head's path (statuses are re-marked whenever the head
moves), and seqs grow along a path, so appending a commit keeps `applied_summaries`' order.
"""

from __future__ import annotations

import bisect
import json

from .journal import Journal


def held_when_applied(p_new_after: float | None, p_true_after: float | None) -> bool:
    """Whether an edit took when it was made: P(new) over P(true) (no target_true: it counts as held)."""
    return p_true_after is None or (p_new_after or 0) > p_true_after


def earlier_entry(row: dict) -> dict | None:
    """A probe's view of an applied edit, or None if the edit did not take (retention skips those)."""
    if not held_when_applied(row["p_new_after"], row["p_true_after"]):
        return None
    fact = json.loads(row["fact_json"])
    return {
        "text": fact["prompt"].replace("{}", fact["subject"], 1),
        "target_new": fact["target_new"],
        "target_true": fact.get("target_true"),
        "p_new_after": row["p_new_after"],
    }


class AppliedCache:
    def __init__(self, journal: Journal):
        self.journal = journal
        self.head: int | None = None  # the head the lists describe; None: not loaded
        self._norms: list[float] = []  # sorted
        self._earlier: list[dict] = []

    def _sync(self) -> None:
        head = self.journal.head
        if head == self.head:
            return
        rows = self.journal.applied_summaries()
        self._norms = sorted(r["update_norm"] for r in rows)
        self._earlier = [e for e in map(earlier_entry, rows) if e is not None]
        self.head = head

    def committed(self, parent: int, seq: int, row: dict) -> None:
        """Edit `seq` was just committed on `parent` with these summary fields: append it."""
        if self.head != parent:  # not loaded, or stale: the next read reloads
            self.head = None
            return
        bisect.insort(self._norms, row["update_norm"])
        entry = earlier_entry(row)
        if entry is not None:
            self._earlier.append(entry)
        self.head = seq

    def norms(self) -> list[float]:
        """The applied edits' update norms, sorted."""
        self._sync()
        return self._norms

    def median_norm(self) -> float:
        """statistics.median of the norms, from the sorted list (the same arithmetic)."""
        norms = self.norms()
        n = len(norms)
        if n % 2 == 1:
            return norms[n // 2]
        i = n // 2
        return (norms[i - 1] + norms[i]) / 2

    def earlier(self) -> list[dict]:
        """The applied edits that took, oldest first, as `RegressionProbes.check` reads them (do not modify)."""
        self._sync()
        return self._earlier
