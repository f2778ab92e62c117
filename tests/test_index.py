"""``featcache index``: sizes from headers, stable ids, every file indexed or listed with a reason."""

from __future__ import annotations

import glob
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
from featcache.store.location import locate
from tests.support.images import (
    HEADER_ONLY_SIZE,
    photo,
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


def test_loose_files_get_the_columns_they_always_had(tmp_path):
    """Container columns (featcache.sources) appear only for images inside tars or Parquet tables:
    a folder's manifest reads as it did before they existed."""
    featcache.index(skimage_photos()[0].parent / "c*.png", tmp_path / "c")
    assert _manifest(tmp_path / "c").column_names == ["index", "image_id", "uri", "width", "height", "size", "mtime"]


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
def test_cli_bad_arguments_give_one_line_and_exit_2(tmp_path, args, capsys):
    """In-process, as the CLI runs them: an exception would escape ``main`` (a traceback) and fail the test."""
    (tmp_path / "empty").mkdir()
    args = [a.replace("EMPTY", str(tmp_path / "empty")).replace("X", str(tmp_path / "out")) for a in args]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and err.strip()


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


# ---- index's commit point: the manifest is written last --------------------------------------

_KILL_AFTER_FIRST_TABLE_WRITE = """
import os, sys
import featcache
from featcache.store import tables
write = tables.write_table
def write_then_die(loc, table):
    write(loc, table)
    os._exit(9)
tables.write_table = write_then_die
featcache.index(sys.argv[1], sys.argv[2])
"""


def test_kill_after_the_first_table_write_never_leaves_a_manifest_without_its_errors(tmp_path):
    src, out = tmp_path / "src", tmp_path / "c"
    bad = {str(c.path) for c in write_header_cases(src) if not c.ok and c.kind != "directory"}
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_FIRST_TABLE_WRITE, str(src), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert not (out / "manifest.parquet").exists() or bad <= set(_errors(out))
    featcache.index(src, out)
    assert bad <= set(_errors(out)) and len(bad) == 6


def test_reindexing_clean_files_drops_the_old_index_errors(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(skimage_photos()[0].parent, src, ignore=lambda d, names: [n for n in names if n != "coffee.png"])
    (src / "notes.jpg").write_bytes(b"not a JPEG")
    featcache.index(src, tmp_path / "c")
    assert list(_errors(tmp_path / "c")) == [str(src / "notes.jpg")]
    (src / "notes.jpg").unlink()
    featcache.index(src, tmp_path / "c")
    assert _errors(tmp_path / "c") == {}


# ---- symbolic links: each directory is followed once ------------------------------------------


def _photos_with_links(tmp_path, loop: bool, outside: bool):
    """src/{coffee,chelsea}.png, with src/a_loop -> src, and/or src/ext -> outside/ holding
    rocket.jpg and back -> src (a loop through a folder outside the tree)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("coffee", "chelsea"):
        shutil.copy(photo(name), src / photo(name).name)
    if loop:
        os.symlink(src, src / "a_loop")
    if outside:
        (tmp_path / "outside").mkdir()
        shutil.copy(photo("rocket"), tmp_path / "outside" / photo("rocket").name)
        os.symlink(tmp_path / "outside", src / "ext")
        os.symlink(src, tmp_path / "outside" / "back")
    return src


def test_glob_does_not_follow_a_link_loop(tmp_path):
    src = _photos_with_links(tmp_path, loop=True, outside=False)
    result = featcache.index(f"{src}/**/*.png", tmp_path / "c")
    table = _manifest(tmp_path / "c")
    assert result.images == table.num_rows == 2
    assert table.column("uri").to_pylist() == [str(src / "chelsea.png"), str(src / "coffee.png")]


def test_glob_follows_a_link_to_an_outside_folder_once(tmp_path):
    src = _photos_with_links(tmp_path, loop=False, outside=True)
    featcache.index(f"{src}/**/*.[pj][np]g", tmp_path / "c")
    table = _manifest(tmp_path / "c")
    assert table.column("image_id").to_pylist() == ["chelsea.png", "coffee.png", "ext/rocket.jpg"]
    assert table.column("uri").to_pylist()[2] == str(src / "ext" / "rocket.jpg")


def test_glob_lists_a_directory_under_its_first_path_in_sorted_order(tmp_path):
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    shutil.copy(photo("coffee"), src / "b" / "coffee.png")
    os.symlink(src / "b", src / "a")  # the link sorts first: b's files are listed as a/...
    os.symlink(src / "b", src / "c")
    featcache.index(f"{src}/**/*.png", tmp_path / "c1")
    assert _manifest(tmp_path / "c1").column("image_id").to_pylist() == ["a/coffee.png"]
    featcache.index(f"{src}/*/*.png", tmp_path / "c2")
    assert _manifest(tmp_path / "c2").column("image_id").to_pylist() == ["a/coffee.png"]


def test_glob_keeps_glob_rules_for_hidden_names_and_depth(tmp_path):
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / ".hidden").mkdir()
    for path in ("top.png", "sub/one.png", "sub/deeper/two.png", ".hidden/three.png", "sub/.dot.png"):
        shutil.copy(photo("coffee"), src / path)
    for pattern in ("**/*.png", "*/*.png", "sub/*", ".hidden/*.png", "**/.*.png", "s*/**/*.png"):
        featcache.index(f"{src}/{pattern}", tmp_path / "c")
        want = sorted(p for p in glob.glob(f"{src}/{pattern}", recursive=True) if not os.path.isdir(p))
        assert _manifest(tmp_path / "c").column("uri").to_pylist() == want, pattern


def test_folder_walk_does_not_follow_directory_links(tmp_path):
    src = _photos_with_links(tmp_path, loop=True, outside=True)
    featcache.index(src, tmp_path / "c")
    assert _manifest(tmp_path / "c").column("image_id").to_pylist() == ["chelsea.png", "coffee.png"]


# ---- what each file was when indexed: size, mtime (local), etag (object stores) --------------


def _assert_stat_recorded(table: pa.Table) -> None:
    assert table.schema.field("size").type == pa.int64() and table.schema.field("mtime").type == pa.float64()
    assert "etag" not in table.column_names
    for row in table.to_pylist():
        st = os.stat(row["uri"])
        assert (row["size"], row["mtime"]) == (st.st_size, st.st_mtime), row["uri"]


def test_index_records_size_and_mtime_of_each_file(tmp_path):
    src = tmp_path / "src"
    write_nested_small_pngs(src, 5, per_folder=2, fanout=2)
    shutil.copy(photo("coffee"), src / "coffee.png")
    os.utime(src / "coffee.png", (1.5e9, 1.5e9 + 0.25))
    featcache.index(src, tmp_path / "c")
    table = _manifest(tmp_path / "c")
    assert table.num_rows == 6
    _assert_stat_recorded(table)
    coffee = next(r for r in table.to_pylist() if r["image_id"] == "coffee.png")
    assert (coffee["size"], coffee["mtime"]) == (os.path.getsize(photo("coffee")), 1.5e9 + 0.25)


def test_list_sources_record_size_and_mtime(tmp_path):
    photos = skimage_photos()[:3]
    for p in photos:
        shutil.copy(p, tmp_path / p.name)
    pacsv.write_csv(pa.table({"uri": [p.name for p in photos], "size": ["big", "small", "big"]}),
                    tmp_path / "list.csv")
    featcache.index(tmp_path / "list.csv", tmp_path / "c")
    table = _manifest(tmp_path / "c")
    _assert_stat_recorded(table)  # the list's own 'size' column cannot stand in for the file size
    assert table.column("size").to_pylist() == [os.path.getsize(p) for p in photos]


@pytest.mark.s3
def test_index_on_s3_records_size_and_etag(s3_root):
    loc = locate(s3_root)
    photos = skimage_photos()[:3]
    for p in photos:
        loc.fs.put_file(str(p), f"{loc.path}/imgs/{p.name}")
    featcache.index(f"{s3_root}/imgs/*.png", f"{s3_root}/out")
    table = tables.read_manifest(locate(f"{s3_root}/out"))
    assert table.schema.field("size").type == pa.int64() and "mtime" not in table.column_names
    for row in table.to_pylist():
        info = loc.fs.info(locate(row["uri"]).path)
        assert row["size"] == info["size"] == os.path.getsize(photo(row["image_id"].split(".")[0]))
        assert row["etag"] == info["ETag"] and len(row["etag"]) > 2


def test_a_deleted_manifest_is_restored_by_indexing_the_same_source_again(tmp_path, capsys):
    """verify says to run index; index then restores the manifest when it matches the cache's fingerprint
    (and refuses another image list), instead of refusing with verify's own message."""
    from tests.support.caches import spec, write_all

    src = tmp_path / "imgs"
    write_nested_small_pngs(src, 10, per_folder=4)
    root = str(tmp_path / "cache")
    featcache.index(str(src), root)
    cache = featcache.open_cache(root)
    view = cache.create_view(spec(), shard_size=4)
    write_all(view)
    os.remove(os.path.join(root, "manifest.parquet"))
    assert main(["verify", root]) == 2
    assert "run 'featcache index' first" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(src, other)
    os.remove(sorted(glob.glob(str(other / "**" / "*.png"), recursive=True))[0])
    assert main(["index", str(other), "--out", root]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds features for another image list" in err[0]
    assert main(["index", str(src), "--out", root]) == 0
    assert featcache.verify(root).ok


# ---- issue 23, item 18: a re-index that accepts changed files uncommits their shards ------------------


def _reindex_cache(tmp_path, n: int = 5, shard_size: int = 2):
    """``n`` real photos indexed, one store-level view with every shard written (no teachers needed)."""
    from tests.support.caches import spec, write_all

    src = tmp_path / "src"
    src.mkdir()
    names = ["astronaut", "camera", "chelsea", "coffee", "horse"][:n]
    for name in names:
        shutil.copyfile(photo(name), src / photo(name).name)
    featcache.index(src, tmp_path / "cache")
    cache = featcache.open_cache(str(tmp_path / "cache"))
    for key in ("a@224", "b@224"):
        write_all(cache.create_view(spec(key), shard_size=shard_size))
    return src, str(tmp_path / "cache")


def test_reindexing_a_replaced_file_uncommits_its_shard_in_every_view(tmp_path):
    src, root = _reindex_cache(tmp_path)
    shutil.copyfile(photo("rocket"), src / "camera.png")  # row 1: shard 0
    st = os.stat(src / "horse.png")
    os.utime(src / "horse.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # row 4: shard 2, touched only
    featcache.index(src, root)
    cache = featcache.open_cache(root)
    assert {k: sorted(v.committed_shards()) for k, v in cache.views.items()} == {"a@224": [1], "b@224": [1]}
    assert featcache.verify(root).ok
    featcache.index(src, root)  # nothing changed since: nothing more is uncommitted
    assert sorted(featcache.open_cache(root).view("a@224").committed_shards()) == [1]


def test_reindexing_unchanged_files_keeps_every_shard(tmp_path):
    src, root = _reindex_cache(tmp_path)
    featcache.index(src, root)
    assert {k: sorted(v.committed_shards()) for k, v in featcache.open_cache(root).views.items()} == {
        "a@224": [0, 1, 2], "b@224": [0, 1, 2]}


@pytest.fixture(scope="module")
def demo_teachers(tmp_path_factory):
    from featcache.demo import save_demo_teachers

    return save_demo_teachers(tmp_path_factory.mktemp("demo-teachers"))


def test_reindex_then_extract_recomputes_changed_images_end_to_end(tmp_path, demo_teachers):
    """Extract, replace camera.png: following "re-index to accept the change" paired the new pixels with
    the old features. Now the re-index uncommits camera's shard and the next extract recomputes it; an
    image changed before extraction (horse, failed as changed) is extracted after re-indexing."""
    import io

    import numpy as np

    from featcache.extract.config import from_dict
    from featcache.pipelines.extract import run
    from featcache.pipelines.ray_session import ray_session
    from tests.test_extract.conftest import direct, stored

    src, out = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    for name in ("astronaut", "camera", "chelsea", "coffee", "horse"):
        shutil.copyfile(photo(name), src / photo(name).name)
    featcache.index(src, out)
    shutil.copyfile(photo("coins"), src / "horse.png")  # before extraction: horse fails as changed
    job = from_dict({"source": str(out), "output": str(out), "shard_size": 2, "batch_size": 2, "stats": False,
                     "teachers": [{"family": "dinov3", "source": demo_teachers["dinov3"], "codec": "f32"}]}, "t")
    with ray_session():  # one embedded Ray for both jobs
        assert run(job, stream=io.StringIO()).failed_images == 1
        shutil.copyfile(photo("rocket"), src / "camera.png")  # after extraction
        assert main(["index", str(src), "--out", str(out)]) == 0
        assert sorted(featcache.open_cache(str(out)).view("dinov3@64").committed_shards()) == [1]
        result = run(job, stream=io.StringIO())
    assert result.exit_code == 0 and result.processed == 2 and result.skipped == 1
    got, want = stored(out, "dinov3@64"), direct(featcache.open_cache(str(out)), "dinov3@64")
    assert want["valid"].all() and np.array_equal(got["valid"], want["valid"])
    for name in ("dense", "summary", "box"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)
    assert featcache.verify(str(out)).ok and tables.read_errors(locate(str(out))).num_rows == 0
