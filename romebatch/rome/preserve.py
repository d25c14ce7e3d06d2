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

The running state is a pure function of the keys of the edits on the journal's current
path, in order: `rebuild` recomputes it from them after a rollback, with the same float64
arithmetic in the same order as the edits were made, so it is byte-identical.
"""

from __future__ import annotations

import torch

METHODS = ("none", "covariance", "nullspace")


class Preserver:
    """The running state of one layer's method: which u a new k* gets."""

    def __init__(self, method: str, cholesky: torch.Tensor | None, d_ff: int, weight: float = 10.0, top_k: int = 0):
        if method not in METHODS:
            raise ValueError(f"preserve method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.weight = weight
        self.d_ff = d_ff
        if cholesky is None:  # mom2 = identity: C = I
            cholesky = torch.eye(d_ff, dtype=torch.float64)
        self.base_cholesky = cholesky.double()
        self.base = self.base_cholesky @ self.base_cholesky.T  # C (+ ridge), float64
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
            along = float(k @ self.base @ k) / norm_sq
            self.matrix.add_(torch.outer(k, k), alpha=self.weight * along / norm_sq)
            self._factor = None  # refactor lazily: only the next edit needs it
        elif self.method == "nullspace":
            solved = torch.cholesky_solve(k[:, None], self.base_cholesky)
            self.solved = torch.cat([self.solved, solved], dim=1)

    def u(self, k_star: torch.Tensor) -> torch.Tensor:
        """u for a new key, float64 (d_ff,)."""
        k = k_star.detach().double().cpu().reshape(-1)
        if self.top_k:
            return self._constrained(k)
        if self.method == "covariance":
            if self._factor is None:
                self._factor = torch.linalg.cholesky(self.matrix)
            return torch.cholesky_solve(k[:, None], self._factor)[:, 0]
        u = torch.cholesky_solve(k[:, None], self.base_cholesky)[:, 0]
        if self.method == "nullspace" and self.keys:
            keys = torch.stack(self.keys, dim=1)  # (d_ff, n)
            gram = keys.T @ self.solved  # Kᵀ C⁻¹ K, (n, n)
            # lstsq, not solve: similar subjects give nearly parallel keys (a singular Gram).
            alpha = torch.linalg.lstsq(gram, keys.T @ u[:, None]).solution
            u = u - (self.solved @ alpha)[:, 0]
        return u

    def _constrained(self, k: torch.Tensor) -> torch.Tensor:
        """u = M⁻¹(k − A α) with Aᵀu = 0: A is C's top-k directions (and, for nullspace, the earlier keys)."""
        if self.method == "covariance":
            if self._factor is None:
                self._factor = torch.linalg.cholesky(self.matrix)
            factor = self._factor
        else:
            factor = self.base_cholesky
        u = torch.cholesky_solve(k[:, None], factor)[:, 0]
        a = self.principal
        solved = torch.cholesky_solve(a, factor)  # M⁻¹ U
        if self.method == "nullspace" and self.keys:
            a = torch.cat([a, torch.stack(self.keys, dim=1)], dim=1)
            solved = torch.cat([solved, self.solved], dim=1)
        gram = a.T @ solved
        # lstsq, not solve: near-parallel keys make the Gram singular (as in u above).
        alpha = torch.linalg.lstsq(gram, a.T @ u[:, None]).solution
        return u - (solved @ alpha)[:, 0]
