"""Keeping earlier edits while making new ones: what u = C⁻¹k* becomes in a sequence.

Plain ROME solves each edit against the base model's key statistics C alone, so nothing
stops edit 500 from overwriting what edit 3 wrote. Each method here changes only how u is
found from k*; the update stays rank one, ΔW = Λ uᵀ with Λ = (v* − W k*) / (uᵀk*), so
every edit is still one journal row of (Λ, u).

- "none": u = C⁻¹ k*, the paper's update, edits independent of each other.
- "covariance": u = (C + λ Σ_p k_p k_pᵀ)⁻¹ k*, summing over the earlier edits' keys at the
  layer: ΔW then minimises ‖ΔW K₀‖² + λ Σ_p ‖ΔW k_p‖² (disturbing the base keys and the
  earlier edits' keys as little as it can) subject to ΔW k* = v* − W k*. λ is relative to
  C's own curvature along each k_p, so it means the same on any model.
- "nullspace": u = C⁻¹ k* projected, in C's metric, off the earlier keys:
  u = C⁻¹(k* − K α) with Kᵀu = 0, so ΔW k_p = 0 for every earlier edit: their outputs at
  the edited layer are kept exactly (to rounding). AlphaEdit's idea, for one rank-one edit.

Any method can also keep u orthogonal to the top-k principal directions of C (`top_k`,
AlphaEdit's preserved-knowledge null space made soft: a small model's C has little exact
null space, so the k directions typical keys occupy most are removed). With U those
eigenvectors and M the method's matrix (C, or C + λ Σ k_p k_pᵀ), u = M⁻¹(k* − A α) with
Aᵀu = 0, A = U (and the earlier keys too for "nullspace"): the u of least ‖ΔW K‖ that
moves no key in span(A). For M = C this is exactly (I − U Uᵀ) C⁻¹ k*.

ENCORE's bound on the edited matrix's norm, made a penalty (`norm_penalty` μ), for any method:
u minimises the method's ‖ΔW K‖² plus μ' times the growth ‖W + ΔW‖²_F − ‖W‖²_F it causes,
μ' = μ · mean(diag C) so μ means the same on any model. With ΔW = r uᵀ (r = v* − W k*, uᵀk* = 1)
the growth is 2 rᵀW u + ‖r‖² ‖u‖², so per unit ‖r‖² the problem is

    min uᵀ(M + μ'I) u + 2 μ' gᵀu   subject to kᵀu = 1 (and Aᵀu = 0),   g = Wᵀr / ‖r‖²

a quadratic with linear constraints, solved in closed form: u = M'⁻¹(B β − μ' g) with
B = [k*, A] and β from the constraints. The update stays rank one and still meets
Ŵ k* = v* exactly, so, unlike a hard bound, it never leaves an edit undone: it only chooses
the u that grows ‖W‖_F least for the damage it does to other keys, and may shrink W along r.

Any method can also make the edit reach the edit prompt's own key in full (`prompt_key` in
`u`): k* is the mean key over the bare prompt and its context prefixes, and an edit writes
Λ uᵀk at a key k, so the prompt itself receives uᵀk_p / uᵀk* of the write. That share is
about 1 for most facts, but where the subject opens its prompt its key can sit far from the
contexts' mean and receive a fifth of the write or less: the edit then fails on the very
prompt it was asked to change, and every repair of it fails the same way
(benchmarks/RESULTS.md, "Issue 20, session 19"). The constraint uᵀ(k_p − k*) = 0 joins A, so
uᵀk_p = uᵀk*: the prompt gets the whole write v* − W k*, the contexts' mean is unchanged.

The running state is a pure function of the keys of the edits on the journal's current
path, in order: `rebuild` recomputes it from them after a rollback, with the same float64
arithmetic in the same order as the edits were made, so it is byte-identical.
"""

from __future__ import annotations

import torch

METHODS = ("none", "covariance", "nullspace")


class Preserver:
    """The running state of one layer's method: which u a new k* gets."""

    def __init__(
        self,
        method: str,
        cholesky: torch.Tensor | None,
        d_ff: int,
        weight: float = 10.0,
        top_k: int = 0,
        norm_penalty: float = 0.0,
    ):
        if method not in METHODS:
            raise ValueError(f"preserve method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.weight = weight
        self.d_ff = d_ff
        if cholesky is None:  # mom2 = identity: C = I
            cholesky = torch.eye(d_ff, dtype=torch.float64)
        self.base_cholesky = cholesky.double()
        self.base = self.base_cholesky @ self.base_cholesky.T  # C (+ ridge), float64
        self.curvature = self.base  # C itself: what "covariance" weighs an earlier key against
        self.norm_penalty = float(norm_penalty)
        self.penalty_scale = self.norm_penalty * float(self.base.diagonal().mean())  # μ'
        if self.penalty_scale:
            # The metric every method solves in becomes M + μ'I: ‖ΔW‖_F² joins ‖ΔW K‖².
            self.base = self.base + self.penalty_scale * torch.eye(d_ff, dtype=torch.float64)
            self.base_cholesky = torch.linalg.cholesky(self.base)
        self.top_k = min(int(top_k), d_ff)
        self.principal = torch.zeros(d_ff, 0, dtype=torch.float64)  # U: C's top-k eigenvectors
        if self.top_k:
            _, vectors = torch.linalg.eigh(self.base)  # ascending eigenvalues
            self.principal = vectors[:, -self.top_k :].flip(1).contiguous()
        self.rebuild([])

    def rebuild(self, keys: list[torch.Tensor]) -> None:
        """State after the edits whose keys are `keys` (oldest first)."""
        self.keys: list[torch.Tensor] = []
        self.matrix = self.base.clone() if self.method == "covariance" else None
        self.solved = torch.zeros(self.d_ff, 0, dtype=torch.float64)  # C⁻¹ K, for nullspace
        self._factor: torch.Tensor | None = self.base_cholesky
        for key in keys:
            self.add(key)

    def add(self, key: torch.Tensor) -> None:
        """Record an applied edit's key k*."""
        k = key.detach().double().cpu().reshape(-1)
        self.keys.append(k)
        if self.method == "covariance":
            # λ times C's own curvature along k: λ = 1 counts the earlier edit as much as the
            # whole corpus does in its direction, on any model and at any layer.
            assert self.matrix is not None  # rebuild() makes it for the covariance method
            norm_sq = float(k @ k)
            along = float(k @ self.curvature @ k) / norm_sq
            self.matrix.add_(torch.outer(k, k), alpha=self.weight * along / norm_sq)
            self._factor = None  # refactor lazily: only the next edit needs it
        elif self.method == "nullspace":
            solved = torch.cholesky_solve(k[:, None], self.base_cholesky)
            self.solved = torch.cat([self.solved, solved], dim=1)

    def u(
        self, k_star: torch.Tensor, pull: torch.Tensor | None = None, prompt_key: torch.Tensor | None = None
    ) -> torch.Tensor:
        """u for a new key, float64 (d_ff,).

        `pull` is g = Wᵀr / ‖r‖² (`rome.update.growth_pull`), which the norm penalty needs.
        `prompt_key`, if given, is the edit prompt's own key: u then also meets uᵀk_p = uᵀk*."""
        k = k_star.detach().double().cpu().reshape(-1)
        level = level_direction(k, prompt_key)
        if self.penalty_scale:
            if pull is None:
                raise ValueError("a norm penalty needs the edit's pull Wᵀr / ‖r‖²")
            return self._penalised(k, pull.detach().double().cpu().reshape(-1), level)
        if self.top_k or level.shape[1]:
            return self._constrained(k, level)
        if self.method == "covariance":
            return torch.cholesky_solve(k[:, None], self._metric_factor())[:, 0]
        u = torch.cholesky_solve(k[:, None], self.base_cholesky)[:, 0]
        if self.method == "nullspace" and self.keys:
            keys = torch.stack(self.keys, dim=1)  # (d_ff, n)
            gram = keys.T @ self.solved  # Kᵀ C⁻¹ K, (n, n)
            # lstsq, not solve: similar subjects give nearly parallel keys (a singular Gram).
            alpha = torch.linalg.lstsq(gram, keys.T @ u[:, None]).solution
            u = u - (self.solved @ alpha)[:, 0]
        return u

    def _constrained(self, k: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """u = M⁻¹(k − A α) with Aᵀu = 0: A is C's top-k directions (and, for nullspace, the
        earlier keys; and k_p − k*, when the prompt key is levelled)."""
        factor = self._metric_factor()
        u = torch.cholesky_solve(k[:, None], factor)[:, 0]
        a, solved = self._constraints(factor, level)
        gram = a.T @ solved
        # lstsq, not solve: near-parallel keys make the Gram singular (as in u above).
        alpha = torch.linalg.lstsq(gram, a.T @ u[:, None]).solution
        return u - (solved @ alpha)[:, 0]

    def _constraints(self, factor: torch.Tensor, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A, the directions u must be orthogonal to (C's top k; for nullspace, the earlier keys
        too; `level`, k_p − k* or nothing), and M⁻¹A."""
        a = self.principal
        solved = torch.cholesky_solve(a, factor)  # M⁻¹ U
        if self.method == "nullspace" and self.keys:
            a = torch.cat([a, torch.stack(self.keys, dim=1)], dim=1)
            solved = torch.cat([solved, self.solved], dim=1)
        if level.shape[1]:
            a = torch.cat([a, level], dim=1)
            solved = torch.cat([solved, torch.cholesky_solve(level, factor)], dim=1)
        return a, solved

    def _metric_factor(self) -> torch.Tensor:
        if self.method == "covariance":
            if self._factor is None:
                self._factor = torch.linalg.cholesky(self.matrix)
            return self._factor
        return self.base_cholesky

    def _penalised(self, k: torch.Tensor, pull: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """argmin uᵀM'u + 2μ' gᵀu with kᵀu = 1 and Aᵀu = 0, scaled so uᵀk = kᵀM'⁻¹k as plain ROME's."""
        factor = self._metric_factor()
        a, solved_a = self._constraints(factor, level)
        b = torch.cat([k[:, None], a], dim=1)  # B = [k*, A]
        solved = torch.cat([torch.cholesky_solve(k[:, None], factor), solved_a], dim=1)  # M'⁻¹ B
        shifted = torch.cholesky_solve(self.penalty_scale * pull[:, None], factor)  # M'⁻¹ μ' g
        targets = torch.zeros(b.shape[1], 1, dtype=torch.float64)
        targets[0] = 1.0
        # lstsq, not solve: near-parallel keys make the Gram singular (as in u above).
        beta = torch.linalg.lstsq(b.T @ solved, targets + b.T @ shifted).solution
        u = (solved @ beta - shifted)[:, 0]
        return u * float(k @ solved[:, 0])


# Below this |cosine| between k_p − k* and k*, levelling would ask uᵀk* = 0 of an edit whose
# prompt key is (nearly) a multiple of k*: no u meets both, so the prompt key is left alone.
PARALLEL = 0.999


def level_direction(k_star: torch.Tensor, prompt_key: torch.Tensor | None) -> torch.Tensor:
    """k_p − k* as one column (d_ff, 1), float64; no column when there is nothing to level:
    no prompt key, the prompt key equal to k* (no context prefixes), or parallel to it."""
    empty = torch.zeros(len(k_star), 0, dtype=torch.float64)
    if prompt_key is None:
        return empty
    d = prompt_key.detach().double().cpu().reshape(-1) - k_star
    size = float(d.norm())
    if size <= 1e-6 * float(k_star.norm()) or abs(float(d @ k_star)) >= PARALLEL * size * float(k_star.norm()):
        return empty
    return d[:, None]


def levelled_u(k_star: torch.Tensor, prompt_key: torch.Tensor, cholesky: torch.Tensor | None) -> torch.Tensor | None:
    """Plain ROME's u = C⁻¹k* made to meet uᵀk_p = uᵀk* too, when no method needs a Preserver:
    u = C⁻¹(k* − α d) with dᵀu = 0, d = k_p − k*; float64 (d_ff,). None when there is nothing
    to level (`level_direction`): the caller then uses C⁻¹k* as it is."""
    k = k_star.detach().double().cpu().reshape(-1)
    level = level_direction(k, prompt_key)
    if not level.shape[1]:
        return None
    if cholesky is None:  # mom2 = identity: C = I
        u, solved = k, level[:, 0]
    else:
        factor = cholesky.double().cpu()
        u = torch.cholesky_solve(k[:, None], factor)[:, 0]
        solved = torch.cholesky_solve(level, factor)[:, 0]
    d = level[:, 0]
    return u - solved * (float(d @ u) / float(d @ solved))
