"""The student as a product (DESIGN.md §8): ``load_student`` answers in the teachers' spaces exactly (a
student whose heads output the cached PHI-S targets gives back the teachers' raw features), an export
loads alone and bit-identically, and a PIL image, a uint8 tensor and a float tensor of the same pixels
give the same outputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.checkpoint import POINTER
from featcache.cli import main
from featcache.errors import UsageError
from featcache.store.cache import Cache
from featcache.store.statsio import read_stats
from featcache.train import config, export, load_student, train
from featcache.train.weights import load_bare_student
from featcache.train.product import PRODUCT, valid_size
from tests.support import training

pytestmark = pytest.mark.slow

CONFIG = f"""
seed = 5
log_every = 100
checkpoint_every = 100

{training.TWO_TEACHERS}
[student]
size = "micro"

[resolution]
low = [64]
high = [128]
high_prob = 0.5

[optim]
steps = 2
batch_size = 4
warmup = 1

[eval]
every = 100
resolution = 64
"""


def _run(training_cache, folder, *overrides):
    path = folder / "train.toml"
    path.write_text(CONFIG)
    run = folder / "run"
    train(config.load(path, cache=str(training_cache), overrides=list(overrides)), run)
    return run


@pytest.fixture(scope="module")
def run(training_cache, tmp_path_factory):
    """Two steps on PHI-S targets (the default space)."""
    return _run(training_cache, tmp_path_factory.mktemp("product"))


@pytest.fixture(scope="module")
def raw_run(training_cache, tmp_path_factory):
    """One step on raw targets (data.space = "raw")."""
    return _run(training_cache, tmp_path_factory.mktemp("product-raw"), 'data.space="raw"', "optim.steps=1")


def _cached(cache: Cache, key: str, row: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The teacher's raw dense map (h, w, C) and summary of ``row`` as cached, float64."""
    reader = cache.views[key].reader()
    summary = reader.row("summary", row) if reader.spec.summary_channels else None
    return (np.asarray(reader.read_dense(row, None, "raw"), np.float64),
            None if summary is None else np.asarray(summary, np.float64))


def _phis(cache: Cache, key: str, x: np.ndarray) -> np.ndarray:
    """y = (x − μ) Rᵀ with the view's stored statistics (ALGORITHMS.md §1), written out here."""
    stats = read_stats(cache.views[key])
    return (x - stats["mean"]) @ np.asarray(stats["rotation"], np.float64).T


def _replace_output(module: torch.nn.Module, value: np.ndarray):
    """The adaptor's output replaced by ``value`` (one image): the student's head 'outputs the targets'."""
    tensor = torch.from_numpy(value).float().unsqueeze(0)
    return module.register_forward_hook(lambda m, args, out: tensor)


def _mean_norm(cache: Cache, key: str) -> float:
    reader = cache.views[key].reader()
    return float(np.mean([np.linalg.norm(np.asarray(reader.row("summary", r), np.float64))
                          for r in range(cache.num_images)]))


@pytest.mark.parametrize("size, dense_view", [(64, "dinov3@64"), (128, "dinov3@128")])
def test_heads_that_output_the_cached_phis_targets_give_the_teachers_raw_features(run, training_cache, size,
                                                                                 dense_view):
    cache, row = Cache.open(str(training_cache)), 3
    product = load_student(run)
    raw, _ = _cached(cache, dense_view, row)
    _, summary = _cached(cache, "siglip2@64", row)
    hooks = [_replace_output(product.student.dense_adaptors["dinov3"], _phis(cache, dense_view, raw)),
             _replace_output(product.student.summary_adaptors["siglip2"], 0.37 * summary)]
    with torch.no_grad():
        out = product(torch.rand(3, size, size))
    for h in hooks:
        h.remove()
    dense = out["dinov3"]["dense"][0].double().numpy()
    assert np.abs(dense - raw).max() <= 1e-4 * np.abs(raw).max()  # float32 through R and R⁻¹
    got = out["siglip2"]["summary"][0].double().numpy()
    expected = summary / np.linalg.norm(summary) * _mean_norm(cache, "siglip2@64")  # direction × mean norm
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_phis_space_on_request_is_what_the_heads_output(run, training_cache):
    cache = Cache.open(str(training_cache))
    teacher, phis = load_student(run), load_student(run, space="phis")
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, bare = phis(pixels), load_bare_student(run)(teacher._standardized(pixels))
    assert torch.equal(a["dinov3"]["dense"], bare.dense["dinov3"])
    assert torch.equal(a["siglip2"]["summary"], bare.summary["siglip2"])
    assert a["dinov3"]["dense"].shape == (2, 4, 4, cache.views["dinov3@64"].spec.channels)


def test_a_raw_space_student_is_the_identity_in_teacher_space_and_rotated_in_phis(raw_run, training_cache):
    cache, row = Cache.open(str(training_cache)), 7
    raw, _ = _cached(cache, "dinov3@64", row)
    out = {}
    for space in ("teacher", "phis"):
        product = load_student(raw_run, space=space)
        hook = _replace_output(product.student.dense_adaptors["dinov3"], raw)
        with torch.no_grad():
            out[space] = product(torch.rand(3, 64, 64))["dinov3"]["dense"][0].double().numpy()
        hook.remove()
    np.testing.assert_allclose(out["teacher"], raw, rtol=0, atol=1e-6 * np.abs(raw).max())
    expected = _phis(cache, "dinov3@64", raw)
    assert np.abs(out["phis"] - expected).max() <= 1e-4 * np.abs(expected).max()


def _outputs(product, images, **kw) -> dict:
    with torch.no_grad():
        return product(images, **kw)


def _same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys() == {"summary", "dense"}
        for kind in a[name]:
            torch.testing.assert_close(a[name][kind], b[name][kind], rtol=0, atol=atol)


def test_export_then_load_gives_bit_identical_outputs_without_the_run(run, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    moved = tmp_path / "elsewhere"
    shutil.copytree(out, moved)
    pixels = torch.rand(2, 3, 64, 128)
    before = _outputs(load_student(run), pixels)
    shutil.rmtree(out)
    _same(_outputs(load_student(moved), pixels), before)


def test_pil_uint8_and_float_inputs_give_the_same_outputs(run):
    product = load_student(run)
    u8 = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    pil = Image.fromarray(u8.permute(1, 2, 0).numpy())
    by_uint8 = _outputs(product, u8)
    _same(_outputs(product, u8.float() / 255), by_uint8)  # the same floats: identical
    _same(_outputs(product, pil), by_uint8)
    _same(_outputs(product, [pil, pil]), _outputs(product, torch.stack([u8, u8])))
    # resized by the size rule (70x100 -> 64x96): the three kinds still agree exactly
    big = torch.randint(0, 256, (3, 70, 100), dtype=torch.uint8)
    resized = _outputs(product, big, resize=True)
    assert resized["dinov3"]["dense"].shape[1:3] == (4, 6)
    _same(_outputs(product, Image.fromarray(big.permute(1, 2, 0).numpy()), resize=True), resized)
    _same(_outputs(product, big.float() / 255, resize=True), resized)


def test_the_size_rule_and_inputs_it_refuses(run):
    assert valid_size(70, 100, 16) == (64, 96) and valid_size(5, 24, 16) == (16, 32)
    product = load_student(run)
    with pytest.raises(UsageError, match="not a multiple of the patch 16 px; sizes that work: 64x96 or 80x112"):
        product(torch.rand(3, 70, 100))
    with pytest.raises(UsageError, match="give uint8"):
        product(torch.zeros(3, 64, 64, dtype=torch.int32))


def test_a_checkpoint_without_the_maps_loads_for_init_only(run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run, old)
    for name in ("best", "last"):  # the sets as featcache wrote them before the maps: weights and state only
        pointer = old / "checkpoints" / name / POINTER
        record = json.loads(pointer.read_text())
        (pointer.parent / record["set"] / PRODUCT).unlink()
        pointer.write_text(json.dumps({**record, "files": [f for f in record["files"] if f != PRODUCT]}))
    with pytest.raises(UsageError, match=f"has no {PRODUCT} .*: its weights load only for --init"):
        load_student(old)
    for a, b in zip(load_bare_student(old).state_dict().values(), load_bare_student(run).state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("what", ["not a run", "out exists"])
def test_export_refuses_a_non_run_and_an_existing_out_in_one_line(run, tmp_path, capsys, what):
    source, out = (tmp_path, tmp_path / "new") if what == "not a run" else (run, tmp_path / "full")
    if what == "out exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    assert main(["export", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("featcache: error: ")
    assert ("is not a training run" if what == "not a run" else "exists and is not an empty folder") in err
    assert (sorted(p.name for p in out.iterdir()) == ["keep.txt"]) if what == "out exists" else not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]  # nothing half-written left beside it
    with pytest.raises(UsageError):
        export(source, out)
