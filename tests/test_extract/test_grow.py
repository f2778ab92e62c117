"""Growing a cache: extract 8 photos, then the same 8 and 9 more, and the cache equals one extracted from
all 17 at once, object for object; a source that does not extend the cache is refused naming the first row
that differs; a grow interrupted between its steps completes on the next run of the same command."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

import featcache
import featcache.store.cache as cache_module
from featcache.cli import main
from featcache.extract.config import from_dict
from featcache.extract.plan import adopt
from featcache.store.location import locate
from featcache.pipelines.extract import run
from featcache.store import tables
from tests.support.caches import make_cache, spec, write_all, write_manifest
from tests.support.images import photo

FIRST = ("astronaut", "brick", "camera", "cell", "chelsea", "chessboard_GRAY", "chessboard_RGB", "clock_motion")
MORE = ("coffee", "coins", "color", "grass", "gravel", "horse", "hubble_deep_field", "ihc")  # all sort after FIRST
TRUNCATED = "coffee_half.png"  # row 9: in shard 1, which held rows 5-7 before the grow and is recomputed whole
KEY = "dinov3@64"
#: The only objects of features.zarr allowed to differ between the grown cache and the one-shot one: the
#: view's attrs record when the view was created ("created", which orders views), and the root's
#: consolidated metadata copies them. Both are compared with that one value left out.
CREATED_ONLY = {"zarr.json", f"{KEY}/zarr.json"}
#: What a commit marker records about who wrote the shard and when: the rest must be equal.
WRITER = ("worker", "info", "time")
#: One embedded Ray for every job of the module, shared with other modules (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("ray_runtime")


class Killed(BaseException):
    """Stands for the driver being killed at one step of a grow (nothing catches it)."""


def _copy_photos(folder: Path, names) -> None:
    for name in names:
        shutil.copyfile(photo(name), folder / photo(name).name)


def _job(src, out, teachers, **overrides):
    d = {"source": str(src), "output": str(out), "shard_size": 5, "batch_size": 5,
         "teachers": [{"family": "dinov3", "source": teachers["dinov3"], "resolutions": [64]}], **overrides}
    return from_dict(d, "grow job")


@pytest.fixture(scope="module")
def grown(tmp_path_factory, job_teachers, ray_runtime):
    """A cache of 8 photos grown to 17 (without, then with ``recompute_stats``), and the same 17 extracted
    at once from the same folder (the same uris); ``eight``: a copy of the cache before it grew."""
    base = tmp_path_factory.mktemp("grow")
    src = base / "photos"
    src.mkdir()
    _copy_photos(src, FIRST)
    (src / "notes.txt").write_text("not an image: an index-stage row of errors.parquet")
    g = SimpleNamespace(src=src, root=base / "grown", once=base / "once", eight=base / "eight")
    first = run(_job(src, g.root, job_teachers), stream=io.StringIO())
    assert first.exit_code == 0 and first.images == 8
    shutil.copytree(g.root, g.eight)
    g.stats_of_eight = _view_attrs(g.root)["stats"]
    _copy_photos(src, MORE)
    (src / TRUNCATED).write_bytes(photo("coffee").read_bytes()[:100_000])  # header fine, pixels cut short
    g.one_shot = run(_job(src, g.once, job_teachers), stream=io.StringIO())
    log = io.StringIO()
    g.result = run(_job(src, g.root, job_teachers), stream=log)
    g.log, g.stats_after_grow = log.getvalue(), _view_attrs(g.root)["stats"]
    log = io.StringIO()
    g.recomputed = run(_job(src, g.root, job_teachers, recompute_stats=True), stream=log)
    g.recompute_log = log.getvalue()
    return g


def _view_attrs(root) -> dict:
    meta = json.loads((Path(root) / "features.zarr" / KEY / "zarr.json").read_text())
    return json.loads(meta["attributes"]["featcache"])


def _objects(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _without_created(value):
    """A zarr.json's content with every view's creation time left out (attrs stored as JSON strings)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "featcache" and isinstance(v, str) and v.startswith("{"):  # not created_with's version
                v = {a: b for a, b in json.loads(v).items() if a != "created"}
            out[k] = _without_created(v)
        return out
    return [_without_created(v) for v in value] if isinstance(value, list) else value


def assert_same_cache(a: Path, b: Path) -> None:
    """Every object of features.zarr byte for byte (the view's creation time aside), the manifest byte for
    byte, the commit markers but for who wrote them and when, the rows of errors.parquet."""
    fa, fb = _objects(a / "features.zarr"), _objects(b / "features.zarr")
    assert sorted(fa) == sorted(fb)
    assert {k for k in fa if fa[k] != fb[k]} == CREATED_ONLY
    for k in CREATED_ONLY:
        assert _without_created(json.loads(fa[k])) == _without_created(json.loads(fb[k])), k
    assert (a / "manifest.parquet").read_bytes() == (b / "manifest.parquet").read_bytes()
    ma, mb = _objects(a / "_commits"), _objects(b / "_commits")
    assert sorted(ma) == sorted(mb) == [f"{KEY}/{k}.json" for k in range(4)]
    for k in ma:
        da, db = json.loads(ma[k]), json.loads(mb[k])
        assert {f: v for f, v in da.items() if f not in WRITER} == {f: v for f, v in db.items() if f not in WRITER}, k
    assert tables.read_errors(locate(str(a))).to_pylist() == tables.read_errors(locate(str(b))).to_pylist()


def test_a_grown_cache_equals_the_one_extracted_at_once(grown):
    g = grown
    assert g.one_shot.exit_code == 1 and g.one_shot.failed_images == 1  # the truncated photo, in both
    assert (g.result.skipped, g.result.processed, g.result.images) == (1, 3, 12)  # shard 1 again, whole
    assert g.recomputed.processed == 0 and g.recomputed.skipped == 4
    assert_same_cache(g.root, g.once)
    errors = tables.read_errors(locate(str(g.root))).to_pylist()
    assert [(r["stage"], r["uri"].rsplit("/", 1)[-1], r["index"]) for r in errors] == [
        ("index", "notes.txt", None), ("decode", TRUNCATED, 9)]
    assert featcache.verify(str(g.root)).ok


def test_the_grow_says_what_it_did_and_keeps_frozen_statistics(grown):
    g = grown
    assert f"grew {g.root} from 8 to 17 images ({g.src} lists 9 more)" in g.log
    assert f"grew the arrays of {KEY} to 17 rows" in g.log
    assert "frozen: fitted on the first 8 of now 17 images (--recompute to refit)" in g.log
    assert g.stats_after_grow == g.stats_of_eight and g.stats_of_eight["rows"] == 8
    recomputed = _view_attrs(g.root)["stats"]
    assert recomputed["hash"] != g.stats_of_eight["hash"] and recomputed == _view_attrs(g.once)["stats"]
    assert recomputed["rows"] == 17 and recomputed["summary_vectors"] == 16 and recomputed["frozen"]
    assert "frozen" not in g.recompute_log.split("summary dispersion")[1]


def test_a_reordered_extension_is_refused_naming_the_first_row_that_differs(grown, job_teachers, tmp_path, capsys):
    """Rows 3 and 4 swapped, one row more: the cache (8 rows) is left exactly as it was."""
    root = tmp_path / "cache"
    shutil.copytree(grown.eight, root)
    rows = tables.read_manifest(locate(str(grown.once))).select(["image_id", "uri"]).to_pylist()
    rows[3], rows[4] = rows[4], rows[3]
    listing = tmp_path / "list.csv"
    listing.write_text("image_id,uri\n" + "".join(f"{r['image_id']},{r['uri']}\n" for r in rows[:9]))
    before = _objects(root)
    code = main(["extract", "--source", str(listing), "--out", str(root), "--no-stats",
                 "--teacher", f"family=dinov3,source={job_teachers['dinov3']},resolutions=64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"holds features of other images than {listing} lists: row 3 (image_id 'chelsea.png', uri " in err[0]
    assert _objects(root) == before


def test_an_interrupted_grow_completes_on_the_next_run(grown, job_teachers, tmp_path, monkeypatch, capsys):
    """Killed after recording the new rows' fingerprint (before the manifest), then killed again while
    growing the arrays: the same command then finishes, and the cache equals the one extracted at once."""
    root = tmp_path / "cache"
    shutil.copytree(grown.eight, root)
    job = _job(grown.src, root, job_teachers, recompute_stats=True)
    write_table = tables.write_table

    def dies_on_the_manifest(loc, table):
        if loc.path == str(root / "manifest.parquet"):
            raise Killed
        write_table(loc, table)

    with monkeypatch.context() as m:
        m.setattr(tables, "write_table", dies_on_the_manifest)
        with pytest.raises(Killed):
            run(job, stream=io.StringIO())
    cache = featcache.open_cache(str(root))
    assert cache.attrs()["num_images"] == 17 and cache.num_images == 8
    assert not (root / "_commits" / KEY / "1.json").exists()  # withdrawn before the new rows were recorded
    argv = ["extract", "--out", str(root), "--no-stats", "--teacher",
            f"family=dinov3,source={job_teachers['dinov3']},resolutions=64"]
    assert main(argv) == 2  # without the source the grow cannot go on: one line says what to do
    assert "run it again with the same source" in capsys.readouterr().err
    resize_rows, calls = cache_module.resize_rows, []

    def dies_on_the_second_array(loc, rows):
        calls.append(loc)
        if len(calls) == 2:
            raise Killed
        resize_rows(loc, rows)

    with monkeypatch.context() as m:
        m.setattr(cache_module, "resize_rows", dies_on_the_second_array)
        with pytest.raises(Killed):
            run(job, stream=io.StringIO())
    shapes = [json.loads((root / "features.zarr" / KEY / a / "zarr.json").read_text())["shape"][0]
              for a in ("dense", "summary")]
    assert shapes == [17, 8] and (root / "_commits" / KEY / "0.json").exists()
    result = run(job, stream=io.StringIO())
    assert (result.skipped, result.processed) == (1, 3)
    assert_same_cache(root, grown.once)


def _stored(loc) -> dict[str, bytes]:
    """Every object under a Location (local or S3), by path relative to it."""
    return {p[len(loc.path):].lstrip("/"): loc.fs.cat_file(p) for p in sorted(loc.fs.find(loc.path))}


def test_every_view_grows_and_one_not_in_the_job_keeps_its_new_rows_uncommitted(cache_root, tmp_path):
    """Store level, no teacher, local and S3: both views of a 6-row cache grow to 10 rows with the metadata
    and image ids a 10-row cache is created with; the partial shard 1 is uncommitted, shard 0 kept."""
    root, fresh = cache_root, str(tmp_path / "fresh")
    cache, view = make_cache(root, n=6, shard_size=4, key="a@224")
    write_all(view)
    write_all(cache.create_view(spec(key="b@224")))
    make_cache(fresh, n=10, shard_size=4, key="a@224")
    manifest = tables.read_manifest(locate(fresh))
    uri = locate(root).uri
    assert adopt(locate(root), manifest, "a list") == f"grew {uri} from 6 to 10 images (a list lists 4 more)"
    assert featcache.open_cache(root).grow_views() == ["a@224", "b@224"]
    theirs = _stored(locate(fresh).join("features.zarr", "a@224"))
    for key in ("a@224", "b@224"):
        assert featcache.open_cache(root).view(key).committed_shards() == {0}
        ours = _stored(locate(root).join("features.zarr", key))
        for name in ("dense/zarr.json", "summary/zarr.json", "box/zarr.json", "valid/zarr.json",
                     "image_id/zarr.json", "image_id/c/0"):
            assert ours[name] == theirs[name], (key, name)
    assert featcache.open_cache(root).grow_views() == []  # done: a rerun finds nothing to grow
    report = featcache.verify(root)
    assert report.ok, report.problems
    other = pa.concat_tables([manifest.slice(1, 1), manifest.slice(0, 1), manifest.slice(2)])
    with pytest.raises(featcache.errors.UsageError, match=r"a list lists: row 0 \(image_id 'img00001'"):
        adopt(locate(root), other, "a list")
    bare = str(tmp_path / "bare")
    write_manifest(bare, 3)  # a root with a manifest and no features yet takes any other list
    assert adopt(locate(bare), other, "a list", []) == "indexed a list (10 images)"
    assert tables.read_manifest(locate(bare)).equals(other)


def test_a_file_changed_since_the_cache_indexed_it_is_refused_when_its_shard_is_recomputed(
        tmp_path, job_teachers, ray_runtime):
    """The grown manifest keeps the cache's own rows as first indexed (size, mtime): an old image
    rewritten since is refused in the recomputed partial shard, not extracted from its new bytes."""
    from featcache.manifest import CHANGED

    src, out = tmp_path / "photos", tmp_path / "cache"
    src.mkdir()
    _copy_photos(src, FIRST[:3])
    assert run(_job(src, out, job_teachers), stream=io.StringIO()).images == 3  # shard 0 holds rows 0-2 of 5
    (src / photo(FIRST[1]).name).write_bytes(photo("rocket").read_bytes())  # row 1 replaced in place
    _copy_photos(src, MORE[:2])
    result = run(_job(src, out, job_teachers), stream=io.StringIO())
    assert result.images == 5 and featcache.open_cache(str(out)).num_images == 5
    errors = tables.read_errors(locate(str(out))).to_pylist()
    assert [(r["index"], r["reason"]) for r in errors if r["stage"] == "decode"] == [(1, CHANGED)]
