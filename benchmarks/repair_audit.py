"""Which facts of a sequential run no longer hold, and why a repair pass left them so.

At the state right after each of the last few repair passes of a journal's head path, every
fact on the path is scored on its own prompt (`repair.standings`, as a pass scores them) and
each fact that no longer holds is put in one class:

- capped: it has used its `MAX_EDITS_PER_FACT` edits, so no pass edits it again;
- unchecked: the pass's bounded span (`REPAIR_SPAN`, in rotation) did not reach it;
- missed: the pass checked it and could edit it, yet it does not hold (the repair did not
  take, or the repair's guards refused it).

For the capped facts it also reports how long each of their edits held (path edits between
consecutive edits of the fact): wear over hundreds of edits, or a fact the method cannot keep.

    python benchmarks/repair_audit.py benchmarks/runs/seq-default-journal --passes 3

The journal is copied first (SQLite's online backup), so a run may keep writing it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from known_loss import copy_journal  # noqa: E402

from romebatch.editor import Editor  # noqa: E402
from romebatch.repair import (  # noqa: E402
    MAX_EDITS_PER_FACT,
    REPAIR_CURSOR,
    REPAIR_MARKS,
    REPAIR_PLAN,
    in_span,
    rejected_on_path,
    standings,
)


def audit(editor: Editor, mark: int, cursor_before: str | None, span: int, dump: Path | None = None) -> dict:
    """The classes of the facts that do not hold at state `mark` (the end of a pass)."""
    editor.replay(mark, verify=False)
    path = editor.journal.lineage(mark)
    rejected = rejected_on_path(editor.journal)
    started = time.perf_counter()
    stood = standings(editor.lm, path, rejected)
    seconds = time.perf_counter() - started
    # The pass that ended at `mark` planned on the path as it was before its own repairs.
    first_seq = {}
    for r in path:
        first_seq.setdefault(r.fact_hash, r.seq)
    checked, _ = in_span(path, cursor_before, span)
    gaps: dict[str, list[int]] = {}
    position = {r.seq: i for i, r in enumerate(path)}
    last: dict[str, int] = {}
    for r in path:
        if r.fact_hash in last:
            gaps.setdefault(r.fact_hash, []).append(position[r.seq] - last[r.fact_hash])
        last[r.fact_hash] = position[r.seq]
    lost = [s for s in stood if not s.holds]
    if dump is not None:  # every fact's standing, for benchmarks that predict which are lost
        rows = [
            {
                "mark": mark,
                "fact": s.fact.hash,
                "holds": s.holds,
                "p_new": s.p_new,
                "p_true": s.p_true,
                "edits": s.edits,
            }
            for s in stood
        ]
        with dump.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    capped = [s for s in lost if s.edits >= MAX_EDITS_PER_FACT]
    unchecked = [s for s in lost if s not in capped and checked is not None and s.fact.hash not in checked]
    missed = [s for s in lost if s not in capped and s not in unchecked]
    # The pass's own repairs are the records after the last first edit of a fact on the path.
    firsts = {first_seq[h] for h in first_seq}
    pass_start = max(firsts)
    in_pass = {r.fact_hash for r in path if r.seq > pass_start}
    capped_gaps = [g for s in capped for g in gaps.get(s.fact.hash, [])]
    age = [len(path) - position[first_seq[s.fact.hash]] for s in capped]
    return {
        "mark": mark,
        "facts": len(stood),
        "holds": 100 * (len(stood) - len(lost)) / len(stood),
        "lost": len(lost),
        "capped": len(capped),
        "capped_all": sum(s.edits >= MAX_EDITS_PER_FACT for s in stood),
        "unchecked": len(unchecked),
        "missed": len(missed),
        "pass_repairs": len(in_pass),
        "missed_repaired_in_pass": sum(s.fact.hash in in_pass for s in missed),
        "missed_repaired_before": sum(s.fact.hash not in in_pass and s.edits > 1 for s in missed),
        "capped_gap_median": median(capped_gaps) if capped_gaps else None,
        "capped_age_median": median(age) if age else None,
        "score_seconds": seconds,
    }


def cursors_before(journal, marks: list[int], span: int) -> dict[int, str | None]:
    """The cursor each pass started its rotation from, walked back from the journal's own.

    Only the latest cursor is journaled. Each pass moved it `span` facts on along its ring,
    so walking back from it is exact while no pass in between started afresh (a cursor lost
    with a rebuilt journal, before ea717d1); forward from the first pass it was not."""
    cursors: dict[int, str | None] = {}
    after = journal.get(REPAIR_CURSOR)
    plan = journal.get(REPAIR_PLAN)
    if plan is not None:  # a pass in progress moved the cursor when it planned, before its mark
        ring = list(dict.fromkeys(r.fact_hash for r in journal.lineage(plan["at"])))
        if len(ring) > span and after in ring:
            after = ring[(ring.index(after) - span) % len(ring)]
    for mark in reversed(marks):
        ring = list(dict.fromkeys(r.fact_hash for r in journal.lineage(mark)))
        if len(ring) <= span or after not in ring:
            cursors[mark] = None  # every fact checked, or the walk back is lost
        else:
            cursors[mark] = ring[(ring.index(after) - span) % len(ring)]
        after = cursors[mark]
    return cursors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("journal", type=Path)
    parser.add_argument("--passes", type=int, default=3, help="the last this many repair passes")
    parser.add_argument("--span", type=int, default=1000, help="the run's repair span")
    parser.add_argument("--states", help="comma-separated states to score instead of the pass ends")
    parser.add_argument("--dump", type=Path, help="append every fact's standing at each pass to this JSONL")
    args = parser.parse_args()
    copy = copy_journal(args.journal)
    with Editor(copy, write=False, verify=False, log=lambda *_: None) as editor:
        marks = editor.journal.get(REPAIR_MARKS) or []
        cursors = cursors_before(editor.journal, marks, args.span)
        chosen = [int(s) for s in args.states.split(",")] if args.states else marks[-args.passes :]
        for mark in chosen:
            print(audit(editor, mark, cursors.get(mark), args.span, args.dump), flush=True)


if __name__ == "__main__":
    main()
