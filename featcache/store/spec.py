"""What one cached teacher view is: the ``ViewSpec`` saved in the view's attrs.

A reader rebuilds everything it needs to interpret the stored numbers from these attrs
(DESIGN.md §2), never from the current code's defaults.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from featcache.errors import CacheFormatError, UsageError
from featcache.store.codec import Codec, codec_named

FORMAT_VERSION = 1
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*@[0-9]+(x[0-9]+)?$")
#: Keys of a view's attrs["featcache"] that are annotations added later, not part of the spec.
ANNOTATIONS = ("format", "stats", "quantization", "created")


def check_view_key(key: str) -> str:
    """A view key is ``<teacher>@<input size>`` (e.g. ``dinov3@224``, ``sam3@1008``)."""
    if not _KEY.match(key):
        raise UsageError(f"bad view key {key!r}: expected '<teacher>@<size>', e.g. 'dinov3@224'")
    return key


@dataclass(frozen=True)
class ViewSpec:
    """Shape and provenance of one teacher view: ``dense (N, h, w, C)`` and ``summary (N, Cs)``; the dense
    array stores ``stored_channels`` values of the codec's dtype per token (C for float codecs).

    ``tile`` is the spatial inner chunk (th, tw) of one image's dense map; it defaults to the
    whole grid. ``teacher`` holds the teacher's own spec (a ``TeacherSpec.to_dict()``).
    """

    key: str
    grid: tuple[int, int]
    channels: int
    summary_channels: int
    input_size: tuple[int, int] | None = None
    dtype: str | None = None  # the dense array's stored dtype, set by the codec
    codec: str = "f16"
    tile: tuple[int, int] | None = None
    view_policy: str = "squash"
    teacher: dict = field(default_factory=dict)
    upsampler: dict | None = None
    mosaic: int = 1  # k: each image was one tile of a k x k mosaic at the teacher's native size

    def __post_init__(self):
        check_view_key(self.key)
        for name in ("grid", "input_size", "tile"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _pair(name, value))
        if self.tile is None:
            object.__setattr__(self, "tile", self.grid)
        if self.dtype is None:
            object.__setattr__(self, "dtype", self.codec_type.dtype)
        self._validate()

    def _validate(self) -> None:
        if self.channels < 1 or self.summary_channels < 0:
            raise UsageError(f"view {self.key}: channels must be >= 1 and summary_channels >= 0")
        if self.codec_type.dtype != self.dtype:
            raise UsageError(f"view {self.key}: codec {self.codec!r} stores {self.codec_type.dtype}, not {self.dtype}")
        self.stored_channels  # a width the codec cannot store: its one line
        if self.mosaic < 1:
            raise UsageError(f"view {self.key}: mosaic must be >= 1")
        if any(g % t for g, t in zip(self.grid, self.tile)):
            raise UsageError(f"view {self.key}: tile {self.tile} does not divide the grid {self.grid}")

    @property
    def codec_type(self) -> type[Codec]:
        """The class of the view's codec (what it stores, whether it needs calibration); an unknown
        name is a UsageError listing the registered ones."""
        return codec_named(self.codec, f"view {self.key}")

    @property
    def stored_channels(self) -> int:
        """The dense array's last dimension: ``channels`` for float codecs, the codec's own width else
        (int4-pca: ⌊C/2⌋ bytes per token)."""
        try:
            return self.codec_type.stored_width(self.channels)
        except UsageError as e:
            raise UsageError(f"view {self.key}: {e}") from None

    @property
    def tiles(self) -> tuple[int, int]:
        """Number of spatial tiles per image along (rows, cols)."""
        return (self.grid[0] // self.tile[0], self.grid[1] // self.tile[1])

    def to_dict(self) -> dict:
        """A JSON-ready dict; :meth:`from_dict` rebuilds an equal spec."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ViewSpec":
        """Rebuild a spec from attrs; annotations (stats, format, quantization) are ignored, unknown keys refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - set(ANNOTATIONS)
        if unknown:
            raise CacheFormatError(f"view attrs hold unknown keys {sorted(unknown)}: written by a newer featcache?")
        d = {k: v for k, v in d.items() if k in names}
        if d.get("codec") == "float32":  # written by featcache before 'codec' was a job setting
            d["codec"] = "f32"
        return cls(**d)


def _pair(name: str, value) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise UsageError(f"{name} must be two positive integers, got {value}")
    return value
