"""The value v*: what the edited layer must output at k* (ROME §3.1, eq. 4).

δ is added to the down-projection's output at the subject's last token of every prompt and
optimised with Adam on

    mean over the N prompts of the target's mean token NLL
  + kl_factor · KL(p_δ ‖ p_0) of the next-token distribution after "{subject} is a"
  + v_weight_decay · ‖δ‖ / ‖v_init‖²          (the original code's penalty, kept as published)

with early stopping once the NLL (or, as the original code, the whole loss: `stop_on`)
falls below `loss_stop`, and δ projected into the ball of radius
`clamp_norm_factor · ‖v_init‖` after every step. v* = v_init + δ, where v_init is the
layer's current output for the averaged key k*: so v* − W k* is exactly δ, and the update
uses the same key everywhere (the original code's mixed-key defect cannot arise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hooks import Hook
from ..lm import answer_ids, as_btd, head_inputs, logits, make_batch, subject_last_index
from ..model import LoadedModel

ESSENCE_TEMPLATE = "{} is a"


@dataclass
class ValueResult:
    v_star: torch.Tensor  # (d_model,) float32: the value W must give k* after the edit
    delta: torch.Tensor  # (d_model,) float32: v* − v_init
    steps: int  # Adam steps taken (early stopping makes this < v_steps)
    loss: float  # final total loss
    nll: float  # final mean target NLL over the prompts


def optimise_value(
    lm: LoadedModel,
    layer: int,
    template: str,
    subject: str,
    target: str,
    prefixes: list[str],
    v_init: torch.Tensor,
    *,
    lr: float = 0.5,
    steps: int = 20,
    loss_stop: float = 0.05,
    stop_on: str = "nll",
    kl_factor: float = 0.0625,
    weight_decay: float = 0.5,
    clamp_norm_factor: float = 4.0,
) -> ValueResult:
    tok = lm.tokenizer
    device = lm.device
    target_ids = answer_ids(tok, template.replace("{}", subject, 1), target)
    m = len(target_ids)

    # Rewrite prompts: prefix + prompt + all target tokens but the last (teacher forcing).
    sequences, lookups, score_rows, score_cols, score_targets = [], [], [], [], []
    for prefix in ["", *prefixes]:
        encoded, subject_index = subject_last_index(tok, template, subject, prefix)
        row = len(sequences)
        sequences.append(encoded.ids + target_ids[:-1])
        lookups.append(subject_index)
        for j in range(m):  # logits at column n-1+j predict target token j
            score_rows.append(row)
            score_cols.append(len(encoded.ids) - 1 + j)
            score_targets.append(target_ids[j])
    n_prompts = len(sequences)
    essence, essence_index = subject_last_index(tok, ESSENCE_TEMPLATE, subject)
    sequences.append(essence.ids)
    lookups.append(essence_index)

    batch = make_batch(sequences, lm.pad_id, device=device)
    offsets = batch.offsets.tolist()
    rows = torch.tensor(score_rows + [n_prompts], device=device)  # (P+1,): the essence row last
    cols = torch.tensor(
        [c + offsets[r] for r, c in zip(score_rows, score_cols)] + [offsets[n_prompts] + len(essence.ids) - 1],
        device=device,
    )
    targets = torch.tensor(score_targets, device=device)  # (P,)
    lookup_rows = torch.arange(len(sequences), device=device)
    lookup_cols = batch.offsets + torch.tensor(lookups, device=device)  # (N+1,)

    delta = torch.zeros_like(v_init, requires_grad=True)  # (d_model,)

    def add_delta(output: torch.Tensor) -> torch.Tensor:
        # (B, T, d_model) + δ at each row's subject-last token; out of place for autograd.
        shift = delta.to(output.dtype).expand(len(lookup_rows), -1)
        patched = torch.index_put(as_btd(output, batch), (lookup_rows, lookup_cols), shift, accumulate=True)
        return patched.view(output.shape)

    hook = Hook(lm.name("down_proj", layer), add_delta)
    with torch.no_grad():
        base_logp = logits(lm, head_inputs(lm, batch, rows[-1:], cols[-1:])).log_softmax(-1)  # (1, V)

    optimiser = torch.optim.Adam([delta], lr=lr)
    max_norm = clamp_norm_factor * v_init.norm()
    init_norm_sq = v_init.norm() ** 2
    step = 0
    loss_value = nll_value = float("nan")
    for step in range(1, steps + 1):
        optimiser.zero_grad()
        logp = logits(lm, head_inputs(lm, batch, rows, cols, [hook])).log_softmax(-1)  # (P+1, V)
        token_nll = -logp[:-1].gather(1, targets[:, None])[:, 0]  # (P,)
        nll = token_nll.view(n_prompts, m).mean()  # mean token NLL per prompt, then over prompts
        essence_logp = logp[-1:]
        kl = (essence_logp.exp() * (essence_logp - base_logp)).sum()
        penalty = weight_decay * delta.norm() / init_norm_sq
        loss = nll + kl_factor * kl + penalty
        loss_value, nll_value = loss.item(), nll.item()
        if (nll_value if stop_on == "nll" else loss_value) < loss_stop:
            step -= 1  # this step measured the loss only; δ was not changed by it
            break
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            norm = delta.norm()
            if norm > max_norm:
                delta.mul_(max_norm / norm)
    delta = delta.detach().float()
    return ValueResult(v_star=v_init.float() + delta, delta=delta, steps=step, loss=loss_value, nll=nll_value)
