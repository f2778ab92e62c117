"""The default reader checks every chunk's crc32c: a flipped byte raises, naming the row and object."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from featcache.errors import CacheFormatError, ChecksumError
from featcache.store.zarrio import shard_object_keys
from tests.support.caches import make_cache, shard_data, write_all

SHARD = 4  # images per shard in these caches; image 5 is row 1 of shard 1


def _object(view, name: str, shard: int):
    """Location of the object ``name`` writes for ``shard``."""
    return view.loc.join(*shard_object_keys(view.group, shard)[name].split("/"))


def _flip(loc, offset: int) -> None:
    """Invert one stored byte in place (local disk or S3: the whole object is rewritten)."""
    data = bytearray(loc.fs.cat_file(loc.path))
    data[offset] ^= 0xFF
    loc.fs.pipe_file(loc.path, bytes(data))


def _tile_offset(view, i: int) -> int:
    """Byte offset of image ``i``'s first tile in its shard object, parsed from the shard index."""
    shard, local = divmod(i, view.shard_size)
    loc = _object(view, "dense", shard)
    tiles = int(np.prod(view.spec.tiles))
    nbytes = view.shard_size * tiles * 16 + 4
    raw = loc.fs.cat_file(loc.path)
    index = np.frombuffer(raw[-nbytes:-4], dtype="<u8").reshape(view.shard_size, tiles, 2)
    return int(index[local, 0, 0])


def _flip_dense(view, i: int, byte: int = 3) -> None:
    _flip(_object(view, "dense", i // view.shard_size), _tile_offset(view, i) + byte)


@pytest.mark.parametrize("tile", [None, (2, 3)], ids=["whole-image-chunks", "spatial-tiles"])
def test_flipped_dense_byte_raises_naming_row_and_object(cache_root, tile):
    _, view = make_cache(cache_root, n=10, shard_size=SHARD, tile=tile)
    write_all(view, seed=1)
    _flip_dense(view, 5)
    reader = view.reader()
    with pytest.raises(ChecksumError) as err:
        reader.read(5)
    msg = str(err.value)
    assert "\n" not in msg and view.key in msg and "row 5" in msg and "dense" in msg
    assert shard_object_keys(view.group, 1)["dense"] in msg and "featcache verify" in msg
    assert isinstance(err.value, CacheFormatError)
    want = shard_data(view, 1, seed=1)["dense"]
    for i in (4, 6, 7):
        np.testing.assert_array_equal(reader.read(i).dense, want[i - 4])


def test_tiles_other_than_the_damaged_one_still_read(tmp_path):
    _, view = make_cache(str(tmp_path), n=8, shard_size=SHARD, tile=(2, 3))
    write_all(view, seed=1)
    _flip_dense(view, 5)  # tile (0, 0) of image 5
    reader = view.reader()
    with pytest.raises(ChecksumError, match=r"tile \(0, 0\)"):
        reader.read_dense(5, (0, 2, 0, 3))
    np.testing.assert_array_equal(reader.read_dense(5, (2, 4, 3, 6)), shard_data(view, 1, seed=1)["dense"][1, 2:, 3:])


def test_opt_out_returns_the_flipped_values(cache_root):
    _, view = make_cache(cache_root, n=10, shard_size=SHARD)
    write_all(view, seed=1)
    _flip_dense(view, 5, byte=3)
    got = view.reader(verify_checksums=False).read(5).dense
    want = shard_data(view, 1, seed=1)["dense"][1]
    diff = np.flatnonzero(np.frombuffer(got.tobytes(), np.uint8) != np.frombuffer(want.tobytes(), np.uint8))
    assert diff.tolist() == [3]


@pytest.mark.parametrize("name", ["summary", "box", "valid"])
def test_flipped_small_array_byte_raises_for_every_row_of_its_shard(cache_root, name):
    _, view = make_cache(cache_root, n=10, shard_size=SHARD)
    write_all(view, seed=1)
    _flip(_object(view, name, 1), 0)
    reader = view.reader()
    for i in range(4, 8):
        with pytest.raises(ChecksumError, match=rf"row {i}\b.*{name}.*featcache verify"):
            reader.read(i)
    for i in (0, 3, 8, 9):
        assert reader.read(i).valid


@pytest.mark.parametrize("kwargs", [{}, {"dtype": "float32"}, {"tile": (2, 3)}, {"dtype": "int8"}],
                         ids=["f16", "f32", "tiled", "int8-codes"])
def test_no_false_alarms_on_a_clean_cache(cache_root, kwargs):
    _, view = make_cache(cache_root, n=10, shard_size=SHARD, **kwargs)
    write_all(view, seed=2, errors={9: "decode failed"})
    reader = view.reader()
    for k in range(view.num_shards):
        want = shard_data(view, k, seed=2)
        for i in range(*view.shard_range(k)):
            got = reader.read(i, space="stored")
            if i != 9:
                np.testing.assert_array_equal(got.dense, want["dense"][i - k * SHARD])
                np.testing.assert_array_equal(got.summary, want["summary"][i - k * SHARD])
                np.testing.assert_array_equal(got.box, want["box"][i - k * SHARD])
            assert got.valid == (i != 9)


class _Counting:
    """Wraps a reader's byte-range source and counts reads by array name."""

    def __init__(self, ranges):
        self.ranges, self.counts, self._lock = ranges, {}, threading.Lock()

    def read(self, path: str, offset: int, length: int, writable: bool = False) -> bytes:
        name = next(n for n in ("dense", "summary", "box", "valid") if f"/{n}/" in path)
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1
        return self.ranges.read(path, offset, length, writable)

    def __getattr__(self, attr):
        return getattr(self.ranges, attr)


def test_an_epoch_fetches_small_arrays_once_per_shard(tmp_path):
    _, view = make_cache(str(tmp_path), n=10, shard_size=SHARD)
    write_all(view, seed=1)
    reader = view.reader()
    reader._ranges = _Counting(reader._ranges)
    for i in np.random.default_rng(0).permutation(10):
        reader.read(int(i))
    shards = view.num_shards
    assert reader._ranges.counts == {"dense": 10 + shards, "summary": shards, "box": shards, "valid": shards}


def test_threads_share_a_one_shard_cache(tmp_path):
    from featcache.store.reader import ViewReader

    _, view = make_cache(str(tmp_path), n=24, shard_size=SHARD)
    write_all(view, seed=3)
    reader = ViewReader(view, small_cache_bytes=1)  # room for one shard: threads keep evicting each other
    want = {k: shard_data(view, k, seed=3) for k in range(view.num_shards)}
    failures = []

    def work(seed: int) -> None:
        for i in np.random.default_rng(seed).integers(0, 24, 200):
            k, r = divmod(int(i), SHARD)
            got = reader.read(int(i))
            if not (np.array_equal(got.summary, want[k]["summary"][r]) and np.array_equal(got.box, want[k]["box"][r])):
                failures.append(int(i))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@pytest.mark.parametrize("tile", [None, (2, 3)], ids=["whole-image-chunks", "spatial-tiles"])
def test_reading_a_window_into_a_batch_buffer_equals_read_dense_and_checks_crc32c(cache_root, tile):
    """``read_dense_into`` (one scattered read per tile into a padded batch buffer on local disk, a
    read and a copy on S3) gives ``read_dense`` for windows inside one tile, across tiles and whole;
    a flipped byte outside the window still fails the tile's crc32c."""
    _, view = make_cache(cache_root, n=10, shard_size=SHARD, tile=tile)
    write_all(view, seed=2)
    reader = view.reader()
    h, w, c = *view.spec.grid, view.spec.channels
    for window in [(0, h, 0, w), (1, 2, 1, 3), (0, h - 1, 1, w), (1, h, 0, 2)]:
        r0, r1, c0, c1 = window
        batch = np.full((2, h + 1, w + 2, c), 7, dtype=reader.read_dense(5, window, "stored").dtype)
        reader.read_dense_into(5, window, batch[1, :r1 - r0, :c1 - c0])
        np.testing.assert_array_equal(batch[1, :r1 - r0, :c1 - c0], reader.read_dense(5, window, "stored"))
        assert (batch[0] == 7).all() and (batch[1, r1 - r0:] == 7).all() and (batch[1, :, c1 - c0:] == 7).all()
    _flip_dense(view, 5, byte=view.spec.tile[1] * c * 2 + 1)  # in the tile's second row: outside (0, 1, ...)
    out = np.zeros((1, 1, c), dtype=batch.dtype)
    with pytest.raises(ChecksumError, match="row 5"):
        view.reader().read_dense_into(5, (0, 1, 0, 1), out)
