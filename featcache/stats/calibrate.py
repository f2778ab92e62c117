"""Calibration of a codec that needs one (``int8-phis``, ``int4-pca``): PHI-S statistics and the
codec's parameters, before any write.

A worker feeds the teacher's float features of a seeded sample of images into a ``Calibration``:
float64 moments of every patch token, a seeded subsample of tokens (at most ``SAMPLE_TOKENS``) and
the summary vectors. ``finish`` fits PHI-S and hands the token subsample to the codec's ``fit``
(int8-phis: the scale and knee that minimize the measured quantization error in PHI-S space, fitted
here by :func:`fit_quantizer`); it returns the ``stats/`` arrays, the attrs summary and the
quantization record, which the driver writes into the view in one go.
"""

from __future__ import annotations

import numpy as np

from featcache.stats.compute import stats_arrays, stats_summary
from featcache.stats.dispersion import dispersion
from featcache.stats.moments import Moments
from featcache.stats.phis import PhiS
from featcache.store.codec import LEVELS, Codec, Int8Phis, compand, expand

SAMPLE_TOKENS = 32_768  # tokens the codec's parameters are fitted on
MAX_VALUES = 1 << 20  # values the error is evaluated on per candidate

HEADROOM = 16.0  # the largest code lies at least this far beyond the largest calibration value
KNEES = (None, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625)  # in PHI-S standard deviations; None: linear codes


def quantization_error(v: np.ndarray, scale: float, knee: float | None, g: np.ndarray | None = None) -> float:
    """Mean squared error of int8 codes with ``scale`` and ``knee`` on the values ``v``
    (``g``: ``compand(v, knee)`` when the caller already has it)."""
    g = compand(v, knee) if g is None else g
    codes = np.clip(np.rint(g / scale), -LEVELS, LEVELS).astype(np.int64)
    table = expand(np.arange(-LEVELS, LEVELS + 1) * scale, knee)
    return float(np.mean((table[codes + LEVELS] - v) ** 2, dtype=np.float64))


def fit_quantizer(y: np.ndarray, seed: int = 0) -> tuple[float, float | None, float, float]:
    """(scale, knee, relative MSE, fraction of values clipped) of int8 codes for the PHI-S-space sample ``y``: for each knee, the
    largest code's value is searched from 16 to 64 times max |y| (log grid, then refined); the pair
    with the least measured error wins. The headroom matters for heavy tails: a token more extreme
    than any in the sample would otherwise be clipped, and one such token can outweigh the rest."""
    v = np.asarray(y).ravel()
    if v.size > MAX_VALUES:
        v = v[np.random.default_rng([seed, 2]).choice(v.size, MAX_VALUES, replace=False)]
    v = v.astype(np.float64)
    power = float(np.mean(v ** 2)) if v.size else 0.0
    top = float(np.abs(v).max()) if v.size else 0.0
    if power == 0.0:
        return 1.0, None, 0.0, 0.0
    best = (np.inf, 1.0, None)
    for knee in KNEES:
        g = compand(v, knee)
        steps = compand(np.geomspace(HEADROOM * top, 4 * HEADROOM * top, 40), knee) / LEVELS
        errors = [quantization_error(v, s, knee, g) for s in steps]
        k = int(np.argmin(errors))
        fine = np.linspace(steps[max(k - 1, 0)], steps[min(k + 1, len(steps) - 1)], 17)
        for s, e in zip([steps[k], *fine], [errors[k], *(quantization_error(v, s, knee, g) for s in fine)]):
            if e < best[0]:
                best = (e, float(s), knee)
    error, scale, knee = best
    clipped = float(np.mean(np.abs(compand(v, knee)) > (LEVELS + 0.5) * scale))
    return scale, knee, error / power, clipped


class Calibration:
    """Accumulates a calibration sample of one view's float features, batch by batch."""

    def __init__(self, channels: int, expected_tokens: int, seed: int = 0, codec: type[Codec] = Int8Phis):
        self.channels, self.seed, self.codec = channels, seed, codec
        self.moments = Moments.empty(channels)
        self.fraction = min(1.0, SAMPLE_TOKENS / max(expected_tokens, 1))
        self._rng = np.random.default_rng([seed, 1])
        self._sample: list[np.ndarray] = []
        self._summaries: list[np.ndarray] = []
        self.images = 0

    def add(self, dense: np.ndarray, summary: np.ndarray) -> None:
        """One batch of valid rows: dense (n, ..., C) and summary (n, Cs), float."""
        tokens = np.asarray(dense, np.float32).reshape(-1, self.channels)
        self.moments.merge(Moments.of(tokens))
        self._sample.append(tokens[self._rng.random(len(tokens)) < self.fraction])
        self._summaries.append(np.asarray(summary, np.float64))
        self.images += len(summary)

    def finish(self) -> dict:
        """Fit PHI-S and the codec's parameters; returns {"arrays", "summary", "quantization"} for the driver."""
        if self.moments.count == 0:
            raise ValueError("no calibration image could be used")
        phis = PhiS.fit(self.moments, seed=self.seed)
        summaries = np.concatenate(self._summaries)
        try:
            disp, direction = dispersion(lambda: [summaries])
        except ValueError:  # no summary channels, or a zero mean: the direction is undefined
            disp, direction = None, None
        arrays = stats_arrays(phis, self.moments, direction, self.seed)
        sample, self._sample = np.concatenate(self._sample), []
        extra, fitted = self.codec.fit(sample, arrays, phis, self.seed)
        arrays.update(extra)
        summary = stats_summary(phis, self.moments, disp, len(summaries), self.seed, token_budget=None,
                                sample_fraction=1.0, frozen=True, source="calibration", images=self.images)
        quantization = {"codec": self.codec.name, **fitted,
                        "calibration": {"images": self.images, "tokens": self.moments.count,
                                        "scale_tokens": int(len(sample)), "seed": self.seed}}
        return {"arrays": arrays, "summary": summary, "quantization": quantization}
