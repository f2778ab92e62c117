"""``featcache plan`` and the teachers' roofline shapes: FLOPs of each family's backbone read from its
config against torch's counter, the plan's JSON keys, its arithmetic, and its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from featcache import estimate, roofline
from featcache.cli import main
from featcache.teachers import create_teacher
from featcache.teachers.base import teacher_shape
from tests.support.teachers import save_dinov3, save_sam3_video_layout, save_siglip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan_teachers")
    return {"siglip2": str(save_siglip(root / "s")[0]), "dinov3": str(save_dinov3(root / "d")[0]),
            "sam3": str(save_sam3_video_layout(root / "m")[0])}


@pytest.mark.parametrize("family, size", [("siglip2", 64), ("dinov3", 64), ("dinov3", 128), ("sam3", 112)])
def test_a_teacher_shape_read_from_its_config_counts_the_flops_torch_counts(tiny, family, size):
    """On the meta device (on a CPU, torch's counter does not see the fused attention kernel)."""
    teacher = create_teacher(family, tiny[family])
    shape = teacher_shape(family, tiny[family], prefix_tokens=teacher.spec.prefix_tokens)
    model = teacher.model.to("meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=torch.zeros(1, 3, size, size, device="meta"))
    assert abs(roofline.vit_flops(shape, size, size) / counter.get_total_flops() - 1) < 0.02


def test_the_plan_s_arithmetic_and_json(tiny, capsys):
    assert main(["plan", "--teacher", f"family=dinov3,source={tiny['dinov3']},resolutions=64+128",
                 "--teacher", f"family=siglip2,source={tiny['siglip2']},codec=int8-phis", "--images", "1000",
                 "--gpus", "2", "--efficiency", "0.5", "--storage-gbps", "1e-6", "--train-samples-per-s", "100",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"images", "views", "total_bytes", "training_read_gbps"} <= set(plan)
    assert [v["key"] for v in plan["views"]] == ["dinov3@64", "dinov3@128", "siglip2@64"]
    for v in plan["views"]:
        assert {"key", "gpu_hours", "bytes", "write_gbps_per_gpu", "bound"} <= set(v) and v["bound"] == "storage"
        assert v["gpu_hours"] == pytest.approx(1000 * v["seconds_per_image"] / 3600)
        assert v["write_gbps_per_gpu"] == pytest.approx(v["bytes"] / 1000 / v["seconds_per_image"] / 1e9)
    d64, d128, s64 = plan["views"]
    # 4x the patches at 128: dense bytes x4 (f16 of 32 channels), per-image FLOPs more than 4x (attention)
    assert d128["bytes"] > 3.5 * d64["bytes"] and d128["flops_per_image"] > 4 * d64["flops_per_image"]
    assert s64["bytes"] < d64["bytes"]  # int8 codes: half the bytes of f16 at the same grid and width
    assert plan["training_read_gbps"] == pytest.approx(100 * sum(v["bytes"] for v in plan["views"]) / 1000 / 1e9)
    assert plan["hours"] == pytest.approx(sum(v["gpu_hours"] for v in plan["views"]) / 2)


def test_the_plan_knows_each_codec_s_bytes(tiny, capsys):
    """The same DINOv3 view in each codec: bytes per token 2C (f16), C (int8-phis), C/2 - 1 (int4-pca), and the
    views' data bytes in that proportion (shard indices and checksums, the same for all, aside); the table says so."""
    teachers = [f"family=dinov3,source={tiny['dinov3']},name=d{codec.replace('-', '')},codec={codec}"
                for codec in ("f16", "int8-phis", "int4-pca")]
    assert main(["plan", *[a for t in teachers for a in ("--teacher", t)], "--images", "1000", "--json"]) == 0
    views = {v["codec"]: v for v in json.loads(capsys.readouterr().out)["views"]}
    c = create_teacher("dinov3", tiny["dinov3"]).spec.channels
    assert {k: v["token_bytes"] for k, v in views.items()} == {"f16": 2 * c, "int8-phis": c, "int4-pca": c // 2 - 1}
    index = views["f16"]["bytes"] - 1000 * 16 * 2 * c  # 4 x 4 cells at 64 px: what is not the tokens
    for codec, v in views.items():
        assert v["bytes"] - index == 1000 * 16 * v["token_bytes"], codec
    assert main(["plan", *[a for t in teachers for a in ("--teacher", t)], "--images", "1000"]) == 0
    assert f"int4-pca, {c // 2 - 1}" in capsys.readouterr().out


def test_efficiency_scales_the_time_and_nothing_else(tiny):
    from featcache.extract.config import from_dict

    job = from_dict({"output": "x", "teachers": [{"family": "dinov3", "source": tiny["dinov3"]}]})
    full, half = (estimate.estimate(job, 100, roofline.HARDWARE["a100"], e) for e in (1.0, 0.5))
    assert half["views"][0]["seconds_per_image"] == pytest.approx(2 * full["views"][0]["seconds_per_image"])
    assert half["total_bytes"] == full["total_bytes"]


@pytest.mark.parametrize("argv, says", [
    (["plan", "--images", "10"], "no teachers: give a job file or --teacher"),
    (["plan", "--teacher", "family=dinov3,source=/nowhere", "--images", "10"], "/nowhere"),
    (["plan", "--teacher", "preset=sam3", "--images", "10", "--device", "tpu"], "unknown device 'tpu'"),
    (["plan", "--teacher", "preset=sam3"], "give --images N"),
])
def test_plan_errors_are_one_line(argv, says, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def indexed_job(tiny, tmp_path_factory):
    """A job file over four indexed photos with a DINOv3 at two sizes and a SAM3 mosaic."""
    import shutil

    from featcache.manifest import index
    from tests.support.images import PHOTO_NAMES, photo

    root = tmp_path_factory.mktemp("plan_job")
    (root / "photos").mkdir()
    for name in PHOTO_NAMES[:4]:
        shutil.copyfile(photo(name), root / "photos" / photo(name).name)
    index(str(root / "photos"), str(root / "out"))
    job = root / "job.yaml"  # JSON is YAML
    job.write_text(json.dumps({"source": str(root / "photos"), "output": str(root / "out"), "batch_size": 4,
                               "shard_size": 4, "teachers": [
                                   {"family": "dinov3", "source": tiny["dinov3"], "resolutions": [64, 128]},
                                   {"family": "sam3", "source": tiny["sam3"], "mosaic": 2}]}))
    return str(job)


def test_measure_times_each_view_here_and_the_whole_job_by_stage(indexed_job, capsys):
    """``--measure``: each view's efficiency is the roofline of this calibrated CPU over its timed forward
    (so its time per image is that forward's), and the job's time per image is the sum of its stages."""
    assert main(["plan", indexed_job, "--measure", "--sample", "3", "--images", "1000", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["device"].startswith("measured (cpu") and [v["key"] for v in plan["views"]] == \
        ["dinov3@64", "dinov3@128", "sam3-mosaic2@56"]
    job = plan["job"]
    assert job["device"] == "cpu" and job["sample"] == 3 and set(job["stages"]) == {"decode", "views", "forward",
                                                                                     "write"}
    for v in plan["views"]:  # tiny models: per-op overheads dominate, far below the roofline
        assert 0 < v["efficiency"] < 1 and v["efficiency"] != plan["efficiency"]
    assert job["stages"]["forward"] == pytest.approx(sum(v["seconds_per_image"] for v in plan["views"]))
    assert all(s > 0 for s in job["stages"].values())
    assert job["seconds_per_image"] == pytest.approx(sum(job["stages"].values()))
    assert plan["hours"] == pytest.approx(1000 * job["seconds_per_image"] / 3600)


def test_on_a_gpu_the_host_stages_run_beside_the_device():
    views = [estimate.ViewCost("a", 1e9, 0.010, 0, 64_000, 0, 0, "compute")]
    m = estimate.Measured("cuda", roofline.HARDWARE["h100"], 8, decode_seconds_per_mpix=0.02,
                          views_seconds={"a": 0.001}, write_seconds_per_object=1e-3, write_seconds_per_byte=1e-9)
    job = estimate.job_time(views, m, images=10, shard_size=5, megapixels=1.0)
    assert job["stages"] == pytest.approx({"decode": 0.02, "views": 0.001, "forward": 0.010,
                                           "write": 6_400 * 1e-9 + 5 / 5 * 1e-3})
    assert job["seconds_per_image"] == pytest.approx(0.02)  # decoding is the slowest: the job is host-bound
    cpu = estimate.job_time(views, estimate.Measured(**{**m.__dict__, "device": "cpu"}), 10, 5, 1.0)
    assert cpu["seconds_per_image"] == pytest.approx(sum(job["stages"].values()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine --measure can plan for a GPU preset")
@pytest.mark.parametrize("extra, says", [
    (["--device", "h100"], "--measure times this machine's CPU"),
])
def test_measure_errors_are_one_line(indexed_job, extra, says, capsys):
    assert main(["plan", indexed_job, "--measure", *extra]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err


def test_measure_needs_the_job_s_images(tiny, capsys):
    assert main(["plan", "--teacher", f"family=dinov3,source={tiny['dinov3']}", "--images", "10", "--measure"]) == 2
    err = capsys.readouterr().err
    assert "--measure samples the job's images: index the source first" in err and len(err.strip().splitlines()) == 1


# ---- storage: linear in the images, and what caches written here hold (issue 23, item 1) -----------


def test_every_term_of_the_plan_grows_linearly_with_the_images(tiny):
    """At N, 2N and 4N images (whole shards) each view's bytes and overhead are affine in N: the
    second difference is zero, and the overhead grows by the image ids and markers of N images
    only (image ids counted once, not once per image of the job)."""
    from featcache.extract.config import from_dict

    job = from_dict({"output": "x", "teachers": [{"family": "dinov3", "source": tiny["dinov3"],
                                                  "resolutions": [64, 128]}]})
    n, shard = 64_000, 64
    a, b, c = (estimate.estimate(job, k * n, roofline.HARDWARE["h100"], shard_size=shard, image_id_bytes=30)
               for k in (1, 2, 4))
    for va, vb, vc in zip(a["views"], b["views"], c["views"]):
        for term in ("bytes", "overhead_bytes"):
            assert vc[term] - vb[term] == 2 * (vb[term] - va[term]), (va["key"], term, va[term], vb[term], vc[term])
        assert vb["overhead_bytes"] - va["overhead_bytes"] == n * 30 + n // shard * estimate.MARKER_BYTES
        assert vb["gpu_hours"] == pytest.approx(2 * va["gpu_hours"])
    assert c["total_bytes"] - b["total_bytes"] == 2 * (b["total_bytes"] - a["total_bytes"])
    assert b["hours"] == pytest.approx(2 * a["hours"])


def _view_bytes(root, key: str) -> int:
    """Every byte a view holds on disk: its arrays, metadata, statistics, image ids, commit markers."""
    files = [*(root / "features.zarr" / key).rglob("*"), *(root / "_commits" / key).glob("*")]
    return sum(f.stat().st_size for f in files if f.is_file())


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Caches actually written (ShardWorker + statistics, as extract does, without Ray) at 16 and 48
    images of 32x24 PNGs with the tiny teachers: siglip2@64, dinov3@64, dinov3@128, sam3-mosaic2@56."""
    from tests.support import training
    from tests.support.images import write_many_small_pngs

    root = tmp_path_factory.mktemp("plan_written")
    models = training.teachers(root / "teachers")
    out = {}
    for n in (16, 48):
        write_many_small_pngs(root / f"src{n}", n)
        training.build(root / f"cache{n}", root / f"src{n}", models, shard_size=8)
        job = root / f"job{n}.yaml"  # JSON is YAML; the same job training.build ran
        job.write_text(json.dumps({"source": str(root / f"cache{n}"), "output": str(root / f"cache{n}"),
                                   "shard_size": 8, "batch_size": 8, "teachers": [
                                       {"family": "siglip2", "source": models["siglip2"]},
                                       {"family": "dinov3", "source": models["dinov3"], "resolutions": [64, 128]},
                                       {"family": "sam3", "source": models["sam3"], "mosaic": 2}]}))
        out[n] = (root / f"cache{n}", str(job))
    return out


@pytest.mark.parametrize("n", [16, 48])
def test_plan_predicts_the_bytes_of_caches_written_here(written, n, capsys):
    """``featcache plan JOB`` (the image count and ids from the job's manifest) against what the job
    wrote: each view's array objects exactly, everything the view holds within 5%."""
    root, job = written[n]
    assert main(["plan", job, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["images"] == n and len(plan["views"]) == 4
    for v in plan["views"]:
        data = sum(f.stat().st_size for name in ("dense", "summary", "box", "valid")
                   for f in (root / "features.zarr" / v["key"] / name / "c").rglob("*") if f.is_file())
        assert v["bytes"] == data, v["key"]
        real = _view_bytes(root, v["key"])
        assert abs((v["bytes"] + v["overhead_bytes"]) / real - 1) < 0.05, (v["key"], real, v)
    assert plan["total_bytes"] == sum(v["bytes"] + v["overhead_bytes"] for v in plan["views"])


# ---- an object-store job: nothing read with --images, one line without (issue 23, item 10) ------------


@pytest.fixture
def no_credentials(s3_root, monkeypatch, tmp_path):
    """An s3:// cache root on the test server, and an environment with no S3 credentials at all."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup
    return s3_root


def _s3_job(tmp_path, root: str, teacher: str) -> str:
    job = tmp_path / "s3job.yaml"
    job.write_text(json.dumps({"source": root, "output": root, "teachers": [{"family": "dinov3", "source": teacher}]}))
    return str(job)


@pytest.mark.s3
def test_plan_with_images_reads_nothing_from_an_s3_output(no_credentials, tiny, tmp_path, capsys):
    assert main(["plan", _s3_job(tmp_path, no_credentials, tiny["dinov3"]), "--images", "100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 100


@pytest.mark.s3
def test_plan_counting_an_s3_manifest_without_credentials_is_one_line(no_credentials, tiny, tmp_path, capsys):
    from tests.test_s3_preflight import assert_one_line, run_cli

    result = run_cli(["plan", _s3_job(tmp_path, no_credentials, tiny["dinov3"])], capsys)
    assert_one_line(result, f"S3 credentials missing or refused for {no_credentials}")


# ---- no long silence (issue 23, item 15) ---------------------------------------------------------------


def test_plan_says_what_it_waits_for(tiny, indexed_job, monkeypatch, capsys):
    """A wait longer than ``log.NOTICE_AFTER_S`` gets a line on stderr naming it (here: every wait, at
    0 s); stdout keeps the JSON alone."""
    import featcache.log

    monkeypatch.setattr(featcache.log, "NOTICE_AFTER_S", 0.0)
    assert main(["plan", indexed_job, "--device", "measured", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["images"] == 4
    lines = err.strip().splitlines()
    assert lines == ["calibrating the roofline of this cpu…", "describing 2 teachers from their configs…"], lines


def test_a_plan_for_a_stated_device_calibrates_nothing(tiny, monkeypatch, capsys):
    import featcache.log

    monkeypatch.setattr(featcache.log, "NOTICE_AFTER_S", 0.0)
    assert main(["plan", "--teacher", f"family=dinov3,source={tiny['dinov3']}", "--images", "10", "--json"]) == 0
    assert capsys.readouterr().err.strip().splitlines() == ["describing 1 teacher from their configs…"]


def test_plan_teacher_help_names_every_key_a_teacher_takes():
    """``plan --teacher`` takes what extract's does, upsampler= included, and its help says so itself."""
    from tests.test_roofline import _help

    text = _help("plan")
    for key in ("family=", "source=", "resolutions=", "mosaic=", "codec=", "name=", "preset=", "upsampler="):
        assert key in text.split("--teacher", 1)[1].split("--images")[0], key
