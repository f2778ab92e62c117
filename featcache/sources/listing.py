"""Which container files a source names: a tar or Parquet file, a glob, or a brace pattern of them.

A source is a container source when it ends in ``.tar`` or ``.parquet``; a single ``.parquet`` file
is one only when it is an image table (else it is a list of files with a ``uri`` column). Each file
comes with its name relative to the source's fixed part (what makes a repeated sample key unique).
"""

from __future__ import annotations

import os

from featcache.errors import SourceNotFoundError, UsageError
from featcache.sources import parquet, patterns
from featcache.sources.globs import glob_paths
from featcache.store.backend import GLOB_CHARS
from featcache.store.location import Location, locate

#: Container kinds by the file name's suffix.
KINDS = {".tar": "tar", ".parquet": "parquet"}


def kind_of(src: str) -> str | None:
    """``tar`` or ``parquet`` when ``src`` names files of that kind by its suffix, else None."""
    return KINDS.get(os.path.splitext(src.rstrip("/"))[1].lower())


def containers(src: str, image_column: str | None) -> tuple[str, list[tuple[Location, str]]] | None:
    """(kind, [(file, name relative to the source)]) when ``src`` names tars or Parquet image tables;
    None for every other source (folders, globs of images, lists)."""
    kind = kind_of(src)
    if kind is None:
        return None
    if patterns.has_braces(src) and not _exists(src):
        return kind, _expanded(src)
    if any(c in src for c in GLOB_CHARS):
        return kind, _globbed(src)
    loc = locate(src)
    if loc.isdir():
        return None  # a folder named like a file: a folder source
    if not loc.exists():
        raise SourceNotFoundError(f"no such file: {src}")
    if kind == "parquet" and not parquet.is_image_table(loc, image_column):
        return None  # a list of files
    return kind, [(loc, os.path.basename(loc.path))]


def _exists(src: str) -> bool:
    return locate(src).exists()


def _expanded(src: str) -> list[tuple[Location, str]]:
    """Each name of a brace pattern (globbed when it holds wildcards), in the pattern's order."""
    base = _base(src[:src.index("{")])
    files = []
    for name in patterns.expand(src):
        found = _globbed(name, missing_ok=True) if any(c in name for c in GLOB_CHARS) else [(locate(name), "")]
        files += [(loc, _relative(loc, base)) for loc, _ in found]
    return files


def _globbed(pattern: str, missing_ok: bool = False) -> list[tuple[Location, str]]:
    loc, top, paths, _ = glob_paths(pattern)
    if not paths and not missing_ok:
        raise UsageError(f"no files match {pattern}")
    base = _base(pattern[:min(pattern.find(c) for c in GLOB_CHARS if c in pattern)])
    files = [loc.at(p) for p in paths]
    return [(f, _relative(f, base)) for f in files]


def _base(static: str) -> str:
    """The URI of the folder above the fixed part of a pattern."""
    folder = static[:static.rfind("/") + 1] if "/" in static else "."
    return locate(folder).uri.rstrip("/")


def _relative(loc: Location, base: str) -> str:
    return loc.uri[len(base):].lstrip("/") if loc.uri.startswith(base + "/") else os.path.basename(loc.path)
