"""``TeacherSpec``: everything needed to reproduce a teacher's view of an image.

Preprocessing is derived from the spec, never typed into pipeline code (STYLE.md): input size,
patch, mean/std, resize mode. The spec is saved in each view's attrs, so a reader knows exactly
which weights (source, revision, hash) and which preprocessing produced the numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from featcache.errors import CacheFormatError, UsageError

SIZE_RULES = ("fixed", "multiple")  # fixed: only input_size; multiple: any multiple of the patch
SUMMARY_KINDS = ("pooler", "cls", "mean")


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher's identity, geometry and preprocessing."""

    family: str
    name: str  # the teacher part of a view key, e.g. "dinov3" in "dinov3@224"
    source: str
    revision: str | None
    weights_hash: str | None
    model_type: str
    patch_size: int
    input_size: tuple[int, int]  # native (H, W)
    size_rule: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "bilinear"
    antialias: bool = True
    channels: int = 0  # dense C
    summary_channels: int = 0
    summary_kind: str = "pooler"
    prefix_tokens: int = 0  # CLS + registers before the patch tokens (dropped from dense)
    dtype: str = "float32"  # compute dtype: float32 on CPU, bfloat16 autocast on CUDA

    def __post_init__(self):
        for name in ("input_size", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.size_rule not in SIZE_RULES:
            raise UsageError(f"size_rule {self.size_rule!r} is not one of {SIZE_RULES}")
        if self.summary_kind not in SUMMARY_KINDS:
            raise UsageError(f"summary_kind {self.summary_kind!r} is not one of {SUMMARY_KINDS}")

    def check_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The input size if this teacher can take it, else a UsageError saying which sizes it takes."""
        size = (int(size[0]), int(size[1]))
        if self.size_rule == "fixed" and size != self.input_size:
            raise UsageError(f"{self.name} takes only {self.input_size[0]}x{self.input_size[1]} inputs, "
                             f"not {size[0]}x{size[1]} (its position embeddings are fixed)")
        if size[0] % self.patch_size or size[1] % self.patch_size or min(size) < self.patch_size:
            raise UsageError(f"{self.name} needs input sizes that are multiples of its patch "
                             f"{self.patch_size}, not {size[0]}x{size[1]}")
        return size

    def grid(self, size: tuple[int, int] | None = None) -> tuple[int, int]:
        """Patch grid (h, w) for an input size (the native one by default)."""
        h, w = self.check_size(size or self.input_size)
        return h // self.patch_size, w // self.patch_size

    def mosaic_tile(self, k: int) -> tuple[int, int]:
        """Per-image input size when ``k`` x ``k`` images share one native-size input (DESIGN.md §4)."""
        H, W = self.input_size
        if k < 1 or H % k or W % k or (H // k) % self.patch_size or (W // k) % self.patch_size:
            sizes = [m for m in range(2, 9) if not H % m and not (H // m) % self.patch_size]
            raise UsageError(f"{self.name} cannot take a {k}x{k} mosaic: {H}x{W}/{k} is not a whole number of "
                             f"{self.patch_size}-pixel patches (mosaic sizes that fit: {sizes or 'none'})")
        return H // k, W // k

    def view_key(self, size: tuple[int, int] | None = None, mosaic: int = 1) -> str:
        """``<name>@<size>``; a mosaic view is ``<name>-mosaic<k>@<tile size>``."""
        name = self.name if mosaic == 1 else f"{self.name}-mosaic{mosaic}"
        h, w = size or (self.mosaic_tile(mosaic) if mosaic > 1 else self.input_size)
        return f"{name}@{h}" if h == w else f"{name}@{h}x{w}"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CacheFormatError(f"teacher spec holds unknown keys {sorted(unknown)}")
        return cls(**d)
