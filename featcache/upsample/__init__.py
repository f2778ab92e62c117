"""Upsamplers: a fixed-resolution teacher's features at a multiple of its grid (ALGORITHMS.md §7).

An upsampler is not a teacher family: it wraps one, and has its own registry. ``featsharp`` is
the one featcache ships, with its trainer (:mod:`featcache.upsample.training`).
"""

from featcache.upsample.featsharp import FeatSharp, FeatSharpConfig

UPSAMPLERS = {"featsharp": (FeatSharp, FeatSharpConfig)}

__all__ = ["FeatSharp", "FeatSharpConfig", "UPSAMPLERS"]
