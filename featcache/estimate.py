"""What an extraction job costs before it runs: ``featcache plan`` (issue 15).

Per view of a job: the teacher's forward time per image from the roofline (``featcache.roofline``)
on a chosen device, divided by an efficiency (the fraction of the roofline a real forward reaches:
stated, or measured by running the teachers here); GPU-hours for the job's images; the bytes the
view stores (its arrays' objects exactly: chunks, their crc32c, shard indices, as the shard writer
lays them out; metadata, commit markers and statistics on top, estimated); the write bandwidth one
GPU needs to keep up; and whether stated storage can absorb what all GPUs write. For training: the
read bandwidth a target samples/s needs, from each view's bytes per sample (the chunks a crop's
window touches: the whole map of an untiled view).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

from featcache import roofline
from featcache.extract.config import ExtractConfig
from featcache.extract.plan import ViewTask, view_specs
from featcache.store.spec import ViewSpec
from featcache.teachers import describe_teacher
from featcache.teachers.base import teacher_shape

#: bytes beyond the arrays' data, estimated: a view's metadata documents (its arrays', its statistics')
#: and a commit marker per shard, as this version writes them
VIEW_METADATA_BYTES = 11_000
MARKER_BYTES = 500
ITEMSIZE = {"float16": 2, "float32": 4, "int8": 1}


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


def data_bytes(spec: ViewSpec, images: int, shard_size: int) -> int:
    """Bytes of a view's array objects as the shard writer stores them (crc32c after every chunk; a
    dense shard's index of 16 bytes per inner chunk + its crc32c; the last chunk of plain arrays padded)."""
    (h, w), (th, tw), c = spec.grid, spec.tile, spec.channels
    shards, per_image = math.ceil(images / shard_size), (h // th) * (w // tw)
    dense = images * per_image * (th * tw * c * ITEMSIZE[spec.dtype] + 4) + shards * (shard_size * per_image * 16 + 4)
    summary_item = 2 if spec.dtype == "int8" else ITEMSIZE[spec.dtype]
    plain = shards * (shard_size * (spec.summary_channels * summary_item + 4 * 4 + 1) + 3 * 4)
    return dense + plain


def overhead_bytes(spec: ViewSpec, images: int, shard_size: int, image_id_bytes: int) -> int:
    """The estimated rest: metadata, a marker per shard, the image ids (``image_id_bytes`` per image,
    its 4-byte length included), and the statistics uncompressed (float64 mean, rotation, inverse,
    eigenvalues, channel mean and std, summary direction): an upper bound, as they are stored compressed."""
    c, cs = spec.channels, spec.summary_channels
    stats = 8 * (2 * c * c + 4 * c + cs)
    return int(VIEW_METADATA_BYTES + math.ceil(images / shard_size) * MARKER_BYTES + images * image_id_bytes + 8 + stats)


def forward_flops_and_ops(shape: roofline.VitShape, task: ViewTask, spec: ViewSpec, teacher, batch: int,
                          itemsize: int) -> tuple[float, list[roofline.Op], int]:
    """(FLOPs per image, ops of one forward batch, images that batch holds) for a view."""
    if task.upsampler:  # the global view and f² tiles at the teacher's size, per image
        f = spec.grid[0] // teacher.grid()[0]
        h, w = teacher.input_size
        model = roofline.ops(shape, h, w, batch * (1 + f * f), itemsize)
    elif task.mosaic > 1:  # k² images per native-size input
        h, w = teacher.input_size
        model = roofline.ops(shape, h, w, max(1, batch // task.mosaic**2), itemsize)
        batch = max(1, batch // task.mosaic**2) * task.mosaic**2
    else:
        model = roofline.ops(shape, task.size[0], task.size[1], batch, itemsize)
    return sum(o.flops * o.count for o in model) / batch, model, batch


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


def estimate(config: ExtractConfig, images: int, hw: roofline.Hardware, efficiency: float = 1.0, gpus: int = 1,
             storage_gbps: float | None = None, shard_size: int = 64, image_id_bytes: int = 24,
             train_samples_per_s: float | None = None) -> dict:
    """The ``featcache plan --json`` object for ``config`` over ``images`` images."""
    views = []
    for i, t in enumerate(config.teachers):
        teacher, shape = describe(t)
        for task, spec in view_specs(i, t, teacher, config):
            flops, model, batch = forward_flops_and_ops(shape, task, spec, teacher, config.batch_size, hw.itemsize)
            seconds = sum(x.seconds for x in roofline.predict(model, hw)) / batch / efficiency
            size = data_bytes(spec, images, shard_size)
            views.append(ViewCost(spec.key, flops, seconds, images * seconds / 3600, size,
                                  overhead_bytes(spec, images, shard_size, images * image_id_bytes),
                                  size / images / seconds / 1e9, "compute"))
    total_seconds = sum(v.seconds_per_image for v in views)
    write_gbps = sum(v.bytes for v in views) / images / total_seconds / 1e9 * gpus if views else 0.0
    bound = "storage" if storage_gbps is not None and write_gbps > storage_gbps else "compute"
    views = [ViewCost(**{**asdict(v), "bound": bound}) for v in views]
    out = {"images": images, "device": hw.name, "efficiency": efficiency, "gpus": gpus,
           "views": [asdict(v) for v in views], "total_bytes": sum(v.bytes + v.overhead_bytes for v in views),
           "write_gbps_all_gpus": write_gbps, "storage_gbps": storage_gbps, "bound": bound,
           "hours": images * total_seconds / gpus / 3600}
    out["training_read_gbps"] = None if train_samples_per_s is None else \
        train_samples_per_s * sum(v.bytes for v in views) / images / 1e9
    return out


def table(plan: dict) -> str:
    """The human-readable form of :func:`estimate`."""
    lines = [f"{plan['images']:,} images on {plan['gpus']} x {plan['device']} at {plan['efficiency']:.0%} of the "
             "roofline",
             f"{'view':28s} {'GFLOP/img':>10s} {'ms/img':>9s} {'GPU-h':>9s} {'GB':>10s} {'GB/s/GPU':>9s}"]
    for v in plan["views"]:
        lines.append(f"{v['key']:28s} {v['flops_per_image'] / 1e9:10.2f} {v['seconds_per_image'] * 1e3:9.3f} "
                     f"{v['gpu_hours']:9.3f} {(v['bytes'] + v['overhead_bytes']) / 1e9:10.3f} "
                     f"{v['write_gbps_per_gpu']:9.3f}")
    storage = f" against {plan['storage_gbps']} GB/s of storage" if plan["storage_gbps"] is not None else ""
    lines.append(f"total {plan['total_bytes'] / 1e9:.3f} GB, {plan['hours']:.2f} h wall; all GPUs write "
                 f"{plan['write_gbps_all_gpus']:.3f} GB/s{storage}: {plan['bound']}-bound")
    if plan["training_read_gbps"] is not None:
        lines.append(f"training reads {plan['training_read_gbps']:.3f} GB/s of cached targets (whole maps of "
                     "untiled views) at the stated samples/s")
    return "\n".join(lines)
