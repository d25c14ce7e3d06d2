"""What v*'s optimisation reads from the LM head, and its gradient, in one pass over the head.

Each Adam step needs, at a few read positions (tens of rows), the log-probability of one
target token, the most probable token, and at the essence read the KL divergence from the
unedited distribution. All three need the whole vocabulary's normaliser. The plain way
(`reads_from_logits`) forms the (rows, vocab) logits, and autograd then multiplies their
gradient by the output embeddings again: two passes over a matrix that on the embedded
default (262,144 × 640) dwarfs every other matrix of the model. On a CPU with so few rows
those products run far below the machine's speed, so the head costs a third of a step.

`one_pass_reads` computes the same three quantities and their gradient with respect to the
hidden states in one pass over the embeddings, a chunk at a time, each chunk used twice
while it is still in cache: once for its logits, once to accumulate the softmax-weighted
sum of its rows that the gradient needs. The normaliser is not known until the last chunk,
so the sums are kept relative to the running maximum and rescaled when it rises (the
online softmax). The backward pass is then one product with the incoming gradients.

The head is frozen here (only δ is optimised): no gradient reaches its weight or bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Rows of the output embeddings per chunk: small enough that a chunk (1024 × d_model floats)
# is still in cache for its second product, large enough that the loop's overhead is small.
CHUNK = 1024


@dataclass
class Reads:
    """The LM head at the batch's read positions, as the loss and MPES use it."""

    target_logp: torch.Tensor  # (R,) float32: log p(each read's target token)
    argmax: torch.Tensor  # (R,) the most probable token at each read
    kl: torch.Tensor  # () float32: KL(p ‖ p_0) at the last read (the essence prompt)
    essence_logits: torch.Tensor | None = None  # (vocab,) the last read's logits, from the one pass


def reads_from_logits(logits: torch.Tensor, targets: torch.Tensor, base_logp: torch.Tensor) -> Reads:
    """The plain way, from (R, vocab) logits; autograd differentiates through it."""
    logp = logits.float().log_softmax(-1)
    essence = logp[-1]
    return Reads(
        target_logp=logp.gather(1, targets[:, None])[:, 0],
        argmax=logp.argmax(-1),
        kl=(essence.exp() * (essence - base_logp)).sum(),
    )


def one_pass_reads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    base_logp: torch.Tensor | None,
    softcap: float | None = None,
    chunk: int = CHUNK,
) -> Reads:
    """`reads_from_logits(head(hidden), ...)`, gradient included, in one pass over `weight`.

    hidden: (R, d) LM-head inputs; weight: (vocab, d), bias: (vocab,) or None, as the head's
    Linear; softcap: the model's final logit soft-capping (cap · tanh(logit / cap)), if any.
    base_logp None: this pass is the unedited model's own, so the KL and its gradient are 0;
    its `essence_logits` give the base distribution for the passes that follow.
    """
    target_logp, kl, argmax, essence = _OnePass.apply(hidden, weight, bias, targets, base_logp, softcap, chunk)
    return Reads(target_logp=target_logp, argmax=argmax, kl=kl, essence_logits=essence)


def _capped(raw: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits as the model computes them, and their derivative with respect to the raw ones."""
    if not softcap:
        return raw, None
    t = torch.tanh(raw / softcap)
    return t * softcap, 1 - t * t


class _OnePass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, base_logp, softcap, chunk):
        rows, vocab = hidden.shape[0], weight.shape[0]
        essence = rows - 1
        device = hidden.device
        own_base = base_logp is None
        essence_logits = torch.empty(vocab, device=device)
        best = torch.full((rows,), -torch.inf, device=device)  # running max logit = the softmax shift
        argmax = torch.zeros(rows, dtype=torch.long, device=device)
        total = torch.zeros(rows, device=device)  # Σ exp(z − best)
        pulled = torch.zeros(rows + 1, hidden.shape[1], device=device)  # Σ exp(z − best) z' W_v per row,
        # and for the essence row Σ exp(z − best)(z − q) z' W_v (its KL gradient), as row `rows`
        kl_sum = torch.zeros((), device=device)  # Σ exp(z − best)(z − q) at the essence read
        for start in range(0, vocab, chunk):
            block = weight[start : start + chunk]
            raw = F.linear(hidden, block, None if bias is None else bias[start : start + chunk]).float()
            z, slope = _capped(raw, softcap)
            top, where = z.max(1)  # the first maximum, as argmax over the whole row
            risen = top > best
            argmax = torch.where(risen, where + start, argmax)
            shift = torch.maximum(best, top)
            rescale = torch.exp(best - shift)  # 0 on the first chunk (best = -inf)
            best = shift
            e = torch.exp(z - shift[:, None])
            total = total * rescale + e.sum(1)
            weighted = e if slope is None else e * slope
            essence_logits[start : start + chunk] = z[essence]
            gap = z[essence] - (essence_logits if own_base else base_logp)[start : start + chunk].float()  # z − q
            stacked = torch.cat([weighted, (weighted[essence] * gap)[None]])
            pulled = pulled * torch.cat([rescale, rescale[essence:]])[:, None] + stacked @ block.float()
            kl_sum = kl_sum * rescale[essence] + (e[essence] * gap).sum()
        lse = best + total.log()
        target_rows = weight[targets]
        raw_target = (hidden * target_rows).sum(-1)
        if bias is not None:
            raw_target = raw_target + bias[targets]
        z_target, slope_target = _capped(raw_target.float(), softcap)
        target_logp = z_target - lse
        mean_pull = pulled[:rows] / total[:, None]  # E_p[z' W_v] at each read
        own = target_rows.float() if slope_target is None else slope_target[:, None] * target_rows.float()
        d_target = own - mean_pull  # ∂ log p(target) / ∂ hidden, per row
        kl = kl_sum / total[essence] - lse[essence]
        # ∂KL/∂z_v = p_v (log p_v − q_v − KL): through z' W_v and summed over the vocabulary.
        d_kl = (pulled[rows] - lse[essence] * pulled[essence]) / total[essence] - kl * mean_pull[essence]
        if own_base:  # p is p_0 itself: the KL is 0 and has no gradient (the sums above used q = z)
            kl, d_kl = torch.zeros((), device=device), torch.zeros_like(d_kl)
        ctx.save_for_backward(d_target, d_kl)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(argmax, essence_logits)
        return target_logp, kl, argmax, essence_logits

    @staticmethod
    def backward(ctx, grad_target, grad_kl, _grad_argmax, _grad_essence):
        d_target, d_kl = ctx.saved_tensors
        grad = grad_target[:, None] * d_target
        grad[-1] = grad[-1] + grad_kl * d_kl
        return grad.to(ctx.hidden_dtype), None, None, None, None, None, None
