"""The rank-one update (ROME eq. 2) against the problem it claims to solve.

`rank_one_update` must give the minimiser of ‖Ŵ K − W K‖_F subject to Ŵ k* = v*, with
C = K Kᵀ / n plus the ridge `KeyStats.factor` adds. The reference here solves that problem
independently, row by row, through its KKT system in float64 NumPy (no closed form), so a
wrong solve, a wrong ridge, a swapped Λ/u or a transposed layout all show up.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_loaded

from romebatch.rome.stats import KeyStats
from romebatch.rome.update import RankOneEdit, apply_edit, current_value, rank_one_update


def keys_and_stats(d_ff: int, n: int, ridge: float, seed: int):
    """A key sample K (d_ff, n) whose second moment is not a multiple of I, and its factored stats."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d_ff, d_ff)) * rng.uniform(0.2, 3.0, size=d_ff)  # anisotropic, mean diag ≠ 1
    K = (mixing @ rng.normal(size=(d_ff, n))).astype(np.float32) + 0.5  # uncentred, like real keys
    mom2 = torch.from_numpy(K.astype(np.float64) @ K.T.astype(np.float64) / n).float()
    stats = KeyStats(layer=0, mom2=mom2, tokens=n).factor(ridge)
    return K, mom2, stats


def kkt_delta(mom2: np.ndarray, ridge: float, k: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """ΔW minimising Σ_rows δᵢᵀ C δᵢ subject to δᵢ·k = rᵢ, each row from its own KKT system."""
    d_ff = mom2.shape[0]
    c = mom2 + ridge * np.mean(np.diag(mom2)) * np.eye(d_ff)
    kkt = np.zeros((d_ff + 1, d_ff + 1))
    kkt[:d_ff, :d_ff] = 2.0 * c
    kkt[:d_ff, d_ff] = k
    kkt[d_ff, :d_ff] = k
    rows = []
    for r in residual:
        rhs = np.zeros(d_ff + 1)
        rhs[d_ff] = r
        rows.append(np.linalg.solve(kkt, rhs)[:d_ff])
    return np.stack(rows)  # (d_model, d_ff)


def random_problem(d_model: int, d_ff: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(d_model, d_ff, generator=gen)
    k_star = torch.randn(d_ff, generator=gen).abs() + 0.1
    v_star = torch.randn(d_model, generator=gen) * 3
    return W, k_star, v_star


@pytest.mark.parametrize(
    "d_model,d_ff,n,ridge,seed",
    [
        (8, 16, 200, 1e-3, 0),  # well-conditioned C
        (6, 24, 10, 1e-3, 1),  # fewer keys than d_ff: C is singular, only the ridge makes it solvable
        (12, 20, 100, 0.5, 2),  # a large ridge: its exact form (× mean diag C) matters
    ],
)
def test_update_satisfies_constraint_and_matches_kkt_solution(d_model, d_ff, n, ridge, seed):
    W, k_star, v_star = random_problem(d_model, d_ff, seed)
    _, mom2, stats = keys_and_stats(d_ff, n, ridge, seed)
    v_current = W @ k_star
    edit = rank_one_update(3, k_star, v_star, v_current, stats.cholesky)

    assert edit.layer == 3
    assert edit.lam.shape == (d_model,) and edit.u.shape == (d_ff,)
    assert edit.lam.dtype == torch.float32 and edit.u.dtype == torch.float32

    W_new = W.double() + torch.outer(edit.lam.double(), edit.u.double())
    achieved = W_new @ k_star.double()
    rel = (achieved - v_star.double()).norm() / v_star.double().norm()
    assert rel < 1e-4, f"W' k* misses v* by {rel:.2e}"

    expected = kkt_delta(
        mom2.double().numpy(), ridge, k_star.double().numpy(), (v_star.double() - v_current.double()).numpy()
    )
    actual = torch.outer(edit.lam.double(), edit.u.double()).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())

    # The recorded diagnostics describe this update.
    assert edit.norm == pytest.approx(float(np.linalg.norm(expected)), rel=1e-4)
    c = mom2.double() + ridge * mom2.double().diagonal().mean() * torch.eye(d_ff, dtype=torch.float64)
    u_ref = torch.linalg.solve(c, k_star.double())
    assert edit.denominator == pytest.approx(float(u_ref @ k_star.double()), rel=1e-6)
    assert edit.denominator > 0


def test_other_keys_move_as_little_as_the_constraint_allows():
    """Any other rank-one ΔW meeting the constraint costs more on the sampled keys."""
    d_model, d_ff, n, ridge = 6, 12, 300, 1e-6
    W, k_star, v_star = random_problem(d_model, d_ff, 7)
    K, mom2, stats = keys_and_stats(d_ff, n, ridge, 7)
    edit = rank_one_update(0, k_star, v_star, W @ k_star, stats.cholesky)
    delta = torch.outer(edit.lam.double(), edit.u.double())
    cost = (delta @ torch.from_numpy(K).double()).norm()
    # C = I's update (u = k*) also meets the constraint, but disturbs the sample's keys more.
    naive = rank_one_update(0, k_star, v_star, W @ k_star, None)
    naive_delta = torch.outer(naive.lam.double(), naive.u.double())
    assert (naive_delta @ k_star.double() - delta @ k_star.double()).abs().max() < 1e-3
    assert cost < (naive_delta @ torch.from_numpy(K).double()).norm() * 0.999


def test_identity_second_moment_gives_u_equal_k_star():
    W, k_star, v_star = random_problem(5, 9, 3)
    v_current = W @ k_star
    edit = rank_one_update(1, k_star, v_star, v_current, None)
    assert torch.equal(edit.u, k_star.float())
    assert edit.denominator == pytest.approx(float(k_star.double() @ k_star.double()), rel=1e-12)
    expected_lam = (v_star.double() - v_current.double()) / float(k_star.double() @ k_star.double())
    torch.testing.assert_close(edit.lam.double(), expected_lam, rtol=1e-6, atol=1e-7)
    achieved = (W.double() + torch.outer(edit.lam.double(), edit.u.double())) @ k_star.double()
    assert (achieved - v_star.double()).norm() / v_star.double().norm() < 1e-5


def test_scaling_c_does_not_change_the_update():
    """ΔW depends on C only up to scale (u and Λ rescale oppositely)."""
    W, k_star, v_star = random_problem(6, 10, 4)
    _, mom2, _ = keys_and_stats(10, 100, 1e-3, 4)
    a = rank_one_update(0, k_star, v_star, W @ k_star, KeyStats(0, mom2, 100).factor(1e-3).cholesky)
    b = rank_one_update(0, k_star, v_star, W @ k_star, KeyStats(0, mom2 * 1000, 100).factor(1e-3).cholesky)
    torch.testing.assert_close(a.matrix(False), b.matrix(False), rtol=1e-4, atol=1e-6)
    assert b.denominator == pytest.approx(a.denominator / 1000, rel=1e-5)


def test_matrix_layouts():
    gen = torch.Generator().manual_seed(5)
    lam, u = torch.randn(4, generator=gen), torch.randn(7, generator=gen)
    edit = RankOneEdit(0, lam, u, 1.0, float(lam.norm() * u.norm()))
    linear = edit.matrix(conv1d=False)
    assert linear.shape == (4, 7)
    assert torch.equal(linear, torch.outer(lam, u))
    conv = edit.matrix(conv1d=True)
    assert conv.shape == (7, 4)
    assert torch.equal(conv, linear.T)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_apply_edit_meets_constraint_in_the_module(family, tokenizer_for):
    """Through the real module (Conv1D for GPT-2, Linear for Llama): output at k* becomes v*."""
    lm = tiny_loaded(family, tokenizer_for(family))
    layer = 1
    weight = lm.weight(layer)
    assert lm.adapter.conv1d == (family == "gpt2")
    d_ff = weight.shape[0] if lm.adapter.conv1d else weight.shape[1]
    before = {name: p.detach().clone() for name, p in lm.model.named_parameters()}

    gen = torch.Generator().manual_seed(11)
    k_star = torch.randn(d_ff, generator=gen).abs()
    v_current = current_value(lm, layer, k_star)
    v_star = v_current + torch.randn(v_current.shape, generator=gen) * 2
    _, _, stats = keys_and_stats(d_ff, 500, 1e-3, 11)
    edit = rank_one_update(layer, k_star, v_star, v_current, stats.cholesky)
    apply_edit(lm, edit)

    achieved = current_value(lm, layer, k_star)
    rel = (achieved - v_star).norm() / v_star.norm()
    assert rel < 1e-4, f"module output at k* misses v* by {rel:.2e}"
    # The stored weight changed by exactly ΔW in its own layout, and nothing else changed.
    name = lm.name("down_proj", layer) + ".weight"
    torch.testing.assert_close(weight.detach() - before[name], edit.matrix(lm.adapter.conv1d), rtol=1e-5, atol=1e-5)
    for other, value in lm.model.named_parameters():
        if other != name:
            assert torch.equal(value, before[other]), f"{other} changed"

    # A different key is moved by ΔW k, not by the constraint's full residual.
    other_key = torch.randn(d_ff, generator=gen).abs()
    apply_edit(lm, RankOneEdit(edit.layer, -edit.lam, edit.u, edit.denominator, edit.norm))  # W - Λ uᵀ
    torch.testing.assert_close(weight.detach(), before[name], rtol=0, atol=1e-5)
    v_other = current_value(lm, layer, other_key)
    apply_edit(lm, edit)
    expected_other = v_other + edit.lam * float(edit.u @ other_key)
    torch.testing.assert_close(current_value(lm, layer, other_key), expected_other, rtol=1e-4, atol=1e-4)
