"""The Python API; each function is what the CLI command of the same name calls."""

from __future__ import annotations

from featcache.store.cache import Cache


def open_cache(uri) -> Cache:
    """Open the cache at ``uri`` (local directory or fsspec URL)."""
    return Cache.open(uri)


def index(*args, **kwargs):
    from featcache.manifest import index as _index

    return _index(*args, **kwargs)


def verify(uri, **kwargs):
    from featcache.store.verify import verify as _verify

    return _verify(open_cache(uri), **kwargs)


def inspect(uri) -> dict:
    from featcache.store.inspect import summarize

    return summarize(open_cache(uri))
