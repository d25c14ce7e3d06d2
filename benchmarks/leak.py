"""Where sequential edits leak: how much each rank-one edit writes into every other token.

    python benchmarks/leak.py benchmarks/runs/seq-none-journal [--every 25] [--upto 100] [--score]
    python benchmarks/leak.py benchmarks/runs/seq-none-journal --upto 100 --score --recompute-u CORPUS

A ROME edit ΔW = Λ uᵀ writes Λ (uᵀk*) at its own key and Λ (uᵀk) at any other key k. For
keys distributed like the statistics C the mean square of that leak is ‖Λ‖² uᵀCu, which
u = C⁻¹k* minimises for a given write; so each edit leaks a fixed fraction of its write,
and N edits' leaks add up. This reads a journal (no edit is recomputed) and prints:

- per edit: the write ‖v* − W k*‖ relative to ‖W k*‖, and the leak per unit of write,
  predicted from C and measured on held-out keys (every token of CounterFact prompts the
  journal did not edit, records 5000-5299: text like the neighbourhood prompts');
- along the path, every --every edits: the drift of the layer, the RMS of ΔW_total k over
  the held-out keys relative to the RMS of W k. This is what NS and fluency feel;
- with --score, the facts so far scored with the summed edits on the base weights (which
  reproduces the sequential run's own checkpoint exactly: each edit's Λ uᵀ is in the
  journal) and the spread of the neighbourhood prompts' log-odds log P(true) − log P(new)
  against the base model's;
- with --joint, the drift of the least-leaking update that makes the same writes at every
  edited fact's key as the summed edits do, ΔW* = D (KᵀC⁻¹K)⁻¹ KᵀC⁻¹ with D = ΔW K: the
  most that re-solving the edits so far jointly (MEMIT's batch solve over the whole history)
  could take off the drift, as a ratio to the sequential sum's;
- with --known, the accuracy on the known facts whose subjects no run edits
  (benchmarks/sequential.py's `known`), with the summed edits on the base weights;
- with --recompute-u CORPUS, the same for a counterfactual: every edit keeps its write
  v* − W k* at its own key, but through u = C⁻¹k* with C from CORPUS. (v* is not
  re-optimised on the states this would have produced, so it is an estimate.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from romebatch.hooks import Hook, attach  # noqa: E402
from romebatch.journal import Journal  # noqa: E402
from romebatch.manifest import fact_from_dict  # noqa: E402
from romebatch.model import load_model  # noqa: E402
from romebatch.rome.stats import load_or_compute_stats  # noqa: E402
from romebatch.scores import answer_nll, score_facts, summarize  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "counterfact-edit-10k.json"


@torch.inference_mode()
def held_out_keys(lm, layer: int, records: list[dict]) -> torch.Tensor:
    """Keys at every token but <bos> of the records' neighbourhood and paraphrase prompts."""
    out = []
    for record in records:
        for text in (record["locality_prompt"], record["rephrase_prompt"]):
            out.append(token_keys(lm, layer, lm.tokenizer(text)["input_ids"])[1:])
    return torch.cat(out)


@torch.inference_mode()
def token_keys(lm, layer: int, ids: list[int]) -> torch.Tensor:
    """The down-projection input of `layer` at every token of one unpadded sequence: (T, d_ff), float64."""
    captured = []
    hook = Hook(lm.name("down_proj", layer), lambda x: captured.append(x[0].double()), on="input", stop=True)
    with attach(lm.model, [hook]):
        lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=False)
    return captured[0].cpu()


def quantiles(values, qs=(0.1, 0.5, 0.9)) -> str:
    return " / ".join(f"{q:.3g}" for q in np.quantile(np.asarray(values, dtype=float), qs))


def neighbour_log_odds(scores) -> np.ndarray:
    """log P(expected) − log P(new object) on every neighbourhood prompt of the scored facts."""
    return np.array([math.log(e) - math.log(n) for s in scores for e, n in s.neighborhood])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("journal", type=Path)
    ap.add_argument("--every", type=int, default=25, help="drift reported every this many edits")
    ap.add_argument("--upto", type=int, help="only the first N edits of the path")
    ap.add_argument("--held-out", default="5000:5300", help="CounterFact record range for held-out keys")
    ap.add_argument(
        "--score",
        action="store_true",
        help="at each report, also score the facts so far with the summed edits on the base weights: "
        "ES/PS/NS and the spread of the neighbourhood prompts' log-odds against the base",
    )
    ap.add_argument(
        "--recompute-u",
        metavar="CORPUS",
        help="what if: each u from C of this corpus (plain text or JSONL, or self:plain / "
        "self:encyclopedic for text sampled from the model) instead, every write kept",
    )
    ap.add_argument("--corpus-tokens", type=int, default=60_000)
    ap.add_argument(
        "--by-position",
        action="store_true",
        help="at the end, the log-odds spread when the summed edit acts only at some positions of each "
        "neighbourhood prompt: its last token, the tokens before it, capitalised words (names)",
    )
    ap.add_argument("--joint", action="store_true", help="also the drift of the joint least-leaking update")
    ap.add_argument("--known", action="store_true", help="also the known facts' accuracy at each report")
    args = ap.parse_args()

    journal = Journal(args.journal)
    path = journal.lineage()[: args.upto]
    if not path:
        sys.exit(f"{args.journal}: no edits on the path")
    hp = journal.get("hparams")
    lm = load_model()
    start, stop = (int(x) for x in args.held_out.split(":"))
    held, weights, stats, other = {}, {}, {}, {}
    for layer in sorted({r.layer for r in path}):
        held[layer] = held_out_keys(lm, layer, json.loads(DATA.read_text())[start:stop])
        weights[layer] = lm.weight(layer).detach().double().cpu()
        if lm.adapter.conv1d:
            weights[layer] = weights[layer].T  # (d_model, d_ff)
        stats[layer] = load_or_compute_stats(
            lm,
            [layer],
            lm.base_hash(),
            n_tokens=hp["stats_tokens"],
            seq_len=hp["stats_seq_len"],
            seed=hp["seed"],
            corpus=hp["stats_corpus"],
            sampling=hp.get("stats_sampling", "plain"),
        )[layer].mom2.double()
        if args.recompute_u:
            sampled = args.recompute_u.startswith("self:")  # self:plain, self:encyclopedic
            other[layer] = (
                load_or_compute_stats(
                    lm,
                    [layer],
                    lm.base_hash(),
                    n_tokens=args.corpus_tokens,
                    seq_len=hp["stats_seq_len"],
                    seed=hp["seed"],
                    corpus=None if sampled else args.recompute_u,
                    sampling=args.recompute_u[5:] if sampled else "plain",
                    log=print,
                )[layer]
                .factor(hp["ridge"])
                .cholesky
            )
    facts = [fact_from_dict(r.fact) for r in path]
    base_log_odds = None
    if args.score:
        base_scores = score_facts(lm, facts)
        base_log_odds = neighbour_log_odds(base_scores)
        pairs = [pair for score in base_scores for pair in score.neighborhood]
        print(
            f"base model on the neighbourhood prompts: median P(expected) {np.median([e for e, _ in pairs]):.4f}, "
            f"both P(expected) and P(new) below 0.01 on {100 * np.mean([max(e, n) < 0.01 for e, n in pairs]):.0f}% of them"
        )

    rel_write, leak_pred, leak_held = [], [], []
    total = {layer: torch.zeros_like(w) for layer, w in weights.items()}
    print(
        f"{args.journal}: {len(path)} edits; held-out keys: {', '.join(f'layer {k}: {len(v)}' for k, v in held.items())}"
        + (f"; u recomputed from C of {args.recompute_u}" if args.recompute_u else "")
    )
    print(
        f"{'edits':>6} {'drift':>7}"
        + ("    ES    PS    NS  Δlog-odds std" if args.score else "")
        + ("  joint/sequential" if args.joint else "")
        + ("  known" if args.known else "")
    )
    keys: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in weights}  # each edited fact's k*
    for i, record in enumerate(path, 1):
        lam = torch.from_numpy(record.lam.copy()).double()
        u = torch.from_numpy(record.u.copy()).double()
        layer, W, H = record.layer, weights[record.layer], held[record.layer]
        if record.k_star is not None:
            k = torch.from_numpy(record.k_star.copy()).double()
            write = float(u @ k)  # the leak per unit of write is |uᵀk| / |uᵀk*|, whatever Λ is
            if args.recompute_u:  # the same write Λ (uᵀk*) at k*, through another u
                lam = lam * write
                u = torch.cholesky_solve(k[:, None], other[layer])[:, 0]
                write = float(u @ k)
                lam = lam / write
            rel_write.append(float(lam.norm() * abs(write) / (W @ k).norm()))
            leak_pred.append(float(torch.sqrt(u @ stats[layer] @ u) / abs(write)))
            leak_held.append(float((H @ u).pow(2).mean().sqrt() / abs(write)))
        elif args.recompute_u:
            sys.exit(f"{args.journal}: edit {record.seq} has no stored key; --recompute-u needs it")
        total[layer] += torch.outer(lam, u)
        if record.k_star is not None:
            keys[layer][record.fact_hash] = torch.from_numpy(record.k_star.copy()).double()  # a repair: the same key
        if i % args.every == 0 or i == len(path):
            drifts = [held_drift(H, total[m], weights[m]) for m, H in held.items()]
            line = f"{i:>6} {' '.join(f'{d:.3f}' for d in drifts):>7}"
            if args.score:
                line += score_with(
                    lm, weights, total, facts[:i], base_log_odds[: sum(len(f.neighborhood) for f in facts[:i])]
                )
            if args.joint:
                ratios = [
                    held_drift(H, joint_update(total[m], keys[m], stats[m], hp["ridge"]), weights[m]) / drift
                    for (m, H), drift in zip(held.items(), drifts)
                    if keys[m]
                ]
                line += f"  {' '.join(f'{r:.3f}' for r in ratios):>16}"
            if args.known:
                line += f"  {known_with(lm, weights, total):5.1f}"
            print(line, flush=True)
    if args.by_position:
        by_position(lm, total, facts)
    if rel_write:
        print(f"write ‖v* − W k*‖ / ‖W k*‖ (10th / 50th / 90th percentile): {quantiles(rel_write)}")
        print(f"leak per unit of write, predicted from C:          {quantiles(leak_pred)}")
        print(f"leak per unit of write, measured on held-out keys: {quantiles(leak_held)}")


def held_drift(held: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> float:
    """RMS of ΔW k over the held-out keys, relative to the RMS of W k."""
    return float((held @ delta.T).pow(2).sum(1).mean().sqrt() / (held @ weight.T).pow(2).sum(1).mean().sqrt())


def joint_update(total: torch.Tensor, keys: dict[str, torch.Tensor], mom2: torch.Tensor, ridge: float):
    """The update of least leak tr(ΔW C ΔWᵀ) with ΔW k = total k at every edited key: the
    edits' writes kept exactly, re-solved together (C regularised as the edits' own u)."""
    K = torch.stack(list(keys.values()), 1)  # (d_ff, n)
    c = mom2 + ridge * mom2.diagonal().mean() * torch.eye(len(mom2), dtype=mom2.dtype)
    cik = torch.linalg.solve(c, K)
    return (total @ K) @ torch.linalg.solve(K.T @ cik, cik.T)


def known_with(lm, weights, total) -> float:
    """The known facts' accuracy (benchmarks/sequential.py) with base + total in the model, then the base put back."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sequential import known_accuracy

    with summed_edits(lm, weights, total):
        return known_accuracy(lm)


@contextmanager
def summed_edits(lm, weights, total):
    """The model with base + total at every edited layer, then the base put back."""
    originals = {m: lm.weight(m).detach().clone() for m in weights}
    try:
        for m, w in weights.items():
            edited = (w + total[m]).float()
            lm.weight(m).data.copy_(edited.T if lm.adapter.conv1d else edited)
        yield
    finally:
        for m, w in originals.items():
            lm.weight(m).data.copy_(w)


@torch.inference_mode()
def by_position(lm, total: dict[int, torch.Tensor], facts) -> None:
    """Which tokens of a neighbourhood prompt carry the drift: ΔW k added at some positions only,
    at every edited layer (`total`: layer → summed ΔW, (d_model, d_ff))."""
    deltas = {layer: delta.float().to(lm.device) for layer, delta in total.items()}

    def log_odds(prompt, answer, new, mask):
        def hook_for(delta):
            def hook(_, inputs, output):
                x = inputs[0]
                if mask is None or x.shape[1] < len(mask):  # the batch of prompt + answer tokens only
                    return output
                m = torch.zeros(x.shape[1], 1, device=x.device)
                m[: len(mask), 0] = torch.tensor(mask, dtype=torch.float, device=x.device)
                return output + (x @ delta.T) * m

            return hook

        handles = [
            lm.module("down_proj", layer).register_forward_hook(hook_for(delta)) for layer, delta in deltas.items()
        ]
        try:
            expected, other = answer_nll(lm, [(prompt, answer), (prompt, new)], batch_size=1)
        finally:
            for handle in handles:
                handle.remove()
        return other - expected

    masks = {
        "every prompt token": lambda n, names: [1] * n,
        "last token": lambda n, names: [0] * (n - 1) + [1],
        "tokens before the last": lambda n, names: [1] * (n - 1) + [0],
        "capitalised words before the last": lambda n, names: names[: n - 1] + [0],
        "other tokens before the last": lambda n, names: [1 - c for c in names[: n - 1]] + [0],
    }
    rows = {name: [] for name in masks}
    base = []
    for fact in facts:
        for n in fact.neighborhood:
            ids = lm.tokenizer(n.prompt)["input_ids"]
            names, capital = [], False
            for i, token in enumerate(ids):
                text = lm.tokenizer.decode([token])
                if i == 0 or text.startswith(" ") or not text[:1].isalnum():  # a new word starts
                    word = text.strip()
                    capital = i > 0 and word[:1].isupper() and word not in ("The", "A", "An", "In")
                names.append(int(capital))
            base.append(log_odds(n.prompt, n.answer, fact.target_new, None))
            for name, mask in masks.items():
                rows[name].append(log_odds(n.prompt, n.answer, fact.target_new, mask(len(ids), names)))
    base = np.array(base)
    for name, values in rows.items():
        values = np.array(values)
        print(
            f"summed edit only at {name:<34} NS {100 * np.mean(values > 0):5.1f} (base {100 * np.mean(base > 0):.1f}), "
            f"log-odds spread {np.std(values - base):.2f}"
        )


def score_with(lm, weights, total, facts, base_log_odds) -> str:
    """Scores of `facts` with base + total written into the model, then the base put back."""
    with summed_edits(lm, weights, total):
        scores = score_facts(lm, facts)
    summary = summarize(scores)
    spread = float(np.std(neighbour_log_odds(scores) - base_log_odds))
    return f" {summary['ES']:5.1f} {summary['PS']:5.1f} {summary['NS']:5.1f} {spread:14.2f}"


if __name__ == "__main__":
    main()
