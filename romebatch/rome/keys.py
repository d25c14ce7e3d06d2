"""The key k*: context prefixes and the subject's last token (ROME §3.1, eq. 3).

k* is the mean, over N prompts (the bare prompt and each sampled prefix + ". " + prompt),
of the down-projection's input at the subject's last token. Averaging over contexts makes
the key describe the subject rather than one phrasing of it.
"""

from __future__ import annotations

import torch

from ..hooks import Hook, attach
from ..lm import as_btd, decode, encode, head_inputs, logits, make_batch, model_inputs, subject_last_index
from ..model import LoadedModel

PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You")  # as the original code


def sample_prefixes(lm: LoadedModel, spec=((5, 10), (10, 10)), top_k: int = 5, seed: int = 0) -> list[str]:
    """Short texts sampled from the model itself, each ending in ". " (stored in the journal).

    Sampling uses its own seeded generator, so the same model and seed give the same
    prefixes whatever else used the global RNG.
    """
    generator = torch.Generator().manual_seed(seed)
    prefixes: list[str] = []
    for max_tokens, count in spec:
        for i in range(count):
            start = PREFIX_SEEDS[i % len(PREFIX_SEEDS)]
            ids = encode(lm.tokenizer, start).ids
            prompt_len = len(ids)
            with torch.inference_mode():
                for _ in range(max_tokens):
                    batch = make_batch([ids], lm.pad_id, device=lm.device)
                    last = torch.tensor([len(ids) - 1])
                    scores = logits(lm, head_inputs(lm, batch, torch.tensor([0]), last))[0]  # (V,)
                    top = scores.topk(top_k)
                    probs = top.values.softmax(-1).cpu()
                    choice = int(torch.multinomial(probs, 1, generator=generator))
                    ids = ids + [int(top.indices[choice])]
            text = start + decode(lm.tokenizer, ids[prompt_len:], skip_special_tokens=True)
            # Braces would be read as template slots; the original code blanks them too.
            text = text.replace("{", " ").replace("}", " ").strip()
            prefixes.append(text + ". ")
    return prefixes


def context_prompts(lm: LoadedModel, template: str, subject: str, prefixes: list[str]):
    """Token ids of the N prompts and the subject's last-token index in each."""
    encoded = [subject_last_index(lm.tokenizer, template, subject, prefix) for prefix in ["", *prefixes]]
    return [e.ids for e, _ in encoded], [index for _, index in encoded]


@torch.inference_mode()
def keys_at(lm: LoadedModel, layer: int, sequences: list[list[int]], indices: list[int]) -> torch.Tensor:
    """The down-projection input of `layer` at token indices[i] of sequences[i]: (N, d_ff)."""
    batch = make_batch(sequences, lm.pad_id, device=lm.device)
    rows = torch.arange(len(sequences), device=lm.device)
    cols = batch.offsets + torch.tensor(indices, device=lm.device)
    captured: list[torch.Tensor] = []
    hook = Hook(
        lm.name("down_proj", layer),
        lambda x: captured.append(as_btd(x, batch)[rows.to(x.device), cols.to(x.device)].float()),
        on="input",
        stop=True,
    )
    with attach(lm.model, [hook]):
        lm.model(**model_inputs(lm, batch), use_cache=False)
    return captured[0]


def compute_keys(
    lm: LoadedModel, layer: int, template: str, subject: str, prefixes: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(k*, the edit prompt's own key), each (d_ff,) float32: the mean key at the subject's last
    token over the bare and prefixed prompts, and the key there in the bare prompt alone."""
    sequences, indices = context_prompts(lm, template, subject, prefixes)
    keys = keys_at(lm, layer, sequences, indices)
    return keys.mean(dim=0), keys[0]


def compute_key(lm: LoadedModel, layer: int, template: str, subject: str, prefixes: list[str]) -> torch.Tensor:
    """k*: mean key at the subject's last token over the bare and prefixed prompts, (d_ff,) float32."""
    return compute_keys(lm, layer, template, subject, prefixes)[0]
