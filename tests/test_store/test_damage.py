"""Hostile states of a cache folder (issue 23, items 19, 20, 28): a folder in features.zarr that is not a
view, damaged or deleted array metadata, a file where the root should be. Readers skip and report what
is not a view, list damage as problems or one line, and never show a traceback."""

from __future__ import annotations

import json
import os

import pytest

import featcache
from featcache.cli import main
from featcache.errors import CacheFormatError
from tests.support.caches import make_cache, spec, write_all

KEY = "dinov3@224"


@pytest.fixture
def written(tmp_path):
    root = str(tmp_path / "cache")
    _, view = make_cache(root, n=10, shard_size=4)
    write_all(view)
    return root, view


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("junk", ["junk", "half@224"])
def test_a_folder_that_is_not_a_view_is_skipped_and_reported(written, capsys, junk):
    """``mkdir features.zarr/junk`` (or a view killed before its zarr.json) blocked every reader."""
    root, _ = written
    os.mkdir(os.path.join(root, "features.zarr", junk))
    cache = featcache.open_cache(root)
    assert list(cache.views) == [KEY]
    assert cache.non_views() == [junk]
    info = featcache.inspect(root)
    assert list(info["views"]) == [KEY] and info["not_views"] == [junk]
    assert main(["inspect", root]) == 0
    out = capsys.readouterr().out
    assert f"note: features.zarr/{junk}: a folder that is not a view (left alone)" in out and KEY in out
    assert main(["inspect", root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["not_views"] == [junk]
    assert main(["verify", root]) == 0
    assert f"features.zarr/{junk}: a folder that is not a view" in capsys.readouterr().out


def test_a_half_created_view_is_finished_by_creating_it_again(written):
    """A kill between a view folder's creation and its zarr.json leaves an empty folder: creating the view
    again (what extract does) finishes it; a view group killed before its arrays gets them too."""
    root, _ = written
    os.mkdir(os.path.join(root, "features.zarr", "half@224"))
    cache = featcache.open_cache(root)
    view = cache.create_view(spec("half@224"))
    assert set(featcache.open_cache(root).views) == {KEY, "half@224"} and view.num_shards == 3
    other = spec("other@224")
    group = os.path.join(root, "features.zarr", "other@224")
    cache.create_view(other)
    for name in ("dense", "valid", "image_id"):  # killed after the group, before these arrays
        for f in sorted(os.walk(os.path.join(group, name)), reverse=True):
            for file in f[2]:
                os.remove(os.path.join(f[0], file))
            os.rmdir(f[0])
    again = featcache.open_cache(root).create_view(other)
    assert featcache.verify(root).ok
    assert again.group["dense"].shape == (10, 4, 6, 8)
    assert list(again.group["image_id"][:3]) == ["img00000", "img00001", "img00002"]


@pytest.mark.parametrize("array", ["dense", "valid", "summary", "box", "image_id"])
@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_damaged_array_metadata_is_a_problem_not_a_traceback(written, capsys, array, damage):
    root, view = written
    meta = os.path.join(view.loc.path, array, "zarr.json")
    if damage == "deleted":
        os.remove(meta)
    else:
        with open(meta, "r+b") as f:
            f.truncate(os.path.getsize(meta) // 2)
    report = featcache.verify(root)
    problems = [(p.view, p.kind) for p in report.problems]
    assert problems == [(KEY, "metadata")], report.problems
    assert f"{KEY}/{array}/zarr.json" in report.problems[0].message
    assert main(["verify", root]) == 1
    capsys.readouterr()
    if array != "image_id":  # featcache's readers never need image_id: inspect shows the rest
        with pytest.raises(CacheFormatError, match=f"{KEY}/{array}/zarr.json"):
            featcache.inspect(root)
        assert main(["inspect", root]) == 2
        line = _one_line(capsys)
        assert line.startswith("featcache: error: ") and f"{array}/zarr.json" in line and "verify" in line


def test_image_ids_that_differ_from_the_manifest_are_a_problem(written):
    root, view = written
    view.group["image_id"][2] = "someone-else"
    assert [(p.kind, p.view) for p in featcache.verify(root).problems] == [("metadata", KEY)]


@pytest.mark.parametrize("command", ["inspect", "verify", "stats"])
def test_readers_on_a_file_do_not_speak_of_writing(tmp_path, capsys, command):
    path = tmp_path / "a-file"
    path.write_text("not a cache")
    assert main([command, str(path)]) == 2
    line = _one_line(capsys)
    assert "writing" not in line and str(path) in line, line
    assert "is a file, not a cache folder" in line, line



@pytest.fixture(scope="module")
def demo_dinov3(tmp_path_factory) -> str:
    from featcache.demo import save_demo_teachers

    return save_demo_teachers(tmp_path_factory.mktemp("teachers"))["dinov3"]


@pytest.mark.parametrize("array", ["dense", "image_id"])
def test_extract_repair_reports_damaged_array_metadata_in_one_line(tmp_path, demo_dinov3, capsys, array):
    """``extract --repair`` ended in a JSONDecodeError traceback: the damage is found before Ray starts."""
    import shutil

    from featcache.extract.plan import prepare
    from tests.support.images import photo

    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(photo("coffee"), src / "coffee.png")
    argv = ["--source", str(src), "--out", str(tmp_path / "c"), "--no-stats",
            "--teacher", f"family=dinov3,source={demo_dinov3},codec=f32"]
    prepare(_job(src, tmp_path / "c", demo_dinov3))  # the views, as extract creates them (no Ray)
    meta = tmp_path / "c" / "features.zarr" / "dinov3@64" / array / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:40])
    assert main(["extract", *argv, "--repair"]) == 2
    line = _one_line(capsys)
    assert f"features.zarr/dinov3@64/{array}/zarr.json is unreadable" in line and "starting Ray" not in line


def _job(src, out, teacher: str):
    from featcache.extract.config import from_dict

    return from_dict({"source": str(src), "output": str(out), "stats": False,
                      "teachers": [{"family": "dinov3", "source": teacher, "codec": "f32"}]}, "test")
