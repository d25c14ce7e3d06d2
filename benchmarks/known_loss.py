"""Where the known facts are lost: the summed edits of a journal, taken apart.

    python benchmarks/known_loss.py JOURNAL [--upto N] [--ranks 1,4,16,64] [--by-overlap]
    python benchmarks/known_loss.py JOURNAL --skip-positions --skip-ranks --subject-alphas 0.1,2
    python benchmarks/known_loss.py JOURNAL --skip-positions --skip-ranks --split-repairs
    python benchmarks/known_loss.py JOURNAL --skip-positions --skip-ranks --by-overlap --token-gammas 0,0.001

The known facts (benchmarks/sequential.py's `known`: ROME's known_1000 whose subjects no run
edits) lose accuracy as sequential edits accumulate, while NS and GE hardly move. This reads a
journal's edits (nothing is recomputed), sums them into ΔW at the edited layer, and reads the
known facts' token accuracy with ΔW acting on the base model in several ways:

- at every token, which reproduces the run's own reading;
- at some positions only: the subject's tokens, the prompt's other tokens, the teacher-forced
  answer tokens (a position's MLP output is its key times W, so this says whose keys carry the
  loss);
- with ΔW's top-r singular directions removed, and with only them kept (is the loss a few
  coherent directions, or the sum of many independent leaks?);
- with ΔW blind to the mean of the edited keys (ΔW (I − m mᵀ/mᵀm), m the mean k*): the part
  that every edit writes in common, along the direction every subject key shares;
- with --subject-alphas, a counterfactual: every edit keeps its write at its own key, through
  u = C'⁻¹k* with C' = C + α (tr C / tr S) S, S the second moment of the keys at the subject
  tokens of CounterFact records --subject-records (names in their prompts, none of them a
  known fact's subject). v* is not re-optimised, so this estimates what weighting names in
  C would save; the edited facts' ES/PS/NS are read with it to see what it costs;
- with --token-gammas, the same kind of counterfactual with u kept off (a penalty γ tr C on
  their span) the keys of the edited subject's last token after other names' first tokens:
  what protecting the other subjects that end in the same token would save;
- with --split-repairs, ΔW split into the path's first edit of each fact and its repairs
  (later edits of a fact already on the path): the known facts with each part alone, and the
  edited facts' ES / PS / NS with the first edits alone (what the repairs buy, at what cost);
- with --by-overlap, each reading's loss split by what a known subject shares with the
  edited subjects: its last token, another token that is an edited subject's last, any
  other token, or nothing.

ΔW is added by a forward hook on the edited layer's down-projection, so the weights are never
touched and each reading is on the same base model.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from statistics import fmean

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from leak import DATA, summed_edits, token_keys  # noqa: E402
from sequential import unedited_known_facts  # noqa: E402

from romebatch.causal_trace import subject_span  # noqa: E402
from romebatch.hparams import HParams  # noqa: E402
from romebatch.journal import Journal  # noqa: E402
from romebatch.manifest import fact_from_dict  # noqa: E402
from romebatch.model import load_model  # noqa: E402
from romebatch.rome.keys import keys_at  # noqa: E402
from romebatch.rome.stats import load_or_compute_stats  # noqa: E402
from romebatch.scores import score_facts, summarize  # noqa: E402
from romebatch.zsre_scores import token_accuracy  # noqa: E402

# A mask maker: (number of prompt tokens, subject's [first, last], number of answer tokens fed) -> 0/1 per position.
Mask = Callable[[int, tuple[int, int], int], list[int]]

MASKS: dict[str, Mask] = {
    "every token": lambda n, s, a: [1] * (n + a),
    "subject tokens": lambda n, s, a: [int(s[0] <= i <= s[1]) for i in range(n)] + [0] * a,
    "subject's last token": lambda n, s, a: [int(i == s[1]) for i in range(n)] + [0] * a,
    "prompt tokens after the subject": lambda n, s, a: [int(i > s[1]) for i in range(n)] + [0] * a,
    "prompt tokens before the subject": lambda n, s, a: [int(0 < i < s[0]) for i in range(n)] + [0] * a,
    "answer tokens fed back": lambda n, s, a: [0] * n + [1] * a,
}


def copy_journal(path: Path) -> Path:
    """A consistent copy of a journal another process may be writing (SQLite's online backup)."""
    out = Path(tempfile.mkdtemp(prefix="known-loss-")) / path.name
    out.mkdir()
    for db in path.glob("*.sqlite*"):
        if db.suffix == ".sqlite":
            with sqlite3.connect(db) as src, sqlite3.connect(out / db.name) as dst:
                src.backup(dst)
    for other in path.iterdir():
        if other.is_file() and ".sqlite" not in other.name and other.name != "lock":  # the writer's lock stays its own
            (out / other.name).write_bytes(other.read_bytes())
    return out


def summed_update(journal: Journal, upto: int | None) -> tuple[int, torch.Tensor, torch.Tensor, int]:
    """(layer, ΔW (d_model, d_ff), mean k* of the edits, number of edits) over the journal's path."""
    path = journal.lineage()[:upto]
    layers = {r.layer for r in path}
    if len(layers) != 1:
        sys.exit(f"known_loss.py reads one edited layer; this path edits {sorted(layers)}")
    keys = [torch.from_numpy(r.k_star.copy()).double() for r in path if r.k_star is not None]
    return layers.pop(), summed(path), torch.stack(keys).mean(0), len(path)


def summed(records) -> torch.Tensor:
    """Σ Λ uᵀ of the edits, in float64 (a 0-d zero when there are none: it broadcasts)."""
    total = torch.zeros((), dtype=torch.float64)
    for r in records:
        total = total + torch.outer(torch.from_numpy(r.lam.copy()).double(), torch.from_numpy(r.u.copy()).double())
    return total


@torch.inference_mode()
def accuracy(lm, layer: int, delta: torch.Tensor | None, mask: Mask, known: list[dict]) -> float:
    """Token accuracy of the known facts' attributes with `delta` added where `mask` says."""
    return 100 * fmean(accuracies(lm, layer, delta, mask, known))


@torch.inference_mode()
def accuracies(lm, layer: int, delta: torch.Tensor | None, mask: Mask, known: list[dict]) -> list[float]:
    """Each known fact's token accuracy (zsRE's, as sequential.py reads it), with `delta` added where `mask` says."""
    if delta is None:
        return token_accuracy(lm, [(k["prompt"], k["attribute"]) for k in known])
    d = delta.float().to(lm.device)
    prompt_tokens: list = []  # (number of prompt tokens, subject's [first, last]) of the fact being read

    def hook(_, inputs, output):
        n, span = prompt_tokens
        fed = inputs[0].shape[1] - n  # the teacher-forced answer tokens after the prompt
        where = torch.tensor(mask(n, span, fed), dtype=torch.float, device=output.device)[:, None]
        return output + (inputs[0] @ d.T) * where

    handle = lm.module("down_proj", layer).register_forward_hook(hook)
    scores = []
    try:
        for k in known:
            encoded, span = subject_span(lm, k["prompt"], k["subject"])
            prompt_tokens[:] = [len(encoded.ids), span]
            scores += token_accuracy(lm, [(k["prompt"], k["attribute"])])
    finally:
        handle.remove()
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("journal", type=Path)
    ap.add_argument("--upto", type=int, help="only the first N edits of the path")
    ap.add_argument("--ranks", default="1,4,16,64", help="top-r singular directions removed / kept")
    ap.add_argument("--skip-positions", action="store_true")
    ap.add_argument("--skip-ranks", action="store_true")
    ap.add_argument(
        "--by-overlap",
        action="store_true",
        help="the loss split by whether a known subject shares a token with an edited subject",
    )
    ap.add_argument("--split-repairs", action="store_true", help="ΔW's first edits and its repairs, each alone")
    ap.add_argument("--subject-alphas", default="", help="e.g. 0.5,2: the counterfactual C' (above)")
    ap.add_argument("--subject-records", default="5000:8000")
    ap.add_argument(
        "--token-gammas",
        default="",
        help="e.g. 0,0.01: each u also kept off the keys of its subject's last token after other names' openers",
    )
    args = ap.parse_args()

    journal = Journal(copy_journal(args.journal))
    layer, delta, mean_key, n = summed_update(journal, args.upto)
    lm = load_model()
    known = unedited_known_facts()
    every = MASKS["every token"]
    print(f"{args.journal}: {n} edits at layer {layer}; {len(known)} known facts", flush=True)
    print(f"{'unedited':<48} {accuracy(lm, layer, None, every, known):5.1f}", flush=True)
    print(f"{'ΔW at every token':<48} {accuracy(lm, layer, delta, every, known):5.1f}", flush=True)
    if args.by_overlap:
        by_overlap(lm, layer, delta, known, [fact_from_dict(r.fact) for r in journal.lineage()[: args.upto]])
    if args.split_repairs:
        split_repairs(lm, journal, layer, delta, known, args.upto)
    if not args.skip_positions:
        for name, mask in list(MASKS.items())[1:]:
            print(f"{'ΔW only at ' + name:<48} {accuracy(lm, layer, delta, mask, known):5.1f}", flush=True)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    energy = S.pow(2).cumsum(0) / S.pow(2).sum()
    for r in [] if args.skip_ranks else (int(x) for x in args.ranks.split(",")):
        top = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        share = float(energy[r - 1])
        print(
            f"{f'ΔW without its top {r} directions ({100 * share:.0f}% of ‖ΔW‖²)':<48} "
            f"{accuracy(lm, layer, delta - top, every, known):5.1f}",
            flush=True,
        )
        print(f"{f'ΔW top {r} directions only':<48} {accuracy(lm, layer, top, every, known):5.1f}", flush=True)
    m = mean_key / mean_key.norm()
    blind = delta - torch.outer(delta @ m, m)
    print(f"{'ΔW blind to the mean edited key':<48} {accuracy(lm, layer, blind, every, known):5.1f}", flush=True)
    if args.subject_alphas or args.token_gammas:
        hp = journal.get("hparams")
        options = HParams.from_record(hp, source=f"journal {args.journal}").stats_options()
        mom2 = load_or_compute_stats(lm, [layer], lm.base_hash(), **options)[layer].mom2.double()

        def ridged(c: torch.Tensor) -> torch.Tensor:  # as the edits' own solve regularises C
            return c + hp["ridge"] * c.diagonal().mean() * torch.eye(len(c), dtype=c.dtype)

        path = journal.lineage()[: args.upto]
        facts = [fact_from_dict(r.fact) for r in path]
        weights = {layer: lm.weight(layer).detach().double().cpu()}
        print(
            f"{'as journaled: ES / PS / NS of the edited facts':<48} {score_with(lm, weights, {layer: delta}, facts)}"
        )

        def report(name: str, other: torch.Tensor) -> None:
            print(
                f"{name:<48} {accuracy(lm, layer, other, every, known):5.1f}; ES / PS / NS "
                f"{score_with(lm, weights, {layer: other}, facts)}; ‖ΔW‖ {float(other.norm()):.3f} "
                f"(journaled {float(delta.norm()):.3f})",
                flush=True,
            )
            if args.by_overlap:
                by_overlap(lm, layer, other, known, facts)

        records = json.loads(DATA.read_text())
        if args.subject_alphas:
            subject = subject_moment(lm, layer, records[slice(*map(int, args.subject_records.split(":")))])
        for alpha in (float(a) for a in args.subject_alphas.split(",") if a):
            factor = torch.linalg.cholesky(ridged(mom2 + alpha * (mom2.trace() / subject.trace()) * subject))
            report(
                f"C + {alpha:g} names: known",
                rewritten(path, lambda i, k, factor=factor: torch.cholesky_solve(k[:, None], factor)[:, 0]),
            )
        if args.token_gammas:
            factor = torch.linalg.cholesky(ridged(mom2))
            prefixes: list[list[int]] = [[]] + [[t] for t in name_openers(lm, records[5000:5016])]
            negatives = [token_negatives(lm, layer, r.fact, prefixes) for r in path]
            scale = float(mom2.trace())
            for gamma in (float(g) for g in args.token_gammas.split(",")):

                def penalised(i, k, gamma=gamma):
                    # u = (C + γ tr(C) N Nᵀ / ‖N‖²)⁻¹ k*, by Woodbury: N is a handful of columns.
                    ck = torch.cholesky_solve(k[:, None], factor)[:, 0]
                    n = negatives[i]
                    if n is None or gamma == 0:
                        return ck
                    n = n * math.sqrt(gamma * scale) / n.norm()
                    cn = torch.cholesky_solve(n, factor)
                    inner = torch.eye(n.shape[1], dtype=n.dtype) + n.T @ cn
                    return ck - cn @ torch.linalg.solve(inner, n.T @ ck)

                report(f"C + {gamma:g} own token elsewhere: known", rewritten(path, penalised))


def split_repairs(lm, journal: Journal, layer: int, delta: torch.Tensor, known: list[dict], upto: int | None) -> None:
    """The known facts with the path's first edits alone and with its repairs alone, and the
    edited facts' ES / PS / NS with all of ΔW and with the first edits alone."""
    path = journal.lineage()[:upto]
    seen: set[str] = set()
    firsts = []  # each fact's first edit on the path; the later ones are its repairs
    for r in path:
        if r.fact_hash not in seen:
            seen.add(r.fact_hash)
            firsts.append(r)
    facts = [fact_from_dict(r.fact) for r in firsts]
    first = summed(firsts)
    repairs = delta - first
    n_repairs = len(path) - len(firsts)
    print(
        f"{f'ΔW of the {len(firsts)} first edits alone':<48} {accuracy(lm, layer, first, MASKS['every token'], known):5.1f}"
    )
    print(
        f"{f'ΔW of the {n_repairs} repairs alone':<48} {accuracy(lm, layer, repairs, MASKS['every token'], known):5.1f}"
    )
    print(
        f"{'‖ΔW‖: all / first edits / repairs':<48} {float(delta.norm()):.3f} / {float(first.norm()):.3f} / {float(repairs.norm()):.3f}"
    )
    weights = {layer: lm.weight(layer).detach().double().cpu()}
    print(f"{'ES / PS / NS of the edited facts, all of ΔW':<48} {score_with(lm, weights, {layer: delta}, facts)}")
    print(
        f"{'ES / PS / NS of the edited facts, first edits':<48} {score_with(lm, weights, {layer: first}, facts)}",
        flush=True,
    )


def rewritten(path, u_for) -> torch.Tensor:
    """ΔW with every edit's write at its own key kept, through u = u_for(i, k*) for the path's i-th edit."""
    total = torch.zeros((), dtype=torch.float64)
    for i, r in enumerate(path):
        lam, u = torch.from_numpy(r.lam.copy()).double(), torch.from_numpy(r.u.copy()).double()
        k = torch.from_numpy(r.k_star.copy()).double()
        new_u = u_for(i, k)
        total = total + torch.outer(lam * float(u @ k) / float(new_u @ k), new_u)
    return total


def name_openers(lm, records: list[dict]) -> list[int]:
    """The first token of other subjects: what else a name's last token may follow."""
    return [lm.tokenizer(r["subject"], add_special_tokens=False)["input_ids"][0] for r in records]


@torch.inference_mode()
def token_negatives(lm, layer: int, fact: dict, prefixes: list[list[int]]) -> torch.Tensor | None:
    """Keys of the subject's last token after other openers (d_ff, len(prefixes)); None for a one-token subject."""
    encoded, (first, last) = subject_span(lm, fact["prompt"].replace("{}", fact["subject"]), fact["subject"])
    if last == first:
        return None
    bos = encoded.ids[:1] if encoded.offsets[0] == (0, 0) else []
    sequences = [bos + prefix + encoded.ids[last : last + 1] for prefix in prefixes]
    return keys_at(lm, layer, sequences, [len(s) - 1 for s in sequences]).double().cpu().T


def by_overlap(lm, layer: int, delta: torch.Tensor, known: list[dict], facts) -> None:
    """Known facts grouped by the tokens their subject shares with the edited subjects."""
    every = MASKS["every token"]
    before = accuracies(lm, layer, None, every, known)
    after = accuracies(lm, layer, delta, every, known)

    def subject_ids(prompt: str, subject: str) -> list[int]:
        encoded, (first, last) = subject_span(lm, prompt, subject)
        return encoded.ids[first : last + 1]

    edited = [subject_ids(f.prompt.replace("{}", f.subject), f.subject) for f in facts]
    edited_last = {ids[-1] for ids in edited if ids}
    edited_any = {t for ids in edited for t in ids}
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(known):
        ids = subject_ids(k["prompt"], k["subject"])
        if ids and ids[-1] in edited_last:
            group = "last token = an edited subject's last token"
        elif set(ids) & edited_last:
            group = "another token = an edited subject's last token"
        elif set(ids) & edited_any:
            group = "shares some other token with an edited subject"
        else:
            group = "shares no token with any edited subject"
        groups.setdefault(group, []).append(i)
    for group, rows in groups.items():
        b, a = fmean(before[i] for i in rows), fmean(after[i] for i in rows)
        print(f"{group:<48} n {len(rows):4d}: {100 * b:5.1f} -> {100 * a:5.1f} ({100 * (a - b):+.1f})", flush=True)


@torch.inference_mode()
def subject_moment(lm, layer: int, records: list[dict]) -> torch.Tensor:
    """E[k kᵀ] over the keys at the subject's tokens in each record's prompt and paraphrase."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for record in records:
        for text in (record["prompt"], record["rephrase_prompt"]):
            if record["subject"] not in text:
                continue
            encoded, (first, last) = subject_span(lm, text, record["subject"])
            keys = token_keys(lm, layer, encoded.ids)[first : last + 1]
            total = total + keys.T @ keys
            count += last + 1 - first
    print(f"subject keys: {count} from {len(records)} records", flush=True)
    return total / count


def score_with(lm, weights, total, facts) -> str:
    """ES / PS / NS of `facts` with base + total in the model."""
    with summed_edits(lm, weights, total):
        summary = summarize(score_facts(lm, facts))
    return f"{summary['ES']:5.1f} / {summary['PS']:5.1f} / {summary['NS']:5.1f}"


if __name__ == "__main__":
    main()
