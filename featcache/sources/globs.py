"""Globs over local folders and object stores, as ``featcache index`` lists them.

A local glob follows links to folders (as ``glob.glob`` does) but enters each real folder once, so
a link loop ends; files come out sorted by path. On other filesystems fsspec's own ``glob`` lists.
"""

from __future__ import annotations

import fnmatch
import os

from featcache.fsio import Location, locate

GLOB_CHARS = "*?["


def glob_paths(pattern: str) -> tuple[Location, str, list[str], list[tuple[str, str]]]:
    """(the pattern's location, the folder above its first wildcard, the sorted paths of the files that
    match, (folder, reason) of folders that could not be listed)."""
    loc = locate(pattern)
    static = loc.path[: min(loc.path.find(c) for c in GLOB_CHARS if c in loc.path)]
    prefix = static[: static.rfind("/") + 1] if "/" in static else ""
    top = prefix.rstrip("/") or "/"
    if loc.is_local:
        paths, unlisted = glob_local(top, loc.path[len(prefix):])
        return loc, top, sorted(paths), unlisted
    paths = [p for p, info in loc.fs.glob(loc.path, detail=True).items() if info["type"] == "file"]
    return loc, top, sorted(paths), []


def glob_local(top: str, pattern: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Non-directory entries below ``top`` whose relative path matches ``pattern`` (``glob.glob``'s
    rules, ``**`` recursive), and (folder, reason) of folders that could not be listed. Links to
    folders are followed, but each real folder (st_dev, st_ino) is entered once, under its first path
    in sorted order: a link loop ends, and nothing is listed twice."""
    segments, seen = tuple(pattern.split("/")), set()
    stack, files, unlisted = [(top, (), True)], [], []
    while stack:  # depth first, children in sorted order: files come out sorted
        path, parts, is_dir = stack.pop()
        if not is_dir:
            files += [path] if _glob_match(parts, segments) else []
            continue
        try:
            if _first_visit(path, seen):
                stack += reversed(_children(path, parts, segments))
        except (FileNotFoundError, NotADirectoryError):
            continue  # vanished while listing, or the glob's fixed part is not a folder: nothing there
        except OSError as e:
            unlisted.append((path, f"cannot list folder: {e.strerror or e}"))
    return files, unlisted


def _first_visit(path: str, seen: set) -> bool:
    st = os.stat(path)
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


def _children(path: str, parts: tuple, segments: tuple) -> list[tuple[str, tuple, bool]]:
    """(path, relative parts, is folder) of the entries of ``path`` that the pattern may reach, in the
    order their paths sort as strings (a folder ``a`` sorts as ``a/``)."""
    with os.scandir(path) as it:
        kids = [(e.path, (*parts, e.name), e.is_dir()) for e in it]
    kids = [k for k in kids if not k[2] or _glob_match(k[1], segments, partial=True)]
    return sorted(kids, key=lambda k: k[1][-1] + "/" if k[2] else k[1][-1])


def _glob_match(parts: tuple, segments: tuple, partial: bool = False) -> bool:
    """Whether the path ``parts`` matches the glob ``segments`` (``partial``: whether a path below
    the folder ``parts`` could)."""
    if not parts:
        return bool(segments) if partial else all(s == "**" for s in segments)
    if not segments:
        return False
    if segments[0] == "**":  # zero or more folders whose names do not start with a dot
        return _glob_match(parts, segments[1:], partial) or (
            not parts[0].startswith(".") and _glob_match(parts[1:], segments, partial))
    return _name_match(parts[0], segments[0]) and _glob_match(parts[1:], segments[1:], partial)


def _name_match(name: str, segment: str) -> bool:
    if not any(c in segment for c in GLOB_CHARS):
        return name == segment
    if name.startswith(".") and not segment.startswith("."):
        return False  # as in glob.glob: a wildcard does not match a leading dot
    return fnmatch.fnmatchcase(name, segment)
