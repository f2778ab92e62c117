"""The ``featcache`` attribute of a group: a JSON object, stored as a JSON string.

Zarr would store the nested object as it is, but xarray copies a group's attributes onto its
Dataset and netCDF accepts only strings, numbers and flat lists there: a nested object made
``ds.to_netcdf()`` fail on every view. A string survives that round trip (``json.loads`` it back).
Caches written before (the object stored as it is) read the same.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from featcache.errors import CacheFormatError

KEY = "featcache"


def decode(value) -> dict:
    """The ``featcache`` attribute's object, from its stored value (a JSON string, a mapping, or absent)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise CacheFormatError(f"the '{KEY}' attribute is not valid JSON ({e})") from None
    if not isinstance(value, Mapping):
        raise CacheFormatError(f"the '{KEY}' attribute holds a {type(value).__name__}, not an object")
    return dict(value)


def encode(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"))


def read(attributes: Mapping) -> dict:
    """``attributes[KEY]`` decoded ({} when absent)."""
    return decode(attributes.get(KEY))


def write(group, obj: dict) -> None:
    """Replace ``group``'s ``featcache`` attribute with ``obj``."""
    group.attrs[KEY] = encode(obj)
