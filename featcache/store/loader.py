"""The DataLoader-safe reader of a cache: windows of several views of one image in one call.

Picklable: a DataLoader's spawned workers receive it, and each process opens its own view readers,
files and locks on first use (none crosses a fork). Training reads the cache through it
(``featcache.train.data``), with the public methods the trainer needs: the space each view's
windows are read in, the PHI-S transform the device applies, boxes, windows, image bytes.
"""

from __future__ import annotations

import os

import numpy as np

from featcache.errors import UsageError
from featcache.sources.read import ImageReader
from featcache.store.cache import Cache


class CacheReader:
    """Windows of several views of one image in one call, for training.

    Picklable (a DataLoader's spawned workers receive it): its view readers, files and locks are
    opened lazily in each process that reads, never shared across a fork. ``len()`` and
    :attr:`rows` count only usable rows (committed and valid in every view); :meth:`row_of` looks
    a row up by ``image_id``.
    """

    def __init__(self, root: str, keys: list[str], space: str = "phis", whole_shards: int = 0):
        self.root, self.keys, self.space = root, list(keys), space
        self.whole_shards = whole_shards  # > 0: each view reads whole shard objects, holding that many
        cache = Cache.open(root)
        missing = [k for k in self.keys if k not in cache.views]
        if missing:
            raise UsageError(f"{root} has no view {', '.join(missing)} (views: {', '.join(cache.views) or 'none'})")
        self.rows = usable_rows(cache, self.keys)
        self.uris = cache.manifest.column("uri").to_pylist()
        self.sizes = np.stack([cache.manifest.column(c).to_numpy() for c in ("width", "height")], axis=1)
        self._ids: dict[str, int] | None = None
        self._images: ImageReader | None = None
        self._pid: int | None = None
        self._readers: dict = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"], state["_pid"], state["_ids"], state["_images"] = {}, None, None, None
        return state

    def image_bytes(self, row: int) -> bytes:
        """The encoded source image of ``row``, wherever it lies (a file, a tar member, a Parquet
        row: a Parquet row reads its row group each time), as indexed."""
        if self._images is None:
            self._images = ImageReader(Cache.open(self.root).manifest)
        return self._images.read(row)

    def row_of(self, image_id: str) -> int:
        """The image row of ``image_id`` (a UsageError when the manifest has none)."""
        if self._ids is None:
            ids = Cache.open(self.root).manifest.column("image_id").to_pylist()
            self._ids = {v: i for i, v in enumerate(ids)}
        try:
            return self._ids[image_id]
        except KeyError:
            raise UsageError(f"no image_id {image_id!r} in {self.root}") from None

    def view(self, key: str):
        """The view reader of ``key`` for this process, opened on first use."""
        if self._pid != os.getpid():
            self._readers, self._pid = {}, os.getpid()
        if key not in self._readers:
            self._readers[key] = Cache.open(self.root).view(key).reader(whole_shards=self.whole_shards)
        return self._readers[key]

    def device_space(self, key: str) -> str:
        """The space a loader reads ``key``'s windows in when decoding is left to the training device:
        stored values (no copy, no matrix product on the loader's CPU) for a codec that stores the raw
        floats (f16/f32) or decodes on the device (int4-pca); other codecs decode on the loader
        (int8-phis: one table lookup per code), so they read ``self.space``."""
        codec = self.view(key).spec.codec_type
        return "stored" if codec.stores_raw or codec.decodes_on_device else self.space

    def device_decoder(self, key: str):
        """What the training device applies to ``key``'s windows before the lookup: the codec's
        ``decode_torch`` into this reader's space (a uint8 window → float32), or None when the windows
        arrive as floats."""
        reader = self.view(key)
        if not reader.spec.codec_type.decodes_on_device:
            return None
        codec, space = reader.codec, self.space
        return lambda windows: codec.decode_torch(windows, space)

    def phis_transform(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(mean, rotation) the device applies to ``key``'s looked-up targets, ``(x - mean) @ rotation.T``,
        or None when the windows already are (or decode to) this reader's space. Exact after the
        lookup: its weights sum to one per cell, so the affine transform commutes with it."""
        if self.space != "phis" or self.device_space(key) == "phis" or self.device_decoder(key) is not None:
            return None
        return self.view(key).phis()

    def box(self, key: str, row: int) -> tuple[float, ...]:
        """The source box (x0, y0, x1, y1) view ``key`` saw of image ``row``; a row without features is a UsageError."""
        reader = self.view(key)
        if not reader.row("valid", row):
            raise UsageError(f"{key}: image row {row} holds no features (failed or not written yet)")
        return tuple(float(v) for v in reader.row("box", row))

    def read(self, row: int, windows: dict[str, tuple[int, int, int, int] | None],
             space: str | None = None, dense: bool = True) -> dict[str, dict]:
        """Per view key: ``dense`` (the window, in ``space``, by default this reader's; None without
        ``dense``), ``summary``, ``box`` and ``bytes`` (chunk bytes the window moves); a window of None
        reads the whole map."""
        out = {}
        for key, window in windows.items():
            reader = self.view(key)
            box = self.box(key, row)
            out[key] = {"dense": reader.read_dense(row, window, space or self.space) if dense else None, "box": box,
                        "summary": reader.row("summary", row) if reader.spec.summary_channels else None,
                        "bytes": reader.bytes_for(window)}
        return out


def usable_rows(cache: Cache, keys: list[str]) -> np.ndarray:
    """Rows whose every view in ``keys`` is committed and valid."""
    ok = np.ones(cache.num_images, dtype=bool)
    for key in keys:
        view = cache.view(key)
        valid = np.asarray(view.group["valid"][:]).astype(bool)
        committed = np.zeros(cache.num_images, dtype=bool)
        for shard in view.committed_shards():
            start, stop = view.shard_range(shard)
            committed[start:stop] = True
        ok &= valid & committed
    return np.flatnonzero(ok)
