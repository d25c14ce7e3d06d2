"""How much of each write reaches the edit prompt itself, with and without `write_prompt_key`.

    python benchmarks/prompt_key.py --n 1000 --skip 3000 --sample 40 --low-max 40
    python benchmarks/prompt_key.py --journal benchmarks/runs/seq-default-s18-journal  # a run's own edits

An edit ΔW = Λ uᵀ writes Λ (uᵀk) at a key k. k* is the mean key over the bare prompt and
its context prefixes, so the prompt itself receives the share ρ = uᵀk_p / uᵀk* of the write
v* − W k*. A screen reads ρ of plain ROME's u = C⁻¹k* for --n facts (records --skip onward:
not the sequential runs' first 3,000; keys only, no edit). Then, for every fact with ρ below
0.5 (at most --low-max) and an evenly spaced --sample of the others, each edit alone on the
base weights with the default settings: v* is found once, u is solved both ways (the
default's norm penalty included) and each edit applied alone and scored:

- ρ, and the facts whose ρ is below 0.5 without levelling;
- ES / PS / NS, over all facts and over those low-ρ facts;
- the damage to typical keys, ‖ΔW‖²_C, as a median ratio levelled / published (how much
  more each edit leaks for reaching its prompt), and the growth of ‖W‖²_F each way.

With --journal, nothing is edited: the share ρ each edit of the journal gave its own prompt
(its stored u and k*, the prompt's key read from the base model: the edited layer's input
does not depend on its own weights), for the edits that took when made and those that did not.
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
from romebatch.rome.keys import compute_keys  # noqa: E402
from romebatch.rome.preserve import Preserver  # noqa: E402
from romebatch.rome.update import current_value, growth_pull, rank_one_update  # noqa: E402
from romebatch.rome.values import optimise_value  # noqa: E402
from romebatch.scores import score_facts, summarize  # noqa: E402

LOW = 0.5  # ρ below this: the prompt gets less than half the write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="facts screened for ρ")
    ap.add_argument("--skip", type=int, default=3000, help="first CounterFact record read")
    ap.add_argument("--sample", type=int, default=40, help="facts with ρ ≥ 0.5 edited and scored")
    ap.add_argument("--low-max", type=int, default=40, help="at most this many facts with ρ < 0.5 edited")
    ap.add_argument("--out", type=Path, help="one JSON line per fact (appended)")
    ap.add_argument("--journal", type=Path, help="only read ρ of this journal's edits")
    args = ap.parse_args()
    if args.journal:
        return journal_shares(args.journal)
    s = setup(args.skip, args.n)
    lm, hp, layer, facts, prefixes, chol, c = s.lm, s.hp, s.layer, s.facts, s.prefixes, s.chol, s.c
    weight = lm.weight(layer)
    d_ff = weight.shape[1]
    preserver = Preserver("none", chol, d_ff, norm_penalty=hp.norm_penalty)
    w = weight.detach().double()
    saved = weight.detach().clone()
    screened = []
    for fact in facts:
        k, k_prompt = compute_keys(lm, layer, fact.prompt, fact.subject, prefixes)
        u = torch.cholesky_solve(k.double()[:, None], chol)[:, 0]
        screened.append(float(u @ k_prompt.double() / (u @ k.double())))
    low = [i for i, rho in enumerate(screened) if rho < LOW][: args.low_max]
    others = [i for i, rho in enumerate(screened) if rho >= LOW]
    chosen = sorted(low + [others[j * len(others) // args.sample] for j in range(min(args.sample, len(others)))])
    print(
        f"screen: {len(facts)} facts from record {args.skip}; ρ of C⁻¹k* 10th / 50th / 90th percentile "
        f"{percentiles(screened)}; {sum(rho < LOW for rho in screened)} below {LOW}; editing {len(chosen)}",
        flush=True,
    )
    rows = []
    for i, fact in enumerate(facts[j] for j in chosen):
        k, k_prompt = compute_keys(lm, layer, fact.prompt, fact.subject, prefixes)
        v_init = current_value(lm, layer, k)
        value = optimise_value(
            lm, layer, fact.prompt, fact.subject, fact.target_new, prefixes, v_init, **hp.value_options(),
            true_target=fact.target_true if hp.v_stop_beats_true else None,
        )  # fmt: skip
        pull = growth_pull(weight, False, value.v_star - v_init)
        row = {"id": fact.id, "steps": value.steps}
        for name, key in (("published", None), ("levelled", k_prompt)):
            u = preserver.u(k, pull, key)
            edit = rank_one_update(layer, k, value.v_star, v_init, chol, u)
            delta = torch.outer(edit.lam.double(), edit.u.double())
            row[f"rho_{name}"] = float(edit.u.double() @ k_prompt.double() / (edit.u.double() @ k.double()))
            row[f"damage_{name}"] = float(torch.einsum("ij,jk,ik->", delta, c, delta))
            row[f"growth_{name}"] = float(((w + delta) ** 2).sum() - (w**2).sum())  # of ‖W‖²_F
            apply_edit(lm, edit)
            try:
                score = score_facts(lm, [fact])[0]
            finally:
                with torch.no_grad():
                    weight.copy_(saved)  # single edits: the base bytes come back
            row[name] = summarize([score])
        rows.append(row)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        print(
            f"{i + 1:>4}/{len(chosen)} steps {value.steps:>2} ρ {row['rho_published']:.3f} → {row['rho_levelled']:.3f} "
            f"ES {row['published']['ES']:.0f} → {row['levelled']['ES']:.0f}",
            flush=True,
        )
    report(rows)


def journal_shares(directory: Path) -> None:
    """ρ of every edit on a journal's path, split by whether it took (P(new) > P(true)) when made."""
    from romebatch.journal import Journal
    from romebatch.manifest import fact_from_dict
    from romebatch.model import load_model

    torch.set_num_threads(1)
    lm = load_model()
    prefixes_none: list[str] = []  # the bare prompt alone: its key is the prompt key
    took: dict[bool, list[float]] = {True: [], False: []}
    with Journal(directory) as journal:
        path = journal.lineage()
    for record in path:
        fact = fact_from_dict(record.fact)
        _, k_prompt = compute_keys(lm, record.layer, fact.prompt, fact.subject, prefixes_none)
        u, k = torch.from_numpy(record.u.copy()).double(), torch.from_numpy(record.k_star.copy()).double()
        if record.p_true_after is not None:
            took[record.p_new_after > record.p_true_after].append(float(u @ k_prompt.double() / (u @ k)))
    for label, key in (("took", True), ("did not take", False)):
        values = took[key]
        if values:
            print(
                f"{label}: {len(values)} edits; ρ 10th / 50th / 90th percentile {percentiles(values)}; "
                f"{sum(v < LOW for v in values)} below {LOW}"
            )


def percentiles(values: list[float]) -> str:
    """The 10th / 50th / 90th percentiles as printed in RESULTS.md (the value at index ⌊q·n⌋ of the sorted list)."""
    ordered = sorted(values)
    return " / ".join(f"{ordered[int(q * len(ordered))]:.3f}" for q in (0.1, 0.5, 0.9))


def report(rows: list[dict]) -> None:
    """The table: facts with ρ ≥ 0.5 and below it apart (the edited ones are not a plain sample)."""
    low = [r for r in rows if r["rho_published"] < LOW]
    high = [r for r in rows if r["rho_published"] >= LOW]

    def ratio(group):
        return statistics.median(r["damage_levelled"] / r["damage_published"] for r in group) if group else None

    print(
        "| facts | u | ES | PS | NS | ρ (median) | growth of ‖W‖²_F (median) | ‖ΔW‖²_C levelled / published (median) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, group in ((f"ρ ≥ {LOW}: {len(high)}", high), (f"ρ < {LOW}: {len(low)}", low)):
        for name in ("published", "levelled"):
            if not group:
                continue
            mean = {key: statistics.fmean(r[name][key] for r in group) for key in ("ES", "PS", "NS")}
            rho = statistics.median(r[f"rho_{name}"] for r in group)
            growth = statistics.median(r[f"growth_{name}"] for r in group)
            shown = f"{ratio(group):.3f}" if name == "levelled" else ""
            print(
                f"| {label} | {name} | {mean['ES']:.1f} | {mean['PS']:.1f} | {mean['NS']:.1f} | {rho:.3f} "
                f"| {growth:.4g} | {shown} |"
            )


if __name__ == "__main__":
    main()
