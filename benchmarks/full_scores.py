"""ES / PS / NS over every fact a journal had edited by chosen depths, edited and unedited.

    python benchmarks/full_scores.py benchmarks/runs/seq-default-s5-journal --at 600,1000,1100

sequential.py's checkpoints score an evenly spaced sample of 200 facts. CounterFact records
have one neighbourhood prompt each, so a checkpoint's NS rests on 200 prompts and swings by
several points between checkpoints; this scores all of them, on the checkpoint's state
(the repairs that followed it included, as ge.py's `state_after`) and on the base model.
The journal is only read (a run may be writing to it). Each (journal, depth, state) is a
line of benchmarks/runs/full-scores.jsonl: re-running resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ge import state_after  # noqa: E402
from sequential import read_jsonl  # noqa: E402

from romebatch.editor import Editor  # noqa: E402
from romebatch.manifest import fact_from_dict  # noqa: E402
from romebatch.model import load_model  # noqa: E402
from romebatch.scores import score_facts, summarize  # noqa: E402

OUT = ROOT / "benchmarks" / "runs" / "full-scores.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("journal", type=Path)
    ap.add_argument("--at", required=True, help="comma-separated depths (facts edited)")
    args = ap.parse_args()
    done = {(r["journal"], r["depth"], r["state"]) for r in read_jsonl(OUT)}
    lm = load_model()
    with Editor(args.journal, lm=lm, write=False, verify=False, log=lambda m: None) as editor:
        path = editor.journal.lineage()
        first = {}
        for record in path:
            first.setdefault(record.fact_hash, record)  # in the order first edited
        facts = [fact_from_dict(json.loads(r.fact_json)) for r in first.values()]
        states = {}  # depth -> the seq of its state
        for depth in (int(x) for x in args.at.split(",")):
            state = state_after(path, depth)
            if state is None:
                print(f"{args.journal.name}: fewer than {depth} facts edited; skipped")
            else:
                states[depth] = state

        def write(depth: int, name: str, scores) -> None:
            row = {"journal": args.journal.name, "depth": depth, "state": name, **summarize(scores)}
            with OUT.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)

        # The base model's scores of a depth are a prefix of the deepest one's: score once.
        base = [d for d in states if (args.journal.name, d, "unedited") not in done]
        if base:
            with editor.at(0):
                scores = score_facts(lm, facts[: max(base)])
            for depth in base:
                write(depth, "unedited", scores[:depth])
        for depth, state in states.items():
            if (args.journal.name, depth, "edited") not in done:
                editor.replay(state, verify=False)
                write(depth, "edited", score_facts(lm, facts[:depth]))
        editor.replay(0, verify=False)


if __name__ == "__main__":
    main()
