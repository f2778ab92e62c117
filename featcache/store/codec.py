"""Storage codecs of the dense arrays: ``f16`` (default), ``f32`` and ``int8-phis``.

``int8-phis`` stores each patch feature in the view's PHI-S space (ALGORITHMS.md §1), where every
channel has unit variance, as int8 codes with one scale ``s`` (and one knee ``b``) per view::

    y = (x − μ) Rᵀ,   q = clamp(round(g(y) / s), −127, 127),   g(y) = sign(y) · b · ln(1 + |y| / b)
    PHI-S floats:  ŷ = g⁻¹(s · q)            raw floats:  x̂ = ŷ R⁻ᵀ + μ

Without a knee (``b = None``) the codes are linear, ŷ = s · q. PHI-S makes every channel look alike,
so one quantizer serves them all; the knee keeps heavy-tailed features (rare tokens tens of standard
deviations out) from forcing a coarse step on everything else. Both are fitted to minimize the
measured error on the calibration sample; decoding is one table lookup per value.

μ, R and R⁻¹ are the view's frozen ``stats/`` arrays, fitted on a calibration sample before any
shard is written; the scale and the sha256 of those statistics are recorded in the view's attrs
under ``quantization``. A reader refuses to decode when the statistics no longer match that hash.
The other codecs store the teacher's floats as they are.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from featcache.errors import CacheFormatError, UsageError
from featcache.store import attrs as attrs_json

#: codec name -> stored dtype of the dense array
CODECS = {"f16": "float16", "f32": "float32", "int8-phis": "int8"}
LEVELS = 127  # codes are -127..127: symmetric, so -q decodes to -ŷ
STATS = "stats"
QUANTIZATION = "quantization"  # the attrs key holding the int8-phis scale and the stats hash


def stats_digest(arrays: dict[str, np.ndarray]) -> str:
    """The hash that names a view's statistics: sha256 over the arrays' names and bytes, by name."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(name.encode() + str(value.dtype).encode() + str(value.shape).encode() + value.tobytes())
    return "sha256:" + digest.hexdigest()


def compand(y, knee: float | None):
    """The code domain: ``sign(y) · b · ln(1 + |y| / b)`` (numpy or torch), identity without a knee."""
    if knee is None:
        return y
    lib = _lib(y)
    return lib.sign(y) * knee * lib.log1p(lib.abs(y) / knee)


def expand(g, knee: float | None):
    """Inverse of :func:`compand`."""
    if knee is None:
        return g
    lib = _lib(g)
    return lib.sign(g) * knee * lib.expm1(lib.abs(g) / knee)


def _lib(x):
    if isinstance(x, (np.ndarray, np.generic, float, int)):
        return np
    import torch

    return torch


@dataclass(frozen=True)
class Int8Phis:
    """The int8-phis transform of one view: PHI-S mean and rotations, the code scale and knee."""

    mean: np.ndarray  # μ (C,)
    rotation: np.ndarray  # R (C, C): y = (x − μ) Rᵀ
    inverse: np.ndarray  # R⁻¹ (C, C): x = y R⁻ᵀ + μ
    scale: float  # PHI-S units per code step near zero
    knee: float | None = None  # None: linear codes; b: logarithmic beyond about |y| = b
    stats_hash: str | None = None  # the statistics μ, R, R⁻¹ came from (recorded in each commit)

    def encode(self, x):
        """Raw features (..., C), a torch tensor on any device → int8 codes (same device)."""
        import torch

        x = x.float()
        if x.device not in self._on_device:  # moved to the device once, not per batch
            self._on_device[x.device] = (torch.as_tensor(self.mean, dtype=torch.float32, device=x.device),
                                         torch.as_tensor(self.rotation, dtype=torch.float32, device=x.device))
        mean, rotation = self._on_device[x.device]
        return self.codes((x - mean) @ rotation.T)

    def codes(self, y):
        """PHI-S-space values (torch) → int8 codes."""
        import torch

        return torch.clamp(torch.round(compand(y, self.knee) / self.scale), -LEVELS, LEVELS).to(torch.int8)

    def encode_numpy(self, x: np.ndarray) -> np.ndarray:
        y = (np.asarray(x, np.float32) - self.mean.astype(np.float32)) @ self.rotation.T.astype(np.float32)
        g = compand(y, None if self.knee is None else np.float32(self.knee))
        return np.clip(np.rint(g / np.float32(self.scale)), -LEVELS, LEVELS).astype(np.int8)

    @property
    def table(self) -> np.ndarray:
        """The PHI-S value of each code, indexed by the code's byte (uint8 view of the int8)."""
        q = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float64)
        q = np.clip(q, -LEVELS, LEVELS)  # -128 is never written
        return expand(q * self.scale, self.knee).astype(np.float32)

    def to_phis(self, q: np.ndarray) -> np.ndarray:
        """Codes → PHI-S-space float32 (one table lookup per value)."""
        return self._table[np.asarray(q).view(np.uint8)]

    def decode(self, q: np.ndarray) -> np.ndarray:
        """Codes → raw float32 features."""
        return self.to_phis(q) @ self.inverse.T.astype(np.float32, copy=False) + self.mean.astype(np.float32)

    def __post_init__(self):
        object.__setattr__(self, "_table", self.table)
        object.__setattr__(self, "_on_device", {})


def view_attrs(view) -> dict:
    """The view's attrs["featcache"] as stored now (not as cached when the view was opened)."""
    import zarr

    group = zarr.open_group(view.group.store, path=view.group.path, mode="r")
    return attrs_json.read(group.attrs)


def stats_path(digest: str) -> str:
    """Where the statistics with hash ``digest`` live, relative to the view: one folder per version."""
    return f"{STATS}/{digest.split(':', 1)[-1][:16]}"


def read_stats(view) -> dict[str, np.ndarray]:
    """The statistics the view's attrs name, checked against their recorded hash.

    Attrs that name arrays which are missing or differ raise a one-line ``CacheFormatError``
    (statistics are published arrays-first, so this only happens to a damaged cache).
    """
    stats = view_attrs(view).get("stats")
    if not stats:
        raise UsageError(f"{view.key} has no statistics yet: run 'featcache stats' first")
    path = stats.get("path", STATS)  # caches written before versioned statistics keep them in stats/
    try:
        arrays = read_stats_at(view, path, stats.get("arrays"))
    except (FileNotFoundError, KeyError) as e:
        raise CacheFormatError(f"{view.key}: its attrs name statistics {stats.get('hash')} under {path}, but "
                               f"{e} is missing: run 'featcache stats --recompute' (or re-extract an int8-phis view)"
                               ) from None
    if stats_digest(arrays) != stats.get("hash"):
        raise CacheFormatError(f"{view.key}: the statistics under {path} do not match their recorded hash "
                               f"{stats.get('hash')} (run 'featcache verify')")
    return arrays


def read_stats_at(view, path: str, names: list[str] | None) -> dict[str, np.ndarray]:
    """The arrays ``names`` (all when None) of the statistics folder ``path`` of ``view``."""
    import zarr

    group = zarr.open_group(view.group.store, path=f"{view.group.path}/{path}", mode="r")
    if names is None:
        return {name: arr[...] for name, arr in group.arrays()}
    return {name: group[name][...] for name in names}


def load_int8_phis(view) -> Int8Phis:
    """The int8-phis transform of ``view``, checked against the stats hash its codes were written with."""
    attrs = view_attrs(view)
    quant, stats = attrs.get(QUANTIZATION), attrs.get("stats")
    if quant is None:
        raise UsageError(f"{view.key} stores int8-phis codes but has no calibration yet: "
                         "run 'featcache extract' to calibrate it")
    if stats is None or stats.get("hash") != quant["stats_hash"]:
        raise CacheFormatError(f"{view.key}: its int8 codes were written with statistics {quant['stats_hash']}, "
                               f"the view now holds {None if stats is None else stats.get('hash')}: "
                               "the codes cannot be decoded")
    try:
        arrays = read_stats(view)
    except CacheFormatError as e:
        raise CacheFormatError(f"{e}: the int8 codes cannot be decoded") from None
    return Int8Phis(arrays["mean"], arrays["rotation"], arrays["inverse"], float(quant["scale"]), quant.get("knee"),
                    quant["stats_hash"])
