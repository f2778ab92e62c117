"""Angular dispersion of summary vectors (ALGORITHMS.md §2), exact, two passes in float64.

    μ_y = E[y] / ‖E[y]‖,   Θ(y, μ) = arccos(clamp(cos(y, μ), ±(1 − 1e-7))),   Disp = E[Θ²]
"""

from __future__ import annotations

import numpy as np

_CLAMP = 1 - 1e-7


def mean_direction(batches) -> np.ndarray:
    """First pass: E[y] / ‖E[y]‖ over an iterable of (n, C) arrays."""
    total, count = None, 0
    for y in batches:
        y = np.asarray(y, dtype=np.float64)
        s = y.sum(axis=0)
        total = s if total is None else total + s
        count += len(y)
    if not count:
        raise ValueError("no summary vectors")
    norm = np.linalg.norm(total)
    if norm == 0:
        raise ValueError("the mean summary vector is zero: its direction is undefined")
    return total / norm


def angles(y, direction: np.ndarray) -> np.ndarray:
    """Θ(y, μ) in radians for each row of y."""
    y = np.asarray(y, dtype=np.float64)
    cos = (y @ direction) / np.maximum(np.linalg.norm(y, axis=1), np.finfo(np.float64).tiny)
    return np.arccos(np.clip(cos, -_CLAMP, _CLAMP))


def dispersion(batches_twice, direction: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """(Disp, μ_y). ``batches_twice`` is a callable returning a fresh iterable of (n, C) arrays
    (it is read twice: once for the direction, once for the angles)."""
    mu = mean_direction(batches_twice()) if direction is None else direction
    total, count = 0.0, 0
    for y in batches_twice():
        theta = angles(y, mu)
        total += float((theta ** 2).sum())
        count += len(theta)
    return total / count, mu
