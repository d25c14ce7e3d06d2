"""zsRE's metric (as in MEND and EasyEdit): token accuracy of the answer under teacher forcing."""

from __future__ import annotations

from statistics import fmean

import torch

from .lm import answer_ids, encode, head_inputs, logits, make_batch
from .model import LoadedModel


@torch.inference_mode()
def token_accuracy(lm: LoadedModel, pairs: list[tuple[str, str]]) -> list[float]:
    """zsRE's metric: share of answer tokens that are the top-1 prediction under teacher forcing."""
    tok = lm.tokenizer
    result = []
    for prompt, answer in pairs:
        ids = encode(tok, prompt).ids
        target = answer_ids(tok, prompt, answer)
        batch = make_batch([ids + target[:-1]], lm.pad_id, device=lm.device)
        cols = torch.arange(len(ids) - 1, len(ids) - 1 + len(target), device=lm.device)
        hidden = head_inputs(lm, batch, torch.zeros_like(cols), cols)
        predicted = logits(lm, hidden).argmax(-1).tolist()
        result.append(fmean(float(p == t) for p, t in zip(predicted, target)))
    return result
