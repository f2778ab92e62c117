"""Parquet image tables (e.g. the Parquet files of a Hugging Face image dataset) as an image source.

The image column holds the encoded file's bytes: a ``binary`` column, or the Hugging Face ``Image``
feature's ``struct<bytes: binary, path: string>``. Other scalar columns (numbers, strings, booleans,
dates) become manifest columns; a string or integer ``image_id`` column gives the ids, else
``<file>/<row>``. Each row is located by file, row group and row within it: a worker reads the image
column of a row group once for all of a shard's rows in it. Parquet cannot read part of a column
chunk, so indexing reads every image's bytes (a row group at a time), then only its header.
"""

from __future__ import annotations

import io
from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featcache.errors import ImageError, UsageError
from featcache.store.location import Location, Stamp
from featcache.images import read_header
from featcache.sources import Found, Member, Scan, row_uri

ID_COLUMN = "image_id"


def image_column(schema: pa.Schema, wanted: str | None, uri: str) -> str | None:
    """The column of ``schema`` that holds the images: ``wanted`` (refused when it cannot), else the
    only column of an image type; None when there is none."""
    if wanted is not None:
        if wanted not in schema.names:
            raise UsageError(f"{uri} has no column {wanted!r} (columns: {', '.join(schema.names)})")
        if not _holds_images(schema.field(wanted).type):
            raise UsageError(f"the column {wanted!r} of {uri} is {schema.field(wanted).type}, not binary or "
                             "struct<bytes: binary, path: string>")
        return wanted
    found = [f.name for f in schema if _holds_images(f.type)]
    if len(found) > 1:
        raise UsageError(f"{uri} has several image columns ({', '.join(found)}): choose one with --image-column")
    return found[0] if found else None


def is_image_table(loc: Location, wanted: str | None) -> bool:
    """Whether the Parquet file at ``loc`` is an image table (else it is a list with a ``uri`` column)."""
    try:
        with _open(loc) as (f, _):
            schema = pq.read_schema(f)
    except (pa.ArrowInvalid, OSError) as e:
        raise UsageError(f"cannot read the Parquet file {loc.uri}: {e}") from e
    if wanted is None and "uri" in schema.names:
        return False
    return image_column(schema, wanted, loc.uri) is not None


def scan(files: list[tuple[Location, str]], wanted: str | None) -> Scan:
    """The rows of every file (given with its name relative to the source), in order."""
    found, failed = [], []
    for loc, rel in files:
        try:
            found += _scan_file(loc, rel, wanted)
        except FileNotFoundError:
            failed.append((loc.uri, "file not found"))
        except (pa.ArrowInvalid, OSError) as e:
            failed.append((loc.uri, f"unreadable Parquet file: {e}"))
    return Scan(found, [], failed)


def read_row_group(loc: Location, group: int, column: str) -> tuple[list, Stamp]:
    """The image column's values (bytes, or None) in row group ``group``, and the file's stamp."""
    with _open(loc) as (f, stamp):
        values = pq.ParquetFile(f).read_row_group(group, columns=[column]).column(column)
    return _image_bytes(values).to_pylist(), stamp


def _scan_file(loc: Location, rel: str, wanted: str | None) -> list[Found]:
    with _open(loc) as (f, stamp):
        table = pq.ParquetFile(f)
        column = image_column(table.schema_arrow, wanted, loc.uri)
        if column is None:
            raise UsageError(f"{loc.uri} has no image column (binary or struct<bytes, path>): name it with "
                             "--image-column")
        scalars = [fld.name for fld in table.schema_arrow if fld.name != column and _is_scalar(fld.type)]
        found, n = [], 0
        for group in range(table.num_row_groups):
            part = table.read_row_group(group, columns=[column, *scalars])
            rows = part.select(scalars).to_pylist()
            for r, (data, path) in enumerate(_values(part.column(column))):
                found.append(_found(loc, rel, column, group, r, n, data, path, rows[r], stamp))
                n += 1
    return found


def _found(loc: Location, rel: str, column: str, group: int, r: int, n: int, data, path, extra: dict,
           stamp: Stamp) -> Found:
    uri = row_uri(loc.uri, n)
    image_id = extra.pop(ID_COLUMN, None)
    member = Member(uri, loc.uri, column, row_group=group, row=r)
    return Found(str(image_id) if image_id is not None else f"{rel}/{n}", loc, member,
                 _header(data, path, column, uri, stamp), extra)


def _header(data, path, column: str, uri: str, stamp: Stamp):
    if data is None:
        elsewhere = f" (it names the file {path!r}, outside the table)" if path else ""
        return ImageError(uri, f"no image bytes in the column {column!r}{elsewhere}")
    try:
        header = read_header(io.BytesIO(data), uri)
    except ImageError as e:
        return e
    return replace(header, size=stamp.size, mtime=stamp.mtime, etag=stamp.etag)


def _values(column: pa.ChunkedArray):
    """(bytes or None, path or None) of each row of an image column."""
    paths = [None] * len(column)
    if pa.types.is_struct(column.type) and column.type.get_field_index("path") >= 0:
        paths = pc.struct_field(column, "path").to_pylist()
    return zip(_image_bytes(column).to_pylist(), paths)


def _image_bytes(column: pa.ChunkedArray) -> pa.ChunkedArray:
    # struct_field, not .field(): a null struct has no bytes, whatever its child array holds
    return pc.struct_field(column, "bytes") if pa.types.is_struct(column.type) else column


def _holds_images(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        i = t.get_field_index("bytes")
        return i >= 0 and _is_binary(t.field(i).type)
    return _is_binary(t)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_scalar(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_string(t)
            or pa.types.is_large_string(t) or pa.types.is_temporal(t))


def _open(loc: Location):
    """(the file, its stamp), opened so that pyarrow reads only the byte ranges it asks for; on an object
    store the stamp comes from the request that opening the file makes anyway."""
    return loc.backend.open_stamped(loc.path)
