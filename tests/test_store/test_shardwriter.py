"""The shard writer: byte for byte what zarr-python writes, read by plain zarr and tensorstore, verified,
written whole on S3, and a writer killed mid-object leaves no commit (a rerun writes the same bytes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, TransposeCodec, ZstdCodec
from zarr.storage import MemoryStore

import featcache
from featcache.store.location import locate
from featcache.store import Cache, shardwriter
from featcache.store.shardwriter import ArrayLayout, LayoutNotSupported
from featcache.store.zarrio import ARRAYS, ChecksumStore, array_layouts, zarr_store
from tests.support.caches import make_cache, shard_data, write_all

REPO = Path(__file__).resolve().parents[2]
FAILED_SHARD = 1  # every row of shard 1 fails in the cache tests; shard 2 is the short last shard


def _expected(view, shard: int, seed: int, failed: set[int]) -> dict[str, np.ndarray]:
    """The rows a shard stores, built without featcache's writer: failed rows are zeros, valid 0."""
    start, stop = view.shard_range(shard)
    rows = {name: x.astype(view.group[name].dtype) for name, x in shard_data(view, shard, seed).items()}
    rows["valid"] = np.ones(stop - start, np.uint8)
    for i in failed & set(range(start, stop)):
        for x in rows.values():
            x[i - start] = 0
    return rows


def _write_with_zarr(view, shard: int, rows: dict) -> dict[str, int]:
    """``shard`` stored by zarr-python (``write_empty_chunks``, as featcache wrote before the shard
    writer); the checksums a ChecksumStore records of the objects it wrote."""
    store = ChecksumStore(zarr_store(view.cache.features))
    group = zarr.open_group(store, path=view.key, mode="r+", zarr_format=3)
    start, stop = view.shard_range(shard)
    for name in ARRAYS:
        group[name].with_config({"write_empty_chunks": True})[start:stop] = rows[name]
    return {k[len(view.key) + 1:]: v for k, v in store.written.items() if k.startswith(view.key + "/")}


def _objects(root, key: str) -> dict[str, bytes]:
    """Every object the arrays of view ``key`` hold, by path relative to the view (any filesystem)."""
    loc = locate(str(root)).join("features.zarr", key)
    found = {}
    for name in ARRAYS:
        for path in loc.backend.find(loc.join(name, "c").path):
            found[path[len(loc.path) + 1:]] = loc.backend.read(path)
    return found


def _failed_rows(view) -> dict[int, str]:
    return {i: "decode: broken" for i in range(*view.shard_range(FAILED_SHARD))}


@pytest.mark.parametrize("tile", [None, (2, 2)], ids=["whole-images", "tiled"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_every_object_is_byte_identical_to_zarr_python(tmp_path, dtype, tile):
    """f16, f32 and int8-phis views (int8 dense, float16 summary), whole-image and tiled inner chunks;
    a shard whose rows all failed and a short last shard. The tiled grid (4x6 cells, 2x2 tiles,
    4 images a shard) puts the chunks of a shard in a Morton order that is not C order."""
    _, view = make_cache(str(tmp_path / "writer"), n=10, shard_size=4, tile=tile, dtype=dtype)
    _, reference = make_cache(str(tmp_path / "zarr"), n=10, shard_size=4, tile=tile, dtype=dtype)
    write_all(view, seed=3, errors=_failed_rows(view))
    recorded = {}
    for k in range(view.num_shards):
        recorded.update(_write_with_zarr(reference, k, _expected(reference, k, 3, set(_failed_rows(view)))))
    got, want = _objects(tmp_path / "writer", view.key), _objects(tmp_path / "zarr", view.key)
    assert sorted(got) == sorted(want) and len(got) == 4 * view.num_shards
    assert [k for k in want if got[k] != want[k]] == []
    markers = {k: v for s in range(view.num_shards) for k, v in view.commit_record(s).checksums.items()}
    assert markers == recorded == {k: zlib.crc32(b) for k, b in got.items()}
    problems = featcache.verify(str(tmp_path / "writer")).problems  # an int8-phis view also needs its calibration
    assert [p.kind for p in problems] == (["codec"] if dtype == "int8" else []), [str(p) for p in problems]


def _zarr_array(shape, dtype, chunks, **kwargs):
    return zarr.create_array(MemoryStore(), shape=shape, dtype=dtype, chunks=chunks, fill_value=0,
                             config={"write_empty_chunks": True}, **kwargs)


def _sharding(endian: str, crc: bool, location: str, chunk_shape=(2, 2, 3, 3)) -> ShardingCodec:
    codecs = [BytesCodec(endian=endian)] + [Crc32cCodec()] * crc
    return ShardingCodec(chunk_shape=chunk_shape, codecs=codecs, index_codecs=codecs, index_location=location)


@pytest.mark.parametrize("location", ["end", "start"])
@pytest.mark.parametrize("endian", ["little", "big"])
@pytest.mark.parametrize("crc", [True, False], ids=["crc32c", "no-crc"])
def test_layouts_beyond_featcache_s_own_are_encoded_as_zarr_writes_them(endian, crc, location):
    """What the metadata says is what is written: byte order, checksums, index at either end; inner
    chunks of two rows, one of them half past the array's end (11 rows, shards of 4)."""
    array = _zarr_array((11, 4, 6, 3), "float32", (4, 4, 6, 3), serializer=_sharding(endian, crc, location),
                        compressors=None)
    _assert_shards_equal(array)


@pytest.mark.parametrize("dtype", ["float64", "int16", "uint8", "bool", "complex64"])
def test_plain_chunks_of_any_fixed_size_type_are_encoded_as_zarr_writes_them(dtype):
    array = _zarr_array((11, 3), dtype, (4, 3), compressors=[Crc32cCodec()])
    _assert_shards_equal(array)


def _assert_shards_equal(array) -> None:
    rng = np.random.default_rng(7)
    data = (rng.standard_normal(array.shape) * 40).astype(array.dtype)
    layout, per_shard = ArrayLayout.from_metadata(array.metadata), array.metadata.chunk_grid.chunk_shape[0]
    for k in range(-(-array.shape[0] // per_shard)):
        rows = data[k * per_shard:(k + 1) * per_shard]
        array[k * per_shard:(k + 1) * per_shard] = rows
        assert b"".join(layout.encode(k, rows)) == array.store._store_dict[layout.key(k)].to_bytes(), k


def test_unknown_layouts_are_refused():
    refused = [
        _zarr_array((8, 3), "float32", (4, 3), compressors=[ZstdCodec()]),
        _zarr_array((8, 4, 6, 3), "float16", (1, 4, 6, 3), shards=(4, 4, 6, 3), compressors=[ZstdCodec()]),
        _zarr_array((8, 3), "float32", (4, 3), filters=[TransposeCodec(order=(1, 0))]),
        _zarr_array((8, 3), "float32", (4, 1)),  # chunks that split a row
        _zarr_array((8,), str, (4,)),
    ]
    for array in refused:
        with pytest.raises(LayoutNotSupported):
            ArrayLayout.from_metadata(array.metadata)


def test_a_view_whose_layout_the_writer_does_not_know_is_written_through_zarr(tmp_path):
    """A dense array compressed with zstd (created by hand): zarr writes it, the other arrays go
    through the shard writer, and the cache verifies and reads back."""
    root = str(tmp_path / "cache")
    cache, view = make_cache(root, n=8, shard_size=4)
    layout = {**array_layouts(view.spec, 8, 4)["dense"], "compressors": [ZstdCodec(), Crc32cCodec()]}
    zarr.create_array(zarr_store(cache.features), name=f"{view.key}/dense", overwrite=True, **layout)
    view = Cache.open(root).view(view.key)
    assert view._layouts["dense"] is None and view._layouts["valid"] is not None
    write_all(view, seed=4)
    assert featcache.verify(root).ok
    with view.reader() as r:
        np.testing.assert_array_equal(r.read_dense(6), shard_data(view, 1, seed=4)["dense"][2])


def _written(tmp_path, tile) -> tuple[str, object]:
    root = str(tmp_path / "cache")
    _, view = make_cache(root, n=10, shard_size=4, grid=(4, 6), tile=tile)
    write_all(view, seed=5, errors=_failed_rows(view))
    return root, view


def _expected_arrays(view) -> dict[str, np.ndarray]:
    failed = set(_failed_rows(view))
    shards = [_expected(view, k, 5, failed) for k in range(view.num_shards)]
    return {name: np.concatenate([s[name] for s in shards]) for name in ARRAYS}


@pytest.mark.parametrize("tile", [None, (2, 3)], ids=["whole-images", "tiled"])
def test_plain_zarr_reads_what_the_writer_wrote(tmp_path, tile):
    root, view = _written(tmp_path, tile)
    group = zarr.open_group(f"{root}/features.zarr", mode="r")[view.key]
    for name, want in _expected_arrays(view).items():
        np.testing.assert_array_equal(group[name][:], want)
    assert featcache.verify(root).ok


def test_tensorstore_reads_what_the_writer_wrote(tmp_path):
    ts = pytest.importorskip("tensorstore")
    root, view = _written(tmp_path, (2, 3))
    for name, want in _expected_arrays(view).items():
        path = os.path.join(root, "features.zarr", view.key, name)
        array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}, open=True).result()
        np.testing.assert_array_equal(array.read().result(), want)


def _encoded_objects(folder: Path, sizes: list[int]) -> list:
    """Objects of 8-row shards (untiled, f16, rows of 16x16x``c``) encoded with their crc32c slots
    still to fill, as ``View.write_shard`` hands them to ``write_objects``."""
    objects = []
    for k, c in enumerate(sizes):
        array = _zarr_array((8, 16, 16, c), "float16", (8, 16, 16, c), serializer=_sharding("little", True, "end", (1, 16, 16, c)),
                            compressors=None)
        layout = ArrayLayout.from_metadata(array.metadata)
        rows = np.random.default_rng(k).standard_normal((8, 16, 16, c)).astype(np.float16)
        array[:] = rows
        objects.append((locate(str(folder)).join(f"object-{k}"), layout.encode_later(0, rows),
                        array.store._store_dict[layout.key(0)].to_bytes()))
    return objects


def test_slots_filled_beside_the_writes_give_the_bytes_zarr_writes(tmp_path, monkeypatch):
    """The writes wait for each crc32c slot they reach (the filler reports every 64 KiB here) and
    the checksums recorded are zlib's CRC-32 of the whole objects."""
    monkeypatch.setattr(shardwriter, "_NOTIFY_BYTES", 64 << 10)
    objects = _encoded_objects(tmp_path, [96, 8, 200])
    assert all(e.pending for _, e, _ in objects)
    checksums = shardwriter.write_objects([(loc, e) for loc, e, _ in objects])
    for (loc, _, want), checksum in zip(objects, checksums):
        assert loc.read_bytes() == want and checksum == zlib.crc32(want)
    assert not _partials(tmp_path)


def test_a_write_that_fails_midway_neither_hangs_nor_leaves_temporaries(tmp_path):
    """The second object's folder is a file: the error names it, the checksums' thread stops waiting
    for slots nobody fills, and the next writes work."""
    (tmp_path / "blocked").write_bytes(b"a file where a folder should be")
    objects = _encoded_objects(tmp_path, [64, 64])
    bad = [objects[0][:2], (locate(str(tmp_path)).join("blocked", "object-1"), objects[1][1])]
    began = time.monotonic()
    with pytest.raises(featcache.errors.StorageError, match="blocked/object-1"):
        shardwriter.write_objects(bad)
    assert time.monotonic() - began < 30 and not _partials(tmp_path)
    assert not (tmp_path / "object-0").exists()  # nothing renamed: the batch failed before its renames
    again = _encoded_objects(tmp_path, [64])
    assert shardwriter.write_objects([again[0][:2]]) == [zlib.crc32(again[0][2])]


@pytest.mark.s3
def test_objects_written_to_s3_are_the_bytes_zarr_python_writes_locally(tmp_path, s3_root):
    _, view = make_cache(s3_root, n=10, shard_size=4, tile=(2, 3))
    _, reference = make_cache(str(tmp_path / "zarr"), n=10, shard_size=4, tile=(2, 3))
    write_all(view, seed=6, errors=_failed_rows(view))
    for k in range(view.num_shards):
        _write_with_zarr(reference, k, _expected(reference, k, 6, set(_failed_rows(view))))
    got, want = _objects(s3_root, view.key), _objects(tmp_path / "zarr", view.key)
    assert sorted(got) == sorted(want) and [k for k in want if got[k] != want[k]] == []
    assert featcache.verify(s3_root).ok


@pytest.mark.s3
def test_a_large_object_goes_to_s3_in_parts_and_reads_back_whole(s3_root):
    """Above twice s3fs's 50 MiB part size, ``pipe_file`` uploads in parts: still one whole object."""
    parts = [np.full(34 << 20, i, np.uint8) for i in range(3)] + [np.arange(1 << 20, dtype=np.uint32).view(np.uint8)]
    loc = locate(s3_root).join("big")
    [checksum] = shardwriter.write_objects([(loc, parts)])
    stored = loc.read_bytes()
    assert stored == b"".join(parts) and checksum == zlib.crc32(stored)
    assert str(loc.fs.info(loc.path)["ETag"]).strip('"').endswith("-3")  # 3 parts of <= 50 MiB


KILLED = textwrap.dedent("""
    import sys
    from featcache.store import Cache
    from tests.test_store.test_shardwriter import big_rows
    view = Cache.open(sys.argv[1]).view("dinov3@224")
    view.write_shard(0, **big_rows(view, seed=1))
""")


def big_rows(view, seed: int) -> dict[str, np.ndarray]:
    """A shard of rows, quick to make however large: one random image, shifted by a step per row."""
    rng = np.random.default_rng(seed)
    n, (h, w), c = view.shard_size, view.spec.grid, view.spec.channels
    image = rng.standard_normal((h, w, c), dtype=np.float32)
    dense = np.empty((n, h, w, c), np.float16)
    for i in range(n):
        np.add(image, i / 4, out=dense[i], casting="unsafe")
    return {"dense": dense,
            "summary": rng.standard_normal((n, view.spec.summary_channels), dtype=np.float32).astype(np.float16),
            "box": rng.uniform(0, 500, (n, 4)).astype(np.float32)}


def _partials(folder: Path) -> list[Path]:
    return list(folder.glob("*.partial")) if folder.is_dir() else []


def test_a_writer_killed_mid_object_leaves_no_commit_and_a_rerun_writes_the_same_bytes(tmp_path):
    """A committed shard of 128 MiB is rewritten with new values by a process SIGKILLed while its dense
    object is being written: no marker, the old dense object still whole (objects are replaced, never
    written in place), the temporary file left behind; the rewrite run again stores zarr-python's
    bytes and leaves no temporary file."""
    root = str(tmp_path / "cache")
    _, view = make_cache(root, n=16, shard_size=16, grid=(64, 64), channels=1024)
    view.write_shard(0, **big_rows(view, seed=0))
    old_dense = _objects(root, view.key)["dense/c/0/0/0/0"]
    dense_dir = tmp_path / "cache" / "features.zarr" / view.key / "dense" / "c" / "0" / "0" / "0"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, root], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while not _partials(dense_dir):
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never started the dense object"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert view.commit_record(0) is None and view.committed_shards() == set()
    assert _partials(dense_dir) and (dense_dir / "0").read_bytes() == old_dense
    report = featcache.verify(root)
    assert report.ok and report.shards_checked == 0

    rows = big_rows(view, seed=1)
    commit = view.write_shard(0, **rows)
    assert not _partials(dense_dir)
    want = _zarr_bytes(view, {**rows, "valid": np.ones(16, np.uint8)})
    got = _objects(root, view.key)
    assert sorted(got) == sorted(want) and [k for k in want if got[k] != want[k]] == []
    assert commit.checksums == {k: zlib.crc32(b) for k, b in want.items()}
    assert featcache.verify(root).ok


def _zarr_bytes(view, rows: dict) -> dict[str, bytes]:
    """The objects zarr-python writes for shard 0 of ``view``, in memory (arrays created as the view's)."""
    store = MemoryStore()
    for name, layout in array_layouts(view.spec, view.num_images, view.shard_size).items():
        zarr.create_array(store, name=name, **layout)[0:view.shard_size] = rows[name]
    return {k: b.to_bytes() for k, b in store._store_dict.items() if "/c/" in k}
