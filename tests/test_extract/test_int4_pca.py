"""The int4-pca codec end to end: calibrated and written by the extract worker (the code the Ray job runs), its
bytes against an f16 twin, decoded by the formula its attrs state from the stored arrays alone (plain zarr, no
featcache reader), its PHI-S error against the teacher's floats computed directly, and ``verify`` on its
scales."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

import featcache
from featcache.errors import UsageError
from featcache.extract.calibration import calibrate_locally, sample_rows
from featcache.extract.config import from_dict
from featcache.extract.plan import prepare
from featcache.extract.worker import ShardWorker
from featcache.stats.compute import compute_view
from featcache.store import ViewSpec
from tests.test_extract.conftest import direct, stored

Q4, F16 = "dinov3q4@96", "dinov3@96"  # 6 x 6 cells: a shard's index and checksums are small beside them
CALIBRATION = sample_rows(10, 5, 0)
HELD_OUT = [i for i in range(10) if i not in CALIBRATION]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, photos_dir, job_teachers):
    """The tiny DINOv3 on the ten photos as int4-pca (calibrated on 5 of them) and as f16."""
    out = tmp_path_factory.mktemp("int4") / "cache"
    job = from_dict({"source": str(photos_dir), "output": str(out), "shard_size": 4, "batch_size": 3,
                     "calibration_images": 5, "teachers": [
                         {"family": "dinov3", "name": "dinov3q4", "source": job_teachers["dinov3"], "codec": "int4-pca",
                          "resolutions": [96]},
                         {"family": "dinov3", "source": job_teachers["dinov3"], "resolutions": [96]}]}, "int4 job")
    plan = prepare(job)
    worker = ShardWorker(str(out), [t.to_dict() for t in plan.teachers], [v.to_dict() for v in plan.views],
                         batch_size=3)
    assert calibrate_locally(plan, worker) == [Q4]
    for shard in plan.todo:
        worker.process(shard)
    worker.close()
    compute_view(featcache.open_cache(str(out)).view(F16))
    return out


def test_the_view_stores_a_quarter_of_f16_and_verifies(extracted):
    cache = featcache.open_cache(str(extracted))
    view, c = cache.view(Q4), cache.view(Q4).spec.channels
    q = view.attrs["quantization"]
    assert view.group["dense"].dtype == np.uint8 and view.group["dense"].shape[-1] == c // 2 - 1
    assert q["stats_hash"] == view.stats["hash"] and q["codec"] == "int4-pca"
    bits = q["bits"]  # the budget spent, leading components first, 8 bits at most
    assert sum(bits) == 8 * (c // 2 - 3) and bits == sorted(bits, reverse=True) and 1 <= bits[-1] <= bits[0] <= 8
    assert q["kept"] == len(bits) <= c and q["dropped_energy"] < 1e-2
    for b in set(bits):
        assert len(q["levels"][str(b)]) == 2 ** b and q["levels"][str(b)] == sorted(q["levels"][str(b)])
    assert q["calibration"]["images"] == 5 and 0 < q["relative_mse"] <= 2e-2
    assert featcache.verify(str(extracted)).ok
    dense = {key: sum(p.stat().st_size for p in (extracted / "features.zarr" / key / "dense" / "c").rglob("*")
                      if p.is_file()) for key in (Q4, F16)}
    assert dense[Q4] <= 0.25 * dense[F16], dense  # checksums and shard indices included
    assert view.spec.codec_type.token_bytes(c) == c // 2 - 1 and cache.view(F16).spec.codec_type.token_bytes(c) == 2 * c


def test_the_attrs_formula_decodes_the_stored_bytes(extracted):
    """Another tool's decoder, from the attrs and the statistics arrays read with plain zarr: the token's
    float16 scale in bytes 0-1, then one bit stream (least significant bit first) of each component's code,
    bits[j] bits wide, indexing that depth's levels; x = s * levels @ codec_basis + mean. It gives
    featcache's reader's floats."""
    group = zarr.open_group(str(extracted / "features.zarr"), mode="r")[Q4]
    attrs = featcache.open_cache(str(extracted)).view(Q4).attrs
    q, stats = attrs["quantization"], group[attrs["stats"]["path"]]
    basis, mean, rotation = (np.asarray(stats[n][...], np.float64) for n in ("codec_basis", "mean", "rotation"))
    raw = stored(extracted, Q4)["dense"]
    scale = raw[..., :2].copy().view("<f2").astype(np.float64)
    stream = np.unpackbits(raw[..., 2:], axis=-1, bitorder="little").astype(np.int64)
    values, at = [], 0
    for b in q["bits"]:
        code = (stream[..., at:at + b] << np.arange(b)).sum(axis=-1)
        values.append(np.asarray(q["levels"][str(b)])[code])
        at += b
    assert len(values) == q["kept"] == len(basis) and not stream[..., at:].any()  # the stream's padding is zeros
    x = (np.stack(values, axis=-1) * scale) @ basis + mean
    with featcache.open_cache(str(extracted)).view(Q4).reader() as reader:
        got = np.stack([reader.read_dense(i) for i in range(10)]).astype(np.float64)
        phis = np.stack([reader.read_dense(i, space="phis") for i in range(10)]).astype(np.float64)
    assert np.abs(got - x).max() <= 1e-5 * np.abs(x).max()
    assert np.abs(phis - (x - mean) @ rotation.T).max() <= 1e-4 * np.abs(phis).max()


def test_phis_error_against_the_teachers_floats_is_within_1e2(extracted):
    cache = featcache.open_cache(str(extracted))
    x = direct(cache, Q4)["dense"].astype(np.float64)
    with cache.view(Q4).reader() as reader:
        mean, rotation = (a.astype(np.float64) for a in reader.phis())
        got = np.stack([reader.read_dense(i, space="phis") for i in range(10)]).astype(np.float64)
    y = (x - mean) @ rotation.T
    for rows in (CALIBRATION, HELD_OUT):  # held out: images the calibration never saw
        relative = ((got[rows] - y[rows]) ** 2).sum() / (y[rows] ** 2).sum()
        assert relative <= 1e-2, (rows, relative)


def test_verify_finds_a_token_whose_scale_is_not_finite(extracted, tmp_path):
    """A shard written with one token's float16 scale NaN (its bytes are all a reader has) fails verify's
    finiteness check for that row, and only that row."""
    copy = tmp_path / "copy"
    shutil.copytree(extracted, copy)
    view = featcache.open_cache(str(copy)).view(Q4)
    codes = stored(copy, Q4)["dense"][:4]
    codes[2, 1, 3, :2] = np.array([np.nan], "<f2").view(np.uint8)
    assert view.spec.codec_type.nonfinite_tokens(codes).sum() == 1
    with view.reader() as reader:
        rows = [reader.read(i) for i in range(4)]
    view.write_shard(0, codes, np.stack([r.summary for r in rows]), np.stack([r.box for r in rows]),
                     info=view.commit_record(0).info)  # the statistics the codes were written with
    problems = featcache.verify(str(copy)).problems
    assert [(p.kind, p.shard) for p in problems] == [("nonfinite", 0)] and "[2]" in str(problems[0])


def test_a_view_too_narrow_for_the_code_is_refused_in_one_line():
    with pytest.raises(UsageError, match=r"^view t@32: int4-pca needs 8 channels at the least \(3 bytes a token, "
                                         r"8 bits of codes\); a view of 6 takes f16 or int8-phis$"):
        ViewSpec(key="t@32", grid=(2, 2), channels=6, summary_channels=0, codec="int4-pca")
