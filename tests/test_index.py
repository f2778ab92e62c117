"""``featcache index``: sizes from headers, stable ids, every file indexed or listed with a reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tracemalloc

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

import featcache
from featcache.cli import main
from featcache.errors import SourceNotFoundError, UsageError
from featcache.store import tables
from featcache.fsio import locate
from tests.support.images import (
    HEADER_ONLY_SIZE,
    skimage_photos,
    write_header_cases,
    write_nested_small_pngs,
    write_non_image_files,
)


def _manifest(root) -> pa.Table:
    return pq.read_table(os.path.join(root, "manifest.parquet"))


def _errors(root) -> dict[str, str]:
    return {r["uri"]: r["reason"] for r in pq.read_table(os.path.join(root, "errors.parquet")).to_pylist()}


def test_real_photos_sizes_match_pillow(tmp_path):
    out = tmp_path / "c"
    result = featcache.index(skimage_photos()[0].parent / "*.[pj][np]g", out)
    table = _manifest(out)
    assert result.images == table.num_rows == len(skimage_photos())
    assert table.column("index").to_pylist() == list(range(table.num_rows))
    for row in table.to_pylist():
        with Image.open(row["uri"]) as im:  # independent: Pillow's own header parse
            assert (row["width"], row["height"]) == im.size
        assert row["image_id"] == os.path.basename(row["uri"])


def test_indexing_twice_gives_the_same_ids_in_the_same_order(tmp_path):
    src = tmp_path / "src"
    write_nested_small_pngs(src, 250, per_folder=30, fanout=3)
    featcache.index(src, tmp_path / "a")
    featcache.index(src, tmp_path / "b", workers=3)
    a, b = _manifest(tmp_path / "a"), _manifest(tmp_path / "b")
    assert a.equals(b)
    ids = a.column("image_id").to_pylist()
    assert ids == sorted(ids, key=lambda s: s.split("/")) and len(set(ids)) == 250


def test_header_cases_each_indexed_or_listed_with_a_reason(tmp_path):
    src = tmp_path / "src"
    cases = write_header_cases(src)
    write_non_image_files(src)
    result = featcache.index(src, tmp_path / "c")
    rows = {r["uri"]: r for r in _manifest(tmp_path / "c").to_pylist()}
    errors = _errors(tmp_path / "c")
    for case in cases:
        uri = str(case.path)
        if case.kind == "directory":
            assert uri not in rows and uri not in errors  # a folder is walked, not indexed
        elif case.ok:
            assert (rows[uri]["width"], rows[uri]["height"]) == case.size, case.name
        else:
            assert uri not in rows and errors[uri], case.name
    assert errors[str(src / "README.txt")].startswith("not an image file")
    assert {os.path.basename(u) for u, _ in result.failed} == {
        c.path.name for c in cases if not c.ok and c.kind != "directory"}


@pytest.mark.parametrize("name,reason", [
    ("jpeg_empty", "empty file"), ("jpeg_text", "not a readable image"),
    ("png_truncated_20_bytes", "corrupt PNG header"), ("jpeg_corrupt_header", "corrupt JPEG header"),
    ("symlink_dangling", "broken symbolic link"), ("fifo_jpg", "not a regular file"),
])
def test_bad_file_reasons(tmp_path, name, reason):
    cases = {c.name: c for c in write_header_cases(tmp_path / "src")}
    featcache.index(tmp_path / "src", tmp_path / "c")
    assert reason in _errors(tmp_path / "c")[str(cases[name].path)]


def test_huge_header_is_sized_without_decoding(tmp_path):
    cases = {c.name: c for c in write_header_cases(tmp_path / "src")}
    tracemalloc.start()
    featcache.index(tmp_path / "src", tmp_path / "c", workers=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rows = {r["uri"]: r for r in _manifest(tmp_path / "c").to_pylist()}
    assert (rows[str(cases["png_header_only_30000"].path)]["width"], ) == (HEADER_ONLY_SIZE[0],)
    assert (rows[str(cases["png_bomb_20000"].path)]["height"]) == 20000
    assert peak < 64 * 2**20, f"indexing allocated {peak / 2**20:.0f} MiB"


def test_exif_orientation_swaps_width_and_height(tmp_path):
    cases = {c.name: c for c in write_header_cases(tmp_path / "src")}
    featcache.index(tmp_path / "src", tmp_path / "c")
    rows = {r["uri"]: r for r in _manifest(tmp_path / "c").to_pylist()}
    row = rows[str(cases["jpeg_exif_orientation6"].path)]
    assert (row["width"], row["height"]) == (30, 40)
    with Image.open(cases["jpeg_exif_orientation6"].path) as im:
        assert im.size == (40, 30)


def test_unicode_and_spaces_in_paths(tmp_path):
    src = tmp_path / "фото с пробелами"
    cases = {c.name: c for c in write_header_cases(src)}
    featcache.index(src, tmp_path / "c")
    ids = _manifest(tmp_path / "c").column("image_id").to_pylist()
    assert cases["unicode_name"].path.name in ids


def test_list_sources_keep_extra_columns_and_order(tmp_path):
    photos = skimage_photos()[:5][::-1]
    listing = pa.table({"uri": [p.name for p in photos], "label": [3, 1, 4, 1, 5], "split": ["a"] * 5})
    for fmt in ("parquet", "csv"):
        folder = tmp_path / fmt
        folder.mkdir()
        for p in photos:
            os.symlink(p, folder / p.name)
        path = folder / f"list.{fmt}"
        pq.write_table(listing, path) if fmt == "parquet" else pacsv.write_csv(listing, path)
        featcache.index(path, tmp_path / f"c-{fmt}")
        table = _manifest(tmp_path / f"c-{fmt}")
        assert table.column("uri").to_pylist() == [str(folder / p.name) for p in photos]
        assert table.column("label").to_pylist() == [3, 1, 4, 1, 5]
        assert table.column("split").to_pylist() == ["a"] * 5


def test_list_without_uri_column_is_refused(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("path,label\na.jpg,1\n")
    with pytest.raises(UsageError, match="no 'uri' column"):
        featcache.index(path, tmp_path / "c")


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(SourceNotFoundError, match="no such folder"):
        featcache.index(tmp_path / "nope", tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no image files"):
        featcache.index(tmp_path / "empty", tmp_path / "c")


@pytest.mark.parametrize("args", [["index", "/definitely/missing", "--out", "X"], ["index", "EMPTY", "--out", "X"],
                                  ["index", "--out", "X"], ["inspect", "X"], ["verify", "X"]])
def test_cli_bad_arguments_give_one_line_and_exit_2(tmp_path, args):
    (tmp_path / "empty").mkdir()
    args = [a.replace("EMPTY", str(tmp_path / "empty")).replace("X", str(tmp_path / "out")) for a in args]
    proc = subprocess.run([sys.executable, "-m", "featcache.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip()


def test_cli_exit_1_when_some_files_fail(tmp_path):
    write_header_cases(tmp_path / "src")
    assert main(["index", str(tmp_path / "src"), "--out", str(tmp_path / "c")]) == 1
    assert main(["index", str(skimage_photos()[0].parent / "*.png"), "--out", str(tmp_path / "d")]) == 0


def test_reindexing_under_existing_features_must_match(tmp_path):
    from tests.support.caches import spec

    src = tmp_path / "src"
    write_nested_small_pngs(src, 6, per_folder=3, fanout=2)
    featcache.index(src, tmp_path / "c")
    featcache.open_cache(tmp_path / "c").create_view(spec(), shard_size=2)
    featcache.index(src, tmp_path / "c")  # same images: fine
    write_nested_small_pngs(tmp_path / "src2", 7, per_folder=3, fanout=2)
    with pytest.raises(UsageError, match="already holds features"):
        featcache.index(tmp_path / "src2", tmp_path / "c")
    assert _manifest(tmp_path / "c").num_rows == 6


@pytest.mark.s3
def test_index_a_folder_on_s3(s3_root, tmp_path):
    loc = locate(s3_root)
    photos = skimage_photos()[:4]
    for p in photos:
        loc.fs.put_file(str(p), f"{loc.path}/imgs/{p.name}")
    loc.fs.pipe_file(f"{loc.path}/imgs/notes.txt", b"hello")
    featcache.index(f"{s3_root}/imgs", s3_root)
    table = tables.read_manifest(loc)
    assert table.column("image_id").to_pylist() == sorted(p.name for p in photos)
    assert table.column("uri").to_pylist()[0].startswith("s3://")
    for row, p in zip(table.to_pylist(), sorted(photos)):
        with Image.open(p) as im:
            assert (row["width"], row["height"]) == im.size


def _without_read_override() -> list[str]:
    """A command prefix under which chmod 000 really means unreadable (root bypasses file modes)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def test_unreadable_file_is_listed_with_a_reason(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in skimage_photos()[:2]:
        shutil.copy(p, src / p.name)
    secret = src / "secret.png"
    shutil.copy(skimage_photos()[2], secret)
    secret.chmod(0)
    cmd = [*_without_read_override(), sys.executable, "-m", "featcache.cli", "index", str(src), "--out",
           str(tmp_path / "c")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert _errors(tmp_path / "c")[str(secret)] == "cannot read: Permission denied"
    assert _manifest(tmp_path / "c").num_rows == 2


@pytest.mark.s3
def test_index_a_glob_on_s3(s3_root):
    loc = locate(s3_root)
    photos = [p for p in skimage_photos() if p.suffix == ".png"][:3] + [p for p in skimage_photos()
                                                                      if p.suffix == ".jpg"][:2]
    for p in photos:
        loc.fs.put_file(str(p), f"{loc.path}/imgs/sub/{p.name}")
    featcache.index(f"{s3_root}/imgs/**/*.png", f"{s3_root}/out")
    table = tables.read_manifest(locate(f"{s3_root}/out"))
    assert table.column("image_id").to_pylist() == sorted(f"sub/{p.name}" for p in photos if p.suffix == ".png")
