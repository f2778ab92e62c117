"""featcache: run vision teachers once, cache what they see, distil students from the cache.

The Python API mirrors the CLI: :func:`index` builds a manifest, :func:`open_cache` opens a cache
with its views, manifest and readers, :func:`verify` checks it, :func:`inspect` summarises it.
"""

__version__ = "0.1.0"

from featcache.api import index, inspect, open_cache, verify  # noqa: E402

__all__ = ["__version__", "index", "inspect", "open_cache", "verify"]
