"""GE (generation entropy) with its sampling noise: several seeds at chosen depths of journals.

    python benchmarks/ge.py benchmarks/runs/seq-default-s5-journal benchmarks/runs/seq-none-journal --at 0,1000

One GE (sequential.py's checkpoint column) is the mean n-gram entropy of 10 sampled
100-token continuations, one seed. On the unedited model, seeds 0-6 gave 592-630 (standard
deviation 2.9%): a single GE cannot tell "within 3% of unedited" from noise. This scores
each state with --seeds seeds and reports the mean and its standard error.

A state is rebuilt from the journal on the base weights (the edits' Λ uᵀ, applied in order,
as `romebatch rollback` does) and checked against the journal's recorded weight hash; the
journal is only read, so a run may be writing to it meanwhile. Depth 0 is the unedited
model. Each (journal, depth, seed) is a line of benchmarks/runs/ge.jsonl: re-running resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sequential import FLUENCY_PROMPTS, read_jsonl  # noqa: E402

from romebatch.editor import Editor  # noqa: E402
from romebatch.fluency import fluency  # noqa: E402
from romebatch.model import load_model  # noqa: E402

OUT = ROOT / "benchmarks" / "runs" / "ge.jsonl"


def state_after(path, facts: int) -> int | None:
    """The seq of the state once `facts` facts were edited, with the repairs that followed.

    sequential.py's checkpoint at k facts scores the state just before the (k+1)-th fact's
    first edit (a repair pass may come between); None if the path has fewer facts.
    """
    seen: set[str] = set()
    state = 0
    for record in path:
        if record.fact_hash not in seen:
            if len(seen) == facts:
                return state
            seen.add(record.fact_hash)
        state = record.seq
    return state if len(seen) == facts else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("journals", type=Path, nargs="+")
    ap.add_argument("--at", default="0", help="comma-separated depths (facts edited); 0 is the unedited model")
    ap.add_argument("--seeds", type=int, default=8)
    args = ap.parse_args()
    depths = [int(x) for x in args.at.split(",")]
    lm = load_model()
    done = {(r["journal"], r["edits"], r["seed"]) for r in read_jsonl(OUT)}
    for directory in args.journals:
        # Read-only (no lock: a run may be writing); replay rebuilds each state from the base
        # weights and checks the journal's recorded hashes.
        with Editor(directory, lm=lm, write=False, verify=False, log=lambda m: None) as editor:
            try:
                path = editor.journal.lineage()
                for depth in depths:
                    name = "unedited" if depth == 0 else directory.name
                    state = state_after(path, depth)
                    if state is None:
                        print(f"{directory.name}: fewer than {depth} facts edited; skipped")
                        continue
                    todo = [s for s in range(args.seeds) if (name, depth, s) not in done]
                    if not todo:
                        continue
                    editor.replay(state)
                    for seed in todo:
                        value = fluency(lm, FLUENCY_PROMPTS, seed=seed)
                        with OUT.open("a") as f:
                            f.write(json.dumps({"journal": name, "edits": depth, "seed": seed, "GE": value}) + "\n")
                        done.add((name, depth, seed))
                        print(f"{name} at {depth}: seed {seed} GE {value:.1f}", flush=True)
            finally:
                editor.replay(0, verify=False)  # the next journal opens on the base weights
    report()


def report() -> None:
    groups: dict[tuple, list[float]] = {}
    for r in read_jsonl(OUT):
        groups.setdefault((r["journal"], r["edits"]), []).append(r["GE"])
    unedited = groups.get(("unedited", 0))
    ref = statistics.fmean(unedited) if unedited else None
    print(f"{'state':<34} {'edits':>6} {'seeds':>5} {'GE mean':>8} {'± s.e.':>7} {'vs unedited':>11}")
    for (name, depth), values in sorted(groups.items()):
        mean = statistics.fmean(values)
        se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
        rel = f"{100 * (mean / ref - 1):+.1f}%" if ref else "-"
        print(f"{name:<34} {depth:>6} {len(values):>5} {mean:>8.1f} {se:>7.1f} {rel:>11}")


if __name__ == "__main__":
    main()
