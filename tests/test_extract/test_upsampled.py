"""``extract`` with an upsampler: the ``<teacher>-featsharp3x@<canvas>`` view holds exactly what the
upsampler gives for each image (raw teacher space), records its checkpoint, resumes, and refuses a
different checkpoint."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

import featcache
from featcache.cli import main
from featcache.decode import decode
from featcache.extract.config import from_dict
from featcache.pipelines.extract import run
from featcache.teachers import create_teacher
from featcache.upsample import run as upsample_run
from featcache.upsample import training
from featcache.upsample.checkpoint import describe_upsampler, load_upsampler
from tests.test_extract.conftest import stored

KEY = "siglip2-featsharp3x@192"  # the tiny SigLIP takes 64 px: a 3x canvas of 192 px, a 12x12 grid


def _checkpoint(teacher: str, photos, out, seed: int):
    settings = training.Settings(family="siglip2", source=teacher, images=str(photos), steps=2, batch_size=2,
                                 heads=4, stats_images=4, heldout=0.0, seed=seed)
    training.train(settings, out)
    return out


pytestmark = pytest.mark.usefixtures("ray_runtime")  # its jobs run on the shared embedded Ray


@pytest.fixture(scope="module")
def upsampled(tmp_path_factory, photos_dir, job_teachers):
    """A two-step checkpoint for the tiny SigLIP, and a job that extracts its view (f32) and the
    plain 64-px view of the same teacher under another name."""
    tmp = tmp_path_factory.mktemp("upsampled")
    ckpt = _checkpoint(job_teachers["siglip2"], photos_dir, tmp / "ckpt", seed=0)
    job = {"source": str(photos_dir), "output": str(tmp / "cache"), "shard_size": 4, "batch_size": 3, "teachers": [
        {"family": "siglip2", "source": job_teachers["siglip2"], "upsampler": str(ckpt), "codec": "f32"},
        {"family": "siglip2", "source": job_teachers["siglip2"], "name": "plain", "codec": "f32"}]}
    log = io.StringIO()
    result = run(from_dict(job), stream=log)
    return tmp, ckpt, job, result, log.getvalue()


def test_rows_equal_a_direct_call_of_the_upsampler(upsampled):
    tmp, ckpt, _, result, _ = upsampled
    assert result.exit_code == 0 and result.views == [KEY, "plain@64"] and result.images == 10
    cache = featcache.open_cache(str(tmp / "cache"))
    got = stored(tmp / "cache", KEY)
    model, _ = load_upsampler(ckpt)
    spec = cache.view(KEY).spec
    teacher = create_teacher("siglip2", spec.teacher["source"])
    uris = cache.manifest.column("uri").to_pylist()
    with torch.inference_mode():
        for i, uri in enumerate(uris):
            canvas, box = upsample_run.canvases([decode(open(uri, "rb").read(), uri)], teacher.spec, 3)
            out = upsample_run.upsample(model, teacher, canvas)
            want = model.denormalize(out.dense)[0].numpy()
            assert got["dense"][i].shape == (12, 12, 32)
            assert np.abs(got["dense"][i] - want).max() <= 1e-5, uri
            assert np.abs(got["summary"][i] - out.summary[0].numpy()).max() <= 1e-5
            assert np.array_equal(got["box"][i], box[0].numpy())
    # the summary is the global view's: close to the plain 64-px view's (the global view is the canvas
    # resized, two resamplings of the image instead of one), far from another image's
    plain = stored(tmp / "cache", "plain@64")["summary"]
    assert np.abs(got["summary"] - plain).max() <= 1e-2 < np.abs(got["summary"] - plain[::-1]).max()


def test_the_view_records_its_checkpoint_and_gets_statistics(upsampled):
    tmp, ckpt, _, _, log = upsampled
    view = featcache.open_cache(str(tmp / "cache")).view(KEY)
    d = describe_upsampler(ckpt)
    assert view.spec.upsampler == {"name": "featsharp", "path": str(ckpt), "sha256": d.sha256, "step": 2,
                                   "config": d.config.to_dict()}
    assert view.spec.grid == (12, 12) and view.spec.input_size == (192, 192)
    assert view.stats["frozen"] and view.stats["tokens"] == 10 * 144  # PHI-S fitted on the stored raw features
    assert featcache.verify(str(tmp / "cache")).ok


def test_a_rerun_resumes_and_another_checkpoint_is_refused(upsampled, job_teachers, photos_dir, capsys):
    tmp, _, job, _, _ = upsampled
    again = run(from_dict(job), stream=io.StringIO())
    assert again.skipped == 3 and again.processed == 0
    other = _checkpoint(job_teachers["siglip2"], photos_dir, tmp / "other", seed=1)
    changed = {**job, "teachers": [{**job["teachers"][0], "upsampler": str(other)}, job["teachers"][1]]}
    config = tmp / "changed.json.yaml"
    config.write_text(json.dumps(changed))
    capsys.readouterr()  # the training's log lines (once a CLI call has sent the library's log to stderr)
    assert main(["extract", str(config), "--no-stats"]) == 2
    err = capsys.readouterr().err
    assert f"{KEY} was written with the upsampler {tmp / 'ckpt'}" in err and str(other) in err, err
    assert len(err.strip().splitlines()) == 1


def test_an_upsampler_for_other_weights_is_refused(upsampled, job_teachers, capsys, tmp_path):
    tmp, ckpt, job, _, _ = upsampled
    wrong = {**job, "output": str(tmp_path / "c"), "teachers": [
        {"family": "dinov3", "source": job_teachers["dinov3"], "upsampler": str(ckpt)}]}
    config = tmp_path / "wrong.yaml"
    config.write_text(json.dumps(wrong))
    assert main(["extract", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"the upsampler {ckpt} was trained for other weights of dinov3" in err, err
