"""The cache's Parquet tables: ``manifest.parquet`` (one row per image) and ``errors.parquet``.

Plain Parquet, readable by pyarrow, pandas or duckdb. The manifest's ``index`` column is the row
of every array in ``features.zarr``; ``image_id`` is the stable key a user joins on.
"""

from __future__ import annotations

import io
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from featcache.errors import CacheFormatError, SourceNotFoundError
from featcache.store.location import Location

MANIFEST = "manifest.parquet"
ERRORS = "errors.parquet"

MANIFEST_COLUMNS = {
    "index": pa.int64(),
    "image_id": pa.string(),
    "uri": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
}
#: Optional manifest columns: what each file was when indexed (manifests written before them lack them).
FILE_COLUMNS = {
    "size": pa.int64(),  # bytes
    "mtime": pa.float64(),  # seconds, local files
    "etag": pa.string(),  # object stores
}
#: Optional manifest columns of images inside container files (featcache.sources: webdataset tars,
#: Parquet image tables), null for loose files; ``size``/``mtime``/``etag`` are then the container's.
MEMBER_COLUMNS = {
    "container": pa.string(),  # URI of the tar or Parquet file
    "member": pa.string(),  # the tar member's name, or the Parquet column that holds the image
    "member_offset": pa.int64(),  # tar: where the member's data starts in the tar, in bytes
    "member_length": pa.int64(),  # tar: its length in bytes
    "row_group": pa.int32(),  # Parquet: the row group
    "row_in_group": pa.int64(),  # Parquet: the row within the row group
}
#: The key of the errors table's Parquet metadata recording which commit markers its rows came from.
ERRORS_RECORD = b"featcache.commits"
ERRORS_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),  # null for files that never entered the manifest
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("stage", pa.string()),  # "index", "decode", "teacher", ...
        ("view", pa.string()),  # null when the failure is not specific to one view
        ("reason", pa.string()),
    ]
)


def write_table(loc: Location, table: pa.Table) -> None:
    """Write a Parquet file in one atomic object write."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    loc.write_bytes_atomic(sink.getvalue())


def read_table(loc: Location) -> pa.Table:
    """Read a whole Parquet file from any filesystem.

    Read through ``ParquetFile`` in the calling thread: ``pq.read_table`` of a Python file object
    pre-buffers on Arrow's IO threads, and a read still in flight when it returns can end during
    interpreter exit, where taking the GIL kills that thread and aborts the process (exit 134,
    "terminate called without an active exception")."""
    with loc.backend.open(loc.path) as f:
        return pq.ParquetFile(f).read()


def read_manifest(root: Location) -> pa.Table:
    """The manifest of the cache at ``root``, checked for the columns every part relies on."""
    loc = root.join(MANIFEST)
    try:
        table = read_table(loc)
    except FileNotFoundError as e:
        raise SourceNotFoundError(f"no {MANIFEST} under {root.uri}: run 'featcache index' first") from e
    except NotADirectoryError as e:  # a reader's words: "a file stands where a folder is needed writing" misleads
        raise SourceNotFoundError(f"{_file_on_the_way(root)} is a file, not a cache folder") from e
    missing = [c for c in MANIFEST_COLUMNS if c not in table.column_names]
    if missing:
        raise CacheFormatError(f"{loc.uri} lacks the columns {missing}")
    return table


def _file_on_the_way(root: Location) -> str:
    """The part of ``root`` that is a file: its first component that exists (else ``root`` itself)."""
    loc = root
    while not loc.exists():
        parent = posixpath.dirname(loc.path)
        if not parent or parent == loc.path:
            return root.uri
        loc = loc.at(parent)
    return loc.uri


def file_column(manifest: pa.Table, name: str) -> list:
    """The values of the optional column ``name`` (one of :data:`FILE_COLUMNS` or :data:`MEMBER_COLUMNS`),
    None where absent (manifests written before it)."""
    if name not in manifest.column_names:
        return [None] * manifest.num_rows
    return manifest.column(name).to_pylist()


# ---- errors.parquet: every part reads and writes it through these -------------------------------


def read_errors(root: Location) -> pa.Table:
    """The errors table: empty when nothing failed, and for caches written before it always existed."""
    try:
        return read_table(root.join(ERRORS))
    except FileNotFoundError:
        return ERRORS_SCHEMA.empty_table()


def error_rows(root: Location, stage: str | None = None) -> list[dict]:
    """The rows of the errors table as dicts, in order (those of ``stage`` alone when given)."""
    rows = read_errors(root).to_pylist()
    return rows if stage is None else [r for r in rows if r["stage"] == stage]


def errors_table(rows: list[dict]) -> pa.Table:
    """Build an errors table from dicts with the columns of :data:`ERRORS_SCHEMA`."""
    return pa.Table.from_pylist([{k: r.get(k) for k in ERRORS_SCHEMA.names} for r in rows], schema=ERRORS_SCHEMA)


def errors_record(table: pa.Table) -> bytes | None:
    """What the rows of an errors table came from, as its writer recorded it (:func:`write_errors`)."""
    return (table.schema.metadata or {}).get(ERRORS_RECORD)


def write_errors(root: Location, rows: list[dict], record: bytes | None = None) -> None:
    """Replace the errors table with ``rows`` (written empty too: tools featcache does not control read
    it), keeping ``record`` (what the rows came from: see ``extract.finalize``) in its metadata."""
    table = errors_table(rows)
    if record is not None:
        table = table.replace_schema_metadata({ERRORS_RECORD: record})
    write_table(root.join(ERRORS), table)


def merge_errors(root: Location, stage: str, rows: list[dict]) -> None:
    """Put ``rows`` (of ``stage``) in place of the errors table's rows of ``stage``, after the others;
    the table's record is dropped, as it no longer says where every row came from."""
    write_errors(root, [r for r in error_rows(root) if r["stage"] != stage] + rows)
