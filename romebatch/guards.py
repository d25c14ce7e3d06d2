"""The guards that refuse a disabling edit before it is committed.

Two checks, both on what an edit does rather than on what it was meant to do:
- the norm guard looks at the update itself: non-finite factors, a non-positive
  denominator, or a norm absurd next to the weight's or the run's typical update;
- the collapse guard looks at the model after the update: the base model's own sampled
  text (every 4th context prefix) must still read fluently.
`norm_growth_max` is not a refusal but a bound the update is scaled to (`rome.update.bound_norm`).
"""

from __future__ import annotations

import torch

from .applied_cache import AppliedCache
from .fluency import text_nll
from .hparams import HParams
from .model import LoadedModel
from .rome import RankOneEdit


def max_weight_norm(base_weight: torch.Tensor, hp: HParams) -> float | None:
    """The bound on ‖W‖_F that `norm_growth_max` sets, from the layer's base weight (None: off)."""
    growth = hp.norm_growth_max
    return (1 + growth) * float(base_weight.double().norm()) if growth else None


def norm_refusal(edit: RankOneEdit, weight: torch.Tensor, hp: HParams, applied: AppliedCache) -> str | None:
    """Refuse an edit whose update is absurd: the signature of a disabling edit."""
    values = torch.cat([edit.lam, edit.u])
    if not torch.isfinite(values).all() or not edit.denominator > 0:
        return f"non-finite update or non-positive denominator ({edit.denominator:.3g})"
    weight_norm = float(weight.detach().float().norm())
    if edit.norm > hp.guard_max_relative * weight_norm:
        return f"update norm {edit.norm:.3g} exceeds {hp.guard_max_relative:g} x the weight's norm {weight_norm:.3g}"
    if len(applied.norms()) >= hp.guard_min_edits:
        typical = applied.median_norm()
        if edit.norm > hp.guard_factor * typical:
            return f"update norm {edit.norm:.3g} is over {hp.guard_factor:g} x the run's median {typical:.3g}"
    return None


def own_text_nll(lm: LoadedModel, prefixes: list[str]) -> float:
    """Mean token NLL of every 4th context prefix, text the base model sampled itself.

    Five texts (~40 tokens) show a collapse as clearly as twenty, at a quarter of the
    cost: each token's logits span the whole vocabulary.
    """
    return text_nll(lm, [p.strip() for p in prefixes[::4]])


def collapse_refusal(lm: LoadedModel, prefixes: list[str], reference: float, limit: float) -> str | None:
    """Refuse an applied edit after which the model no longer reads fluent text (a disabling edit).

    The probe is one batched forward pass over texts the base model sampled as context
    prefixes: an ordinary edit moves their NLL by hundredths of a nat, a disabling edit
    by several nats. `reference` is the base model's own NLL of them.
    """
    now = own_text_nll(lm, prefixes)
    if not now <= reference + limit:  # NaN counts as a collapse
        return (
            f"collapse: the base model's own sampled text now costs {now:.2f} nats/token "
            f"(base {reference:.2f}, at most +{limit:g} allowed)"
        )
    return None
