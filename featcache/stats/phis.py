"""PHI-S: isotropic standardization of teacher features (ALGORITHMS.md §1).

    y = α · H Uᵀ (x − μ),   α = (mean λ)^(−1/2)        x = α⁻¹ · U Hᵀ y + μ

with Σ = U diag(λ) Uᵀ (eigh in float64, negative eigenvalues clamped to 0) and H an orthonormal
Hadamard matrix: every output channel then has variance exactly mean(λ)·α² = 1. Fit once, persist,
and never refit silently (eigenvectors are not stable between estimates).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.stats.hadamard import Construction, hadamard
from featcache.stats.moments import Moments


@dataclass(frozen=True)
class PhiS:
    mean: np.ndarray  # μ (C,) float64
    rotation: np.ndarray  # R = α H Uᵀ (C, C) float64
    inverse: np.ndarray  # R⁻¹ = α⁻¹ U Hᵀ (C, C) float64
    eigenvalues: np.ndarray  # λ, descending, clamped at 0
    alpha: float
    hadamard: Construction
    count: int
    eigenvectors: np.ndarray | None = None  # U (C, C), columns in the order of λ (kept by ``fit``, not stored)

    @classmethod
    def fit(cls, moments: Moments, seed: int = 0) -> "PhiS":
        cov = moments.covariance
        lam, u = np.linalg.eigh((cov + cov.T) / 2)
        order = np.argsort(lam)[::-1]
        lam, u = np.clip(lam[order], 0.0, None), u[:, order]
        if not lam.mean() > 0:
            raise ValueError("the features have zero variance: PHI-S is undefined")
        alpha = float(lam.mean() ** -0.5)
        h, construction = hadamard(len(lam), seed)
        return cls(moments.mean.copy(), alpha * h @ u.T, (u @ h.T) / alpha, lam, alpha, construction,
                   moments.count, u)

    def apply(self, x) -> np.ndarray:
        """Raw features (..., C) → PHI-S space."""
        x = np.asarray(x)
        dtype = np.float64 if x.dtype == np.float64 else np.float32
        return ((x - self.mean) @ self.rotation.T).astype(dtype, copy=False)

    def invert(self, y) -> np.ndarray:
        """PHI-S space (..., C) → raw features."""
        y = np.asarray(y)
        dtype = np.float64 if y.dtype == np.float64 else np.float32
        return (y @ self.inverse.T + self.mean).astype(dtype, copy=False)
