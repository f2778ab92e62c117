"""Command-line wording: bracketed help text survives rendering, counts read "1 worker" not "1 workers"."""

from __future__ import annotations

import contextlib
import io
import os

import pytest

from featcache.cli import main
from featcache.extract.progress import plural


def _help(*argv: str) -> str:
    """``featcache ARGV --help`` as a user sees it on a 100-column terminal (in-process, as the CLI runs it:
    the same text as from ``python -m featcache.cli``), its wrapped lines joined again."""
    out, err = io.StringIO(), io.StringIO()
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([*argv, "--help"])
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    assert code == 0, err.getvalue()
    return " ".join(out.getvalue().split())


@pytest.mark.parametrize("command, text", [("index", "[default: 1 for local files, 16 for remote]"),
                                           ("extract", "Images per shard [64]."),
                                           ("extract", "[$RAY_ADDRESS if set, else embedded local Ray]"),
                                           ("extract", "[,mosaic=K]")])
def test_bracketed_help_text_is_shown(command, text):
    assert text in _help(command)


@pytest.mark.parametrize("n, expected", [(0, "0 workers"), (1, "1 worker"), (2, "2 workers"), (16, "16 workers")])
def test_plural(n, expected):
    assert plural(n, "worker") == expected


def test_plural_with_an_irregular_plural():
    assert plural(1, "this", "these") == "1 this" and plural(2, "this", "these") == "2 these"


def test_the_extract_summary_of_one_image_in_one_shard(monkeypatch, capsys):
    from featcache import cli
    from featcache.pipelines import extract

    result = extract.ExtractResult(root="c", views=["v@64"], shards=1, skipped=0, processed=1, images=1,
                                   seconds=2.0, images_per_second=0.5, record="c/runs/r.json")
    monkeypatch.setattr(extract, "run", lambda cfg: result)
    cli._run_extract(None)
    assert capsys.readouterr().out.startswith("extracted 1 image in 1 shard (0 already committed) into c: 2.0 s")


def test_index_says_1_image(tmp_path, capsys):
    import shutil

    from tests.support.images import photo

    src = tmp_path / "one"
    src.mkdir()
    shutil.copy(photo("coffee"), src)
    (src / "notes.txt").write_text("not an image")
    assert main(["index", str(src), "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert f"indexed 1 image into {tmp_path / 'c'} (" in out
    assert "ignored 1 file (not images; listed in errors.parquet)" in out


def test_an_embedded_ray_starts_without_rays_token_warning(capfd):
    """Token authentication stays on (chosen explicitly), without Ray's warning about its default."""
    import ray

    from featcache.pipelines.ray_session import ray_session

    assert not ray.is_initialized()
    with ray_session(None):
        assert ray.get(ray.put(7)) == 7
    err = capfd.readouterr().err
    assert "starting Ray (embedded" in err and "Token authentication is enabled" not in err, err


def test_quiet_after_the_command_works_as_before_it(tmp_path, capsys):
    """``featcache inspect -q ROOT`` was refused; it prints what ``featcache -q inspect ROOT`` prints."""
    from tests.support.caches import make_cache

    root = str(tmp_path / "cache")
    make_cache(root)
    assert main(["-q", "inspect", root]) == 0
    before = capsys.readouterr()
    assert main(["inspect", "-q", root]) == 0 and main(["inspect", "--quiet", root, "--json"]) == 0
    after = capsys.readouterr()
    assert after.out.startswith(before.out) and "dinov3@224" in before.out and after.err == before.err == ""


def test_dir_lists_the_lazy_public_api():
    import featcache

    names = dir(featcache)
    assert set(featcache.__all__) <= set(names) and {"open_cache", "verify", "inspect", "index"} <= set(names)
    assert "__version__" in names and names == sorted(names)
