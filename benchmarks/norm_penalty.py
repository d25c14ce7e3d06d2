"""What `norm_penalty` μ trades, one edit at a time from the base model, before a long run.

    python benchmarks/norm_penalty.py --n 20 --mus 0,0.01,0.1,1

v* does not depend on u, so each fact's k* and v* are computed once (the default settings,
base weights) and every μ only re-solves u (romebatch/rome/preserve.py). For each μ, over
the facts: the growth of ‖W‖²_F each edit causes and its damage to typical keys ‖ΔW‖²_C
(both as a median ratio to plain ROME's, μ = 0), then the edit applied alone and scored
(ES / PS / NS and the neighbourhood margin NM, CounterFact's magnitude score). Records
--skip onward, so they are not the ablation's first 500 facts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from single_edits import setup  # noqa: E402

from romebatch.rome import apply_edit  # noqa: E402
from romebatch.rome.keys import compute_key  # noqa: E402
from romebatch.rome.preserve import Preserver  # noqa: E402
from romebatch.rome.update import current_value, growth_pull, rank_one_update  # noqa: E402
from romebatch.rome.values import optimise_value  # noqa: E402
from romebatch.scores import magnitudes, score_facts, summarize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--skip", type=int, default=500, help="first CounterFact record read")
    ap.add_argument("--mus", default="0,0.01,0.1,1")
    args = ap.parse_args()
    s = setup(args.skip, args.n)
    lm, hp, layer, facts, prefixes, chol, c = s.lm, s.hp, s.layer, s.facts, s.prefixes, s.chol, s.c
    weight = lm.weight(layer)
    w = weight.detach().double()
    d_ff = w.shape[1]
    solved = []
    for i, fact in enumerate(facts):
        k = compute_key(lm, layer, fact.prompt, fact.subject, prefixes)
        v_init = current_value(lm, layer, k)
        value = optimise_value(
            lm, layer, fact.prompt, fact.subject, fact.target_new, prefixes, v_init,
            lr=hp.v_lr, steps=hp.v_steps, loss_stop=hp.v_loss_stop, stop_on=hp.v_stop_on,
            kl_factor=hp.kl_factor, weight_decay=hp.v_weight_decay, clamp_norm_factor=hp.clamp_norm_factor,
        )  # fmt: skip
        solved.append((fact, k, v_init, value.v_star))
        print(f"{i + 1}/{len(facts)} v* in {value.steps} steps", flush=True)
    saved = weight.detach().clone()
    plain: dict[str, tuple[float, float]] = {}
    rows = []
    for mu in [float(x) for x in args.mus.split(",")]:
        preserver = Preserver("none", chol, d_ff, norm_penalty=mu) if mu else None
        growth, damage, scores = [], [], []
        for fact, k, v_init, v_star in solved:
            pull = growth_pull(weight, False, v_star - v_init)
            u = preserver.u(k, pull) if preserver else None
            edit = rank_one_update(layer, k, v_star, v_init, chol, u)
            delta = torch.outer(edit.lam.double(), edit.u.double())
            g = float(((w + delta) ** 2).sum() - (w**2).sum())
            dmg = float(torch.einsum("ij,jk,ik->", delta, c, delta))
            if not mu:
                plain[fact.id] = (g, dmg)
            growth.append(g / plain[fact.id][0])
            damage.append(dmg / plain[fact.id][1])
            apply_edit(lm, edit)
            try:
                scores.extend(score_facts(lm, [fact]))
            finally:
                with torch.no_grad():
                    weight.copy_(saved)  # single edits: the base bytes come back
        row = {
            "mu": mu,
            "n": len(solved),
            "growth_ratio": statistics.median(growth),
            "damage_ratio": statistics.median(damage),
            **summarize(scores),
            "NM": magnitudes(scores)["NM"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| μ | growth of ‖W‖²_F / plain | ‖ΔW‖²_C / plain | ES | PS | NS | NM |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['mu']:g} | {r['growth_ratio']:.3f} | {r['damage_ratio']:.3f} | {r['ES']:.1f} | {r['PS']:.1f} "
            f"| {r['NS']:.1f} | {r['NM']:.2f} |"
        )


if __name__ == "__main__":
    main()
