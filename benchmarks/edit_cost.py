"""What the per-edit checks cost in journal reads at depth N: the old re-read against the cache.

    python benchmarks/edit_cost.py --depths 100,1000,3000

No model: a journal of N synthetic applied edits (Gemma-3-270M's vector sizes, a
CounterFact-sized fact JSON each) is written, then each depth times, per edit,

- old: what `_guard` and the probes did before romebatch/applied_cache.py: read every
  applied row (`applied_summaries`), take the median norm, parse every fact's JSON;
- cached: `AppliedCache.committed` of one new edit plus the guard's median and the probes'
  list (what an edit costs now);
- `Journal.chain()`, which rollback's status marking now reads instead of `path()` (every
  vector), and `path()` itself, for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from romebatch.applied_cache import AppliedCache  # noqa: E402
from romebatch.journal import Journal  # noqa: E402
from romebatch.journal_records import EditRecord  # noqa: E402

D_MODEL, D_FF = 640, 2048
FACT = {
    "id": "x",
    "subject": "Danielle Darrieux",
    "prompt": "The mother tongue of {} is",
    "target_new": "English",
    "target_true": "French",
    "paraphrases": ["Danielle Darrieux spoke the language"] * 2,
    "neighborhood": [{"prompt": "Michel Rocard is a native speaker of", "answer": "French"}] * 10,
}


def record(i: int, parent: int, rng) -> EditRecord:
    fact = {**FACT, "id": f"f{i}"}
    return EditRecord(
        seq=0,
        parent=parent,
        fact_id=f"f{i}",
        fact_hash=f"h{i}",
        fact_json=json.dumps(fact),
        layer=1,
        weight_name="w",
        lam=rng.standard_normal(D_MODEL, "f4"),
        u=rng.standard_normal(D_FF, "f4"),
        update_norm=float(rng.random()),
        denominator=1.0,
        weight_hash_before="b",
        weight_hash_after="a",
        p_new_after=float(rng.random()),
        p_true_after=float(rng.random()),
        k_star=rng.standard_normal(D_FF, "f4"),
    )


def old_reads(journal: Journal) -> None:
    norms = [r["update_norm"] for r in journal.applied_summaries()]
    statistics.median(norms)
    [
        {
            "text": f["prompt"].replace("{}", f["subject"], 1),
            "target_new": f["target_new"],
            "target_true": f.get("target_true"),
            "p_new_after": r["p_new_after"],
        }
        for r in journal.applied_summaries()
        for f in [json.loads(r["fact_json"])]
        if r["p_true_after"] is None or (r["p_new_after"] or 0) > r["p_true_after"]
    ]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="100,1000,3000")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    depths = sorted(int(x) for x in args.depths.split(","))
    rng = np.random.default_rng(0)
    print("| applied edits N | old reads per edit (ms) | cached per edit (ms) | chain() (ms) | path() (ms) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(Path(tmp) / "j", write=True, create=True)
        cache = AppliedCache(journal)
        for depth in depths:
            while len(journal.chain()) < depth:
                journal.commit_edit(record(journal.head + 1, journal.head, rng))
            old = timed(lambda: old_reads(journal), args.repeats)
            cache.norms()  # loaded once, as an editor's first edit does

            def one_edit():
                cache.median_norm()
                cache.earlier()
                row = record(depth, journal.head, rng)  # noqa: B023 (the hook runs within this iteration)
                cache.committed(
                    journal.head,
                    journal.head + 1,
                    {
                        "update_norm": row.update_norm,
                        "fact_json": row.fact_json,
                        "p_new_after": row.p_new_after,
                        "p_true_after": row.p_true_after,
                    },
                )
                cache.head = journal.head  # keep the cache on the journal's head for the next repeat

            cached = timed(one_edit, args.repeats)
            chain = timed(journal.chain, args.repeats)
            path = timed(journal.lineage, max(1, args.repeats // 2))
            print(
                f"| {depth} | {1000 * old:.2f} | {1000 * cached:.3f} | {1000 * chain:.2f} | {1000 * path:.1f} |",
                flush=True,
            )
        journal.close()


if __name__ == "__main__":
    main()
