"""Calibration of a codec that needs one (``int8-phis``, ``int4-pca``): PHI-S statistics and the
codec's parameters, before any write.

A worker feeds the teacher's float features of a seeded sample of images into a ``Calibration``:
float64 moments of every patch token, a seeded subsample of tokens (at most ``SAMPLE_TOKENS``) and
the summary vectors. ``finish`` fits PHI-S and hands the token subsample to the codec's ``fit``
(int8-phis: the scale and knee that minimize the measured quantization error in PHI-S space, fitted
by ``featcache.store.codec.int8_phis.fit_quantizer``); it returns the ``stats/`` arrays, the attrs
summary and the quantization record, which the driver writes into the view in one go.
"""

from __future__ import annotations

import numpy as np

from featcache.stats.compute import stats_arrays, stats_summary
from featcache.stats.dispersion import dispersion
from featcache.stats.moments import Moments
from featcache.stats.phis import PhiS
from featcache.store.codec import Codec, Int8Phis

SAMPLE_TOKENS = 32_768  # tokens the codec's parameters are fitted on


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
