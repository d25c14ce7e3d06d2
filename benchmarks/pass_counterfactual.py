"""One repair pass made again with another u: how many held facts would it knock off?

benchmarks/repair_audit.py found that a repair pass's own repairs knock off facts that
held when the pass began (67 for 89 repairs at 1,500 facts of the default's run). This
replays one pass of a journal from the state before it, with each repair's v* kept (the
value it wrote, `v* = W k* + Λ uᵀk*` on the journaled weights) and its u found another way:

- journaled: the pass as it was made;
- plain: u = C⁻¹k*, the paper's update (no prompt-key levelling, no norm penalty);
- covariance λ: u = (C + λ Σ_p k_p k_pᵀ)⁻¹ k*, every earlier key on the path (and the
  pass's earlier repairs) weighed in (rome/preserve.py, "covariance").

Λ = (v* − W k*) / uᵀk* on the counterfactual weights, so each repair still meets its v*.
Every fact on the path is then scored on its own prompt (as a pass scores it), and the
known facts of ../shared/data/known_1000.json (benchmarks/sequential.py) are read.

    python benchmarks/pass_counterfactual.py benchmarks/runs/seq-default-journal --before 1834 --after 1923
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from known_loss import copy_journal  # noqa: E402
from sequential import known_accuracy  # noqa: E402

from romebatch.editor import Editor  # noqa: E402
from romebatch.repair import rejected_on_path, standings  # noqa: E402
from romebatch.rome.preserve import Preserver  # noqa: E402


def vec(array) -> torch.Tensor:
    return torch.from_numpy(array).double()


def counterfactual(editor: Editor, before: int, after: int, method: str, weight: float) -> None:
    """Leave the model at state `before` plus the pass's repairs, each with the u `method` gives."""
    editor.replay(before, verify=False)
    path = editor.journal.lineage(after)
    repairs = [r for r in path if r.seq > before]
    earlier = [r for r in path if r.seq <= before]
    layer = repairs[0].layer
    w = editor.lm.weight(layer)
    base = w.detach().double().clone()  # (d_model, d_ff) at `before`
    journaled = base.clone()
    ours = base.clone()
    stats = editor.stats(layer)
    preserver = Preserver("covariance", stats.cholesky if stats else None, base.shape[1], weight)
    if method == "covariance":
        preserver.rebuild([vec(r.k_star) for r in earlier])
    for r in repairs:
        k, lam, u = vec(r.k_star), vec(r.lam), vec(r.u)
        v_star = journaled @ k + lam * float(u @ k)
        journaled += torch.outer(lam, u)
        if method == "journaled":
            new_u = u
        elif method == "plain":
            new_u = torch.cholesky_solve(k[:, None], stats.cholesky.double())[:, 0]
        else:
            new_u = preserver.u(k)
            preserver.add(k)
        new_lam = (v_star - ours @ k) / float(new_u @ k)
        ours += torch.outer(new_lam, new_u)
    with torch.no_grad():
        w.copy_(ours.to(w.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("journal", type=Path)
    parser.add_argument("--before", type=int, required=True, help="the state the pass began on")
    parser.add_argument("--after", type=int, required=True, help="the state the pass ended on")
    parser.add_argument("--variants", default="journaled,plain,covariance:1,covariance:10")
    parser.add_argument("--out", type=Path, help="append one JSON row per variant")
    args = parser.parse_args()
    copy = copy_journal(args.journal)
    with Editor(copy, write=False, verify=False, log=lambda *_: None) as editor:
        editor.replay(args.before, verify=False)
        start = {s.fact.hash: s.holds for s in standings(editor.lm, editor.journal.lineage(args.before))}
        known_before = known_accuracy(editor.lm)
        rejected = rejected_on_path(editor.journal)
        for variant in args.variants.split(","):
            method, _, weight = variant.partition(":")
            t = time.perf_counter()
            counterfactual(editor, args.before, args.after, method, float(weight or 0))
            stood = standings(editor.lm, editor.journal.lineage(args.after), rejected)
            lost = {s.fact.hash for s in stood if not s.holds}
            row = {
                "variant": variant,
                "facts": len(stood),
                "held_before": sum(start.values()),
                "lost_after": len(lost),
                "knocked_off": sum(1 for h in lost if start.get(h)),
                "still_lost": sum(1 for h in lost if h in start and not start[h]),
                "ES": 100 * (len(stood) - len(lost)) / len(stood),
                "known": known_accuracy(editor.lm),
                "known_before": known_before,
                "seconds": time.perf_counter() - t,
            }
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
