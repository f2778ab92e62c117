"""Fast random reads of one image's window: ``dense[i, r0:r1, c0:c1]`` with summary, box, valid.

zarr-python decodes a whole inner chunk through its async codec pipeline and re-reads the
shard index on every call. For the layout featcache writes (sharded, inner codecs ``bytes`` +
``crc32c``, index at the end) the bytes of a chunk are the array itself, so the reader keeps each
shard's index in memory and fetches exactly the chunk bytes: ``os.pread`` on local files, one
ranged GET through fsspec elsewhere. Other layouts fall back to zarr indexing. Only committed
shards are read; rows of other shards come back with ``valid = False`` and zeros.

Every chunk's crc32c is checked by default, as zarr-python does (a flipped byte raises
:class:`~featcache.errors.ChecksumError` naming the row and the object, never returns silently
wrong values). The check runs over the chunk and its stored crc together, against the crc32c
residue, with no copy (hardware crc32c, ~27 GB/s here). The small arrays (summary, box, valid) are
one chunk of S rows per shard: as DESIGN.md §5 asks of a training reader, a shard's three chunks are
fetched and checked once and kept in a bounded LRU, so each further row of that shard is a lookup
and an epoch issues one dense read per image.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import crc32c
import numpy as np

from featcache.errors import CacheFormatError, ChecksumError, UsageError
from featcache.store.codec import Codec, check_space
from featcache.store.statsio import read_stats

_EMPTY = np.uint64(2**64 - 1)
_CRC = 4
#: crc32c of any message followed by its own crc32c (little-endian): one call checks a chunk.
_RESIDUE = crc32c.crc32c(bytes(_CRC))
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024  # buffers one preadv call takes
_SMALL = ("summary", "box", "valid")


@dataclass(frozen=True)
class Sample:
    """One image's row of a view."""

    index: int
    dense: np.ndarray  # (r1 - r0, c1 - c0, C)
    summary: np.ndarray  # (Cs,)
    box: np.ndarray  # (4,) x0, y0, x1, y1 in source pixels
    valid: bool


class _LocalRanges:
    """Byte ranges by ``os.pread`` on cached file descriptors."""

    def __init__(self, max_open: int = 256):
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self._max_open = max_open

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.pop(path, None)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                if len(self._fds) >= self._max_open:
                    os.close(self._fds.popitem(last=False)[1])
            self._fds[path] = fd
            return fd

    def will_need(self, path: str, offset: int, length: int) -> None:
        """Ask the kernel to start reading the range into the page cache (returns at once)."""
        os.posix_fadvise(self._fd(path), offset, length, os.POSIX_FADV_WILLNEED)

    def read(self, path: str, offset: int, length: int, writable: bool = False):
        """The bytes; with ``writable`` read straight into a fresh uint8 array instead (no zero-fill,
        no copy: arrays viewing it can be handed to torch as they are)."""
        if writable:
            data = np.empty(length, dtype=np.uint8)
            self.read_into(path, offset, [data])
            return data
        data = os.pread(self._fd(path), length, offset)
        if len(data) != length:
            raise CacheFormatError(f"{path}: short read ({len(data)} of {length} bytes at {offset})")
        return data

    def read_into(self, path: str, offset: int, buffers: list[np.ndarray]) -> None:
        """The bytes from ``offset`` on, scattered over ``buffers`` in order (``preadv``, at most
        IOV_MAX buffers a call)."""
        fd, done, length = self._fd(path), 0, sum(len(b) for b in buffers)
        for k in range(0, len(buffers), _IOV_MAX):
            batch = buffers[k:k + _IOV_MAX]
            got = os.preadv(fd, batch, offset + done)
            done += got
            if got != sum(len(b) for b in batch):
                raise CacheFormatError(f"{path}: short read ({done} of {length} bytes at {offset})")

    def size(self, path: str) -> int:
        return os.fstat(self._fd(path)).st_size

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class _BackendRanges:
    """Byte ranges by ranged requests to the storage backend."""

    def __init__(self, backend):
        self.backend = backend

    def will_need(self, path: str, offset: int, length: int) -> None:
        """No read-ahead through fsspec: the range is fetched when read."""

    def read(self, path: str, offset: int, length: int, writable: bool = False) -> bytes:
        data = self.backend.read_range(path, offset, length)
        if len(data) != length:
            raise CacheFormatError(f"{path}: short read ({len(data)} of {length} bytes at {offset})")
        return data

    def size(self, path: str) -> int:
        return self.backend.size(path)

    def close(self) -> None:
        pass


class WholeObjects:
    """Byte ranges of objects asked for ahead served from whole copies in memory: :meth:`will_need` starts
    fetching an object with one GET (as webdataset's and mosaicml streaming's readers fetch their shards),
    ``threads`` at a time, and at most ``max_objects`` are held, the least recently used dropped first. A read
    of an object held (or being fetched: it waits) is a slice of it; any other read is a ranged read through
    ``fallback`` (an evaluation's rows, a shard nobody announced)."""

    def __init__(self, fallback, backend, max_objects: int, threads: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        self.backend, self.fallback, self.max_objects = backend, fallback, max(1, max_objects)
        self._held: OrderedDict[str, object] = OrderedDict()  # path -> bytes, or the Future fetching them
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="featcache-objects")
        self.fetched = 0  # objects fetched whole (for tests and benchmarks)

    def _object(self, path: str):
        """The object's bytes when it is held or being fetched (waiting for the fetch), else None."""
        with self._lock:
            held = self._held.get(path)
            if held is not None:
                self._held.move_to_end(path)
        if held is None or isinstance(held, bytes):
            return held
        data = held.result()  # a failed GET raises here, and :meth:`_forget_failed` has dropped it
        with self._lock:
            if self._held.get(path) is held:
                self._held[path] = data
        return data

    def _fetch(self, path: str) -> bytes:
        data = self.backend.read(path)
        self.fetched += 1
        return data

    def will_need(self, path: str, offset: int, length: int) -> None:
        """Fetch the whole object ``path`` in the background (the range does not matter)."""
        with self._lock:
            if path in self._held:
                self._held.move_to_end(path)
                return
            fetching = self._held[path] = self._pool.submit(self._fetch, path)
            while len(self._held) > self.max_objects:
                self._held.popitem(last=False)
        fetching.add_done_callback(lambda done: self._forget_failed(path, done))

    def _forget_failed(self, path: str, done) -> None:
        """A fetch that failed is not held, whether or not a reader waited for it: a later announcement or read
        fetches the object again (a storage outage must not outlive itself in the held objects)."""
        if done.cancelled() or done.exception() is not None:
            with self._lock:
                if self._held.get(path) is done:
                    del self._held[path]

    def read(self, path: str, offset: int, length: int, writable: bool = False):
        data = self._object(path)
        if data is None:
            return self.fallback.read(path, offset, length, writable)
        if offset + length > len(data):
            raise CacheFormatError(f"{path}: short read ({max(0, len(data) - offset)} of {length} bytes at {offset})")
        # no copy: a view of the held object (read-only, as the bytes of a ranged GET are)
        return np.frombuffer(data, dtype=np.uint8, count=length, offset=offset) if writable else \
            memoryview(data)[offset:offset + length]

    def size(self, path: str) -> int:
        data = self._object(path)
        return self.fallback.size(path) if data is None else len(data)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._held.clear()
        self.fallback.close()


def _ranges_for(view, whole_objects: int = 0):
    """os.pread where the cache's backend allows positional reads, ranged requests elsewhere; with
    ``whole_objects``, whole objects held in memory (:class:`WholeObjects`)."""
    ranges = _LocalRanges() if view.cache.capabilities.positional_reads else _BackendRanges(view.loc.backend)
    return WholeObjects(ranges, view.loc.backend, whole_objects) if whole_objects else ranges


def _is_plain_crc(codecs) -> bool:
    names = [c["name"] for c in codecs]
    return names == ["bytes", "crc32c"] and codecs[0].get("configuration", {}).get("endian", "little") == "little"


def _fast_layout(meta: dict) -> bool:
    """True when chunks are stored as raw little-endian bytes + crc32c (what featcache writes)."""
    codecs = meta["codecs"]
    if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
        cfg = codecs[0]["configuration"]
        return (cfg.get("index_location", "end") == "end" and _is_plain_crc(cfg["codecs"])
                and _is_plain_crc(cfg["index_codecs"]))
    return _is_plain_crc(codecs)


class ViewReader:
    """Random access to one view; thread-safe, holds shard indices, file handles and the small
    arrays of recently read shards (at most ``small_cache_bytes`` of them, one shard at least).

    ``verify_checksums=False`` skips the crc32c check of the chunks read (shard indices are
    always checked: their offsets steer every read). ``whole_shards`` > 0 reads the objects of announced shards
    whole and holds that many shards in memory (:class:`WholeObjects`: a reader that goes shard by shard, on an
    object store)."""

    def __init__(self, view, verify_checksums: bool = True, small_cache_bytes: int = 64 << 20,
                 whole_shards: int = 0):
        self.view = view
        self.spec = view.spec
        self.verify_checksums = verify_checksums
        self._ranges = _ranges_for(view, whole_shards * (1 + len(_SMALL)))  # a shard: dense and small arrays
        self._index_cache: dict[int, np.ndarray] = {}
        self._objects: dict[tuple, object] = {}
        self._arrays = {name: view.array(name) for name in ("dense", "summary", "box", "valid")}
        self._dtypes = {name: np.dtype(a.dtype).newbyteorder("<") for name, a in self._arrays.items()}
        self._fast = all(_fast_layout(a.metadata.to_dict()) for a in self._arrays.values())
        self._keys = {name: a.metadata for name, a in self._arrays.items()}
        self._phis_arrays: tuple[np.ndarray, np.ndarray] | None = None
        self._codec: Codec | None = None
        self._lock = threading.Lock()
        self._small = _ShardLRU(max(1, small_cache_bytes // self._small_bytes_per_shard()))
        self.refresh()

    def refresh(self) -> None:
        """Reload the set of committed shards (a job may still be writing)."""
        self.committed = self.view.committed_shards()

    def close(self) -> None:
        self._ranges.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- public reads -------------------------------------------------------------------

    def read(self, i: int, window: tuple[int, int, int, int] | None = None, space: str = "raw") -> Sample:
        """Image ``i``: dense window (r0, r1, c0, c1) (whole grid by default), summary, box, valid;
        the dense features in ``space`` (see :meth:`read_dense`)."""
        shard = self._shard_of(i)
        if shard not in self.committed:
            return self._empty(i, window, space)
        return Sample(index=i, dense=self.read_dense(i, window, space), summary=self._row("summary", i),
                      box=self._row("box", i), valid=bool(self._row("valid", i)[()]))

    def read_dense(self, i: int, window: tuple[int, int, int, int] | None = None, space: str = "raw") -> np.ndarray:
        """``dense[i, r0:r1, c0:c1]`` reading only the tiles that cover the window, in ``space``:

        - ``raw``: the teacher's features (float32 decoded from codes; f16/f32 as stored);
        - ``phis``: float32 in the view's PHI-S space, ``(x − μ) Rᵀ`` with its frozen statistics
          (for int8-phis: one table lookup per code, no matrix product);
        - ``stored``: the stored values as they are (float16, float32, int8 codes or int4-pca's bytes:
          ``stored_channels`` of them per cell).
        """
        check_space(space)  # before any read
        x = self._read_dense(i, window)
        return x if space == "stored" else self.codec.decode(x, space, self.phis)

    def row(self, name: str, i: int) -> np.ndarray:
        """Row ``i`` of a small array (``summary``, ``box`` or ``valid``) without reading dense
        features: one fetch per shard, then lookups (zeros for uncommitted shards)."""
        if name not in _SMALL:
            raise UsageError(f"{name!r} is not one of {', '.join(_SMALL)}")
        if self._shard_of(i) not in self.committed:
            return np.zeros(self._arrays[name].shape[1:], self._dtypes[name])
        return self._row(name, i)

    @property
    def codec(self) -> Codec:
        """The view's codec, ready to decode (an int8-phis one checked against its statistics' hash
        once, on first use)."""
        with self._lock:
            if self._codec is None:
                self._codec = self.spec.codec_type.open(self.view)
        return self._codec

    def phis(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean μ, rotation R) of the view's PHI-S transform ``y = (x − μ) Rᵀ`` as float32, read
        once (a view without statistics is a UsageError saying to run ``featcache stats``)."""
        if self._phis_arrays is None:
            if not self.view.stats:
                raise UsageError(f"{self.view.key} has no statistics yet: run 'featcache stats' first")
            stats = read_stats(self.view)
            self._phis_arrays = (stats["mean"].astype(np.float32), stats["rotation"].astype(np.float32))
        return self._phis_arrays

    def _read_dense(self, i: int, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
        r0, r1, c0, c1 = self._window(window)
        if not self._fast:
            return np.asarray(self._arrays["dense"][i, r0:r1, c0:c1])
        (th, tw), c = self.spec.tile, self.spec.stored_channels
        rows, cols = range(r0 // th, (r1 - 1) // th + 1), range(c0 // tw, (c1 - 1) // tw + 1)
        if len(rows) == 1 and len(cols) == 1:
            tile = self._tile(i, rows[0], cols[0])
            return tile[r0 - rows[0] * th:r1 - rows[0] * th, c0 - cols[0] * tw:c1 - cols[0] * tw]
        out = np.empty((r1 - r0, c1 - c0, c), dtype=self._dtypes["dense"])
        for a in rows:
            for b in cols:
                y0, x0 = max(r0, a * th), max(c0, b * tw)
                y1, x1 = min(r1, (a + 1) * th), min(c1, (b + 1) * tw)
                out[y0 - r0:y1 - r0, x0 - c0:x1 - c0] = self._tile(i, a, b)[y0 - a * th:y1 - a * th,
                                                                            x0 - b * tw:x1 - b * tw]
        return out

    def read_dense_into(self, i: int, window: tuple[int, int, int, int] | None, out: np.ndarray) -> None:
        """``dense[i, r0:r1, c0:c1]`` as stored, read straight into ``out`` ((r1 - r0, c1 - c0, W) of the
        stored dtype with C-contiguous rows, e.g. a window of a batch buffer). On local files each
        tile is one positional read scattered between ``out`` and scratch memory (the tile's other
        cells, kept for its crc32c): the kernel's copy is the only one. Elsewhere: read, then copy."""
        r0, r1, c0, c1 = self._window(window)
        rows_ok = out.shape == (r1 - r0, c1 - c0, self.spec.stored_channels) and out[0].flags.c_contiguous
        if not (self._fast and rows_ok and isinstance(self._ranges, _LocalRanges)) or self._shard_of(i) not in self.committed:
            out[...] = self.read_dense(i, window, "stored")
            return
        (th, tw), shard = self.spec.tile, i // self.view.shard_size
        for a in range(r0 // th, (r1 - 1) // th + 1):
            for b in range(c0 // tw, (c1 - 1) // tw + 1):
                y0, y1, x0, x1 = max(r0, a * th), min(r1, (a + 1) * th), max(c0, b * tw), min(c1, (b + 1) * tw)
                part = out[y0 - r0:y1 - r0, x0 - c0:x1 - c0]
                offset, nbytes = self._shard_index(shard, i)[i % self.view.shard_size, a, b, 0]
                if offset == _EMPTY:
                    part[...] = 0
                    continue
                self._scatter_tile(i, (a, b), (y0 - a * th, y1 - a * th, x0 - b * tw, x1 - b * tw), part,
                                   int(offset), int(nbytes))

    def _scatter_tile(self, i: int, tile: tuple[int, int], cells: tuple[int, int, int, int], part: np.ndarray,
                      offset: int, nbytes: int) -> None:
        """One tile's bytes in file order: its ``cells`` (tile-local rows and columns) into ``part``, the
        rest into scratch; then the crc32c over all of them, in order."""
        ty0, ty1, tx0, tx1 = cells
        cell = self.spec.stored_channels * self._dtypes["dense"].itemsize
        row = self.spec.tile[1] * cell
        if nbytes != self.spec.tile[0] * row + _CRC:
            raise CacheFormatError(f"{self.view.key}: image row {i}: dense tile {tile} is {nbytes} bytes in the shard "
                                   f"index, not the {self.spec.tile[0] * row + _CRC} its shape takes")
        scratch, segments, pos = np.empty(nbytes, dtype=np.uint8), [], 0
        for y in range(ty0, ty1):
            start = y * row + tx0 * cell
            if start > pos:
                segments.append(scratch[pos:start])
            segments.append(part[y - ty0].reshape(-1).view(np.uint8))
            pos = start + (tx1 - tx0) * cell
        segments.append(scratch[pos:nbytes])
        coords = (i // self.view.shard_size, 0, 0, 0)
        self._ranges.read_into(self._path("dense", coords), offset, segments)
        if self.verify_checksums:
            crc = 0
            for x in segments:
                crc = crc32c.crc32c(x, crc)
            self._check(b"", i, "dense" if self.spec.tiles == (1, 1) else f"dense tile {tile}", "dense", coords, crc)

    def prefetch(self, i: int, window: tuple[int, int, int, int] | None = None) -> None:
        """Start reading the chunks a later :meth:`read_dense` of ``window`` needs (local files: the
        kernel reads them in the background while the caller does other work; elsewhere nothing)."""
        if not self._fast or self._shard_of(i) not in self.committed:
            return
        r0, r1, c0, c1 = self._window(window)
        (th, tw) = self.spec.tile
        shard, local = divmod(i, self.view.shard_size)
        if isinstance(self._ranges, WholeObjects):  # the shard's objects, whole, without waiting for its index
            for name in ("dense", *_SMALL):
                if name == "dense" or self._small_row_bytes(name):
                    self._ranges.will_need(self._path(name, self._chunk_of(name, shard)), 0, 0)
            return
        path, index = self._path("dense", (shard, 0, 0, 0)), self._shard_index(shard, i)
        for a in range(r0 // th, (r1 - 1) // th + 1):
            for b in range(c0 // tw, (c1 - 1) // tw + 1):
                offset, nbytes = index[local, a, b, 0]
                if offset != _EMPTY:
                    self._ranges.will_need(path, int(offset), int(nbytes))

    def bytes_for(self, window: tuple[int, int, int, int] | None = None) -> int:
        """Bytes of chunk data a dense read of ``window`` moves (for benchmarks and planning)."""
        r0, r1, c0, c1 = self._window(window)
        (th, tw), c = self.spec.tile, self.spec.stored_channels
        ntiles = ((r1 - 1) // th - r0 // th + 1) * ((c1 - 1) // tw - c0 // tw + 1)
        return ntiles * (th * tw * c * self._dtypes["dense"].itemsize + _CRC)

    # ---- internals ----------------------------------------------------------------------

    def _window(self, window) -> tuple[int, int, int, int]:
        h, w = self.spec.grid
        r0, r1, c0, c1 = window if window is not None else (0, h, 0, w)
        if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
            raise UsageError(f"window {(r0, r1, c0, c1)} is outside the {h}x{w} grid of {self.view.key}")
        return r0, r1, c0, c1

    def _shard_of(self, i: int) -> int:
        if not 0 <= i < self.view.num_images:
            raise UsageError(f"image {i} is out of range: the cache holds {self.view.num_images} images")
        return i // self.view.shard_size

    def _object(self, name: str, coords: tuple[int, ...]):
        """The Location of the stored object holding chunk ``coords`` of array ``name``."""
        loc = self._objects.get((name, coords))
        if loc is None:
            loc = self.view.loc.join(*f"{name}/{self._keys[name].encode_chunk_key(coords)}".split("/"))
            self._objects[(name, coords)] = loc
        return loc

    def _path(self, name: str, coords: tuple[int, ...]) -> str:
        return self._object(name, coords).path

    def _check(self, raw: bytes, i: int, what: str, name: str, coords: tuple[int, ...], crc: int | None = None) -> None:
        """Raise :class:`ChecksumError` naming row ``i``, ``what`` and the object unless ``raw``
        (chunk bytes followed by their crc32c; or ``crc``, their crc32c computed by the caller)
        checks out."""
        if (crc32c.crc32c(raw) if crc is None else crc) != _RESIDUE:
            raise ChecksumError(
                f"{self.view.key}: image row {i}: {what} fails its crc32c check in "
                f"{self._object(name, coords).uri}: the stored bytes are damaged; "
                f"run 'featcache verify {self.view.cache.root.uri}'")

    def _shard_index(self, shard: int, i: int | None = None) -> np.ndarray:
        """The dense index of ``shard``, loaded and checked once (a mismatch names row ``i``,
        by default the shard's first)."""
        idx = self._index_cache.get(shard)
        if idx is None:
            idx = self._load_index(shard * self.view.shard_size if i is None else i)
            self._index_cache[shard] = idx
        return idx

    def _load_index(self, i: int) -> np.ndarray:
        tr, tc = self.spec.tiles
        shape = (self.view.shard_size, tr, tc, 1, 2)
        nbytes = int(np.prod(shape)) * 8 + _CRC
        coords = (i // self.view.shard_size, 0, 0, 0)
        path = self._path("dense", coords)
        raw = self._ranges.read(path, self._ranges.size(path) - nbytes, nbytes)
        self._check(raw, i, "the dense shard index", "dense", coords)
        return np.frombuffer(raw, dtype="<u8", count=nbytes // 8).reshape(shape)

    def _tile(self, i: int, a: int, b: int) -> np.ndarray:
        shard, local = divmod(i, self.view.shard_size)
        offset, nbytes = self._shard_index(shard, i)[local, a, b, 0]
        (th, tw), c = self.spec.tile, self.spec.stored_channels
        if offset == _EMPTY:
            return np.zeros((th, tw, c), dtype=self._dtypes["dense"])
        coords = (shard, 0, 0, 0)
        raw = self._ranges.read(self._path("dense", coords), int(offset), int(nbytes), writable=True)
        if self.verify_checksums:
            self._check(raw, i, "dense" if self.spec.tiles == (1, 1) else f"dense tile {(a, b)}", "dense", coords)
        return np.frombuffer(raw, dtype=self._dtypes["dense"], count=th * tw * c).reshape(th, tw, c)

    def _row(self, name: str, i: int) -> np.ndarray:
        if not self._fast:
            return np.asarray(self._arrays[name][i])
        shard, local = divmod(i, self.view.shard_size)
        arrays = self._small.get(shard)
        if arrays is None:
            arrays = {n: self._small_chunk(n, i) for n in _SMALL}
            self._small.put(shard, arrays)
        return arrays[name][local]

    def _small_chunk(self, name: str, i: int) -> np.ndarray:
        """The whole chunk (S rows) of small array ``name`` that holds row ``i``, checked once."""
        arr, dtype = self._arrays[name], self._dtypes[name]
        if self._small_row_bytes(name) == 0:  # e.g. a view without summaries: zarr stores no object
            return np.zeros((self.view.shard_size, *arr.shape[1:]), dtype)
        coords = self._chunk_of(name, i // self.view.shard_size)
        nbytes = self._small_row_bytes(name) * self.view.shard_size
        raw = self._ranges.read(self._path(name, coords), 0, nbytes + _CRC)
        if self.verify_checksums:
            self._check(raw, i, name, name, coords)
        return np.frombuffer(raw, dtype=dtype, count=nbytes // dtype.itemsize).reshape(-1, *arr.shape[1:])

    def _chunk_of(self, name: str, shard: int) -> tuple[int, ...]:
        """The chunk coordinates of array ``name``'s one chunk (a shard) holding ``shard``'s rows."""
        return (shard,) + (0,) * (self._arrays[name].ndim - 1)

    def _small_row_bytes(self, name: str) -> int:
        return int(np.prod(self._arrays[name].shape[1:], dtype=np.int64)) * self._dtypes[name].itemsize

    def _small_bytes_per_shard(self) -> int:
        return self.view.shard_size * sum(self._small_row_bytes(n) for n in _SMALL)

    def _empty(self, i: int, window, space: str) -> Sample:
        r0, r1, c0, c1 = self._window(window)
        dtype = self.spec.codec_type.dtype_in(space)
        width = self.spec.stored_channels if space == "stored" else self.spec.channels
        return Sample(index=i, dense=np.zeros((r1 - r0, c1 - c0, width), dtype),
                      summary=np.zeros(self.spec.summary_channels, self._dtypes["summary"]),
                      box=np.zeros(4, np.float32), valid=False)


class _ShardLRU:
    """The small arrays of the ``max_shards`` most recently read shards; thread-safe.

    Two threads missing the same shard both fetch it (the same bytes); neither waits for the
    other's I/O under the lock.
    """

    def __init__(self, max_shards: int):
        self.max_shards = max_shards
        self._items: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, shard: int) -> dict[str, np.ndarray] | None:
        with self._lock:
            arrays = self._items.get(shard)
            if arrays is not None:
                self._items.move_to_end(shard)
            return arrays

    def put(self, shard: int, arrays: dict[str, np.ndarray]) -> None:
        with self._lock:
            self._items[shard] = arrays
            self._items.move_to_end(shard)
            while len(self._items) > self.max_shards:
                self._items.popitem(last=False)
