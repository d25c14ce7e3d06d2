"""The rank-one update (ROME §3.1, eq. 2) and the one function that writes weights.

With C the key second moment and the averaged key k* used in all three places:

    u = C⁻¹ k*            (a Cholesky solve, never an explicit inverse)
    Λ = (v* − W k*) / (uᵀ k*)
    W ← W + Λ uᵀ          (Λ on the output side; transposed for GPT-2's Conv1D layout)

which solves min ‖Ŵ K − W K‖ subject to Ŵ k* = v*, with C = K Kᵀ. An edit is fully
described by (Λ, u): d_model + d_ff numbers, which is what the journal stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import LoadedModel


@dataclass
class RankOneEdit:
    layer: int
    lam: torch.Tensor  # (d_model,) float32: Λ
    u: torch.Tensor  # (d_ff,) float32
    denominator: float  # uᵀ k*; tiny values are what made the original code's edits explode
    norm: float  # ‖Λ uᵀ‖_F = ‖Λ‖ ‖u‖

    def matrix(self, conv1d: bool) -> torch.Tensor:
        """ΔW in the weight's stored layout: (d_model, d_ff), or (d_ff, d_model) for Conv1D."""
        delta = torch.outer(self.lam, self.u)  # (d_model, d_ff)
        return delta.T if conv1d else delta


def rank_one_update(
    layer: int,
    k_star: torch.Tensor,
    v_star: torch.Tensor,
    v_current: torch.Tensor,
    c_cholesky: torch.Tensor | None,
    u: torch.Tensor | None = None,
) -> RankOneEdit:
    """(Λ, u) from k* (d_ff,), v* and the current value v(k*) (d_model,), in float64.

    `c_cholesky` is the lower Cholesky factor of C; None means C = I. A given `u` (from a
    sequential-stability method, rome/preserve.py) replaces C⁻¹k*.
    """
    k = k_star.double().cpu()
    if u is not None:
        u = u.double().cpu()
    elif c_cholesky is None:
        u = k.clone()
    else:
        u = torch.cholesky_solve(k[:, None], c_cholesky.double().cpu())[:, 0]  # (d_ff,)
    denominator = float(u @ k)
    lam = (v_star.double().cpu() - v_current.double().cpu()) / denominator  # (d_model,)
    lam32, u32 = lam.float(), u.float()
    return RankOneEdit(layer, lam32, u32, denominator, float(lam32.double().norm() * u32.double().norm()))


def apply_edit(lm: LoadedModel, edit: RankOneEdit, sign: int = 1) -> None:
    """W ← W + sign · Λ uᵀ in place: elementwise float32 arithmetic, so replay is byte-exact."""
    weight = lm.weight(edit.layer)
    with torch.no_grad():
        delta = edit.matrix(lm.adapter.conv1d).to(weight.device)
        updated = weight.float() + delta if sign > 0 else weight.float() - delta
        weight.copy_(updated.to(weight.dtype))


def current_value(lm: LoadedModel, layer: int, key: torch.Tensor) -> torch.Tensor:
    """What the down-projection outputs for `key` now (bias included): (d_model,) float32."""
    module = lm.module("down_proj", layer)
    with torch.inference_mode():
        return module(key.to(lm.device, module.weight.dtype)[None])[0].float()


def compute_edit(lm, layer, fact_template, subject, target, prefixes, stats, hp, timings: dict | None = None,
                 preserver=None):
    """k*, v* and the update for one fact; the model is unchanged when this returns.

    Returns (edit, k_star, value). `timings`, if given, receives seconds_key and seconds_value.
    `preserver` (rome/preserve.py), if given, chooses u from k* instead of C⁻¹k*.
    """
    import time

    from .keys import compute_key
    from .values import optimise_value

    started = time.perf_counter()
    k_star = compute_key(lm, layer, fact_template, subject, prefixes)
    v_init = current_value(lm, layer, k_star)
    keyed = time.perf_counter()
    value = optimise_value(
        lm, layer, fact_template, subject, target, prefixes, v_init,
        lr=hp.v_lr, steps=hp.v_steps, loss_stop=hp.v_loss_stop, stop_on=hp.v_stop_on, kl_factor=hp.kl_factor,
        weight_decay=hp.v_weight_decay, clamp_norm_factor=hp.clamp_norm_factor,
        engine="exact" if hp.exact_protocol else "cached",
    )
    if timings is not None:
        timings.update(seconds_key=keyed - started, seconds_value=time.perf_counter() - keyed)
    u = preserver.u(k_star) if preserver is not None else None
    edit = rank_one_update(layer, k_star, value.v_star, v_init, stats.cholesky if stats else None, u)
    return edit, k_star, value
