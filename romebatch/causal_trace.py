"""Causal tracing (Meng et al. 2022, §2): where in the network does a fact live?

1. Run the prompt clean and read every layer's hidden state, MLP output and attention output.
2. Corrupt it: add Gaussian noise (`noise` × the embeddings' standard deviation, seeded,
   `samples` draws) to the subject's token embeddings.
3. Rerun the corrupted input with one state restored to its clean value: a hidden state at
   (layer, token), or the MLP / attention outputs of a window of `window` layers around a
   layer at one token. Indirect effect = P(answer | restored) − P(answer | corrupted).

Every restoration of one kind runs in ONE batched forward pass: each row of the batch is a
(layer, token, noise sample) combination, and the hook at every layer patches exactly the
rows whose window covers that layer. A fact costs a few batched passes, not one per cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from .hooks import Hook, attach
from .lm import answer_ids, as_btd, decode, encode, head_inputs, last_token_in_span, logits, make_batch, model_inputs
from .model import LoadedModel

KINDS = ("hidden", "mlp", "attn")
MODULE_OF_KIND = {"hidden": "layer", "mlp": "mlp", "attn": "attn"}


@dataclass
class TraceResult:
    prompt: str
    subject: str
    answer: str
    tokens: list[str]
    subject_tokens: tuple[int, int]  # [first, last] token indices of the subject
    answer_id: int
    p_clean: float
    p_corrupt: float
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> (tokens, layers) P(answer | restored)

    @property
    def subject_last(self) -> int:
        return self.subject_tokens[1]

    def effect(self, kind: str) -> np.ndarray:
        """Indirect effect (tokens, layers): restored probability minus the corrupted one."""
        return self.scores[kind] - self.p_corrupt

    def to_rows(self) -> list[dict]:
        rows = []
        for kind, grid in self.scores.items():
            for t, token in enumerate(self.tokens):
                for layer in range(grid.shape[1]):
                    rows.append(
                        {
                            "prompt": self.prompt,
                            "subject": self.subject,
                            "answer": self.answer,
                            "kind": kind,
                            "token_index": t,
                            "token": token,
                            "is_subject": self.subject_tokens[0] <= t <= self.subject_tokens[1],
                            "layer": layer,
                            "p_restored": float(grid[t, layer]),
                            "indirect_effect": float(grid[t, layer] - self.p_corrupt),
                            "p_clean": self.p_clean,
                            "p_corrupt": self.p_corrupt,
                        }
                    )
        return rows


def embedding_std(lm: LoadedModel, sample: int = 2000, seed: int = 0) -> float:
    """Std of the token embeddings as the model feeds them in (Gemma scales them by √d)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = cast(torch.Tensor, lm.model.get_input_embeddings().weight).shape[0]
    ids = torch.randint(0, vocab, (1, min(sample, vocab)), generator=generator).to(lm.device)
    embed = lm.model.get_submodule(lm.adapter.embed)
    with torch.inference_mode():
        return float(embed(ids).float().std())


def subject_span(lm: LoadedModel, prompt: str, subject: str):
    """The encoded prompt and the [first, last] token indices of the subject in it."""
    start = prompt.find(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} not in prompt {prompt!r}")
    encoded = encode(lm.tokenizer, prompt)
    first = next(i for i, (a, b) in enumerate(encoded.offsets) if b > a and b > start)
    return encoded, (first, last_token_in_span(encoded, start, start + len(subject)))


class _Setup:
    """Everything one fact's tracing runs share: tokens, subject span, answer token, noise."""

    def __init__(self, lm, prompt, subject, answer, noise, samples, seed):
        self.lm = lm
        encoded, (first, last) = subject_span(lm, prompt, subject)
        self.ids = encoded.ids
        self.subject_tokens = (first, last)
        self.n_tokens = len(self.ids)
        if answer is None:  # the model's own prediction, as the paper traces
            answer_id = int(self.clean_logits().argmax())
            self.answer = lm.tokenizer.decode([answer_id]).strip()
        elif isinstance(answer, int):  # a token id, e.g. from an earlier TraceResult
            answer_id = answer
            self.answer = lm.tokenizer.decode([answer_id]).strip()
        else:
            answer_id = answer_ids(lm.tokenizer, prompt, answer)[0]
            self.answer = answer
        self.answer_id = answer_id
        generator = torch.Generator().manual_seed(seed)
        width = last - first + 1
        d_model = lm.model.get_input_embeddings().weight.shape[1]
        scale = noise * embedding_std(lm, seed=seed)
        self.noise = (torch.randn(samples, width, d_model, generator=generator) * scale).to(lm.device)
        self.samples = samples

    def clean_logits(self) -> torch.Tensor:
        lm = self.lm
        batch = make_batch([self.ids], lm.pad_id, device=lm.device)
        with torch.inference_mode():
            return logits(lm, head_inputs(lm, batch, torch.tensor([0]), torch.tensor([self.n_tokens - 1])))[0]

    def probabilities(self, rows: int, hooks: list[Hook], noised: bool = True) -> torch.Tensor:
        """P(answer) at the last token for `rows` copies of the prompt, subject noised per sample."""
        lm = self.lm
        batch = make_batch([self.ids] * rows, lm.pad_id, device=lm.device)
        first, last = self.subject_tokens
        sample_of_row = torch.arange(rows, device=lm.device) % self.samples

        def corrupt(embedded: torch.Tensor) -> torch.Tensor:
            embedded = embedded.clone()
            embedded[:, first : last + 1] += self.noise[sample_of_row].to(embedded.dtype)
            return embedded

        all_hooks = ([Hook(lm.adapter.embed, corrupt)] if noised else []) + hooks
        row_idx = torch.arange(rows, device=lm.device)
        col_idx = torch.full((rows,), self.n_tokens - 1, device=lm.device)
        with torch.inference_mode():
            hidden = head_inputs(lm, batch, row_idx, col_idx, all_hooks)
            return logits(lm, hidden).softmax(-1)[:, self.answer_id].double().cpu()


def _clean_states(setup: _Setup, kinds) -> dict[str, list[torch.Tensor]]:
    """Every layer's output of each kind on the clean prompt: kind -> [layer] (T, d)."""
    lm = setup.lm
    batch = make_batch([setup.ids], lm.pad_id, device=lm.device)
    states: dict[str, list[torch.Tensor | None]] = {kind: [None] * lm.n_layers for kind in kinds}
    hooks = []
    for kind in kinds:
        for layer in range(lm.n_layers):

            def keep(x, kind=kind, layer=layer):
                states[kind][layer] = as_btd(x, batch)[0].detach().clone()

            hooks.append(Hook(lm.name(MODULE_OF_KIND[kind], layer), keep))
    with torch.inference_mode(), attach(lm.model, hooks):
        lm.model(**model_inputs(lm, batch), use_cache=False)
    return cast("dict[str, list[torch.Tensor]]", states)  # every layer's hook ran: no None is left


def _restore_hooks(setup: _Setup, kind: str, clean: list[torch.Tensor], cells: list[tuple[int, int]], window: int):
    """Hooks that restore, in row r = cell index × samples + sample, the clean state of cells[cell]."""
    lm = setup.lm
    n_layers = lm.n_layers
    hooks = []
    half = window // 2
    for module_layer in range(n_layers):
        rows, cols = [], []
        for index, (layer, token) in enumerate(cells):
            low, high = (
                (layer, layer) if window <= 1 else (max(0, layer - half), min(n_layers - 1, layer - half + window - 1))
            )
            if low <= module_layer <= high:
                for sample in range(setup.samples):
                    rows.append(index * setup.samples + sample)
                    cols.append(token)
        if not rows:
            continue
        rows_t = torch.tensor(rows, device=lm.device)
        cols_t = torch.tensor(cols, device=lm.device)
        state = clean[module_layer]

        def patch(x, rows_t=rows_t, cols_t=cols_t, state=state):
            shaped = as_btd(x, (len(cells) * setup.samples, setup.n_tokens))
            patched = shaped.clone()
            where = (rows_t.to(patched.device), cols_t.to(patched.device))  # a device map may split layers
            patched[where] = state[cols_t.to(state.device)].to(patched.device, patched.dtype)
            return patched.view(x.shape)

        hooks.append(Hook(lm.name(MODULE_OF_KIND[kind], module_layer), patch))
    return hooks


def trace_fact(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    answer: str | None = None,
    *,
    kinds=KINDS,
    noise: float = 3.0,
    samples: int = 10,
    window: int = 10,
    seed: int = 0,
    tokens: list[int] | None = None,
    cell_batch: int = 64,
) -> TraceResult:
    """Trace one fact over every (token, layer) cell (or only the `tokens` given) for each kind."""
    setup = _Setup(lm, prompt, subject, answer, noise, samples, seed)
    p_clean = float(setup.clean_logits().softmax(-1)[setup.answer_id])
    p_corrupt = float(setup.probabilities(samples, []).mean())
    clean = _clean_states(setup, kinds)
    token_list = list(range(setup.n_tokens)) if tokens is None else tokens
    result = TraceResult(
        prompt=prompt,
        subject=subject,
        answer=setup.answer,
        tokens=[decode(lm.tokenizer, [i]) for i in setup.ids],
        subject_tokens=setup.subject_tokens,
        answer_id=setup.answer_id,
        p_clean=p_clean,
        p_corrupt=p_corrupt,
    )
    for kind in kinds:
        grid = np.full((setup.n_tokens, lm.n_layers), np.nan)
        cells = [(layer, token) for token in token_list for layer in range(lm.n_layers)]
        for start in range(0, len(cells), cell_batch):
            chunk = cells[start : start + cell_batch]
            hooks = _restore_hooks(setup, kind, clean[kind], chunk, 1 if kind == "hidden" else window)
            probs = setup.probabilities(len(chunk) * samples, hooks).view(len(chunk), samples).mean(1)
            for (layer, token), p in zip(chunk, probs.tolist()):
                grid[token, layer] = p
        result.scores[kind] = grid
    return result


def restored_probability(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    answer: str | int | None,
    restore: dict[str, list[int]],
    *,
    noise: float = 3.0,
    samples: int = 10,
    seed: int = 0,
) -> float:
    """P(answer) with the subject corrupted and the named modules' outputs restored at `restore[name]` tokens.

    The building block the tests use to check tracing against first principles: restoring
    everything gives the clean probability back, restoring nothing the corrupted one.
    """
    setup = _Setup(lm, prompt, subject, answer, noise, samples, seed)
    batch = make_batch([setup.ids], lm.pad_id, device=lm.device)
    clean: dict[str, torch.Tensor] = {}
    keep_hooks = []
    for name in restore:

        def keep(x, name=name):
            clean[name] = as_btd(x, batch)[0].detach().clone()

        keep_hooks.append(Hook(name, keep))
    with torch.inference_mode(), attach(lm.model, keep_hooks):
        lm.model(**model_inputs(lm, batch), use_cache=False)
    hooks = []
    for name, positions in restore.items():
        cols = torch.tensor(positions, dtype=torch.long, device=lm.device)

        def patch(x, name=name, cols=cols):
            shaped = as_btd(x, (samples, setup.n_tokens)).clone()
            shaped[:, cols] = clean[name][cols].to(shaped.dtype)
            return shaped.view(x.shape)

        hooks.append(Hook(name, patch))
    return float(setup.probabilities(samples, hooks).mean())


def mlp_effect_by_layer(results: list[TraceResult]) -> np.ndarray:
    """Average indirect effect of MLP outputs at the subject's last token, per layer."""
    return np.mean([r.effect("mlp")[r.subject_last] for r in results], axis=0)


def average_trace(
    lm: LoadedModel, facts, *, samples: int = 10, noise: float = 3.0, window: int = 10, seed: int = 0, progress=None
) -> tuple[np.ndarray, int, list[TraceResult]]:
    """MLP indirect effect at each fact's subject-last token, averaged: (effect by layer, best layer, results)."""
    results = []
    for done, (prompt, subject, answer) in enumerate(facts, 1):
        _, (_, subject_last) = subject_span(lm, prompt, subject)
        results.append(
            trace_fact(
                lm,
                prompt,
                subject,
                answer,
                kinds=("mlp",),
                noise=noise,
                samples=samples,
                window=window,
                seed=seed,
                tokens=[subject_last],
            )
        )
        if progress:
            progress(done, len(facts))
    effect = mlp_effect_by_layer(results)
    return effect, int(np.argmax(effect)), results
