"""The codec contract: how a view's dense features are stored, and read back in each space.

After zarr-python's codecs: a codec is a frozen dataclass registered by name. It describes itself
as the view's attrs store it (:meth:`Codec.to_dict`: the ``codec`` name and, when it has one, its
``quantization``; :meth:`Codec.from_attrs` rebuilds it), says what it stores (``dtype``, bytes per
value), whether it must be calibrated before the first write, encodes on the device (torch) and
decodes to each space of :data:`SPACES`. A new codec is one class under :func:`register_codec`;
nothing outside the codec classes compares codec names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np

from featcache.errors import CacheFormatError, UsageError
from featcache.registry import Registry
from featcache.store.statsio import read_stats, view_attrs

#: What a read returns: the teacher's features, the view's PHI-S space, or the stored values as they are.
SPACES = ("raw", "phis", "stored")
QUANTIZATION = "quantization"  # the attrs key holding a codec's fitted parameters (int8-phis: scale, stats hash)
#: (mean μ, rotation R) of the view's PHI-S transform, ``y = (x − μ) Rᵀ``, asked for only when needed
PhisSource = Callable[[], tuple[np.ndarray, np.ndarray]]

_CODECS: Registry[type["Codec"]] = Registry("codec")


def register_codec(cls: type["Codec"]) -> type["Codec"]:
    """Class decorator: add a codec to the registry under its ``name`` (a duplicate name is an error)."""
    return _CODECS.add(cls.name, cls)


def codec_names() -> list[str]:
    """The registered codec names, sorted."""
    return _CODECS.names()


def codec_named(name: str, where: str | None = None) -> type["Codec"]:
    """The codec class registered as ``name``; an unknown name is a UsageError listing the known ones
    (after ``where``, e.g. the teacher or view that names it)."""
    return _CODECS.get(name, where)


def codec_from_attrs(attrs: dict) -> "Codec":
    """The codec a view's attrs (or ``inspect``'s summary of them) describe, without its statistics."""
    return codec_named(attrs["codec"]).from_attrs(attrs)


def check_space(space: str) -> str:
    if space not in SPACES:
        raise UsageError(f"space {space!r} is not one of {', '.join(SPACES)}")
    return space


def calibrated_stats(view, name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(the ``quantization`` attrs, the statistics arrays) of a view whose ``name`` codes were fitted to
    its statistics, checked against the hash the codes were written with (each failure one line)."""
    attrs = view_attrs(view)
    quant, stats = attrs.get(QUANTIZATION), attrs.get("stats")
    if quant is None:
        raise UsageError(f"{view.key} stores {name} codes but has no calibration yet: "
                         "run 'featcache extract' to calibrate it")
    if stats is None or stats.get("hash") != quant["stats_hash"]:
        raise CacheFormatError(f"{view.key}: its {name} codes were written with statistics {quant['stats_hash']}, "
                               f"the view now holds {None if stats is None else stats.get('hash')}: "
                               "the codes cannot be decoded")
    try:
        return quant, read_stats(view)
    except CacheFormatError as e:
        raise CacheFormatError(f"{e}: the {name} codes cannot be decoded") from None


@dataclass(frozen=True)
class Codec:
    """One way of storing a view's dense features. Subclasses set the class attributes and
    implement :meth:`encode`, :meth:`encode_numpy` and :meth:`to_raw` (and :meth:`to_phis` when the
    PHI-S space has a shorter way than raw floats and the view's transform)."""

    name: ClassVar[str]
    dtype: ClassVar[str]  # numpy name of the dense array's stored dtype
    summary_dtype: ClassVar[str]  # ... and of the summary array's
    #: parameters (and the PHI-S statistics they depend on) are fitted before the first write, then frozen
    needs_calibration: ClassVar[bool] = False
    #: the stored values are the raw features cast to a float type: a read needs no decoding, and a
    #: lookup or an affine map (the PHI-S transform) may run on them as stored, on the device
    stores_raw: ClassVar[bool] = False
    #: the training loader hands the stored values to the training device, which decodes them there
    #: (:meth:`decode_torch`) before the crop lookup; otherwise the loader decodes on its CPU
    decodes_on_device: ClassVar[bool] = False
    #: a round trip of finite features (within the calibration's reach) keeps Σ(x̂ − x)² ≤ error_bound · Σx²
    error_bound: ClassVar[float]
    bytes_per_value: ClassVar[int]  # of the dense array, from ``dtype``

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "dtype" in cls.__dict__:
            cls.bytes_per_value = np.dtype(cls.dtype).itemsize

    # ---- self-description ------------------------------------------------------------------

    @classmethod
    def stored_width(cls, channels: int) -> int:
        """The dense array's last dimension for features of ``channels`` channels (a width the codec
        cannot store is a one-line UsageError)."""
        return channels

    @classmethod
    def token_bytes(cls, channels: int) -> int:
        """Bytes one patch token of ``channels`` channels takes in the dense array."""
        return cls.stored_width(channels) * cls.bytes_per_value

    @classmethod
    def stats_bytes(cls, channels: int) -> int:
        """Bytes of the arrays :meth:`fit` adds to a view's statistics (none for most codecs)."""
        return 0

    @classmethod
    def fit(cls, tokens: np.ndarray, arrays: dict[str, np.ndarray], phis, seed: int = 0) -> tuple[dict, dict]:
        """A codec that needs calibration: fit its parameters to the raw float32 calibration ``tokens``
        (n, C), given the view's new statistics ``arrays`` and their ``PhiS``. Returns (arrays to add to
        the statistics, covered by their hash; the ``quantization`` record for the view's attrs)."""
        raise NotImplementedError(f"{cls.name} needs no calibration")

    @classmethod
    def nonfinite_tokens(cls, stored: np.ndarray) -> np.ndarray:
        """Which tokens of the stored values (..., W) decode to NaN or Inf (``verify``'s check)."""
        if np.dtype(cls.dtype).kind != "f":
            return np.zeros(np.shape(stored)[:-1], dtype=bool)
        return ~np.isfinite(stored).all(axis=-1)

    @classmethod
    def from_attrs(cls, attrs: dict) -> "Codec":
        """The codec the view attrs ``attrs`` describe (its ``quantization``, when it has one)."""
        return cls()

    @classmethod
    def from_fitted(cls, arrays: dict[str, np.ndarray], quantization: dict) -> "Codec":
        """A calibrated codec from its statistics ``arrays`` and ``quantization`` record (what :meth:`fit` and
        ``Calibration`` return, or what :meth:`open` reads from a view), ready to encode and decode."""
        raise NotImplementedError(f"{cls.name} needs no calibration")

    @classmethod
    def open(cls, view) -> "Codec":
        """The codec of ``view``, ready to encode and decode (with the statistics it needs, checked)."""
        return cls.from_attrs(view.attrs)

    def to_dict(self) -> dict:
        """What the view's attrs store of this codec; :meth:`from_attrs` rebuilds an equal codec."""
        return {"codec": self.name}

    @property
    def calibrated(self) -> bool:
        """Whether its parameters are fitted (always, for a codec that needs no calibration)."""
        return True

    def describe(self) -> str:
        """One line for ``inspect``: the name, and what was fitted."""
        return self.name

    def commit_info(self) -> dict:
        """What each shard's commit records of the codec its values were encoded with."""
        return {}

    # ---- values ----------------------------------------------------------------------------

    @property
    def torch_dtype(self):
        """The stored dtype as torch's (what :meth:`encode` returns)."""
        import torch

        return getattr(torch, np.dtype(self.dtype).name)

    def encode(self, x):
        """Raw features (..., C), a torch tensor on any device → stored values (same device)."""
        raise NotImplementedError

    def encode_numpy(self, x: np.ndarray) -> np.ndarray:
        """Raw features (..., C) → stored values, on the host."""
        raise NotImplementedError

    def decode(self, stored: np.ndarray, space: str = "raw", phis: PhisSource | None = None) -> np.ndarray:
        """Stored values → ``space`` (:data:`SPACES`): ``stored`` as they are, ``raw`` the teacher's
        features, ``phis`` in the view's PHI-S space (``phis()`` gives its transform, when needed)."""
        if check_space(space) == "stored":
            return stored
        return self.to_raw(stored) if space == "raw" else self.to_phis(stored, phis)

    def decode_torch(self, stored, space: str = "raw", phis: PhisSource | None = None):
        """:meth:`decode` of a torch tensor, float32 on the tensor's device (this default goes through
        the host; a codec with ``decodes_on_device`` decodes there)."""
        import torch

        decoded = self.decode(stored.cpu().numpy(), space, phis)
        return torch.from_numpy(np.asarray(decoded, dtype=np.float32)).to(stored.device)

    def to_raw(self, stored: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def to_phis(self, stored: np.ndarray, phis: PhisSource | None = None) -> np.ndarray:
        """Float32 in the view's PHI-S space: raw floats, then ``(x − μ) Rᵀ``."""
        if phis is None:
            raise UsageError(f"{self.name}: reading the PHI-S space takes the view's statistics")
        mean, rotation = phis()
        return (self.to_raw(stored).astype(np.float32) - mean) @ rotation.T

    def _ready(self) -> None:
        """A calibrated codec refuses, in one line, to encode or decode without its calibration and the
        statistics it was fitted to (``mean``: set by ``open``, absent when rebuilt from attrs alone)."""
        if not self.calibrated:
            raise UsageError(f"{self.name} codes cannot be encoded or decoded before the view is calibrated: "
                             "run 'featcache extract' to calibrate it")
        if getattr(self, "mean", None) is None:
            raise UsageError(f"{self.name}: this codec was rebuilt from attrs alone; open it from its view "
                             f"({type(self).__name__}.open) to read the statistics its codes are in")

    @classmethod
    def dtype_in(cls, space: str) -> np.dtype:
        """The dtype :meth:`decode` returns in ``space``."""
        stored = check_space(space) == "stored" or (space == "raw" and cls.stores_raw)
        return np.dtype(cls.dtype) if stored else np.dtype(np.float32)
