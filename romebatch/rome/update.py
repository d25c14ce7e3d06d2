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
from typing import TYPE_CHECKING, cast

import torch

from ..model import LoadedModel

if TYPE_CHECKING:
    from .preserve import Preserver
    from .stats import KeyStats
    from .values import ValueResult


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


def bound_norm(edit: RankOneEdit, weight: torch.Tensor, conv1d: bool, max_norm: float) -> tuple[RankOneEdit, float]:
    """Scale Λ by the largest s ≤ 1 with ‖W + s Λ uᵀ‖_F ≤ max_norm; returns (edit, s).

    ‖W + s D‖² = ‖W‖² + 2 s ⟨W, D⟩ + s² ‖D‖² is a quadratic in s, so the bound is met
    exactly (in float64, then shrunk by 1e-6 so float32 rounding cannot cross it). The key,
    u and the denominator are unchanged: only how far the edit moves v(k*) shrinks.
    s is 0 when W is already at the bound and the edit would only push it further.
    """
    w = weight.detach().double().cpu()
    if conv1d:
        w = w.T  # (d_model, d_ff), the layout Λ uᵀ is in
    lam, u = edit.lam.double(), edit.u.double()
    a = float((w * w).sum())
    b = float(lam @ w @ u)
    c = float(lam @ lam) * float(u @ u)
    limit = max_norm * max_norm
    if c == 0 or a + 2 * b + c <= limit:
        return edit, 1.0
    disc = b * b - c * (a - limit)
    s = (-b + disc**0.5) / c if disc >= 0 else 0.0
    s = min(1.0, max(0.0, s * (1 - 1e-6)))
    lam32 = (lam * s).float()
    return RankOneEdit(
        edit.layer, lam32, edit.u, edit.denominator, float(lam32.double().norm() * edit.u.double().norm())
    ), s


def growth_pull(weight: torch.Tensor, conv1d: bool, residual: torch.Tensor) -> torch.Tensor:
    """g = Wᵀr / ‖r‖², float64 (d_ff,): how an update r uᵀ's u moves ‖W + r uᵀ‖²_F linearly.

    ‖W + r uᵀ‖² − ‖W‖² = 2 ‖r‖² gᵀu + ‖r‖² ‖u‖², what the norm penalty (rome/preserve.py) weighs.
    r = 0 (v* already reached at step 0, as MPES can stop) writes nothing whatever u is: g = 0."""
    r = residual.detach().double().cpu().reshape(-1)
    w = weight.detach().double().cpu()
    pulled = w @ r if conv1d else w.T @ r  # Conv1D stores W as (d_ff, d_model)
    size = float(r @ r)
    return pulled / size if size else torch.zeros_like(pulled)


def apply_edit(lm: LoadedModel, edit: RankOneEdit) -> None:
    """W ← W + Λ uᵀ in place: elementwise float32 arithmetic, so replay is byte-exact."""
    weight = lm.weight(edit.layer)
    with torch.no_grad():
        delta = edit.matrix(lm.adapter.conv1d).to(weight.device)
        updated = weight.float() + delta
        weight.copy_(updated.to(weight.dtype))


def current_value(lm: LoadedModel, layer: int, key: torch.Tensor) -> torch.Tensor:
    """What the down-projection outputs for `key` now (bias included): (d_model,) float32."""
    module = lm.module("down_proj", layer)
    with torch.inference_mode():
        return module(key.to(lm.device, cast(torch.Tensor, module.weight).dtype)[None])[0].float()


def compute_edit(
    lm: LoadedModel,
    layer: int,
    fact_template: str,
    subject: str,
    target: str,
    prefixes: list[str],
    stats: KeyStats | None,
    hp,  # HParams, resolved; rome/ does not import the layers above it
    timings: dict | None = None,
    preserver: Preserver | None = None,
    max_weight_norm: float | None = None,
    target_true: str | None = None,
) -> tuple[RankOneEdit, torch.Tensor, ValueResult]:
    """k*, v* and the update for one fact; the model is unchanged when this returns.

    Returns (edit, k_star, value). `timings`, if given, receives seconds_key and seconds_value.
    `preserver` (rome/preserve.py), if given, chooses u from k* instead of C⁻¹k*; with
    `hp.write_prompt_key`, u also gives the edit prompt's own key the whole write.
    `max_weight_norm`, if given, scales the update so ‖W‖_F stays within it (`bound_norm`).
    `target_true`, the fact's true object if known, is what MPES compares the target against
    (with `hp.v_stop_beats_true`).
    """
    import time

    from .keys import compute_keys
    from .values import optimise_value

    started = time.perf_counter()
    k_star, prompt_key = compute_keys(lm, layer, fact_template, subject, prefixes)
    v_init = current_value(lm, layer, k_star)
    keyed = time.perf_counter()
    value = optimise_value(
        lm,
        layer,
        fact_template,
        subject,
        target,
        prefixes,
        v_init,
        **hp.value_options(),
        true_target=target_true if hp.v_stop_beats_true else None,
    )
    if timings is not None:
        timings.update(seconds_key=keyed - started, seconds_value=time.perf_counter() - keyed)
    u = None
    if preserver is not None:
        pull = None
        if preserver.penalty_scale:
            pull = growth_pull(lm.weight(layer), lm.adapter.conv1d, value.v_star - v_init)
        u = preserver.u(k_star, pull, prompt_key if hp.write_prompt_key else None)
    elif hp.write_prompt_key:
        from .preserve import levelled_u

        u = levelled_u(k_star, prompt_key, stats.cholesky if stats else None)
    edit = rank_one_update(layer, k_star, value.v_star, v_init, stats.cholesky if stats else None, u)
    if max_weight_norm is not None:
        edit, scale = bound_norm(edit, lm.weight(layer), lm.adapter.conv1d, max_weight_norm)
        if scale <= 0:
            raise ValueError(
                f"the edited matrix's norm is at its bound ({max_weight_norm:.4g}); "
                "raise norm_growth_max to edit further"
            )
    return edit, k_star, value
