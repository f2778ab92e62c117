"""Streaming first and second moments in float64, mergeable across batches and workers.

Each batch contributes its count, mean and *centred* scatter matrix; two partial results merge
with the parallel update of Chan, Golub and LeVeque (ALGORITHMS.md §1), never through
Σxxᵀ − nμμᵀ, which loses precision when the mean is large relative to the spread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Moments:
    count: int
    mean: np.ndarray  # (C,) float64
    scatter: np.ndarray  # (C, C) float64: Σ (x − mean)(x − mean)ᵀ

    @classmethod
    def empty(cls, channels: int) -> "Moments":
        return cls(0, np.zeros(channels), np.zeros((channels, channels)))

    @classmethod
    def of(cls, x) -> "Moments":
        """The moments of the rows of ``x`` (n, C), computed in float64."""
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
        centred = x - mean
        return cls(len(x), mean, centred.T @ centred)

    def add(self, x) -> "Moments":
        """Merge a batch of rows in place; returns self."""
        return self.merge(Moments.of(x))

    def merge(self, other: "Moments") -> "Moments":
        """Chan's parallel update, in place; returns self."""
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.scatter = other.count, other.mean.copy(), other.scatter.copy()
            return self
        n = self.count + other.count
        delta = other.mean - self.mean
        self.scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / n)
        self.mean = self.mean + delta * (other.count / n)
        self.count = n
        return self

    @property
    def covariance(self) -> np.ndarray:
        """The population covariance (divided by the count)."""
        if self.count == 0:
            raise ValueError("no samples")
        return self.scatter / self.count

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"count": np.array(self.count, dtype=np.int64), "mean": self.mean, "scatter": self.scatter}

    @classmethod
    def from_arrays(cls, d: dict) -> "Moments":
        return cls(int(d["count"]), np.asarray(d["mean"], np.float64), np.asarray(d["scatter"], np.float64))
