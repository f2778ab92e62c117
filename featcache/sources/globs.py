"""Globs over local folders and object stores, as ``featcache index`` lists them.

The backend globs (``featcache.store.local`` follows links to folders but enters each real folder
once, so a link loop ends); files come out sorted by path.
"""

from __future__ import annotations

from featcache.store.backend import glob_top
from featcache.store.location import Location, locate


def glob_paths(pattern: str) -> tuple[Location, str, list[str], list[tuple[str, str]]]:
    """(the pattern's location, the folder above its first wildcard, the sorted paths of the files that
    match, (folder, reason) of folders that could not be listed)."""
    loc = locate(pattern)
    _, top = glob_top(loc.path)
    paths, unlisted = loc.backend.glob(loc.path)
    return loc, top, paths, unlisted
