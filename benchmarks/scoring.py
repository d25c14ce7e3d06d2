"""CounterFact scoring with shared rows (scores.shared_rows) against a row for every pair, in one run.

    OMP_NUM_THREADS=1 python benchmarks/scoring.py [--n 100] [--start 0] [--repeats 3]

Scores the ES / PS / NS pairs of `--n` CounterFact records on the embedded model both ways,
alternating so that both share the machine's state. Prints the rows each way, the median
seconds of each and their ratio, and the largest difference between the two NLLs and
whether any ES / PS / NS comparison came out differently.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from romebatch.manifest import load_manifest  # noqa: E402
from romebatch.model import load_model  # noqa: E402
from romebatch.scores import answer_inputs, answer_nll, fact_pairs, shared_rows  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "counterfact-edit-10k.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    lm = load_model(None)
    facts = load_manifest(DATA, skip_invalid=True).facts[args.start : args.start + args.n]
    pairs, plans = fact_pairs(facts)
    # Each ES / PS / NS comparison as the indices of its two pairs (a fact's true object may be unknown).
    compared = [(a, b) for new, true, para, neigh in plans for a, b in [(new, true), *para, *neigh] if b is not None]
    rows, _ = shared_rows([seq for seq, _, _ in answer_inputs(lm.tokenizer, pairs)])
    print(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}; records {args.start}+{args.n}")
    print(f"pairs {len(pairs)}; rows shared {len(rows)} ({len(rows) / len(pairs):.2f} of a row a pair)")

    seconds: dict[bool, list[float]] = {True: [], False: []}
    nll: dict[bool, list[float]] = {}
    for _ in range(args.repeats):
        for share in (True, False):
            started = time.perf_counter()
            nll[share] = answer_nll(lm, pairs, share=share)
            seconds[share].append(time.perf_counter() - started)
    shared, alone = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(f"a row a pair: median {alone:.2f} s; shared rows: median {shared:.2f} s; ratio {alone / shared:.2f}x")
    gap = max(abs(a - b) for a, b in zip(nll[True], nll[False]))
    flips = sum((nll[True][a] < nll[True][b]) != (nll[False][a] < nll[False][b]) for a, b in compared)
    print(f"largest NLL difference {gap:.2e}; comparisons that differ {flips} of {len(compared)}")


if __name__ == "__main__":
    main()
