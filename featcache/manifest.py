"""``featcache index``: turn an image source into ``ROOT/manifest.parquet`` (DESIGN.md §2).

A source is a folder or a glob on any fsspec filesystem, or a ``.parquet``/``.csv`` list with a
``uri`` column (its other columns are kept), or container files (:mod:`featcache.sources`): webdataset
tar shards or Parquet image tables, as a file, a glob or a brace pattern. Sizes come from image
headers only. The order, and
so every ``index``, is deterministic: sorted relative paths for folders and globs, list order for
lists. ``image_id`` is the path relative to the folder (or the glob's fixed prefix), or the list's
``image_id`` column, or its ``uri``. Files that cannot be used are listed in ``errors.parquet``
with a reason; the index goes on without them. Each file's ``size`` and ``mtime`` (local files) or
``etag`` (object stores) are recorded too, so that extraction can refuse a file replaced since.

A local glob follows links to folders (as ``glob.glob`` does) but enters each real folder once, so
a link loop ends; a folder source does not follow links to folders at all (``os.walk``'s default).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pacsv

from featcache.errors import ImageError, SourceNotFoundError, UsageError
from featcache.images import header_of, is_image_name
from featcache.log import LOGGER
from featcache.sources import Member, listing, parquet, tars
from featcache.sources.globs import glob_paths
from featcache.store import tables
from featcache.store.backend import GLOB_CHARS
from featcache.store.cache import Cache
from featcache.store.location import Location, check_reachable, locate

_LIST_SUFFIXES = (".parquet", ".csv")
_RESERVED = ("index", "image_id", "uri", "width", "height", *tables.FILE_COLUMNS, *tables.MEMBER_COLUMNS)
#: manifest column -> Member attribute
_MEMBER_FIELDS = {"container": "container", "member": "name", "member_offset": "offset", "member_length": "length",
                  "row_group": "row_group", "row_in_group": "row"}
#: Reason recorded for an image whose bytes are not those indexed (see :func:`changed_since_indexing`).
CHANGED = "changed since indexing (re-index to accept the change)"


@dataclass(frozen=True)
class Entry:
    """One image of the source: where it is, its id, and the columns its source gives it (a list's
    extra columns, a webdataset sample's labels, a Parquet table's scalar columns)."""

    loc: Location  # the image file, or the container (tar, Parquet file) that holds it
    image_id: str
    extra: dict = field(default_factory=dict)
    member: Member | None = None  # where the image lies inside ``loc``; None: ``loc`` is the image

    @property
    def uri(self) -> str:
        return self.member.uri if self.member is not None else self.loc.uri


@dataclass
class _Listing:
    """A source listed: its images with their headers (or errors), what was ignored, containers that
    could not be read, and the bytes read from tars."""

    entries: list[Entry]
    headers: list
    ignored: list[tuple[str, str]]
    broken: list[tuple[str, str]] = field(default_factory=list)
    bytes_read: int | None = None


@dataclass
class IndexResult:
    """What ``index`` did: images indexed, files that failed, files ignored (not images)."""

    root: str
    images: int
    failed: list[tuple[str, str]]
    ignored: list[tuple[str, str]]
    seconds: float
    bytes_read: int | None = None  # fetched from tar shards while indexing (headers, labels)

    @property
    def files_per_second(self) -> float:
        return (self.images + len(self.failed)) / max(self.seconds, 1e-9)


def index(src, out, workers: int | None = None, image_column: str | None = None,
          image_ext: list[str] | None = None) -> IndexResult:
    """Index ``src`` into ``out/manifest.parquet`` (and ``out/errors.parquet``).

    ``workers`` threads read headers (or scan tars); by default 1 for local files (header parsing
    holds the GIL, threads only add contention) and 16 for remote ones (they hide request latency).
    ``image_column``: a Parquet image table's column of images (default: its only one of an image
    type); ``image_ext``: the fields of a webdataset sample that are images, as ``jpg`` or ``.jpg``
    (default: :data:`featcache.sources.tars.IMAGE_FIELDS`).
    """
    t0 = time.perf_counter()
    check_reachable(src)  # an unusable object store is refused before listing, the output before reading headers
    check_reachable(out, write=True)
    found = _list_and_read(os.fspath(src), workers, image_column, image_ext)
    pairs = list(zip(found.entries, found.headers))
    good = [(e, h) for e, h in pairs if not isinstance(h, ImageError)]
    failed = [(e.uri, e.image_id, h.reason) for e, h in pairs if isinstance(h, ImageError)]
    failed += [(uri, None, reason) for uri, reason in found.broken]
    if not good:
        shown = [(uri, reason) for uri, _, reason in failed] or found.ignored  # why there is nothing to index
        reasons = "; ".join(f"{os.path.basename(uri)}: {reason}" for uri, reason in shown[:3])
        what = "images" if found.broken or any(e.member for e in found.entries) else "files"
        raise UsageError(f"none of the {len(found.entries)} {what} in {src} is a readable image ({reasons})")
    root = locate(out)
    manifest = _manifest_table(good)
    _check_replaceable(root, manifest)
    _write_index_errors(root, failed + [(uri, None, reason) for uri, reason in found.ignored])
    tables.write_table(root.join(tables.MANIFEST), manifest)  # last: the manifest is index's commit point
    return IndexResult(root.uri, manifest.num_rows, [(uri, reason) for uri, _, reason in failed], found.ignored,
                       time.perf_counter() - t0, found.bytes_read)


def _list_and_read(src: str, workers: int | None, image_column: str | None, image_ext) -> _Listing:
    """Every image of ``src`` with its header: files listed then read; containers scanned."""
    found = listing.containers(src, image_column)
    kind = found[0] if found else None
    if image_column is not None and kind != "parquet":
        raise UsageError(f"--image-column is for Parquet image tables, and {src} is not one")
    if image_ext is not None and kind != "tar":
        raise UsageError(f"--image-ext is for webdataset tars (.tar files), and {src} names none")
    if found is None:
        entries, ignored = list_source(src)
        return _Listing(entries, _read_headers(entries, workers), ignored)
    files = found[1]
    if kind == "tar":
        scan = tars.scan(files, _image_fields(image_ext), _workers(workers, [loc for loc, _ in files]))
    else:
        scan = parquet.scan(files, image_column)
    entries = [Entry(f.loc, f.image_id, _user_columns(f.extra), f.member) for f in scan.found]
    return _Listing(entries, [f.header for f in scan.found], scan.ignored, scan.failed, scan.bytes_read)


def _image_fields(image_ext) -> tuple[str, ...]:
    if image_ext is None:
        return tars.IMAGE_FIELDS
    fields = tuple(e.strip().lstrip(".").lower() for part in image_ext for e in part.split(",") if e.strip())
    if not fields:
        raise UsageError("--image-ext names no extension (e.g. --image-ext jpg,png)")
    return fields


def _user_columns(extra: dict) -> dict:
    """A source's own columns, without those the manifest defines itself."""
    return {k: v for k, v in extra.items() if k not in _RESERVED}


# ---- listing ------------------------------------------------------------------------------


def list_source(src: str) -> tuple[list[Entry], list[tuple[str, str]]]:
    """Entries to index and (uri, reason) of files ignored because they are not images (image files
    and lists of them; containers are :func:`featcache.sources.listing.containers`')."""
    if any(c in src for c in GLOB_CHARS):
        return _list_glob(src)
    loc = locate(src)
    if src.lower().endswith(_LIST_SUFFIXES) and not loc.isdir():
        return _list_table(loc), []
    if not loc.exists():
        raise SourceNotFoundError(f"no such folder: {src}")
    if not loc.isdir():
        raise UsageError(f"{src} is a file: SRC must be a folder, a glob, or a .parquet/.csv list with a 'uri' column")
    files = loc.backend.find(loc.path)
    entries, ignored = _split(loc, files, loc.path)
    if not entries:
        raise UsageError(f"no image files in {src} ({len(ignored)} other files)")
    return entries, ignored


def _split(base: Location, paths: list[str], prefix: str) -> tuple[list[Entry], list[tuple[str, str]]]:
    entries, ignored = [], []
    for path in paths:
        rel = path[len(prefix):].lstrip("/" + os.sep).replace(os.sep, "/")
        loc = base.at(path)
        if is_image_name(path):
            entries.append(Entry(loc, rel))
        else:
            ignored.append((loc.uri, f"not an image file (extension {os.path.splitext(path)[1] or 'none'!r})"))
    return entries, ignored


def _list_glob(pattern: str) -> tuple[list[Entry], list[tuple[str, str]]]:
    loc, top, paths, unlisted = glob_paths(pattern)
    entries, ignored = _split(loc, paths, top)
    if not entries:
        raise UsageError(f"no image files match {pattern}")
    return entries, ignored + unlisted


def _list_table(loc: Location) -> list[Entry]:
    try:
        with loc.backend.open(loc.path) as f:
            # ParquetFile, not read_table: its IO threads can outlive the call (see tables.read_table)
            table = pacsv.read_csv(f) if loc.path.lower().endswith(".csv") else tables.pq.ParquetFile(f).read()
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
        return header_of(entry.loc)
    except ImageError as e:
        return e


def _workers(workers: int | None, locs: list[Location]) -> int:
    """``workers``, by default 16 where requests wait on a network (threads hide the wait), else 1."""
    if workers is None:
        return 16 if any(loc.backend.capabilities.latency_bound for loc in locs) else 1
    return workers


def _read_headers(entries: list[Entry], workers: int | None, batch: int = 256) -> list:
    """Headers (or the ImageError) of every entry, in order; threads hide remote latency."""
    workers = _workers(workers, [e.loc for e in entries])
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
        "uri": pa.array([e.uri for e, _ in good], pa.string()),
        "width": pa.array([h.width for _, h in good], pa.int32()),
        "height": pa.array([h.height for _, h in good], pa.int32()),
    }
    for name, dtype in tables.FILE_COLUMNS.items():  # only those the filesystem gave for some file
        values = [getattr(h, name) for _, h in good]
        if any(v is not None for v in values):
            columns[name] = pa.array(values, dtype)
    members = [e.member for e, _ in good]
    for name, attr in _MEMBER_FIELDS.items():  # only those some image's container gave
        values = [None if m is None else getattr(m, attr) for m in members]
        if any(v is not None for v in values):
            columns[name] = pa.array(values, tables.MEMBER_COLUMNS[name])
    for name in dict.fromkeys(k for e, _ in good for k in e.extra):  # in order of first appearance
        columns[name] = pa.array([e.extra.get(name) for e, _ in good])
    return pa.table(columns)


def _check_replaceable(root: Location, manifest: pa.Table) -> None:
    """A manifest under existing features may only be rewritten with the same images in the same order
    (checked against the cache's fingerprint, so a deleted manifest can be restored by indexing again).
    Files that changed since the last index are accepted: their shards are uncommitted in every view."""
    if not root.join("features.zarr").exists():
        return
    cache = Cache(root)
    if "manifest" in cache.attrs():
        detail = cache.manifest_difference(manifest)
        if detail:
            raise UsageError(f"{root.uri} already holds features for another image list ({detail}); "
                             "index into a new root")
        _accept_changes(cache, manifest)
        return
    old = tables.read_manifest(root)  # a cache from before fingerprints: compare with its manifest
    same = all(old.column(c).equals(manifest.column(c)) for c in ("image_id", "uri")) \
        if old.num_rows == manifest.num_rows else False
    if not same:
        raise UsageError(f"{root.uri} already holds features for another image list; index into a new root")
    _accept_changes(cache, manifest)


def _accept_changes(cache: Cache, manifest: pa.Table) -> None:
    """Uncommit the shards of the images that changed since the last index (when a manifest is there to
    compare with), and say so."""
    if not cache.root.join(tables.MANIFEST).exists():  # a deleted manifest being restored: nothing to compare
        return
    rows = cache.uncommit_changed(manifest)
    if rows:
        ids = manifest.column("image_id").to_pylist()
        shown = ", ".join(ids[r] for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        LOGGER.info(f"{len(rows)} image(s) changed since the last index ({shown}): their shards are uncommitted in "
                    "every view, and the next 'featcache extract' recomputes them")


def _write_index_errors(root: Location, rows: list[tuple[str, str | None, str]]) -> None:
    new = [{"index": None, "image_id": image_id, "uri": uri, "stage": "index", "view": None, "reason": reason}
           for uri, image_id, reason in rows]
    tables.merge_errors(root, "index", new)  # an earlier index's rows go


# ---- extraction's check -------------------------------------------------------------------


def changed_since_indexing(loc: Location, data: bytes, size: int | None, mtime: float | None) -> bool:
    """True when ``data``, just read from ``loc``, is not the file indexed: its byte count, or (local
    files) the file's modification time, differs from the manifest's. Nothing recorded: no check."""
    if size is not None and len(data) != size:
        return True
    return mtime is not None and loc.backend.mtime(loc.path) not in (None, mtime)
