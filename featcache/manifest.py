"""``featcache index``: turn an image source into ``ROOT/manifest.parquet`` (DESIGN.md §2).

A source is a folder or a glob on any fsspec filesystem, or a ``.parquet``/``.csv`` list with a
``uri`` column (its other columns are kept). Sizes come from image headers only. The order, and
so every ``index``, is deterministic: sorted relative paths for folders and globs, list order for
lists. ``image_id`` is the path relative to the folder (or the glob's fixed prefix), or the list's
``image_id`` column, or its ``uri``. Files that cannot be used are listed in ``errors.parquet``
with a reason; the index goes on without them. Each file's ``size`` and ``mtime`` (local files) or
``etag`` (object stores) are recorded too, so that extraction can refuse a file replaced since.

A local glob follows links to folders (as ``glob.glob`` does) but enters each real folder once, so
a link loop ends; a folder source does not follow links to folders at all (``os.walk``'s default).
"""

from __future__ import annotations

import fnmatch
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pacsv

from featcache.errors import ImageError, SourceNotFoundError, UsageError
from featcache.fsio import Location, check_reachable, locate
from featcache.images import header_of_local, header_of_remote, is_image_name
from featcache.store import tables
from featcache.store.cache import Cache

_GLOB_CHARS = "*?["
_LIST_SUFFIXES = (".parquet", ".csv")
_RESERVED = ("index", "width", "height", *tables.FILE_COLUMNS)
#: Reason recorded for an image whose bytes are not those indexed (see :func:`changed_since_indexing`).
CHANGED = "changed since indexing (re-index to accept the change)"


@dataclass(frozen=True)
class Entry:
    """One file of the source: where it is, its id, and the list's extra columns."""

    loc: Location
    image_id: str
    extra: dict = field(default_factory=dict)


@dataclass
class IndexResult:
    """What ``index`` did: images indexed, files that failed, files ignored (not images)."""

    root: str
    images: int
    failed: list[tuple[str, str]]
    ignored: list[tuple[str, str]]
    seconds: float

    @property
    def files_per_second(self) -> float:
        return (self.images + len(self.failed)) / max(self.seconds, 1e-9)


def index(src, out, workers: int | None = None) -> IndexResult:
    """Index ``src`` into ``out/manifest.parquet`` (and ``out/errors.parquet``).

    ``workers`` threads read headers; by default 1 for local files (header parsing holds the GIL,
    threads only add contention) and 16 for remote ones (they hide request latency).
    """
    t0 = time.perf_counter()
    check_reachable(src)  # an unusable object store is refused before listing, the output before reading headers
    check_reachable(out, write=True)
    entries, ignored = list_source(os.fspath(src))
    results = _read_headers(entries, workers)
    good = [(e, h) for e, h in zip(entries, results) if not isinstance(h, ImageError)]
    failed = [(e, h) for e, h in zip(entries, results) if isinstance(h, ImageError)]
    if not good:
        reasons = "; ".join(f"{os.path.basename(e.loc.uri)}: {h.reason}" for e, h in failed[:3])
        raise UsageError(f"none of the {len(entries)} files in {src} is a readable image ({reasons})")
    root = locate(out)
    manifest = _manifest_table(good)
    _check_replaceable(root, manifest)
    _write_index_errors(root, [(e.loc.uri, e.image_id, h.reason) for e, h in failed] +
                        [(uri, None, reason) for uri, reason in ignored])
    tables.write_table(root.join(tables.MANIFEST), manifest)  # last: the manifest is index's commit point
    return IndexResult(root.uri, manifest.num_rows, [(e.loc.uri, h.reason) for e, h in failed], ignored,
                       time.perf_counter() - t0)


# ---- listing ------------------------------------------------------------------------------


def list_source(src: str) -> tuple[list[Entry], list[tuple[str, str]]]:
    """Entries to index and (uri, reason) of files ignored because they are not images."""
    if any(c in src for c in _GLOB_CHARS):
        return _list_glob(src)
    loc = locate(src)
    if src.lower().endswith(_LIST_SUFFIXES) and not loc.fs.isdir(loc.path):
        return _list_table(loc), []
    if not loc.fs.exists(loc.path):
        raise SourceNotFoundError(f"no such folder: {src}")
    if not loc.fs.isdir(loc.path):
        raise UsageError(f"{src} is a file: SRC must be a folder, a glob, or a .parquet/.csv list with a 'uri' column")
    files = _walk_local(loc.path) if loc.is_local else sorted(loc.fs.find(loc.path))
    entries, ignored = _split(loc, files, loc.path)
    if not entries:
        raise UsageError(f"no image files in {src} ({len(ignored)} other files)")
    return entries, ignored


def _walk_local(top: str) -> list[str]:
    """Every non-directory entry below ``top`` (dangling links and FIFOs included), sorted."""
    out = []
    for dirpath, _, filenames in os.walk(top):
        out += [os.path.join(dirpath, f) for f in filenames]
    return sorted(out, key=lambda p: p[len(top):].split(os.sep))


def _split(base: Location, paths: list[str], prefix: str) -> tuple[list[Entry], list[tuple[str, str]]]:
    entries, ignored = [], []
    for path in paths:
        rel = path[len(prefix):].lstrip("/" + os.sep).replace(os.sep, "/")
        loc = Location(base.fs, path, path if base.is_local else base.fs.unstrip_protocol(path))
        if is_image_name(path):
            entries.append(Entry(loc, rel))
        else:
            ignored.append((loc.uri, f"not an image file (extension {os.path.splitext(path)[1] or 'none'!r})"))
    return entries, ignored


def _list_glob(pattern: str) -> tuple[list[Entry], list[tuple[str, str]]]:
    loc = locate(pattern)
    static = loc.path[: min(loc.path.find(c) for c in _GLOB_CHARS if c in loc.path)]
    prefix = static[: static.rfind("/") + 1] if "/" in static else ""
    unlisted = []
    if loc.is_local:
        paths, unlisted = _glob_local(prefix.rstrip("/") or "/", loc.path[len(prefix):])
    else:
        paths = [p for p, info in loc.fs.glob(loc.path, detail=True).items() if info["type"] == "file"]
    entries, ignored = _split(loc, sorted(paths), prefix.rstrip("/") or "/")
    if not entries:
        raise UsageError(f"no image files match {pattern}")
    return entries, ignored + unlisted


def _glob_local(top: str, pattern: str) -> tuple[list[str], list[tuple[str, str]]]:
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
    if not any(c in segment for c in _GLOB_CHARS):
        return name == segment
    if name.startswith(".") and not segment.startswith("."):
        return False  # as in glob.glob: a wildcard does not match a leading dot
    return fnmatch.fnmatchcase(name, segment)


def _list_table(loc: Location) -> list[Entry]:
    try:
        with loc.fs.open(loc.path, "rb") as f:
            table = pacsv.read_csv(f) if loc.path.lower().endswith(".csv") else tables.pq.read_table(f)
    except FileNotFoundError as e:
        raise SourceNotFoundError(f"no such list: {loc.uri}") from e
    except (pa.ArrowInvalid, OSError) as e:
        raise UsageError(f"cannot read the list {loc.uri}: {e}") from e
    if "uri" not in table.column_names:
        raise UsageError(f"the list {loc.uri} has no 'uri' column (columns: {', '.join(table.column_names)})")
    if table.num_rows == 0:
        raise UsageError(f"the list {loc.uri} is empty")
    base = os.path.dirname(loc.uri)
    rows = table.to_pylist()
    return [_list_entry(row, base, loc.uri, n) for n, row in enumerate(rows)]


def _list_entry(row: dict, base: str, list_uri: str, n: int) -> Entry:
    uri = row.pop("uri")
    if not isinstance(uri, str) or not uri:
        raise UsageError(f"row {n} of {list_uri} has no uri")
    if "://" not in uri and not os.path.isabs(uri):
        uri = f"{base}/{uri}" if "://" in base else os.path.join(base, uri)
    image_id = row.pop("image_id", None) or uri
    extra = {k: v for k, v in row.items() if k not in _RESERVED}
    return Entry(locate(uri), str(image_id), extra)


# ---- headers, tables ----------------------------------------------------------------------


def _header(entry: Entry):
    try:
        if entry.loc.is_local:
            return header_of_local(entry.loc.path)
        return header_of_remote(entry.loc.fs, entry.loc.path, entry.loc.uri)
    except ImageError as e:
        return e


def _read_headers(entries: list[Entry], workers: int | None, batch: int = 256) -> list:
    """Headers (or the ImageError) of every entry, in order; threads hide remote latency."""
    if workers is None:
        workers = 1 if all(e.loc.is_local for e in entries) else 16
    batches = [entries[i:i + batch] for i in range(0, len(entries), batch)]
    if workers <= 1 or len(batches) == 1:
        return [_header(e) for e in entries]
    with ThreadPoolExecutor(workers) as pool:
        return [h for hs in pool.map(lambda b: [_header(e) for e in b], batches) for h in hs]


def _manifest_table(good: list) -> pa.Table:
    ids = [e.image_id for e, _ in good]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise UsageError(f"image_id {dup!r} appears more than once in the source")
    columns = {
        "index": pa.array(range(len(good)), pa.int64()),
        "image_id": pa.array(ids, pa.string()),
        "uri": pa.array([e.loc.uri for e, _ in good], pa.string()),
        "width": pa.array([h.width for _, h in good], pa.int32()),
        "height": pa.array([h.height for _, h in good], pa.int32()),
    }
    for name, dtype in tables.FILE_COLUMNS.items():  # only those the filesystem gave for some file
        values = [getattr(h, name) for _, h in good]
        if any(v is not None for v in values):
            columns[name] = pa.array(values, dtype)
    for name in good[0][0].extra:
        columns[name] = pa.array([e.extra.get(name) for e, _ in good])
    return pa.table(columns)


def _check_replaceable(root: Location, manifest: pa.Table) -> None:
    """A manifest under existing features may only be rewritten with the same images in the same order
    (checked against the cache's fingerprint, so a deleted manifest can be restored by indexing again)."""
    if not root.join("features.zarr").exists():
        return
    cache = Cache(root)
    if "manifest" in cache.attrs():
        detail = cache.manifest_difference(manifest)
        if detail:
            raise UsageError(f"{root.uri} already holds features for another image list ({detail}); "
                             "index into a new root")
        return
    old = tables.read_manifest(root)  # a cache from before fingerprints: compare with its manifest
    same = all(old.column(c).equals(manifest.column(c)) for c in ("image_id", "uri")) \
        if old.num_rows == manifest.num_rows else False
    if not same:
        raise UsageError(f"{root.uri} already holds features for another image list; index into a new root")


def _write_index_errors(root: Location, rows: list[tuple[str, str | None, str]]) -> None:
    old = tables.read_errors(root).to_pylist()
    kept = [r for r in old if r["stage"] != "index"]
    new = [{"index": None, "image_id": image_id, "uri": uri, "stage": "index", "view": None, "reason": reason}
           for uri, image_id, reason in rows]
    # always written, empty too: tools featcache does not control read it (an earlier index's rows go)
    tables.write_table(root.join(tables.ERRORS), tables.errors_table(kept + new))


# ---- extraction's check -------------------------------------------------------------------


def changed_since_indexing(loc: Location, data: bytes, size: int | None, mtime: float | None) -> bool:
    """True when ``data``, just read from ``loc``, is not the file indexed: its byte count, or (local
    files) the file's modification time, differs from the manifest's. Nothing recorded: no check."""
    if size is not None and len(data) != size:
        return True
    return mtime is not None and loc.is_local and os.stat(loc.path).st_mtime != mtime
