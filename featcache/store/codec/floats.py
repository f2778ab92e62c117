"""``f16`` (the default) and ``f32``: the teacher's features as they are, cast to a float type."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.store.codec.base import Codec, register_codec


@dataclass(frozen=True)
class _Float(Codec):
    """Raw features cast to ``dtype``; reading them back needs no decoding."""

    stores_raw = True

    def encode(self, x):
        return x.to(self.torch_dtype)

    def encode_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x).astype(self.dtype)

    def to_raw(self, stored: np.ndarray) -> np.ndarray:
        """The stored values as they are (a float16 view reads as float16)."""
        return stored


@register_codec
@dataclass(frozen=True)
class F16(_Float):
    name = "f16"
    dtype = summary_dtype = "float16"
    error_bound = 2.0 ** -22  # round to nearest: |x̂ − x| ≤ 2⁻¹¹ |x| in float16's normal range


@register_codec
@dataclass(frozen=True)
class F32(_Float):
    name = "f32"
    dtype = summary_dtype = "float32"
    error_bound = 0.0  # the teacher's float32 as it is
