"""Indexing webdataset tar shards: samples grouped by key, image members located by their exact byte
range (checked against tarfile's own parse), labels as columns, bad members and bad shards listed."""

from __future__ import annotations

import gzip
import os
import tarfile

import fsspec
import pyarrow.parquet as pq
import pytest
from PIL import Image

import featcache
from featcache.cli import main
from featcache.errors import ImageError, UsageError
from featcache.store.location import locate
from featcache.manifest import CHANGED
from featcache.sources import tar_uri, tars
from featcache.sources.read import ImageReader
from tests.support.images import HEADER_ONLY_SIZE, photo
from tests.test_sources.conftest import GOOD, INDEX_FAILS, MEMBERS, SHARDS, add_member, labels, write_tar


def _manifest(root) -> list[dict]:
    return pq.read_table(os.path.join(root, "manifest.parquet")).to_pylist()


def _errors(root) -> dict[str, dict]:
    return {r["uri"]: r for r in pq.read_table(os.path.join(root, "errors.parquet")).to_pylist()}


def test_members_are_located_by_their_exact_byte_range(layouts, tmp_path):
    result = featcache.index(f"{layouts.tars}/*.tar", tmp_path / "c")
    rows = _manifest(tmp_path / "c")
    assert result.images == len(rows) == len(GOOD)
    data = {(s, f"{k}.{e}"): d for s in SHARDS for k, e, d in MEMBERS[s]}
    for row, (shard, key) in zip(rows, GOOD):
        tar_path = str(layouts.tars / f"{shard}.tar")
        with tarfile.open(tar_path) as tar:  # the stdlib's own parse, independent of the index's reader
            info = tar.getmember(row["member"])
        assert row["container"] == tar_path and row["uri"] == tar_uri(tar_path, row["member"])
        assert (row["member_offset"], row["member_length"]) == (info.offset_data, info.size)
        with open(tar_path, "rb") as f:
            f.seek(row["member_offset"])
            assert f.read(row["member_length"]) == data[shard, row["member"]]
        assert (row["width"], row["height"]) == _displayed_size(layouts.loose / shard / row["member"])
        assert row["label"] == labels()[shard, key]
        assert row["size"] == os.path.getsize(tar_path) and row["mtime"] == os.stat(tar_path).st_mtime
    assert [r["image_id"] for r in rows if "repeat" in r["image_id"]] == ["00000.tar/x_repeat", "00001.tar/x_repeat"]


def _displayed_size(path) -> tuple[int, int]:
    """Pillow's own header parse, turned as EXIF orientation 6 turns it (the one rotated photo)."""
    if path.stem == "01_bomb":
        return HEADER_ONLY_SIZE  # Pillow refuses to open it
    with Image.open(path) as im:
        w, h = im.size
    return (h, w) if path.stem == "02_rotated" else (w, h)


def test_bad_members_and_samples_without_an_image_are_listed(layouts, tmp_path):
    result = featcache.index(f"{layouts.tars}/*.tar", tmp_path / "c")
    errors = _errors(tmp_path / "c")
    (shard, key), = INDEX_FAILS
    bad = tar_uri(str(layouts.tars / f"{shard}.tar"), f"{key}.jpg")
    assert errors[bad]["image_id"] == key and "not a readable image" in errors[bad]["reason"]
    assert result.failed == [(bad, errors[bad]["reason"])]
    for s in SHARDS:
        readme = errors[tar_uri(str(layouts.tars / f"{s}.tar"), "zz_readme.txt")]
        assert readme["image_id"] is None and "has no image member (its fields: txt" in readme["reason"]


def test_index_reads_headers_not_images(layouts, tmp_path):
    """Members far larger than the read window cost about a window each: the images' bytes are not read."""
    result = featcache.index(f"{layouts.tars}/*.tar", tmp_path / "c")
    tar_bytes = sum(os.path.getsize(layouts.tars / f"{s}.tar") for s in SHARDS)
    samples = sum(len(MEMBERS[s]) for s in SHARDS)
    assert result.bytes_read < tar_bytes / 5
    assert result.bytes_read <= (samples + len(SHARDS)) * 2 * tars.WINDOW


def test_long_names_in_every_tar_format(tmp_path):
    name = "a" * 100 + "/" + "b" * 40 + "/sample_0001"  # over the 100-byte name field (ustar: in its prefix)
    data = photo("coffee").read_bytes()
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        path = write_tar(tmp_path / f"{fmt}.tar", [(f"{name}.cls", b"3"), (f"{name}.png", data)], fmt=fmt)
        featcache.index(path, tmp_path / f"c{fmt}")
        (row,) = _manifest(tmp_path / f"c{fmt}")
        assert row["image_id"] == name and row["member"] == f"{name}.png" and row["label"] == 3
        assert ImageReader(pq.read_table(tmp_path / f"c{fmt}" / "manifest.parquet")).read(0) == data


def test_a_corrupt_header_keeps_the_members_before_it(tmp_path):
    path = write_tar(tmp_path / "s.tar", [(f"{n}.png", photo(n).read_bytes()) for n in ("coffee", "chelsea", "rocket")])
    with tarfile.open(path) as tar:
        bad = tar.getmember("rocket.png").offset
    with open(path, "r+b") as f:
        f.seek(bad + 148)  # the checksum field
        f.write(b"99999999")
    result = featcache.index(path, tmp_path / "c")
    assert [r["image_id"] for r in _manifest(tmp_path / "c")] == ["coffee", "chelsea"]
    assert result.failed == [(str(path), f"unreadable tar: invalid tar header at byte {bad} (members after the "
                                         "error are not indexed)")]


def test_a_truncated_tar_fails_its_last_member(tmp_path):
    path = write_tar(tmp_path / "s.tar", [(f"{n}.png", photo(n).read_bytes()) for n in ("coffee", "chelsea")])
    with tarfile.open(path) as tar:
        info = tar.getmember("chelsea.png")
    os.truncate(path, info.offset_data + 1000)
    result = featcache.index(path, tmp_path / "c")
    assert [r["image_id"] for r in _manifest(tmp_path / "c")] == ["coffee"]
    reasons = dict(result.failed)
    assert reasons[tar_uri(str(path), "chelsea.png")] == (f"truncated member: the tar ends 1000 bytes into its "
                                                           f"{info.size} bytes")
    assert "unexpected end of data" in reasons[str(path)]


def test_a_gzip_compressed_tar_is_refused_with_the_reason(tmp_path):
    plain = write_tar(tmp_path / "p.tar", [("coffee.png", photo("coffee").read_bytes())])
    path = tmp_path / "z.tar"
    path.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(UsageError, match="gzip-compressed tar: its members cannot be read by byte range"):
        featcache.index(path, tmp_path / "c")


def test_image_ext_chooses_the_image_field(tmp_path):
    coffee, chelsea, rocket = (photo(n).read_bytes() for n in ("coffee", "chelsea", "rocket"))
    path = write_tar(tmp_path / "s.tar", [("a.jpg.txt", b"caption"), ("a.png", coffee), ("a.seg.png", chelsea),
                                          ("a.json", b'{"k": 1}'), ("b.PNG", rocket)])
    featcache.index(path, tmp_path / "c1")
    first = _manifest(tmp_path / "c1")
    assert [(r["image_id"], r["member"]) for r in first] == [("a", "a.png"), ("b", "b.PNG")]
    assert (first[0]["jpg_txt"], first[0]["json"]) == ("caption", '{"k": 1}') and first[1]["json"] is None
    featcache.index(path, tmp_path / "c2", image_ext=[".seg.png,jpg"])
    assert [(r["image_id"], r["member"]) for r in _manifest(tmp_path / "c2")] == [("a", "a.seg.png")]


def test_a_key_back_later_in_the_same_tar_is_an_error(tmp_path):
    data = photo("coffee").read_bytes()
    path = write_tar(tmp_path / "s.tar", [("a.png", data), ("b.png", data), ("a.jpg", data)])
    result = featcache.index(path, tmp_path / "c")
    assert [r["image_id"] for r in _manifest(tmp_path / "c")] == ["a", "b"]
    assert result.failed == [(tar_uri(str(path), "a.jpg"), "sample key 'a' comes back later in the same tar "
                                                            "(keys must be unique)")]


def test_a_tar_changed_after_indexing_is_never_read_as_indexed(tmp_path):
    coffee = photo("coffee").read_bytes()
    path = write_tar(tmp_path / "s.tar", [("a.png", coffee)])
    featcache.index(path, tmp_path / "c")
    reader = ImageReader(pq.read_table(tmp_path / "c" / "manifest.parquet"))
    assert reader.read(0) == coffee
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same bytes, touched
    with pytest.raises(ImageError, match=CHANGED.replace("(", r"\(").replace(")", r"\)")):
        reader.read(0)
    with tarfile.open(path, "a") as tar:  # grown by a member: another size
        add_member(tar, "b.png", coffee)
    with pytest.raises(ImageError, match="changed since indexing"):
        reader.read(0)
    os.remove(path)
    with pytest.raises(ImageError, match="file not found"):
        reader.read(0)


def test_member_uris_open_with_plain_fsspec(layouts):
    """Readers that know nothing of the manifest's columns still get the image from its URI."""
    shard, key, ext, data = SHARDS[1], *MEMBERS[SHARDS[1]][0]
    uri = tar_uri(str(layouts.tars / f"{shard}.tar"), f"{key}.{ext}")
    with fsspec.open(uri, "rb") as f:
        assert f.read() == data
    assert locate(uri).read_bytes() == data


def test_cli_index_of_tars(layouts, tmp_path, capsys):
    src = f"{layouts.tars}/{{{SHARDS[0]}..{SHARDS[1]}}}.tar"
    assert main(["index", src, "--out", str(tmp_path / "c")]) == 1  # one member could not be indexed
    out, err = capsys.readouterr()
    assert f"indexed {len(GOOD)} images" in out and "03_notes.jpg" in err
    for args, says in ((["--image-column", "image"], "--image-column is for Parquet image tables"),
                       (["--image-ext", " , "], "--image-ext names no extension")):
        assert main(["index", src, "--out", str(tmp_path / "d"), *args]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
    assert main(["index", str(layouts.loose), "--out", str(tmp_path / "e"), "--image-ext", "jpg"]) == 2
    assert "--image-ext is for webdataset tars" in capsys.readouterr().err
    assert main(["index", f"{layouts.tars}/{{00007..00008}}.tar", "--out", str(tmp_path / "f")]) == 2
    assert "none of the 0 images" in capsys.readouterr().err


def test_a_member_name_twice_in_one_sample_is_listed_not_dropped(tmp_path):
    """Two members named ``k/1.png``: the second was silently dropped (webdataset raises on it); the
    sample is ambiguous, so it is listed in errors.parquet with the reason, and the other samples indexed."""
    coffee, astronaut = photo("coffee").read_bytes(), photo("astronaut").read_bytes()
    path = write_tar(tmp_path / "s.tar", [("k/1.png", coffee), ("k/1.png", astronaut), ("k/2.png", coffee)])
    result = featcache.index(path, tmp_path / "c")
    assert [r["image_id"] for r in _manifest(tmp_path / "c")] == ["k/2"]
    reason = "sample 'k/1' holds the member k/1.png more than once (webdataset refuses duplicate fields)"
    assert result.failed == [(tar_uri(str(path), "k/1.png"), reason)]
    assert _errors(tmp_path / "c")[tar_uri(str(path), "k/1.png")]["reason"] == reason
