"""The encoded bytes of a manifest row at extraction time, wherever the image lies.

A loose file is read whole; a tar member with one ranged read of its recorded byte range (one GET on
S3, whose answer also says which version of the tar it came from); a Parquet row from its row group's
image column, read once per shard for every row of the shard in it (:class:`RowGroups`). Bytes are
never returned from a file that changed since indexing: a loose file's size (and local mtime), a
container's size and mtime or ETag, must be those the manifest recorded.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pyarrow as pa

from featcache.errors import ImageError
from featcache.store.location import Location, Stamp, locate
from featcache.manifest import CHANGED, changed_since_indexing
from featcache.sources import parquet
from featcache.store import tables

_COLUMNS = ("size", "mtime", "etag", "container", "member", "member_offset", "member_length", "row_group",
            "row_in_group")


class RowGroups:
    """Parquet row groups read for one shard: each read once, by whichever decode thread asks first;
    dropped with the shard."""

    def __init__(self):
        self._lock = threading.Lock()
        self._groups: dict[tuple, Future] = {}

    def get(self, key: tuple, load):
        with self._lock:
            future = self._groups.get(key)
            mine = future is None
            if mine:
                future = self._groups[key] = Future()
        if mine:
            try:
                future.set_result(load())
            except BaseException as e:  # noqa: BLE001  every thread waiting on this group raises it
                future.set_exception(e)
        return future.result()


class ImageReader:
    """Reads the encoded image of any row of ``manifest`` (manifests without the container columns too)."""

    def __init__(self, manifest: pa.Table):
        self.uris = manifest.column("uri").to_pylist()
        self.cols = {name: tables.file_column(manifest, name) for name in _COLUMNS}
        self._locs: dict[str, Location] = {}

    def read(self, i: int, groups: RowGroups | None = None) -> bytes:
        """The bytes of row ``i`` as indexed; an ImageError with the reason otherwise."""
        uri = self.uris[i]
        try:
            if self.cols["container"][i] is None:
                return self._file(i)
            if self.cols["member_offset"][i] is not None:
                return self._tar_member(i)
            return self._parquet_row(i, groups or RowGroups())
        except ImageError:
            raise
        except FileNotFoundError:
            raise ImageError(uri, "file not found (deleted since indexing?)") from None
        except (OSError, ValueError) as e:
            raise ImageError(uri, f"cannot read: {type(e).__name__}: {e}") from None

    def _file(self, i: int) -> bytes:
        loc = locate(self.uris[i])
        data = loc.read_bytes()
        if changed_since_indexing(loc, data, self.cols["size"][i], self.cols["mtime"][i]):
            raise ImageError(self.uris[i], CHANGED)  # never extract other bytes than those the manifest describes
        return data

    def _tar_member(self, i: int) -> bytes:
        length = self.cols["member_length"][i]
        data, stamp = self._container(i).read_range(self.cols["member_offset"][i], length)
        if self._changed(i, stamp) or len(data) != length:
            raise ImageError(self.uris[i], CHANGED)
        return data

    def _parquet_row(self, i: int, groups: RowGroups) -> bytes:
        loc, group, column = self._container(i), self.cols["row_group"][i], self.cols["member"][i]
        values, stamp = groups.get((loc.uri, group, column), lambda: parquet.read_row_group(loc, group, column))
        row = self.cols["row_in_group"][i]
        if self._changed(i, stamp) or row >= len(values):
            raise ImageError(self.uris[i], CHANGED)
        if values[row] is None:
            raise ImageError(self.uris[i], f"no image bytes in the column {column!r}")
        return values[row]

    def _container(self, i: int) -> Location:
        uri = self.cols["container"][i]
        if uri not in self._locs:
            self._locs[uri] = locate(uri)
        return self._locs[uri]

    def _changed(self, i: int, stamp: Stamp) -> bool:
        """Whether the container is not the file indexed, by what both the manifest and ``stamp`` know."""
        recorded = (self.cols["size"][i], self.cols["mtime"][i], self.cols["etag"][i])
        return any(r is not None and now is not None and r != now
                   for r, now in zip(recorded, (stamp.size, stamp.mtime, stamp.etag)))
