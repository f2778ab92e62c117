"""featcache: run vision teachers once, cache what they see, distil students from the cache.

The Python API mirrors the CLI: :func:`index` builds a manifest, :func:`open_cache` opens a cache
with its views, manifest and readers, :func:`verify` checks it, :func:`inspect` summarises it.
They are imported on first use, so that the modules that need no cache (teachers, roofline, the
student, the upsampler) import without zarr, as on a GPU machine lent for a benchmark.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "index", "inspect", "open_cache", "verify"]


def __getattr__(name: str):
    if name in __all__:
        from featcache import api

        return getattr(api, name)
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names and the lazy public API (``dir(featcache)`` and completion show what exists)."""
    return sorted(set(globals()) | set(__all__))
