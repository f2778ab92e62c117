"""One distillation step (DESIGN.md §5; C-RADIOv4's recipe, ALGORITHMS.md §2–§5): the student's forward on a
batch and the weighted sum of its losses, in the shape of timm's task and dinov3's ``forward_backward``::

    task = DistillTask(cfg, student, targets, dataset, device, ema)
    out = task.forward(batch, micro_step)   # {"loss": tensor, "dinov3/spatial": 0.71, ..., "mesa": 0.48}

Every loss registered in :mod:`featcache.train.losses` that the config gives a weight is a term: per teacher
(``<teacher>/<loss>``, teacher by teacher in config order) and then per batch (``<loss>``). The loop
(:mod:`featcache.train.loop`) only schedules, steps the optimizer and EMA, and calls the evaluators.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from featcache.errors import UsageError
from featcache.geometry import lookup_targets
from featcache.store.cache import Cache
from featcache.train.config import TrainConfig
from featcache.train.data import CacheDataset, normalize
from featcache.train.distributed import Ranks
from featcache.train.ema import EMA
from featcache.train.losses import LOSSES, Loss, damp_call
from featcache.train.student import Student, StudentOutput


@dataclass
class Target:
    """What the loop knows of one teacher: its views per partition, channels, dispersion, weights."""

    name: str
    views: dict[str, str]
    channels: int
    summary_channels: int
    dispersion: dict[str, float]
    spatial: float
    summary: float


def describe_targets(cache: Cache, cfg: TrainConfig) -> list[Target]:
    """Check every view a run needs (present, statistics when PHI-S targets are asked for, one
    channel count per teacher) and read each view's summary dispersion from its statistics."""
    targets = []
    known = cache.views
    for t in cfg.teachers:
        views = {"low": t.view("low"), "high": t.view("high")}
        specs = {}
        for part, key in views.items():
            if key not in known:
                raise UsageError(f"teacher {t.name}: view {key} is not in {cache.root.uri} "
                                 f"(views: {', '.join(known) or 'none'})")
            view = known[key]
            if (cfg.data.space == "phis" or view.spec.summary_channels) and not view.stats:
                raise UsageError(f"view {key} has no statistics yet: run 'featcache stats {cache.root.uri}'")
            specs[part] = view.spec
        if len({(s.channels, s.summary_channels) for s in specs.values()}) > 1:
            raise UsageError(f"teacher {t.name}: views {views['low']} and {views['high']} have different channels")
        disp = {}
        if specs["low"].summary_channels and t.summary > 0:
            for part, key in views.items():
                d = known[key].stats.get("dispersion")
                if not d or d <= 0:
                    raise UsageError(f"view {key} has no summary dispersion in its statistics (no valid summary "
                                     f"yet?): run 'featcache stats {cache.root.uri} --recompute', or set summary = 0")
                disp[part] = float(d)
        targets.append(Target(t.name, views, specs["low"].channels, specs["low"].summary_channels, disp,
                              t.spatial, t.summary))
    return targets


@dataclass(frozen=True)
class Term:
    """A registered loss bound to its teacher (None: once per batch) and its weight; ``key`` names it in
    metrics.jsonl."""

    loss: Loss
    target: Target | None
    weight: float
    key: str


def terms_of(cfg: TrainConfig, targets: list[Target]) -> list[Term]:
    """Every registered loss the config weights: per teacher first (teacher by teacher), then per batch."""
    per_teacher = [loss for loss in LOSSES.values() if loss.per_teacher]
    terms = [Term(loss, t, w, f"{t.name}/{loss.name}") for t in targets for loss in per_teacher
             if (w := loss.weight(cfg, t)) is not None]
    return terms + [Term(loss, None, w, loss.name) for loss in LOSSES.values()
                    if not loss.per_teacher and (w := loss.weight(cfg, None)) is not None]


@dataclass
class Step:
    """What a loss sees of one batch: the student's output, the batch (on the device), the optimizer
    step it trains (None for an evaluation batch: no noise, no MESA) and the task."""

    out: StudentOutput
    batch: dict
    step: int | None
    task: DistillTask

    @property
    def cfg(self) -> TrainConfig:
        return self.task.cfg

    @property
    def ranks(self) -> Ranks | None:
        """The data-parallel ranks a training batch is a share of (None: one process, or an evaluation batch,
        which rank 0 computes alone): losses that average over a batch's images count them over every share."""
        return self.task.ranks if self.step is not None and self.task.parallel is not None else None

    def targets(self, target: Target) -> torch.Tensor:
        """``target``'s teacher features on the student's grid, (B, h, w, C) float32."""
        return self.task.targets_of(self.batch[target.name], self.out.grid)

    @torch.no_grad()
    def ema_output(self) -> StudentOutput:
        """The EMA student on the batch's second crop (MESA's target; no gradient)."""
        return self.task.ema.module(normalize(self.batch["image2"]))


class DistillTask:
    """The student, the teachers it learns and the weighted losses: :meth:`forward` is one step's loss."""

    def __init__(self, cfg: TrainConfig, student: Student, targets: list[Target], dataset: CacheDataset,
                 device: torch.device, ema: EMA | None = None):
        self.cfg, self.student, self.targets, self.dataset, self.device, self.ema = (cfg, student, targets, dataset,
                                                                                     device, ema)
        self.terms = terms_of(cfg, targets)
        self.parallel: torch.nn.parallel.DistributedDataParallel | None = None  # :meth:`data_parallel`
        self.ranks: Ranks | None = None
        self._phis: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._decoders: dict[str, Callable | None] = {}  # per view: the device's decoding of its windows
        self.online = self._online() if cfg.data.targets == "online" else None

    def _online(self):
        """The online target source (``data.targets = "online"``, :mod:`featcache.train.online`): it loads
        the views' teachers and switches the dataset to hand over their inputs instead of windows."""
        from featcache.train.online import OnlineTargets  # a cache run never imports a teacher

        views = sorted({key for t in self.targets for key in t.views.values()})
        online = OnlineTargets(views, self.dataset, self.device, self.cfg.data.space)
        self._phis.update(online.transforms())
        self._decoders.update({key: None for key in views})  # the teachers' own floats
        return online

    def data_parallel(self, ranks: Ranks) -> None:
        """Train through ``DistributedDataParallel`` (the process group is up: ``featcache.train.distributed``):
        the training forward, DAMP's noisy weights included, runs as one wrapped module, so each backward
        averages the ranks' gradients. Parameters some step may leave without a gradient (a summary head whose
        weight is 0) are looked for, at the cost DDP's documentation states."""
        self.ranks = ranks
        unused = any(t.summary_channels and not t.summary for t in self.targets)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.parallel = torch.nn.parallel.DistributedDataParallel(_TrainingForward(self.student), device_ids=ids,
                                                                  find_unused_parameters=bool(unused),
                                                                  gradient_as_bucket_view=True)

    def syncing(self, last: bool):
        """Context of a micro-batch's backward: the ranks average gradients at the step's ``last`` one only."""
        return nullcontext() if self.parallel is None or last else self.parallel.no_sync()

    def forward(self, batch: dict, micro_step: int | None) -> dict:
        """``{"loss": weighted sum, <term>: value as a float, ...}`` of one batch on the device.

        ``micro_step`` counts micro-batches over the run (optimizer step × ``optim.accumulate`` + the
        micro-batch): it seeds DAMP's noise; None for an evaluation batch (no noise, no MESA)."""
        if self.online is not None:
            self.online.fill(batch)
        out = self.features(batch["image"], micro_step)
        step = None if micro_step is None else micro_step // self.cfg.optim.accumulate
        seen = Step(out, batch, step, self)
        total, values = 0.0, {}
        for term in self.terms:
            value = term.loss.fn(seen, term.target)
            if value is not None:
                values[term.key] = float(value.detach())
                total = total + term.weight * value
        return {"loss": total, **values}

    def features(self, pixels: torch.Tensor, micro_step: int | None) -> StudentOutput:
        """The student on ``pixels`` (a loader's uint8 batch is normalized here, on the device), with
        DAMP's noise seeded by (seed, micro-step) for a training batch; bf16 autocast on CUDA."""
        pixels = normalize(pixels) if pixels.dtype == torch.uint8 else pixels
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with autocast:
            g = None
            if micro_step is not None and self.cfg.loss.damp > 0 and self.student.training:
                g = torch.Generator(device=self.device).manual_seed(self.cfg.seed * 1_000_003 + micro_step)
            if self.parallel is not None and micro_step is not None and self.student.training:
                return self.parallel(pixels, self.cfg.loss.damp if g is not None else 0.0, g)
            if g is not None:
                return damp_call(self.student, self.cfg.loss.damp, pixels, generator=g)
            return self.student(pixels)

    def targets_of(self, part: dict, grid: tuple[int, int]) -> torch.Tensor:
        """One teacher's targets on the student grid, (B, h, w, C) float32: its windows decoded on the
        device when their codec does so (int4-pca), the batched lookup, then (for float views) the
        PHI-S transform on the device (DESIGN.md §5). An online
        part's window is its teacher's map of the crop, computed here when not yet."""
        if "window" not in part:
            self.online.fill({"part": part})
        key = part["key"]
        if key not in self._decoders:
            self._decoders[key] = self.dataset.views.device_decoder(key)
        windows = part["window"] if self._decoders[key] is None else self._decoders[key](part["window"])
        target = lookup_targets(windows.permute(0, 3, 1, 2), part["map"], part["extent"], grid).permute(0, 2, 3, 1)
        if key not in self._phis:
            phis = self.dataset.views.phis_transform(key)
            self._phis[key] = None if phis is None else tuple(torch.from_numpy(a).to(self.device) for a in phis)
        if self._phis[key] is not None:
            mean, rotation = self._phis[key]
            target = (target - mean) @ rotation.T
        return target

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """The student in eval mode (no DAMP, no drop-path) for the block, then back as it was."""
        was = self.student.training
        self.student.eval()
        try:
            yield
        finally:
            self.student.train(was)


class _TrainingForward(torch.nn.Module):
    """The student's training forward as one module for ``DistributedDataParallel``: with DAMP's noise
    (``sigma`` > 0, drawn from ``generator``) its weights enter through ``functional_call``, and their gradients
    still reach the student's parameters, which DDP averages."""

    def __init__(self, student: Student):
        super().__init__()
        self.student = student

    def forward(self, pixels: torch.Tensor, sigma: float, generator: torch.Generator | None) -> StudentOutput:
        return damp_call(self.student, sigma, pixels, generator=generator)
