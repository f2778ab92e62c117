"""A training run's configuration: TOML or YAML in (:mod:`featcache.configfile`), every key checked,
flags on top, the resolved whole out.

A run's ``config.toml`` is the resolved configuration (defaults filled in), so the run can be read
and repeated without the file it started from. Unknown keys are refused with the section they were
found in: a misspelt ``warmup_step`` never silently trains with the default.
"""

from __future__ import annotations

import dataclasses
import operator
import typing
from dataclasses import dataclass, field
from pathlib import Path

from featcache import configfile
from featcache.errors import UsageError
from featcache.geometry import CropConfig
from featcache.train.losses import check_terms
from featcache.train.student import StudentConfig
from featcache.typecheck import fits

#: Where a run's targets come from: the cached windows, or the teachers run on each crop (ALGORITHMS.md §9).
TARGET_SOURCES = ("cache", "online")
#: how the loader reads a cache: ranged reads of each window, or whole shard objects in turn (DESIGN.md §5)
READ_MODES = ("auto", "windows", "shards")

#: The report's student resolutions (ALGORITHMS.md §6).
LOW = (128, 192, 224, 256, 384, 432)
HIGH = (512, 768, 1024, 1152)


@dataclass
class TeacherTarget:
    """One teacher as the student learns it: the cached view each partition reads, and its weights.

    The summary weight's default, 0.03, is the parity benchmark's (BENCHMARKS.md, issue 25): at 1.0 the
    summary angle loss learns the training images' summaries by heart and pulls the backbone with it;
    0.03 gave the best held-out scores on both the summary and the dense probe (0.01-1.0 measured)."""

    name: str
    low: str  # view key serving the low partition, e.g. "dinov3@224"
    high: str | None = None  # view key serving the high partition (the low one when unset)
    spatial: float = 1.0  # weight of the spatial MSE
    summary: float = 0.03  # weight of the summary angle loss (ignored for views without summaries)

    def view(self, partition: str) -> str:
        return self.high if partition == "high" and self.high else self.low


@dataclass
class Resolutions:
    low: list[int] = field(default_factory=lambda: list(LOW))
    high: list[int] = field(default_factory=lambda: list(HIGH))
    high_prob: float = 0.0  # probability that a batch draws from the high partition


@dataclass
class Losses:
    mesa: float = 0.0  # MESA weight (0: off, no EMA forward)
    mesa_start: int = 0  # first step MESA counts
    ema_decay: float = 0.999
    damp: float = 0.0  # DAMP σ
    terms: dict[str, float] = field(default_factory=dict)  # weight of each other registered loss (train.losses)


@dataclass
class Optim:
    steps: int = 1000
    batch_size: int = 32
    accumulate: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 100
    min_lr: float = 1e-6
    clip: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class Data:
    space: str = "phis"  # targets in each view's PHI-S space (ALGORITHMS.md §1)
    targets: str = "cache"  # "online": each view's teacher runs on every crop (featcache.train.online)
    workers: int = 0
    prefetch: int = 2
    heldout: float = 0.1  # fraction of rows held out when the manifest has no 'split' column
    heldout_images: int = 64  # at most this many held-out rows are evaluated
    read: str = "auto"  # "windows" (ranged reads), "shards" (whole shard objects); auto: shards on an object store
    shard_buffer: int = 4  # with read = "shards": shards whose rows are shuffled together (twice as many held)


@dataclass
class Evaluation:
    every: int = 200  # held-out losses (and best.*) every this many steps, and at the end
    resolution: int = 224
    knn: bool = False  # kNN top-1 of the student's summaries on the manifest's 'label' column
    knn_teacher: str | None = None  # which summary head (default: the first teacher with summaries)
    pictures: bool = True


@dataclass
class Logging:
    tensorboard: bool = False  # TensorBoard event files under RUN/tensorboard (the tensorboard package)
    wandb: dict = field(default_factory=dict)  # {project = ..., entity, name, group, tags, mode}: featcache.train.wandb_log


@dataclass
class TrainConfig:
    cache: str = ""
    teachers: list[TeacherTarget] = field(default_factory=list)
    student: dict = field(default_factory=dict)  # featcache.train.student.StudentConfig without heads
    resolution: Resolutions = field(default_factory=Resolutions)
    crop: CropConfig = field(default_factory=CropConfig)
    loss: Losses = field(default_factory=Losses)
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)
    eval: Evaluation = field(default_factory=Evaluation)
    log: Logging = field(default_factory=Logging)
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 100
    prune: str = ""  # "unstructured:D", "block:D" or "2:4": magnitude-prune the block linears (featcache.train.prune)

    def check(self, where: str = "config") -> "TrainConfig":
        self.student = _student(self.student, f"{where} [student]")
        if not self.cache:
            raise UsageError("no cache to train from: give ROOT (or 'cache' in the config)")
        if not self.teachers:
            raise UsageError("no teachers: add a [[teachers]] table with name and low (a view key)")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise UsageError(f"teacher names repeat: {names}")
        if self.prune:
            from featcache.train.prune import parse

            parse(self.prune)
        self._check_ranges()
        check_terms(self.loss.terms)
        if self.log.tensorboard:
            from featcache.train.tensorboard import check_available

            check_available()
        if self.log.wandb:
            from featcache.train.wandb_log import check

            check(self.log.wandb)
        if not 0 <= self.resolution.high_prob <= 1:
            raise UsageError(f"resolution.high_prob must be in [0, 1], not {self.resolution.high_prob}")
        if not self.resolution.low or (self.resolution.high_prob > 0 and not self.resolution.high):
            raise UsageError("each partition that can be drawn needs at least one resolution")
        for r in self.resolution.low + self.resolution.high + [self.eval.resolution]:
            if r % self.patch:
                raise UsageError(f"resolution {r} is not a multiple of the student's patch {self.patch}")
        if self.data.space not in ("raw", "phis"):
            raise UsageError(f"data.space must be 'raw' or 'phis', not {self.data.space!r}")
        if self.data.targets not in TARGET_SOURCES:
            raise UsageError(f"data.targets must be one of {', '.join(map(repr, TARGET_SOURCES))}, "
                             f"not {self.data.targets!r}")
        if self.data.read not in READ_MODES:
            raise UsageError(f"data.read must be one of {', '.join(map(repr, READ_MODES))}, not {self.data.read!r}")
        if not 0 <= self.data.heldout < 1:
            raise UsageError(f"data.heldout must be in [0, 1), not {self.data.heldout}")
        return self

    def _check_ranges(self) -> None:
        """Every number inside the range it can be used in (a negative rate, a zero period are refused
        here, not found as a ZeroDivisionError mid-run)."""
        for key, op, bound in _RANGES:
            section, _, name = key.rpartition(".")
            value = getattr(getattr(self, section) if section else self, name)
            if not _COMPARE[op](value, bound):
                raise UsageError(f"{key} must be {op} {bound}, not {value!r}")
        if not 0 <= self.loss.ema_decay <= 1 or not all(0 <= b < 1 for b in self.optim.betas):
            raise UsageError(f"loss.ema_decay must be in [0, 1] ({self.loss.ema_decay}) and each of optim.betas "
                             f"in [0, 1) ({self.optim.betas})")
        if min(self.resolution.low + self.resolution.high) < 1:
            raise UsageError(f"resolutions must be >= 1, not {self.resolution.low + self.resolution.high}")
        for t in self.teachers:
            if t.spatial < 0 or t.summary < 0:
                raise UsageError(f"teacher {t.name}: spatial ({t.spatial}) and summary ({t.summary}) must be >= 0")

    @property
    def patch(self) -> int:
        return self.student.get("patch", StudentConfig.patch)

    def to_dict(self) -> dict:
        return configfile.plain(dataclasses.asdict(self))

    def to_toml(self) -> str:
        return configfile.to_toml(self.to_dict())


#: (key, comparison, bound) each number must satisfy
_RANGES = [("optim.steps", ">=", 1), ("optim.batch_size", ">=", 1), ("optim.accumulate", ">=", 1),
           ("optim.lr", ">", 0), ("optim.min_lr", ">=", 0), ("optim.weight_decay", ">=", 0), ("optim.clip", ">", 0),
           ("optim.warmup", ">=", 0), ("seed", ">=", 0), ("log_every", ">=", 1), ("checkpoint_every", ">=", 1),
           ("eval.every", ">=", 1), ("eval.resolution", ">=", 1), ("data.workers", ">=", 0), ("data.prefetch", ">=", 1),
           ("data.heldout_images", ">=", 0), ("data.shard_buffer", ">=", 1), ("loss.mesa", ">=", 0), ("loss.mesa_start", ">=", 0),
           ("loss.damp", ">=", 0)]
_COMPARE = {">": operator.gt, ">=": operator.ge}

_CROP_HINTS = typing.get_type_hints(CropConfig)
_SECTIONS = {"resolution": Resolutions, "crop": CropConfig, "loss": Losses,
             "optim": Optim, "data": Data, "eval": Evaluation, "log": Logging}


def from_dict(d: dict, where: str = "config") -> TrainConfig:
    """A checked config from a plain dict (a parsed TOML file, flags applied)."""
    configfile.check_keys(TrainConfig, d, where)
    kwargs = {}
    for name, value in d.items():
        if name in _SECTIONS:
            kwargs[name] = _section(_SECTIONS[name], value, f"{where} [{name}]")
        elif name == "teachers":
            if not isinstance(value, list):
                raise UsageError(f"{where}: 'teachers' must be a list of tables ([[teachers]])")
            kwargs[name] = [_section(TeacherTarget, t, f"{where} [[teachers]] #{k + 1}") for k, t in enumerate(value)]
        else:
            kwargs[name] = configfile.typed(TrainConfig, name, value, where)
    try:
        return TrainConfig(**kwargs).check(where)
    except TypeError as e:
        raise UsageError(f"{where}: {e}") from None


def _student(value, where: str) -> dict:
    """The student table checked by the student's own config (unknown keys, sizes, windows) and
    resolved: every architecture key the run uses, defaults included; heads come from the teachers."""
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a table, not {type(value).__name__}")
    if "heads" in value:
        raise UsageError(f"{where}: 'heads' come from [[teachers]], not from the student table")
    try:
        resolved = StudentConfig.from_dict(value).to_dict()
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
    resolved.pop("heads", None)
    return resolved


def _section(cls, value, where: str):
    if cls is CropConfig and isinstance(value, dict):  # its pairs are tuples; a file holds lists
        value = {k: tuple(v) if isinstance(v, list) and fits(v, _CROP_HINTS[k]) else v for k, v in value.items()}
    return configfile.build(cls, value, where)


def load(path: str | Path | None = None, cache: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The config of a run: the TOML or YAML file at ``path`` (if any), ``cache`` for its root, then
    each ``section.key=value`` override (:func:`featcache.configfile.parse_value`: ``optim.lr=3e-4``,
    ``crop.scale=[0.5, 1.0]``)."""
    d = configfile.read(str(path)) if path is not None else {}
    if cache is not None:
        d["cache"] = cache
    configfile.apply_overrides(d, list(overrides or []))
    return from_dict(d, str(path) if path else "config")
