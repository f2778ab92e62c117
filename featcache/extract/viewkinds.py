"""The kinds of view a teacher gives an extract job, one class each: the one place that knows a
kind's input, its forwards, the memory they hold and how it runs the teacher.

- :class:`Plain`: each image resized to ``size`` (the teacher's native size, or a resolution of the
  job), one teacher input per image.
- :class:`Mosaic`: k x k images tiled into one input of the teacher's native size
  (``Teacher.extract_mosaic``); a worker batch takes ``batch`` mosaics, ``batch`` x k² images.
- :class:`Upsampled`: an upsampler's map of a canvas of ``factor`` x the native size (FeatSharp,
  ALGORITHMS.md §7): the teacher runs on the canvas's global view and its factor² tiles, all at its
  native size, in forwards of ``batch`` inputs (``Teacher.extract`` splits them), so a batch of
  ``batch`` images costs 1 + factor² forwards of the size of a plain native view's.

The memory a forward holds (:meth:`ViewKind.forward`: inputs and tokens) serves the pool and batch
estimates (``featcache.extract.pools``, ``limits``) and the roofline of ``featcache plan``
(``featcache.estimate``) alike; the worker (``featcache.extract.worker``) runs the teacher with
:meth:`ViewKind.views` and :meth:`ViewKind.features`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featcache.teachers import TeacherSpec
from featcache.teachers.views import make_views


@dataclass(frozen=True)
class Forward:
    """The teacher forwards one worker batch of a view runs: ``count`` forwards of ``inputs``
    inputs of ``size`` pixels each, for ``images`` source images."""

    size: tuple[int, int]
    inputs: int
    count: int
    images: int

    def tokens(self, teacher: TeacherSpec) -> int:
        """Tokens of one input: its patches and the teacher's prefix tokens."""
        p = teacher.patch_size
        return self.size[0] // p * (self.size[1] // p) + teacher.prefix_tokens


class ViewKind:
    """What every kind answers; see the module docstring."""

    measured = True  # ``featcache plan --measure`` times its forward (an upsampler's efficiency is stated)

    def input_size(self, teacher: TeacherSpec) -> tuple[int, int]:
        """The size of the teacher's inputs for this view."""
        return teacher.input_size

    def images_per_batch(self, batch: int) -> int:
        """Source images a worker batch of ``batch`` takes."""
        return batch

    def forward(self, teacher: TeacherSpec, batch: int) -> Forward:
        """The forwards a worker batch of ``batch`` runs."""
        return Forward(self.input_size(teacher), batch, 1, self.images_per_batch(batch))

    def views(self, teacher: TeacherSpec, images: list, policy: str, device, upsampler=None):
        """(teacher inputs, boxes (B, 4)) of uint8 ``images`` already on ``device``."""
        raise NotImplementedError

    def features(self, teacher, pixels: torch.Tensor, dtype: torch.dtype | None, batch: int, upsampler=None):
        """(dense (B, h, w, C), summary (B, Cs)) of the inputs :meth:`views` made."""
        raise NotImplementedError


@dataclass(frozen=True)
class Plain(ViewKind):
    size: tuple[int, int]

    def input_size(self, teacher: TeacherSpec) -> tuple[int, int]:
        return tuple(self.size)

    def views(self, teacher: TeacherSpec, images: list, policy: str, device, upsampler=None):
        return make_views(images, teacher, size=tuple(self.size), policy=policy, device=device)

    def features(self, teacher, pixels: torch.Tensor, dtype: torch.dtype | None, batch: int, upsampler=None):
        out = teacher.extract(pixels, dtype=dtype)
        return out.dense, out.summary


@dataclass(frozen=True)
class Mosaic(ViewKind):
    k: int

    def images_per_batch(self, batch: int) -> int:
        return batch * self.k ** 2

    def views(self, teacher: TeacherSpec, images: list, policy: str, device, upsampler=None):
        return make_views(images, teacher, policy=policy, device=device, mosaic=self.k)

    def features(self, teacher, pixels: torch.Tensor, dtype: torch.dtype | None, batch: int, upsampler=None):
        out = teacher.extract_mosaic(pixels, self.k, dtype=dtype)
        return out.dense, out.summary


@dataclass(frozen=True)
class Upsampled(ViewKind):
    factor: int
    measured = False

    def forward(self, teacher: TeacherSpec, batch: int) -> Forward:
        return Forward(teacher.input_size, batch, 1 + self.factor ** 2, batch)

    def views(self, teacher: TeacherSpec, images: list, policy: str, device, upsampler=None):
        from featcache.upsample import run

        return run.canvases(images, teacher, self.factor, policy, device)

    def features(self, teacher, pixels: torch.Tensor, dtype: torch.dtype | None, batch: int, upsampler=None):
        """The upsampler's maps in the teacher's raw space, and the global views' summaries."""
        from featcache.upsample import run

        with torch.inference_mode():
            with torch.autocast("cuda", torch.bfloat16, enabled=pixels.device.type == "cuda"):
                out = run.upsample(upsampler, teacher, pixels, batch)
            dense, summary = upsampler.denormalize(out.dense.float()), out.summary
        return (dense, summary) if dtype is None else (dense.to(dtype), summary.to(dtype))

