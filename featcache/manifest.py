"""``featcache index``: turn an image source into ``ROOT/manifest.parquet`` (DESIGN.md §2).

A source is a folder or a glob on any fsspec filesystem, or a ``.parquet``/``.csv`` list with a
``uri`` column (its other columns are kept). Sizes come from image headers only. The order, and
so every ``index``, is deterministic: sorted relative paths for folders and globs, list order for
lists. ``image_id`` is the path relative to the folder (or the glob's fixed prefix), or the list's
``image_id`` column, or its ``uri``. Files that cannot be used are listed in ``errors.parquet``
with a reason; the index goes on without them.
"""

from __future__ import annotations

import glob as globlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pacsv

from featcache.errors import ImageError, SourceNotFoundError, UsageError
from featcache.fsio import Location, locate
from featcache.images import header_of_local, header_of_remote, is_image_name
from featcache.store import tables

_GLOB_CHARS = "*?["
_LIST_SUFFIXES = (".parquet", ".csv")
_RESERVED = ("index", "width", "height")


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
    tables.write_table(root.join(tables.MANIFEST), manifest)
    _write_index_errors(root, [(e.loc.uri, e.image_id, h.reason) for e, h in failed] +
                        [(uri, None, reason) for uri, reason in ignored])
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
    if loc.is_local:
        paths = [p for p in globlib.glob(loc.path, recursive=True) if not os.path.isdir(p)]
    else:
        paths = [p for p, info in loc.fs.glob(loc.path, detail=True).items() if info["type"] == "file"]
    entries, ignored = _split(loc, sorted(paths), prefix.rstrip("/") or "/")
    if not entries:
        raise UsageError(f"no image files match {pattern}")
    return entries, ignored


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
    for name in good[0][0].extra:
        columns[name] = pa.array([e.extra.get(name) for e, _ in good])
    return pa.table(columns)


def _check_replaceable(root: Location, manifest: pa.Table) -> None:
    """A manifest under existing features may only be rewritten with the same images in the same order."""
    if not root.join("features.zarr").exists():
        return
    old = tables.read_manifest(root)
    same = all(old.column(c).equals(manifest.column(c)) for c in ("image_id", "uri")) \
        if old.num_rows == manifest.num_rows else False
    if not same:
        raise UsageError(f"{root.uri} already holds features for another image list; index into a new root")


def _write_index_errors(root: Location, rows: list[tuple[str, str | None, str]]) -> None:
    kept = [r for r in tables.read_errors(root).to_pylist() if r["stage"] != "index"]
    new = [{"index": None, "image_id": image_id, "uri": uri, "stage": "index", "view": None, "reason": reason}
           for uri, image_id, reason in rows]
    if kept or new:
        tables.write_table(root.join(tables.ERRORS), tables.errors_table(kept + new))
