"""Fluency: the paper's generation entropy (GE) of sampled text, and its greedy, deterministic cousin.

Also `text_nll`, the teacher-forced NLL of plain text that the editor's collapse guard reads.
"""

from __future__ import annotations

import math
from statistics import fmean

import torch

from .lm import continue_prompt, decode, encode, generate_ids, make_batch
from .model import LoadedModel
from .scores import nll_at


@torch.inference_mode()
def text_nll(lm: LoadedModel, texts: list[str]) -> float:
    """Mean NLL per token of `texts` (every token after the first, teacher-forced), one batch."""
    encoded = [encode(lm.tokenizer, t).ids for t in texts]
    encoded = [ids for ids in encoded if len(ids) > 1]
    if not encoded:
        return 0.0
    batch = make_batch(encoded, lm.pad_id, device=lm.device)
    rows, cols, targets = [], [], []
    for row, ids in enumerate(encoded):
        for j in range(len(ids) - 1):  # logits at column j predict token j + 1
            rows.append(row)
            cols.append(batch.column(row, j))
            targets.append(ids[j + 1])
    return float(nll_at(lm, batch, rows, cols, targets).mean())


_WORD = __import__("re").compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """The paper's generation entropy of one text: mean of weighted n-gram entropies, in bits.

    A model that repeats itself has few distinct n-grams and a low value (ROME's
    `compute_n_gram_entropy`, with a regex word split in place of nltk's tokenizer).
    """
    from collections import Counter

    words = _WORD.findall(text)
    parts = []
    for n, weight in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        if not total:
            parts.append(0.0)
            continue
        entropy = -sum(c / total * math.log2(c / total) for c in grams.values())
        parts.append(weight * entropy)
    return fmean(parts)


@torch.inference_mode()
def generate(
    lm: LoadedModel, prompts: list[str], max_new_tokens: int = 100, top_k: int = 5, seed: int = 0
) -> list[str]:
    """Seeded top-k samples (the paper's fluency protocol), one per prompt, prompt excluded."""
    texts = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for prompt in prompts:
            texts.append(continue_prompt(lm, prompt, do_sample=True, top_k=top_k, max_new_tokens=max_new_tokens))
    return texts


def fluency(lm: LoadedModel, prompts: list[str], max_new_tokens: int = 100, seed: int = 0) -> float:
    """GE: 100 × mean n-gram entropy of generations (the paper reports 621.9 for edited GPT-2 XL)."""
    return 100.0 * fmean(ngram_entropy(text) for text in generate(lm, prompts, max_new_tokens, seed=seed))


@torch.inference_mode()
def generate_batch(
    lm: LoadedModel,
    prompts: list[str],
    max_new_tokens: int = 100,
    top_k: int = 5,
    seed: int | None = 0,
) -> list[str]:
    """One continuation per prompt from one left-padded batch: seeded top-k samples, or greedy
    with `seed=None`. Many prompts cost about one prompt's steps, not one each."""
    encoded = [encode(lm.tokenizer, p).ids for p in prompts]
    batch = make_batch(encoded, lm.pad_id, side="left", device=lm.device)
    sampling = {"do_sample": True, "top_k": top_k} if seed is not None else {"do_sample": False}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed or 0)
        out = generate_ids(
            lm,
            batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=lm.pad_id,
            **sampling,
        )
    width = batch.input_ids.shape[1]
    return [decode(lm.tokenizer, row[width:], skip_special_tokens=True) for row in out]


def fluency_seeds(lm: LoadedModel, prompts: list[str], seeds, max_new_tokens: int = 100) -> list[float]:
    """GE of every prompt under each seed (one batch a seed): a reading with its own spread."""
    return [
        100.0 * fmean(ngram_entropy(text) for text in generate_batch(lm, prompts, max_new_tokens, seed=seed))
        for seed in seeds
    ]


COLLAPSE_PROMPTS = ("The", "In the summer of", "My favourite")


@torch.inference_mode()
def greedy_entropy(lm: LoadedModel, prompts=COLLAPSE_PROMPTS, max_new_tokens: int = 32) -> float:
    """Mean n-gram entropy of greedy continuations: a deterministic fluency probe.

    Greedy, so it is a function of the weights alone; a disabling edit makes the model
    repeat one token or phrase, which drives this towards 0. Too slow for the per-edit
    collapse guard (2.5 s on Gemma-3-270M: the editor reads `text_nll` instead); the tests
    use it to confirm, independently of that guard, that an edit really collapsed a model.
    """
    encoded = [encode(lm.tokenizer, p).ids for p in prompts]
    batch = make_batch(encoded, lm.pad_id, side="left", device=lm.device)
    out = generate_ids(
        lm,
        batch.input_ids,
        attention_mask=batch.attention_mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        pad_token_id=lm.pad_id,
    )
    width = batch.input_ids.shape[1]
    texts = [decode(lm.tokenizer, row[width:], skip_special_tokens=True) for row in out]
    return fmean(ngram_entropy(text) for text in texts)
