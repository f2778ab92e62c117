"""The cache format (DESIGN.md §2): views in Zarr v3, Parquet tables, commit markers."""

from featcache.store.cache import Cache, View
from featcache.store.commits import Commit
from featcache.store.spec import FORMAT_VERSION, ViewSpec

__all__ = ["Cache", "Commit", "FORMAT_VERSION", "View", "ViewSpec"]
