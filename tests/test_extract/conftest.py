"""Shared pieces of the extract tests: saved tiny teachers, a folder of real photos, job configs,
and the direct (non-Ray, one image at a time) computation every stored row is checked against."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import zarr

from featcache.decode import decode
from featcache.errors import ImageError
from featcache.extract.config import from_dict
from featcache.teachers.views import make_views
from featcache.store.cache import Cache
from featcache.teachers import TeacherSpec, create_teacher
from tests.support.images import photo
from tests.support.teachers import save_dinov3, save_sam3_video_layout, save_siglip

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "camera", "horse", "coins", "retina",
          "hubble_deep_field"]


@pytest.fixture(scope="session")
def job_teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("job_teachers")
    return {"siglip2": str(save_siglip(root / "siglip2")[0]), "dinov3": str(save_dinov3(root / "dinov3")[0]),
            "sam3": str(save_sam3_video_layout(root / "sam3")[0])}


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory):
    """Ten real photos of mixed sizes, modes and formats (RGB, greyscale, JPEG, PNG)."""
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        src = photo(name)
        shutil.copyfile(src, folder / src.name)
    return folder


@pytest.fixture(scope="session")
def two_image_shards(tmp_path_factory, photos_dir, job_teachers, ray_runtime):
    """The three-family job (:func:`three_family_job`) in shards of 2 images and batches of 2, run once,
    uninterrupted, on the shared embedded Ray: what test_faults' interrupted runs and test_cluster's
    two-node run must equal. Read it, never change it."""
    from featcache.pipelines.extract import run

    out = tmp_path_factory.mktemp("two_image_shards") / "cache"
    assert run(three_family_job(out, photos_dir, job_teachers, shard_size=2, batch_size=2),
               stream=io.StringIO()).exit_code == 0
    return out


def three_family_job(out, source, teachers: dict, **overrides):
    """index -> extract job: three families, DINOv3 at two resolutions, SAM3 as a 2x2 mosaic, float32."""
    d = {"source": str(source), "output": str(out), "shard_size": 4, "batch_size": 3, "teachers": [
        {"family": "siglip2", "source": teachers["siglip2"], "codec": "f32"},
        {"family": "dinov3", "source": teachers["dinov3"], "resolutions": [64, 96], "codec": "f32"},
        {"family": "sam3", "source": teachers["sam3"], "mosaic": 2, "codec": "f32"}]}
    d.update(overrides)
    return from_dict(d, "test job")


def stored(root, key: str) -> dict[str, np.ndarray]:
    """A view's arrays read with plain zarr (not featcache's reader)."""
    group = zarr.open_group(str(root) + "/features.zarr", mode="r")[key]
    return {name: group[name][:] for name in ("dense", "summary", "box", "valid")}


def direct(cache: Cache, key: str) -> dict[str, np.ndarray]:
    """The view computed without Ray or the worker: decode, make_views, extract, image by image
    (a mosaic view: the shard's good tiles in order, k*k per mosaic, as the job groups them)."""
    view = cache.view(key)
    spec = view.spec
    teacher = create_teacher(spec.teacher["family"], spec.teacher["source"], name=spec.teacher["name"])
    assert TeacherSpec.from_dict(spec.teacher).weights_hash is not None
    uris = cache.manifest.column("uri").to_pylist()
    n, s = len(uris), view.shard_size
    out = {"dense": np.zeros((n, *spec.grid, spec.channels), np.float32),
           "summary": np.zeros((n, spec.summary_channels), np.float32),
           "box": np.zeros((n, 4), np.float32), "valid": np.zeros(n, np.uint8)}
    for start in range(0, n, s):
        good, images = [], []
        for i in range(start, min(start + s, n)):
            try:
                images.append(decode(open(uris[i], "rb").read(), uris[i]))
                good.append(i)
            except ImageError:
                pass
        if spec.mosaic > 1:
            tiles, boxes = make_views(images, teacher.spec, policy=spec.view_policy, mosaic=spec.mosaic)
            res = teacher.extract_mosaic(tiles, spec.mosaic)
            dense, summary = res.dense, res.summary
        else:
            rows = [make_views([im], teacher.spec, size=spec.input_size, policy=spec.view_policy) for im in images]
            outs = [teacher.extract(p) for p, _ in rows]
            dense = np.concatenate([o.dense.numpy() for o in outs]) if outs else None
            summary = np.concatenate([o.summary.numpy() for o in outs]) if outs else None
            boxes = np.concatenate([b.numpy() for _, b in rows]) if rows else None
        for j, i in enumerate(good):
            out["dense"][i], out["summary"][i], out["box"][i], out["valid"][i] = dense[j], summary[j], boxes[j], 1
    return out
