"""Indexing Parquet image tables: the image column found or named, rows located by row group and
row, scalar columns kept, unusable rows listed; workers read each row group once per shard."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import featcache
from featcache.cli import main
from featcache.errors import ImageError, UsageError
from featcache.manifest import CHANGED
from featcache.sources import parquet, row_uri
from featcache.sources.read import ImageReader, RowGroups
from tests.support.images import photo
from tests.test_sources.conftest import GOOD, INDEX_FAILS, MEMBERS, SHARDS, labels

PHOTOS = ("coffee", "chelsea", "rocket", "astronaut", "camera")


def _manifest(root) -> pa.Table:
    return pq.read_table(os.path.join(root, "manifest.parquet"))


def test_rows_are_located_by_row_group_and_row(layouts, tmp_path):
    result = featcache.index(layouts.table, tmp_path / "c")
    rows = _manifest(tmp_path / "c").to_pylist()
    everything = [(s, k) for s in SHARDS for k, _, _ in MEMBERS[s]]
    data = {(s, k): d for s in SHARDS for k, _, d in MEMBERS[s]}
    assert result.images == len(rows) == len(GOOD)
    for row, sample in zip(rows, GOOD):
        n = everything.index(sample)  # the row in the whole file; written in row groups of 3
        assert (row["row_group"], row["row_in_group"]) == (n // 3, n % 3)
        assert row["uri"] == row_uri(str(layouts.table), n) and row["image_id"] == f"images.parquet/{n}"
        assert (row["container"], row["member"]) == (str(layouts.table), "image")
        assert (row["label"], row["shard"]) == (labels()[sample], sample[0])
        assert row["size"] == os.path.getsize(layouts.table)
        assert ImageReader(_manifest(tmp_path / "c")).read(row["index"]) == data[sample]
    assert "tags" not in rows[0]  # a list column is not a manifest column
    (bad,) = INDEX_FAILS
    assert [uri for uri, _ in result.failed] == [row_uri(str(layouts.table), everything.index(bad))]


def test_a_shard_reads_each_row_group_once(layouts, tmp_path, monkeypatch):
    featcache.index(layouts.table, tmp_path / "c")
    manifest = _manifest(tmp_path / "c")
    loads = []
    real = parquet.read_row_group
    monkeypatch.setattr(parquet, "read_row_group", lambda loc, g, c: loads.append(g) or real(loc, g, c))
    reader, groups = ImageReader(manifest), RowGroups()
    for i in range(manifest.num_rows):
        reader.read(i, groups)
    assert sorted(loads) == sorted(set(manifest.column("row_group").to_pylist()))


def _table(path, **columns) -> str:
    pq.write_table(pa.table(columns), path, row_group_size=2)
    return str(path)


def test_binary_columns_and_the_image_column_choice(tmp_path, capsys):
    images = [photo(n).read_bytes() for n in PHOTOS]
    path = _table(tmp_path / "two.parquet", a=images, b=images[::-1], image_id=[f"id{i}" for i in range(5)],
                  score=[0.5] * 5)
    with pytest.raises(UsageError, match=r"several image columns \(a, b\): choose one with --image-column"):
        featcache.index(path, tmp_path / "c")
    with pytest.raises(UsageError, match="the column 'score' of .* is double, not binary"):
        featcache.index(path, tmp_path / "c", image_column="score")
    with pytest.raises(UsageError, match="has no column 'img'"):
        featcache.index(path, tmp_path / "c", image_column="img")
    assert main(["index", path, "--out", str(tmp_path / "c"), "--image-column", "img"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1  # one line, no traceback
    featcache.index(path, tmp_path / "c", image_column="b")
    manifest = _manifest(tmp_path / "c")
    assert manifest.column("image_id").to_pylist() == [f"id{i}" for i in range(5)]
    assert manifest.column("width").to_pylist() == [Image.open(photo(n)).size[0] for n in PHOTOS[::-1]]
    assert manifest.column("score").to_pylist() == [0.5] * 5 and "a" not in manifest.column_names
    assert ImageReader(manifest).read(4) == images[0]


def test_rows_without_bytes_are_listed_with_the_reason(tmp_path):
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    values = [{"bytes": photo("coffee").read_bytes(), "path": "coffee.png"}, {"bytes": None, "path": "far/away.jpg"},
              None]
    path = _table(tmp_path / "t.parquet", image=pa.array(values, image))
    result = featcache.index(path, tmp_path / "c")
    assert result.images == 1
    elsewhere = "no image bytes in the column 'image' (it names the file 'far/away.jpg', outside the table)"
    assert result.failed == [(row_uri(path, 1), elsewhere), (row_uri(path, 2), "no image bytes in the column 'image'")]


def test_a_list_with_a_uri_column_is_still_a_list(tmp_path):
    """A table with a 'uri' column and no --image-column is a list of files, as before image tables."""
    path = _table(tmp_path / "list.parquet", uri=[str(photo("coffee"))], thumb=[b"\x89PNG"])
    featcache.index(path, tmp_path / "c")
    assert _manifest(tmp_path / "c").column("uri").to_pylist() == [str(photo("coffee"))]


def test_a_table_changed_after_indexing_is_never_read_as_indexed(tmp_path):
    images = [photo(n).read_bytes() for n in PHOTOS]
    path = _table(tmp_path / "t.parquet", image=images)
    featcache.index(path, tmp_path / "c")
    reader = ImageReader(_manifest(tmp_path / "c"))
    assert reader.read(3) == images[3]
    _table(tmp_path / "t.parquet", image=images[::-1])  # same rows in another order: the same size
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a later mtime, whatever the clock
    with pytest.raises(ImageError, match="changed since indexing") as e:
        reader.read(3)
    assert e.value.reason == CHANGED


def test_parquet_globs_and_brace_patterns(tmp_path):
    images = [photo(n).read_bytes() for n in PHOTOS]
    for part in range(2):
        _table(tmp_path / f"train-{part:05d}-of-00002.parquet", image=images[part * 2:part * 2 + 3])
    featcache.index(tmp_path / "train-*.parquet", tmp_path / "c")
    featcache.index(str(tmp_path / "train-{00000..00001}-of-00002.parquet"), tmp_path / "d")
    a, b = _manifest(tmp_path / "c"), _manifest(tmp_path / "d")
    assert a.equals(b)
    assert a.column("image_id").to_pylist() == [f"train-0000{p}-of-00002.parquet/{r}" for p in (0, 1) for r in range(3)]
