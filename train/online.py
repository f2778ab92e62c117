"""Online distillation targets (ALGORITHMS.md §9, DESIGN.md §8): each view's teacher runs on every
student crop, as RADIO and TAO train, instead of the cache answering with its whole-image map.

How to call it: set the config key ``data.targets = "online"`` (default ``"cache"``) and train as
usual; the cache still supplies the image list, the views' teacher sources, their input sizes and
their PHI-S statistics::

    from featcache.train import config, train
    cfg = config.load("train.toml", cache="cache/", overrides=["data.targets=online"])
    train(cfg, "runs/online")              # or: featcache train cache/ --set data.targets=online ...

What one step does for a teacher view (the cached view's key names it):

1. the loader (:class:`featcache.train.data.CacheDataset` with ``teacher_inputs`` set) crops the
   student crop's source box, unflipped, resized to the view's input size with the teacher's own
   filter, in float (no uint8 rounding); it reads no cached window (only the small per-row boxes the crop sampler uses);
2. :meth:`OnlineTargets.fill` runs the teacher (loaded once through ``create_teacher``, the loader
   the extract worker uses, and refused unless its weights hash to the ones that made the view) on
   those inputs through the view's kind (``featcache.extract.viewkinds``: plain, or mosaic tiles),
   and puts its dense map as the part's ``window`` and its summary as ``summary``;
3. :meth:`featcache.train.task.DistillTask.targets_of` then resamples the map onto the student grid
   with the cache path's ``lookup_targets`` (the map spans the crop exactly; a flip is in the map) and
   applies the view's PHI-S transform, the same statistics as the cache's.

So for a crop equal to a view's box at the view's input size the online targets are the cached
ones (up to the stored f16). ``DistillTask`` builds this
source itself when the config asks for it; the Trainer needs no other change.
"""

from __future__ import annotations

import torch

from featcache.errors import UsageError
from featcache.extract.plan import ViewTask
from featcache.store.spec import ViewSpec
from featcache.teachers import TeacherSpec, create_teacher
from featcache.teachers.base import Teacher
from featcache.teachers.views import normalize
from featcache.train.data import CacheDataset


def teacher_of(spec: ViewSpec, device: torch.device) -> Teacher:
    """The teacher that made view ``spec`` (its recorded family, source and revision) on ``device``;
    refused when the weights found there are not the ones the view records (another model, or
    retrained since extraction: the targets would not match the cache's statistics)."""
    recorded = TeacherSpec.from_dict(spec.teacher)
    teacher = create_teacher(recorded.family, recorded.source, recorded.revision, device=str(device),
                             name=recorded.name, hash_weights=recorded.weights_hash is not None)
    if teacher.spec.weights_hash != recorded.weights_hash:
        raise UsageError(f"online targets for {spec.key}: the weights at {recorded.source} "
                         f"({teacher.spec.weights_hash}) are not those the view was extracted with "
                         f"({recorded.weights_hash})")
    return teacher


def kind_of(spec: ViewSpec):
    """The view's kind as extraction ran it (plain or mosaic); an upsampled view has no online form."""
    if spec.upsampler:
        raise UsageError(f"online targets: {spec.key} is an upsampled view; run online from a plain view")
    return ViewTask(spec.key, 0, tuple(spec.input_size), spec.mosaic).kind


class OnlineTargets:
    """The teachers of a run's views, run on each batch's crops (see the module docstring).

    ``views``: the view keys the run reads; ``dataset`` is switched to hand over teacher inputs."""

    def __init__(self, views: list[str], dataset: CacheDataset, device: torch.device, space: str = "phis"):
        self.device, self.space = device, space
        self.readers = {key: dataset.reader(key) for key in views}
        self.specs = {key: reader.spec for key, reader in self.readers.items()}
        self.kinds = {key: kind_of(spec) for key, spec in self.specs.items()}
        loaded: dict[tuple, Teacher] = {}  # one teacher serves every view of its weights
        self.teachers = {}
        for key, spec in self.specs.items():
            t = spec.teacher
            ident = (t["family"], t["source"], t.get("revision"))
            self.teachers[key] = loaded.get(ident) or loaded.setdefault(ident, teacher_of(spec, device))
        dataset.teacher_inputs = {key: (tuple(spec.input_size), self.teachers[key].spec.resize)
                                  for key, spec in self.specs.items()}

    def transforms(self) -> dict[str, tuple[torch.Tensor, torch.Tensor] | None]:
        """Per view, the (mean, rotation) ``targets_of`` applies: the view's PHI-S statistics (the cache's,
        whatever its codec stores), None for raw targets."""
        if self.space != "phis":
            return {key: None for key in self.specs}
        return {key: tuple(torch.from_numpy(a).to(self.device) for a in reader.phis())
                for key, reader in self.readers.items()}

    @torch.no_grad()
    def fill(self, batch: dict) -> dict:
        """``batch`` (on the device) with each online part's ``window`` (the teacher's dense map of its
        inputs, (B, h, w, C) float32) and ``summary`` (B, Cs); a part already filled is left as it is."""
        for part in batch.values():
            if isinstance(part, dict) and "pixels" in part and "window" not in part:
                part["window"], summary = self.features(part["key"], part["pixels"])
                if self.specs[part["key"]].summary_channels:
                    part["summary"] = summary
        return batch

    def features(self, key: str, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dense (B, h, w, C), summary (B, Cs)), float32, of view ``key``'s teacher on inputs in [0, 1]
        (:func:`featcache.train.data.crop_float`), normalized here by the teacher's spec."""
        teacher = self.teachers[key]
        spec = teacher.spec
        x = normalize(pixels.to(self.device, torch.float32), spec.mean, spec.std)
        dense, summary = self.kinds[key].features(teacher, x, torch.float32, len(x))
        return dense.clone(), summary.clone()  # plain tensors (not inference-mode ones) for autograd's use
