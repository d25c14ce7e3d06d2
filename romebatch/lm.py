"""Tokenising, batching and reading logits only where they are needed.

Shared by ROME, scoring and tracing. Three rules hold everywhere:

- Token indices come from the tokenizer's offset mapping of the *full* text, never from
  tokenising pieces separately (SentencePiece merges across piece boundaries).
- Padding is done here, not by the tokenizer, so every index is shifted by the row's pad
  count on either side and position ids are always explicit.
- Logits are computed only at the positions a loss reads: a hook reads the LM head's input
  and stops the forward pass there, so a 262k-word vocabulary costs nothing elsewhere.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

import torch

from .hooks import Hook, attach
from .model import LoadedModel

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    offsets: list[tuple[int, int]]  # character span of each token; (0, 0) for specials


def encode(tokenizer, text: str) -> Encoded:
    """Token ids of `text` as the model sees it (BOS included when the model uses one)."""
    out = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    return Encoded(list(out["input_ids"]), [tuple(span) for span in out["offset_mapping"]])


def decode(tokenizer: PreTrainedTokenizerBase, ids, skip_special_tokens: bool = False) -> str:
    """The text of one sequence of ids (transformers types `decode` for batches too: str | list[str])."""
    return cast(str, tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))


def generate_ids(lm: LoadedModel, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """`model.generate(input_ids, **kwargs)`: the ids, prompt included, as one (B, T') tensor.

    The causal-LM classes transformers loads all mix in GenerationMixin (PreTrainedModel alone
    does not), and without return_dict_in_generate generate returns the tensor of ids.
    """
    return cast(torch.Tensor, cast("GenerationMixin", lm.model).generate(input_ids, **kwargs))


def continue_prompt(lm: LoadedModel, prompt: str, **generation) -> str:
    """What `model.generate(**generation)` adds to `prompt` alone, special tokens dropped.

    One prompt at a time, not batched: no padding, so nothing depends on how a family
    handles a padded batch.
    """
    ids = torch.tensor([encode(lm.tokenizer, prompt).ids], device=lm.device)  # (1, T)
    out = generate_ids(lm, ids, attention_mask=torch.ones_like(ids), pad_token_id=lm.pad_id, **generation)
    return decode(lm.tokenizer, out[0, ids.shape[1] :], skip_special_tokens=True)


def last_token_in_span(encoded: Encoded, start: int, end: int) -> int:
    """Index of the last token overlapping characters [start, end) of the text.

    Special tokens (BOS) have empty spans and are never chosen; a token that starts inside
    the span and runs past it (e.g. "Needle's" merged) still counts as the span's last.
    """
    best = None
    for index, (tok_start, tok_end) in enumerate(encoded.offsets):
        if tok_end <= tok_start:
            continue  # special token: no characters
        if tok_start < end and tok_end > start:
            best = index
    if best is None:
        raise ValueError(f"no token covers characters {start}..{end}")
    return best


def subject_last_index(tokenizer, template: str, subject: str, prefix: str = "") -> tuple[Encoded, int]:
    """Encode `prefix + template.format(subject)`; return it and the subject's last token index."""
    start = len(prefix) + template.index("{}")
    text = prefix + template.replace("{}", subject, 1)
    encoded = encode(tokenizer, text)
    return encoded, last_token_in_span(encoded, start, start + len(subject))


def answer_ids(tokenizer, prompt_text: str, answer: str) -> list[int]:
    """Token ids of " answer" as they follow `prompt_text` (answers are scored with a leading space)."""
    prompt = encode(tokenizer, prompt_text).ids
    full = encode(tokenizer, prompt_text + " " + answer).ids
    if full[: len(prompt)] == prompt and len(full) > len(prompt):
        return full[len(prompt) :]
    # The join re-tokenised the prompt's end: fall back to the answer on its own.
    ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    return list(ids)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    offsets: torch.Tensor  # (B,) column of each row's token 0 (the pad count on the left)

    def column(self, row: int, index: int) -> int:
        return int(self.offsets[row]) + index


def make_batch(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    side: Literal["left", "right"] = "right",
    device: torch.device | str = "cpu",
) -> Batch:
    """Pad token sequences to one tensor; positions count real tokens only."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    offsets = torch.zeros(len(sequences), dtype=torch.long)
    for row, seq in enumerate(sequences):
        start = width - len(seq) if side == "left" else 0
        ids[row, start : start + len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, start : start + len(seq)] = 1
        offsets[row] = start
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T): 0.. on real tokens
    return Batch(ids.to(device), mask.to(device), positions.to(device), offsets.to(device))


def as_btd(x: torch.Tensor, batch: Batch | tuple[int, int]) -> torch.Tensor:
    """View an activation as (B, T, d): OPT flattens its MLP activations to (B*T, d)."""
    if x.dim() == 2:
        rows, tokens = batch if isinstance(batch, tuple) else batch.input_ids.shape
        return x.view(rows, tokens, -1)
    return x


def _accepts_position_ids(model: torch.nn.Module) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


def model_inputs(lm: LoadedModel, batch: Batch) -> dict:
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if _accepts_position_ids(lm.model):
        inputs["position_ids"] = batch.position_ids
    return inputs


def head_inputs(
    lm: LoadedModel,
    batch: Batch,
    rows: torch.Tensor,
    cols: torch.Tensor,
    hooks: Sequence[Hook] = (),
) -> torch.Tensor:
    """Run the model and return the LM head's input at (rows[i], cols[i]): (P, d_model).

    The forward pass stops at the LM head, whose logits are then computed only for the
    selected positions by `logits`. Extra `hooks` (patches) run in the same pass.
    """
    captured: list[torch.Tensor] = []

    def keep(hidden: torch.Tensor):
        # Under a device map the head's input sits on the last block's device (device_map.py).
        captured.append(hidden[rows.to(hidden.device), cols.to(hidden.device)])  # (P, d_model)

    with attach(lm.model, [*hooks, Hook(lm.lm_head_name, keep, on="input", stop=True)]):
        lm.model(**model_inputs(lm, batch), use_cache=False)
    return captured[0]


def logits(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits for hidden states (P, d_model) -> (P, vocab), as the model computes them."""
    out = lm.model.get_output_embeddings()(hidden)
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        out = torch.tanh(out / cap) * cap
    return out.float()
