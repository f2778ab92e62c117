"""``featcache stats``: a Ray job over a cache, checked against a direct numpy computation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import featcache
from featcache.cli import main
from featcache.stats.hadamard import hadamard
from featcache.pipelines import stats
from tests.support.caches import make_cache, shard_data, write_all

pytestmark = pytest.mark.usefixtures("ray_runtime")  # the stats jobs share one embedded Ray
N, SHARD = 40, 8
FAILED = {3: "decode: broken", 17: "decode: broken"}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats") / "cache"
    cache, view = make_cache(str(root), n=N, shard_size=SHARD, grid=(4, 6), channels=24, dtype="float32")
    write_all(view, seed=1, errors=FAILED)
    return root


def _copy(src: Path, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _stats_bytes(root: str) -> dict[str, bytes]:
    base = Path(root) / "features.zarr" / "dinov3@224" / "stats"
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def _direct(root: str):
    """Mean, covariance and summary dispersion of the valid rows, computed directly from the arrays."""
    view = featcache.open_cache(root).view("dinov3@224")
    data = [shard_data(view, k, seed=1) for k in range(view.num_shards)]
    valid = np.ones(N, bool)
    valid[list(FAILED)] = False
    dense = np.concatenate([d["dense"] for d in data])[valid].reshape(-1, 24).astype(np.float64)
    summary = np.concatenate([d["summary"] for d in data])[valid].astype(np.float64)
    mu = summary.mean(axis=0) / np.linalg.norm(summary.mean(axis=0))
    cos = summary @ mu / np.linalg.norm(summary, axis=1)
    disp = np.mean(np.arccos(np.clip(cos, -1 + 1e-7, 1 - 1e-7)) ** 2)
    return dense.mean(axis=0), np.cov(dense, rowvar=False, bias=True), disp, len(dense)


def test_stats_equal_a_direct_computation(cache_root, tmp_path):
    root = _copy(cache_root, tmp_path / "c")
    rows = stats.run(root)
    mean, cov, disp, tokens = _direct(root)
    assert len(rows) == 1 and rows[0].tokens == tokens == (N - 2) * 24
    assert abs(rows[0].dispersion - disp) < 1e-9
    path = featcache.open_cache(root).view("dinov3@224").stats["path"]  # stats/<hash>: one folder per version
    group = zarr.open_group(f"{root}/features.zarr/dinov3@224/{path}", mode="r")
    assert np.allclose(group["mean"][:], mean, rtol=1e-10, atol=1e-12)
    lam = np.sort(np.linalg.eigvalsh(cov))[::-1]
    assert np.allclose(group["eigenvalues"][:], lam, rtol=1e-8, atol=1e-12)
    alpha = lam.mean() ** -0.5
    assert abs(rows[0].alpha - alpha) < 1e-9
    # the stored rotation is α H Uᵀ: R Σ Rᵀ has α²λ on its diagonal... and every channel variance 1
    r = group["rotation"][:].astype(np.float64)
    assert np.allclose(np.diag(r @ cov @ r.T), 1.0, atol=1e-5)
    assert np.allclose(r @ group["inverse"][:].astype(np.float64), np.eye(24), atol=1e-5)
    attrs = featcache.open_cache(root).view("dinov3@224").stats
    assert attrs["frozen"] and attrs["hadamard"]["description"] == "H2 ⊗ Paley I q=11"
    assert featcache.verify(root).ok


def test_same_seed_same_bytes_and_budget_sampling(cache_root, tmp_path):
    a, b, c = (_copy(cache_root, tmp_path / name) for name in "abc")
    ra = stats.run(a, token_budget=300, seed=7)
    stats.run(b, token_budget=300, seed=7)
    stats.run(c, token_budget=300, seed=8)
    assert _stats_bytes(a) == _stats_bytes(b)
    assert _stats_bytes(a) != _stats_bytes(c)
    assert abs(ra[0].tokens - 300) < 4 * np.sqrt(300)  # each token kept with probability 300/912
    attrs = featcache.open_cache(a).view("dinov3@224").stats
    assert attrs["token_budget"] == 300 and attrs["seed"] == 7 and attrs["tokens"] == ra[0].tokens


def test_frozen_stats_are_kept_unless_recompute(cache_root, tmp_path, capsys):
    root = _copy(cache_root, tmp_path / "c")
    assert main(["stats", root, "--token-budget", "300", "--seed", "1"]) == 0
    before = _stats_bytes(root)
    assert main(["stats", root, "--token-budget", "300", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "frozen (--recompute to overwrite)" in out and _stats_bytes(root) == before
    assert main(["stats", root, "--token-budget", "300", "--seed", "2", "--recompute"]) == 0
    assert _stats_bytes(root) != before
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[:4] == ["view", "channels", "tokens", "alpha"] and "dispersion" in header


def test_a_partly_committed_view_is_not_frozen(tmp_path):
    root = str(tmp_path / "c")
    cache, view = make_cache(root, n=N, shard_size=SHARD, grid=(2, 2), channels=12)
    for k in (0, 2):
        view.write_shard(view.shard_range(k)[0], **shard_data(view, k))
    rows = stats.run(root)
    assert "2 of 5 shards (not frozen)" in rows[0].note
    assert not featcache.open_cache(root).view("dinov3@224").stats["frozen"]
    before = featcache.open_cache(root).view("dinov3@224").stats
    assert stats.run(root, complete_only=True)[0].note == "not computed: 2 of 5 shards committed"
    assert featcache.open_cache(root).view("dinov3@224").stats == before  # left alone
    write_all(view)
    rows = stats.run(root)  # not frozen: computed again over every shard
    assert rows[0].tokens == N * 4 and featcache.open_cache(root).view("dinov3@224").stats["frozen"]


def test_fallback_rotation_is_persisted(tmp_path):
    root = str(tmp_path / "c")
    cache, view = make_cache(root, n=16, shard_size=8, grid=(4, 4), channels=92)  # 92: no construction
    write_all(view)
    stats.run(root, seed=5)
    path = featcache.open_cache(root).view("dinov3@224").stats["path"]  # stats/<hash>: one folder per version
    group = zarr.open_group(f"{root}/features.zarr/dinov3@224/{path}", mode="r")
    assert np.array_equal(group["hadamard"][:], hadamard(92, seed=5)[0])
    assert featcache.open_cache(root).view("dinov3@224").stats["hadamard"]["seed"] == 5


@pytest.mark.parametrize("args, message", [(["--views", "nope@1"], "no view 'nope@1'"),
                                           (["--token-budget", "0"], "token budget must be >= 1")])
def test_bad_arguments_are_one_line(cache_root, args, message, capsys):
    assert main(["stats", str(cache_root), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_reader_returns_phis_space_on_request(cache_root, tmp_path):
    root = _copy(cache_root, tmp_path / "c")
    view = featcache.open_cache(root).view("dinov3@224")
    with view.reader() as reader:
        with pytest.raises(featcache.errors.UsageError, match="no statistics yet: run 'featcache stats'"):
            reader.read(0, space="phis")
    stats.run(root)  # all tokens: on exactly those tokens PHI-S gives mean 0, variance 1 per channel
    view = featcache.open_cache(root).view("dinov3@224")
    valid = [i for i in range(N) if i not in FAILED]
    with view.reader() as reader:
        y = np.stack([reader.read(i, space="phis").dense for i in valid]).reshape(-1, 24).astype(np.float64)
        window = reader.read(5, window=(1, 3, 2, 5), space="phis").dense
        raw = reader.read(5).dense
    assert np.abs(y.mean(axis=0)).max() < 1e-5 and np.abs(y.var(axis=0) - 1).max() < 1e-4
    path = featcache.open_cache(root).view("dinov3@224").stats["path"]  # stats/<hash>: one folder per version
    group = zarr.open_group(f"{root}/features.zarr/dinov3@224/{path}", mode="r")
    expected = (raw[1:3, 2:5].astype(np.float64) - group["mean"][:]) @ group["rotation"][:].astype(np.float64).T
    assert window.shape == (2, 3, 24) and np.abs(window - expected).max() < 1e-4
    with pytest.raises(featcache.errors.UsageError, match="space 'pca' is not one of raw, phis, stored"):
        view.reader().read(0, space="pca")


def test_stats_json_carries_the_values_in_the_attrs(cache_root, tmp_path, capsys):
    """``stats --json``: one JSON object on stdout with DESIGN.md §7's keys, equal to what the view's attrs hold."""
    import json

    root = _copy(cache_root, tmp_path / "c")
    assert main(["stats", root, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    attrs = featcache.open_cache(root).view("dinov3@224").stats
    (row,) = got["views"]
    assert row["key"] == "dinov3@224" and row["channels"] == 24 and row["tokens"] == attrs["tokens"] == (N - 2) * 24
    assert row["alpha"] == attrs["alpha"] and row["dispersion"] == attrs["dispersion"]
    assert row["hadamard"] == attrs["hadamard"] and row["hadamard"] is not None


@pytest.mark.parametrize("frozen", [False, True])
def test_a_negative_seed_is_one_line_before_ray_starts(tmp_path, capfd, frozen):
    """``stats --seed -1`` ended in a traceback from numpy's seeding; with frozen statistics it was ignored."""
    root = str(tmp_path / "cache")
    _, view = make_cache(root, n=8, shard_size=4)
    write_all(view)
    if frozen:
        assert main(["stats", root]) == 0
    capfd.readouterr()
    assert main(["stats", root, "--seed", "-1"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["featcache: error: --seed must be >= 0, not -1"], err
