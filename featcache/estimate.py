"""What an extraction job costs before it runs: ``featcache plan`` (issue 15).

Per view of a job: the teacher's forward time per image from the roofline (``featcache.roofline``)
on a chosen device, divided by an efficiency (the fraction of the roofline a real forward reaches:
stated, or measured by running the teachers here); GPU-hours for the job's images; the bytes the
view stores (its arrays' objects exactly: chunks, their crc32c, shard indices, as the shard writer
lays them out; metadata, commit markers and statistics on top, estimated); the write bandwidth one
GPU needs to keep up; and whether stated storage can absorb what all GPUs write. For training: the
read bandwidth a target samples/s needs, from each view's bytes per sample (the chunks a crop's
window touches: the whole map of an untiled view).

``--measure`` (:func:`measure_job`) runs a sample of the job's own images through its teachers on this
machine: the efficiency of each view's forward against the roofline of this device, and the host's
work per image (read + decode per megapixel, views, writing objects and bytes), so that the plan can
say how long the whole job takes here in its steady state (the statistics pass and start-up aside).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from featcache import roofline
from featcache.extract.config import ExtractConfig
from featcache.extract.plan import ViewTask, view_specs
from featcache.store.spec import ViewSpec
from featcache.teachers import describe_teacher
from featcache.teachers.base import teacher_shape

#: bytes beyond the arrays' data, estimated from what this version writes (measured on the caches of
#: tests/test_plan.py): a view's metadata documents (its arrays', its statistics': 9.8 kB) and a commit
#: marker per shard (340 bytes, more when the shard has failed images)
VIEW_METADATA_BYTES = 10_000
MARKER_BYTES = 350
#: objects a shard of one view writes (dense, summary, box, valid, its commit marker)
OBJECTS_PER_SHARD = 5


@dataclass(frozen=True)
class ViewCost:
    key: str
    flops_per_image: float
    seconds_per_image: float  # one GPU (or this CPU), the efficiency applied
    gpu_hours: float
    bytes: int  # the arrays' data objects
    overhead_bytes: int  # metadata, markers, statistics (estimated)
    write_gbps_per_gpu: float
    bound: str  # what limits the job's rate for this view: "compute" or "storage"
    efficiency: float = 1.0  # of the roofline: stated, or measured for this view
    codec: str = "f16"
    token_bytes: int = 0  # one patch token in the dense array (the codec's: f16 2C, int8-phis C, int4-pca ⌊C/2⌋ − 1)


def data_bytes(spec: ViewSpec, images: int, shard_size: int) -> int:
    """Bytes of a view's array objects as the shard writer stores them (crc32c after every chunk; a
    dense shard's index of 16 bytes per inner chunk + its crc32c; the last chunk of plain arrays padded)."""
    (h, w), (th, tw), c = spec.grid, spec.tile, spec.channels
    shards, per_image = math.ceil(images / shard_size), (h // th) * (w // tw)
    codec = spec.codec_type
    dense = images * per_image * (th * tw * codec.token_bytes(c) + 4) + shards * (shard_size * per_image * 16 + 4)
    summary_item = np.dtype(codec.summary_dtype).itemsize
    plain = shards * (shard_size * (spec.summary_channels * summary_item + 4 * 4 + 1) + 3 * 4)
    return dense + plain


def overhead_bytes(spec: ViewSpec, images: int, shard_size: int, image_id_bytes: float) -> int:
    """The estimated rest: metadata, a marker per shard, the image ids (``image_id_bytes`` per image,
    its 4-byte length included; the chunk's count and crc32c on top), and the statistics uncompressed
    (float32 rotation and inverse; float64 mean, eigenvalues, channel mean and std, summary direction; a
    codec's own arrays, e.g. int4-pca's basis):
    zstd barely shrinks them. Affine in ``images`` at whole shards."""
    c, cs = spec.channels, spec.summary_channels
    stats = 4 * 2 * c * c + 8 * (4 * c + cs) + spec.codec_type.stats_bytes(c)
    ids = math.ceil(images * image_id_bytes) + 8
    return int(VIEW_METADATA_BYTES + math.ceil(images / shard_size) * MARKER_BYTES + ids + stats)


def image_id_bytes(manifest) -> float:
    """Mean bytes a manifest's image id takes in a view's ``image_id`` array (UTF-8 and a 4-byte length)."""
    ids = manifest.column("image_id").to_pylist()
    return sum(len(i.encode()) + 4 for i in ids) / max(1, len(ids))


def forward_flops_and_ops(shape: roofline.VitShape, task: ViewTask, spec: ViewSpec, teacher, batch: int,
                          itemsize: int) -> tuple[float, list[roofline.Op], int]:
    """(FLOPs per image, ops of the forwards of one worker batch, images that batch holds) for a
    view: the forwards its kind runs (a mosaic: ``batch`` native-size mosaics of k² images; an
    upsampled view: 1 + f² forwards of ``batch`` native-size inputs), as the memory estimates count them."""
    forward = task.kind.forward(teacher, batch)
    model = [dataclasses.replace(o, count=o.count * forward.count)
             for o in roofline.ops(shape, *forward.size, forward.inputs, itemsize)]
    return sum(o.flops * o.count for o in model) / forward.images, model, forward.images


def describe(t) -> tuple:
    """(TeacherSpec, VitShape) of a job's teacher: from its config (local, or the HF hub), or, for a
    preset's own HF id that cannot be fetched here, from the preset's published config."""
    from featcache.errors import TeacherLoadError
    from featcache.teachers.presets import PRESETS

    try:
        spec = describe_teacher(t.family, t.source, t.revision, name=t.name, hash_weights=False)
        return spec, teacher_shape(t.family, t.source, t.revision, spec.prefix_tokens)
    except TeacherLoadError:
        p = next((p for p in PRESETS.values() if p.source == t.source and p.family == t.family), None)
        if p is None:
            raise
    spec = p.random_teacher("meta").spec
    return dataclasses.replace(spec, name=t.name or t.family, source=t.source), p.shape


@dataclass(frozen=True)
class Measured:
    """What :func:`measure_job` timed on this machine (seconds, fastest of repeats)."""

    device: str
    hardware: roofline.Hardware  # the calibrated roofline the efficiencies are relative to
    sample: int  # images decoded
    decode_seconds_per_mpix: float  # read + decode
    views_seconds: dict[str, float] = field(default_factory=dict)  # per image, per view key
    forward_seconds: dict[str, float] = field(default_factory=dict)  # per image, per view key
    efficiency: dict[str, float] = field(default_factory=dict)  # roofline / measured forward, per view key
    write_seconds_per_object: float = 0.0
    write_seconds_per_byte: float = 0.0


def measure_job(config: ExtractConfig, manifest, hw: roofline.Hardware | None = None, sample: int = 16,
                seconds: float = 0.5, scratch: str | None = None) -> Measured:
    """Time the job's own work on ``sample`` of its images (evenly spread over ``manifest``) on this
    machine's device: reading and decoding, each view's resize and forward at the job's batch size
    (its efficiency: the roofline of ``hw``, by default this device calibrated, over the measured
    forward), and writing
    small and large objects into ``scratch`` (a temporary folder; the output's own folder when local)."""
    import torch

    from featcache.decode import decode
    from featcache.errors import ImageError, UsageError
    from featcache.sources.read import ImageReader
    from featcache.teachers import create_teacher

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hw = hw or roofline.measure(device, seconds)
    uris, n, source = manifest.column("uri").to_pylist(), manifest.num_rows, ImageReader(manifest)
    images, t0 = [], time.perf_counter()
    for i in sorted({round(j * (n - 1) / max(1, sample - 1)) for j in range(min(sample, n))}):
        try:
            images.append(decode(source.read(i), uris[i], config.max_pixels))
        except (ImageError, OSError):
            continue
    if not images:
        raise UsageError("--measure: none of the sampled images could be read and decoded")
    decode_rate = (time.perf_counter() - t0) / (sum(im.shape[1] * im.shape[2] for im in images) / 1e6)
    out = Measured(f"{device}", hw, len(images), decode_rate)
    for i, t in enumerate(config.teachers):
        teacher = create_teacher(t.family, t.source, t.revision, device=device, name=t.name, hash_weights=False)
        shape = teacher_shape(t.family, t.source, t.revision, teacher.spec.prefix_tokens)
        for task, spec in view_specs(i, t, teacher.spec, config):
            kind = task.kind
            if not kind.measured:  # an upsampled view's efficiency is stated
                continue
            per_batch = kind.images_per_batch(config.batch_size)
            batch = [images[j % len(images)].to(device) for j in range(per_batch)]
            view = lambda: kind.views(teacher.spec, batch, config.view_policy, device)[0]  # noqa: E731
            pixels = view()
            run = lambda: kind.features(teacher, pixels, None, config.batch_size)  # noqa: E731
            with torch.inference_mode():
                forward = roofline.fastest(run, device, seconds)
            _, model, images_per_call = forward_flops_and_ops(shape, task, spec, teacher.spec, config.batch_size,
                                                              hw.itemsize)
            predicted = sum(x.seconds for x in roofline.predict(model, hw))
            out.views_seconds[task.key] = roofline.fastest(view, device, seconds / 4) / per_batch
            out.forward_seconds[task.key] = forward / images_per_call
            out.efficiency[task.key] = predicted / forward
        del teacher
    small, large = _write_rates(scratch)
    return dataclasses.replace(out, write_seconds_per_object=small, write_seconds_per_byte=large)


def _write_rates(scratch: str | None, objects: int = 32, size: int = 16 << 20) -> tuple[float, float]:
    """(seconds per small object, seconds per byte of a large one) written into a fresh folder."""
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".featcache-plan-") as folder:
        t0 = time.perf_counter()
        for i in range(objects):
            with open(os.path.join(folder, f"{i}"), "wb") as f:
                f.write(b"\0" * 512)
        per_object = (time.perf_counter() - t0) / objects
        data = os.urandom(size)
        t0 = time.perf_counter()
        with open(os.path.join(folder, "large"), "wb") as f:
            f.write(data)
        return per_object, max(0.0, time.perf_counter() - t0 - per_object) / size


def estimate(config: ExtractConfig, images: int, hw: roofline.Hardware, efficiency: float = 1.0, gpus: int = 1,
             storage_gbps: float | None = None, shard_size: int = 64, image_id_bytes: float = 24,
             train_samples_per_s: float | None = None, measured: Measured | None = None,
             megapixels_per_image: float | None = None) -> dict:
    """The ``featcache plan --json`` object for ``config`` over ``images`` images. With ``measured``
    each view's efficiency is its measured one, and ``job`` holds the whole job's time per image here
    (``megapixels_per_image``: the mean size of the source images, for the decoding). ``image_id_bytes``:
    what one image's id stores (:func:`image_id_bytes` of the manifest, when there is one)."""
    views = []
    for i, t in enumerate(config.teachers):
        teacher, shape = describe(t)
        for task, spec in view_specs(i, t, teacher, config):
            flops, model, batch = forward_flops_and_ops(shape, task, spec, teacher, config.batch_size, hw.itemsize)
            e = measured.efficiency.get(spec.key, efficiency) if measured else efficiency
            seconds = sum(x.seconds for x in roofline.predict(model, hw)) / batch / e
            size = data_bytes(spec, images, shard_size)
            views.append(ViewCost(spec.key, flops, seconds, images * seconds / 3600, size,
                                  overhead_bytes(spec, images, shard_size, image_id_bytes),
                                  size / images / seconds / 1e9, "compute", e, spec.codec,
                                  spec.codec_type.token_bytes(spec.channels)))
    total_seconds = sum(v.seconds_per_image for v in views)
    write_gbps = sum(v.bytes for v in views) / images / total_seconds / 1e9 * gpus if views else 0.0
    bound = "storage" if storage_gbps is not None and write_gbps > storage_gbps else "compute"
    views = [ViewCost(**{**asdict(v), "bound": bound}) for v in views]
    job = None if measured is None else job_time(views, measured, images, shard_size, megapixels_per_image or 0.0)
    out = {"images": images, "device": hw.name, "efficiency": efficiency, "gpus": gpus,
           "views": [asdict(v) for v in views], "total_bytes": sum(v.bytes + v.overhead_bytes for v in views),
           "write_gbps_all_gpus": write_gbps, "storage_gbps": storage_gbps, "bound": bound,
           "hours": images * (job["seconds_per_image"] if job else total_seconds) / gpus / 3600, "job": job}
    out["training_read_gbps"] = None if train_samples_per_s is None else \
        train_samples_per_s * sum(v.bytes for v in views) / images / 1e9
    return out


def job_time(views: list[ViewCost], measured: Measured, images: int, shard_size: int, megapixels: float) -> dict:
    """Seconds per image of the whole job in its steady state, by stage. On a CPU every stage shares
    the cores: their sum. On a GPU the views and forwards run on the device while the host decodes
    (``decode_threads`` beside each other, not modelled: one) and writes: the slowest of the three."""
    stages = {"decode": measured.decode_seconds_per_mpix * megapixels,
              "views": sum(measured.views_seconds.get(v.key, 0.0) for v in views),
              "forward": sum(v.seconds_per_image for v in views),
              "write": sum(v.bytes for v in views) / images * measured.write_seconds_per_byte
              + len(views) * OBJECTS_PER_SHARD / shard_size * measured.write_seconds_per_object}
    if measured.device == "cpu":
        per_image = sum(stages.values())
    else:
        per_image = max(stages["views"] + stages["forward"], stages["decode"], stages["write"])
    return {"device": measured.device, "sample": measured.sample, "seconds_per_image": per_image,
            "stages": stages, "images_per_second": 1 / per_image if per_image else None}


def table(plan: dict) -> str:
    """The human-readable form of :func:`estimate`."""
    efficiency = "efficiencies measured here" if plan["job"] else f"{plan['efficiency']:.0%} of the roofline"
    lines = [f"{plan['images']:,} images on {plan['gpus']} x {plan['device']}, {efficiency}",
             f"{'view':28s} {'GFLOP/img':>10s} {'eff':>5s} {'ms/img':>9s} {'GPU-h':>9s} {'GB':>10s} {'GB/s/GPU':>9s}"
             f"  codec, bytes/token"]
    for v in plan["views"]:
        lines.append(f"{v['key']:28s} {v['flops_per_image'] / 1e9:10.2f} {v['efficiency']:5.0%} "
                     f"{v['seconds_per_image'] * 1e3:9.3f} {v['gpu_hours']:9.3f} "
                     f"{(v['bytes'] + v['overhead_bytes']) / 1e9:10.3f} {v['write_gbps_per_gpu']:9.3f}"
                     f"  {v['codec']}, {v['token_bytes']}")
    if plan["job"]:
        job = plan["job"]
        stages = ", ".join(f"{k} {s * 1e3:.2f}" for k, s in job["stages"].items())
        lines.append(f"the whole job here ({job['device']}, {job['sample']} images sampled): ms per image {stages}; "
                     f"{job['seconds_per_image'] * 1e3:.2f} ms per image in all, {job['images_per_second']:.1f} images/s")
    storage = f" against {plan['storage_gbps']} GB/s of storage" if plan["storage_gbps"] is not None else ""
    lines.append(f"total {plan['total_bytes'] / 1e9:.3f} GB, {plan['hours']:.2f} h wall; all GPUs write "
                 f"{plan['write_gbps_all_gpus']:.3f} GB/s{storage}: {plan['bound']}-bound")
    if plan["training_read_gbps"] is not None:
        lines.append(f"training reads {plan['training_read_gbps']:.3f} GB/s of cached targets (whole maps of "
                     "untiled views) at the stated samples/s")
    return "\n".join(lines)
