"""The Zarr side of the cache: stores, array layouts and a store that checksums what it writes.

Every array is created with its final shape by the driver (DESIGN.md §2). ``dense`` is sharded
(one shard = S images, one inner chunk = one image or one spatial tile of it); the small arrays
are plain chunks of S rows. Every chunk carries a crc32c, and so does every shard index.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from contextlib import contextmanager

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import Buffer
from zarr.errors import ContainsArrayError, ZarrUserWarning
from zarr.storage import MemoryStore, WrapperStore

from featcache.errors import UsageError
from featcache.store.location import Location
from featcache.store.shardwriter import object_crc32
from featcache.store.spec import ViewSpec

#: The arrays of a view, in the order a shard writes them; ``valid`` goes last so that a row
#: reads as valid only after its features are in place.
ARRAYS = ("dense", "summary", "box", "valid")


def zarr_store(loc: Location, read_only: bool = False):
    """A zarr store over the location, whatever its backend (same code above this line)."""
    return loc.backend.zarr_store(loc.path, loc.uri, read_only=read_only)


@contextmanager
def writes_settled_on_error():
    """Let an error out of the block only once every zarr write it started has ended.

    Zarr writes a node's parent groups alongside the node, all at once; when one write fails (a
    full disk), the error comes back while the others still run in zarr's threads, each about to
    remove its own ``<name>.<hex>.partial`` file. Waiting for them keeps a one-line error from
    leaving such a file behind (the caller may exit, or look, at once).
    """
    try:
        yield
    except BaseException:
        _settle()
        raise


def _settle(timeout: float = 60.0) -> None:
    """Wait (up to ``timeout`` s) for the tasks still running on zarr's event loop."""
    from zarr.core.sync import sync

    async def others() -> None:
        running = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.gather(*running, return_exceptions=True)

    try:
        sync(others(), timeout=timeout)
    except Exception:  # noqa: BLE001 - the caller's error is the one to report
        pass


def array_layouts(spec: ViewSpec, num_images: int, shard_size: int) -> dict[str, dict]:
    """Keyword arguments of ``zarr.create_array`` for each array of a view."""
    n, s = num_images, shard_size
    (h, w), (th, tw), c = spec.grid, spec.tile, spec.stored_channels
    common = {"compressors": [Crc32cCodec()], "fill_value": 0, "config": {"write_empty_chunks": True}}
    return {
        "dense": dict(shape=(n, h, w, c), chunks=(1, th, tw, c), shards=(s, h, w, c), dtype=spec.dtype,
                      dimension_names=("image", "row", "col", "channel"), **common),
        "summary": dict(shape=(n, spec.summary_channels), chunks=(s, spec.summary_channels),
                        dtype=spec.codec_type.summary_dtype,
                        dimension_names=("image", "summary_channel"), **common),
        "box": dict(shape=(n, 4), chunks=(s, 4), dtype="float32", dimension_names=("image", "xyxy"), **common),
        "valid": dict(shape=(n,), chunks=(s,), dtype="uint8", dimension_names=("image",), **common),
    }


def shard_object_keys(group: zarr.Group, shard: int) -> dict[str, str]:
    """Store key (relative to the view group) of the object each array writes for ``shard``."""
    keys = {}
    for name in ARRAYS:
        arr = group[name]
        coords = (shard,) + (0,) * (arr.ndim - 1)
        keys[name] = f"{name}/{arr.metadata.encode_chunk_key(coords)}"
    return keys


class ChecksumStore(WrapperStore):
    """Wraps a store and records a checksum of every object written through it.

    The commit marker stores these, so ``verify`` can compare what is stored now with what the
    writer wrote, without the writer reading anything back.
    """

    def __init__(self, store):
        super().__init__(store)
        self.written: dict[str, int] = {}

    async def set(self, key: str, value: Buffer) -> None:
        self.written[key] = object_checksum(value.as_numpy_array())
        await self._store.set(key, value)

    async def _set_many(self, values) -> None:
        for key, value in values:
            await self.set(key, value)


def object_checksum(data) -> int:
    """The checksum featcache records for a whole stored object: zlib's CRC-32.

    Not crc32c: every object zarr writes here ends with the crc32c of what precedes it, and the
    crc32c of a message followed by its own crc32c is the same constant for every message.
    """
    return object_crc32(data)


def open_root(loc: Location, mode: str = "r") -> zarr.Group:
    """Open the ``features.zarr`` group from its live metadata.

    Never from the consolidated copy in the root ``zarr.json`` (see :func:`consolidate`): a job
    creating views or publishing statistics changes the metadata after that copy was written.
    """
    store = zarr_store(loc, read_only=mode == "r")
    return zarr.open_group(store, mode=mode, zarr_format=3, use_consolidated=False)


def consolidate(loc: Location) -> None:
    """Copy the metadata of every group and array into the root ``zarr.json`` (driver only).

    For readers featcache does not control (xarray, whose ``open_zarr`` warns without it); featcache
    itself never reads that copy. Zarr warns that consolidated metadata is not yet part of the v3
    spec: that is known and accepted here (xarray and zarr-python read it), so that one warning is
    silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part",
                                category=ZarrUserWarning)
        zarr.consolidate_metadata(zarr_store(loc), zarr_format=3)


_ID_ROWS_PER_CHUNK = 1 << 20


def _image_id_layout(rows: int) -> dict:
    """``create_array`` arguments of a view's ``image_id`` array of ``rows`` rows."""
    chunk = max(1, min(rows, _ID_ROWS_PER_CHUNK))
    return dict(shape=(rows,), dtype=str, chunks=(chunk,), dimension_names=("image",), compressors=[Crc32cCodec()])


def write_image_ids(group: zarr.Group, image_ids: np.ndarray) -> None:
    """Write ``image_id`` (variable-length UTF-8, dimension ``image``) into a view group (driver only).

    The group's attrs name it in ``coordinates``, so xarray opens it as the view's coordinate.
    Chunks of up to 2**20 rows: creating a view of ImageNet-1k writes two objects, not one per shard.
    Idempotent: a process creating the same view at the same time writes the same values.
    """
    try:
        arr = group.create_array("image_id", **_image_id_layout(len(image_ids)))
    except ContainsArrayError:
        arr = group["image_id"]
    arr[...] = image_ids


def replace_image_ids(view: Location, image_ids: np.ndarray) -> None:
    """Rewrite a view's ``image_id`` array for a cache that grew (driver only): the same objects a view
    created at this length holds (its chunking follows the length), its metadata written last."""
    _write_via_memory(view, "image_id", image_ids, _image_id_layout(len(image_ids)))


def resize_rows(array: Location, rows: int) -> None:
    """Set the first dimension of the array at ``array`` to ``rows`` in its ``zarr.json`` (one atomic
    write; no chunk is touched), formatted as zarr writes it."""
    meta_loc = array.join("zarr.json")
    meta = json.loads(meta_loc.read_bytes())
    meta["shape"][0] = rows
    meta_loc.write_bytes_atomic(json.dumps(meta, allow_nan=True, indent=zarr.config.get("json_indent")).encode())


def as_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """Cast to a stored dtype, refusing silent overflow for integer codecs."""
    if np.dtype(dtype).kind == "i" and x.dtype.kind == "f":
        raise UsageError(f"cannot store floats as {dtype}: the view takes its codec's codes "
                         "(featcache.store.codec.Codec.encode)")
    return np.ascontiguousarray(x, dtype=dtype)


def write_small_array(parent: Location, name: str, values: np.ndarray, dimension_names: tuple[str, ...]) -> None:
    """Write a one-chunk array ``parent/name`` object by object, each replaced atomically.

    Writers racing with the same values leave a complete array whatever the interleaving (zarr's
    own ``create_array(overwrite=True)`` deletes the folder first and could remove a racer's chunk).
    """
    _write_via_memory(parent, name, values, dict(shape=values.shape, dtype=values.dtype, chunks=values.shape,
                                                 fill_value=0, dimension_names=dimension_names,
                                                 compressors=[Crc32cCodec()]))


def _write_via_memory(parent: Location, name: str, values: np.ndarray, layout: dict) -> None:
    """Encode the array ``name`` in memory, then write its objects under ``parent`` one by one, each
    replaced atomically, its ``zarr.json`` last (until then the old metadata describes the array)."""
    memory = MemoryStore()
    arr = zarr.create_array(memory, name=name, **layout)
    arr[...] = values
    objects = [(k, buf) for k, buf in memory._store_dict.items() if k.startswith(name + "/")]  # not the implicit root
    for key, buf in sorted(objects, key=lambda kv: kv[0].endswith("zarr.json")):
        parent.join(*key.split("/")).write_bytes_atomic(buf.to_bytes())
