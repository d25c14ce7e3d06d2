"""Scoring with the CounterFact conventions (Meng et al. 2022, §4.2).

Every comparison uses length-normalised probabilities: exp(−mean token NLL) of an answer
(with a leading space) after its prompt, so a multi-token object is not penalised for its
length. Scoring is batched under `torch.inference_mode`, and logits are computed only at
the answer positions.

- efficacy ES: P(o*) > P(o_true) on the edit prompt
- paraphrase PS: the same on paraphrased prompts
- neighbourhood NS: P(their expected answer) > P(o*) on other subjects' prompts

Fluency (GE) is in `fluency.py`, zsRE's token accuracy in `zsre_scores.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import fmean, harmonic_mean

import torch

from .lm import answer_ids, encode, head_inputs, logits, make_batch
from .manifest import Fact
from .model import LoadedModel


@torch.inference_mode()
def nll_at(
    lm: LoadedModel, batch, rows: list[int], cols: list[int], targets: list[int], chunk: int = 64
) -> torch.Tensor:
    """−log P(targets[i]) from the logits at (rows[i], cols[i]) of `batch`: (P,) float64 on CPU.

    Only those positions reach the unembedding, `chunk` at a time: with a 262k vocabulary
    a logit row is 1 MB.
    """
    hidden = head_inputs(lm, batch, torch.tensor(rows, device=lm.device), torch.tensor(cols, device=lm.device))
    wanted = torch.tensor(targets, device=lm.device)
    parts = [
        -logits(lm, hidden[s : s + chunk]).log_softmax(-1).gather(1, wanted[s : s + chunk, None])[:, 0]
        for s in range(0, len(targets), chunk)
    ]
    return torch.cat(parts).double().cpu()


def shared_rows(sequences: list[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """The fewest token rows that contain every sequence as a prefix, and each one's row.

    A causal model's logits at a position depend on the tokens up to it only, so a pair whose
    input (prompt + answer[:-1]) is a prefix of another's is read from that one's row. Most
    scored prompts are asked twice (o* and the true object, the expected answer and o*), and
    a one-token answer's input is the bare prompt: this halves the rows a scoring needs.
    In lexicographic order a sequence that is a prefix of any other is a prefix of the next.
    """
    unique = sorted(set(sequences))
    host: dict[tuple[int, ...], int] = {}
    rows: list[tuple[int, ...]] = []
    for index in range(len(unique) - 1, -1, -1):
        seq = unique[index]
        after = unique[index + 1] if index + 1 < len(unique) else None
        if after is not None and after[: len(seq)] == seq:
            host[seq] = host[after]
        else:
            host[seq] = len(rows)
            rows.append(seq)
    return rows, [host[seq] for seq in sequences]


def answer_inputs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[tuple[int, ...], int, list[int]]]:
    """Each pair's model input (prompt + answer[:-1]), its prompt's length, and the answer's ids."""
    prepared = []
    encoded: dict[str, list[int]] = {}
    for prompt, answer in pairs:
        if prompt not in encoded:
            encoded[prompt] = encode(tokenizer, prompt).ids
        ids = encoded[prompt]
        target = answer_ids(tokenizer, prompt, answer)
        prepared.append((tuple(ids + target[:-1]), len(ids), target))
    return prepared


@torch.inference_mode()
def answer_nll(lm: LoadedModel, pairs: list[tuple[str, str]], batch_size: int = 32, share: bool = True) -> list[float]:
    """Mean token NLL of " answer" after each prompt, in the order given.

    `share=False` gives every pair its own row, as before `shared_rows` (benchmarks/scoring.py
    compares the two).
    """
    prepared = answer_inputs(lm.tokenizer, pairs)
    if share:
        sequences, row_of = shared_rows([seq for seq, _, _ in prepared])
    else:
        sequences, row_of = [seq for seq, _, _ in prepared], list(range(len(prepared)))
    readers: list[list[int]] = [[] for _ in sequences]
    for i, row in enumerate(row_of):
        readers[row].append(i)
    # Sort by length so batches pad little; results go back in input order.
    order = sorted(range(len(sequences)), key=lambda r: len(sequences[r]))
    result = [math.nan] * len(prepared)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = make_batch([sequences[r] for r in chunk], lm.pad_id, device=lm.device)
        rows, cols, targets, owner = [], [], [], []
        pair_of: list[int] = []
        for row, r in enumerate(chunk):
            for i in readers[r]:
                _, n_prompt, target = prepared[i]
                for j, token in enumerate(target):
                    rows.append(row)
                    cols.append(batch.column(row, n_prompt - 1 + j))
                    targets.append(token)
                    owner.append(len(pair_of))
                pair_of.append(i)
        nll = nll_at(lm, batch, rows, cols, targets)
        sums = torch.zeros(len(pair_of), dtype=torch.float64).index_add_(0, torch.tensor(owner), nll)
        counts = torch.zeros(len(pair_of), dtype=torch.float64).index_add_(0, torch.tensor(owner), torch.ones_like(nll))
        for k, i in enumerate(pair_of):
            result[i] = float(sums[k] / counts[k])
    return result


@dataclass
class FactScores:
    """Length-normalised probabilities for one fact's prompts."""

    p_new: float
    p_true: float | None
    paraphrase: list[tuple[float, float | None]] = field(default_factory=list)  # (P(new), P(true))
    neighborhood: list[tuple[float, float]] = field(default_factory=list)  # (P(expected), P(new))

    @property
    def efficacy(self) -> float | None:
        return None if self.p_true is None else float(self.p_new > self.p_true)

    @property
    def paraphrase_success(self) -> float | None:
        scored = [new > true for new, true in self.paraphrase if true is not None]
        return fmean(scored) if scored else None

    @property
    def neighborhood_success(self) -> float | None:
        scored = [expected > new for expected, new in self.neighborhood]
        return fmean(scored) if scored else None


# A fact's comparisons as indices into the pairs: (o*, true) on the edit prompt, the same on
# each paraphrase, (expected answer, o*) on each neighbourhood prompt; None: true unknown.
FactPlan = tuple[int, int | None, list[tuple[int, int | None]], list[tuple[int, int]]]


def fact_pairs(facts: list[Fact]) -> tuple[list[tuple[str, str]], list[FactPlan]]:
    """The (prompt, answer) pairs that scoring `facts` reads, and each fact's plan of them."""
    pairs: list[tuple[str, str]] = []

    def ask(prompt: str, answer: str) -> int:
        pairs.append((prompt, answer))
        return len(pairs) - 1

    def ask_if(prompt: str, answer: str | None) -> int | None:  # target_true may be unknown
        return None if answer is None else ask(prompt, answer)

    plan: list[FactPlan] = []
    for fact in facts:
        plan.append(
            (
                ask(fact.text, fact.target_new),
                ask_if(fact.text, fact.target_true),
                [(ask(p, fact.target_new), ask_if(p, fact.target_true)) for p in fact.paraphrases],
                [(ask(n.prompt, n.answer), ask(n.prompt, fact.target_new)) for n in fact.neighborhood],
            )
        )
    return pairs, plan


def score_facts(lm: LoadedModel, facts: list[Fact], batch_size: int = 32) -> list[FactScores]:
    """Score each fact's edit prompt, paraphrases and neighbourhood, all in one batched pass."""
    pairs, plan = fact_pairs(facts)
    nll = answer_nll(lm, pairs, batch_size)

    def p(index: int) -> float:
        return math.exp(-nll[index])

    def p_if(index: int | None) -> float | None:
        return None if index is None else p(index)

    return [
        FactScores(p(new), p_if(true), [(p(a), p_if(b)) for a, b in para], [(p(a), p(b)) for a, b in neigh])
        for new, true, para, neigh in plan
    ]


def edit_holds(p_new: float, p_true: float | None, p_new_after: float | None) -> bool:
    """Whether an applied edit still holds: the one test of retention, verify and repair passes.

    The CounterFact test (ES) where a true object is known; without one, an edit holds while
    it keeps half the probability it had right after it was made (always, if that is unknown).
    """
    if p_true is not None:
        return p_new > p_true
    return p_new_after is None or p_new >= 0.5 * p_new_after


def summarize(scores: list[FactScores]) -> dict[str, float | None]:
    """ES / PS / NS in percent and their harmonic mean S, over the facts that have each probe."""

    def pct(values):
        values = [v for v in values if v is not None]
        return 100.0 * fmean(values) if values else None

    es = pct(s.efficacy for s in scores)
    ps = pct(s.paraphrase_success for s in scores)
    ns = pct(s.neighborhood_success for s in scores)
    parts = [x for x in (es, ps, ns) if x is not None]
    s = harmonic_mean(parts) if parts and all(x > 0 for x in parts) else (0.0 if parts else None)
    return {"ES": es, "PS": ps, "NS": ns, "S": s, "n": len(scores)}


def magnitudes(scores: list[FactScores]) -> dict[str, float | None]:
    """EM / PM / NM: mean probability margins, in percentage points (CounterFact's magnitude scores)."""

    def mean(values):
        values = [v for v in values if v is not None]
        return 100.0 * fmean(values) if values else None

    def per_fact(pairs):  # like ES/PS/NS: average within a fact first, then over facts
        pairs = list(pairs)
        return fmean(pairs) if pairs else None

    em = mean(s.p_new - s.p_true for s in scores if s.p_true is not None)
    pm = mean(per_fact(new - true for new, true in s.paraphrase if true is not None) for s in scores)
    nm = mean(per_fact(expected - new for expected, new in s.neighborhood) for s in scores)
    return {"EM": em, "PM": pm, "NM": nm}
