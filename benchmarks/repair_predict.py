"""Can the journal alone say which facts a repair pass should check first?

A fact's edit wrote w_i = Λ_i (u_iᵀ k_i) at its key k_i. Every later edit j adds Λ_j (u_jᵀ k_i)
there, so the journal gives, with no forward pass, the drift d_i at each fact's own key since
its latest edit. This script ranks the facts on a path by several such readings and asks how
many of the facts that really no longer hold (scored by benchmarks/repair_audit.py --dump)
fall in the top k of each ranking, against the rotation the passes use today.

    python benchmarks/repair_predict.py benchmarks/runs/seq-default-journal /tmp/standings.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from known_loss import copy_journal  # noqa: E402

from romebatch.journal import Journal  # noqa: E402


def readings(path) -> dict[str, dict[str, float]]:
    """Per fact hash on `path`: the drift readings at its key since its latest edit."""
    lam = np.stack([r.lam for r in path]).astype(np.float64)  # (M, d_model)
    u = np.stack([r.u for r in path]).astype(np.float64)  # (M, d_ff)
    latest: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, r in enumerate(path):
        latest[r.fact_hash] = i
        first.setdefault(r.fact_hash, i)
    hashes = list(latest)
    rows = [latest[h] for h in hashes]
    keys = np.stack([path[i].k_star for i in rows]).astype(np.float64)  # (N, d_ff)
    coeff = keys @ u.T  # (N, M): u_jᵀ k_i
    later = np.arange(len(path))[None, :] > np.array(rows)[:, None]
    drift = (coeff * later) @ lam  # (N, d_model)
    own = coeff[np.arange(len(rows)), rows][:, None] * lam[rows]  # w_i
    own_sq = (own**2).sum(1)
    out = {}
    for n, h in enumerate(hashes):
        r = path[rows[n]]
        margin = None
        if r.p_new_after and r.p_true_after:
            margin = float(np.log(r.p_new_after) - np.log(r.p_true_after))
        out[h] = {
            "relative": float(np.sqrt((drift[n] ** 2).sum() / max(own_sq[n], 1e-30))),
            "against": float(-(own[n] @ drift[n]) / max(own_sq[n], 1e-30)),
            "age": float(len(path) - rows[n]),
            "first": float(first[h]),
            "margin": margin if margin is not None else 0.0,
        }
    return out


# Sort keys over one fact's readings: the fact most likely lost first.
RANKINGS = {
    "relative drift": lambda r: -r["relative"],
    "drift against the write": lambda r: -r["against"],
    "drift against / margin": lambda r: -r["against"] / max(r["margin"], 1e-3),
    "age since latest edit": lambda r: -r["age"],
    "oldest first (rotation from the start)": lambda r: r["first"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("journal", type=Path)
    parser.add_argument("standings", type=Path)
    parser.add_argument("--top", default="250,500,1000")
    args = parser.parse_args()
    by_mark: dict[int, dict[str, bool]] = {}
    for line in args.standings.read_text().splitlines():
        row = json.loads(line)
        by_mark.setdefault(row["mark"], {})[row["fact"]] = row["holds"]
    journal = Journal(copy_journal(args.journal), write=False, create=False)
    tops = [int(t) for t in args.top.split(",")]
    for mark, holds in sorted(by_mark.items()):
        read = readings(journal.lineage(mark))
        lost = {h for h, ok in holds.items() if not ok}
        print(f"state {mark}: {len(holds)} facts, {len(lost)} lost")
        for name, rank in RANKINGS.items():
            keys = {h: rank(read[h]) for h in holds}
            order = sorted(holds, key=keys.__getitem__)
            found = [len(lost & set(order[:k])) for k in tops]
            print(f"  {name:42s} " + "  ".join(f"top {k}: {f}/{len(lost)}" for k, f in zip(tops, found)))


if __name__ == "__main__":
    main()
