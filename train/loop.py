"""``featcache train``: distil a student straight from a cache (DESIGN.md §5).

Nothing here builds or runs a teacher: every target comes out of the cache. One run is one folder
(:mod:`featcache.runs`, as every trainer's)::

    RUN/config.toml               the resolved config
    RUN/checkpoints/last/         a set: student weights (safetensors) + optimizer, EMA and RNG state
    RUN/checkpoints/best/         the same at the lowest held-out loss
    RUN/metrics.jsonl             one JSON object per logged step and per evaluation
    RUN/pictures/                 PCA of student vs teacher features and the error per cell

Batches are a function of (seed, step) (:class:`featcache.train.data.BatchPlan`) and DAMP's noise
is drawn from a generator seeded by the step, so ``resume`` continues a killed run with exactly the
losses an uninterrupted run logs.

The step itself (forward and the weighted losses) is :class:`featcache.train.task.DistillTask`; the loop
schedules, steps the optimizer and the EMA, and calls the evaluators (:mod:`featcache.train.evaluate`),
each periodic action when :func:`due`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from featcache import checkpoint
from featcache.devices import resolve_device
from featcache.errors import FeatcacheError, UsageError
from featcache.extract.progress import duration
from featcache.store.location import check_reachable
from featcache.log import LogStream
from featcache.runs import RunFolder
from featcache.store.cache import Cache
from featcache.train import config as train_config
from featcache.train.config import TrainConfig
from featcache.train import distributed
from featcache.train.data import (AHEAD, BatchPlan, CacheDataset, ShardPlan, StepSampler, collate, split_rows,
                                  to_device)
from featcache.train.ema import EMA
from featcache.train.evaluate import evaluators_for
from featcache.train import product, prune
from featcache.train.task import DistillTask, Target, describe_targets
from featcache.train.tensorboard import FOLDER as TENSORBOARD, TensorBoardLog
from featcache.train.wandb_log import FOLDER as WANDB, WandbLog
from featcache.train.student import StudentConfig, build_student
from featcache.train.weights import SET_STATE, SET_WEIGHTS, legacy_files, checkpoint_files, load_bare_student



@dataclass
class TrainResult:
    run: str
    steps: int
    heldout: dict[str, float] = field(default_factory=dict)
    knn: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    rank: int = 0  # of the data-parallel processes (rank 0 evaluates: the others' heldout and knn are empty)

    @classmethod
    def of(cls, run: str, steps: int, evaluation: dict[str, float], seconds: float, rank: int = 0) -> "TrainResult":
        """The result whose last evaluation recorded ``evaluation`` (held-out losses and kNN accuracies)."""
        knn = {k: v for k, v in evaluation.items() if k.startswith("knn/")}
        heldout = {k: v for k, v in evaluation.items() if k not in knn and k != "step"}
        return cls(run, steps, heldout, knn, seconds, rank)


#: what a run writes beside its metrics and checkpoints; a run started over before its first checkpoint drops them
RUN_LOGS = ("pictures", TENSORBOARD, WANDB)


def student_config(cfg: TrainConfig, targets: list[Target]) -> StudentConfig:
    heads = [{"name": t.name, "dense_channels": t.channels, "summary_channels": t.summary_channels} for t in targets]
    return StudentConfig.from_dict({**cfg.student, "heads": heads})


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``optim.lr``, then cosine to ``optim.min_lr`` at the last step."""
    o = cfg.optim
    return checkpoint.warmup_cosine(step, o.steps, o.warmup, o.lr, o.min_lr)


def _next(batches):
    """The loader's next batch. An error of featcache's raised in a DataLoader worker comes back as
    torch rebuilds it: its message is "Caught X in DataLoader worker process N" and the worker's whole
    traceback; it goes on with the worker's own one-line message, as with no workers."""
    try:
        return next(batches)
    except FeatcacheError as e:
        text = str(e)
        if text.startswith("Caught ") and "Original Traceback" in text:
            last = text.strip().splitlines()[-1]
            e.args = (last.split(": ", 1)[1] if last.startswith(f"{type(e).__module__}.") else last,)
        raise


def open_cache(uri: str) -> Cache:
    """The cache to train from, its manifest checked; an unusable object-store location is refused in one
    line first (the preflight extract uses)."""
    check_reachable(uri)
    cache = Cache.open(uri)
    cache.check_manifest()
    return cache


def check_batch(cfg: TrainConfig, train_rows: int, device: torch.device) -> None:
    """Refuse, before anything is allocated, a batch that cannot be drawn from the training rows or whose
    activations alone (a lower bound) would not fit in the device's free memory."""
    batch = cfg.optim.batch_size
    if train_rows == 0:
        raise UsageError(f"no training rows: every usable row of {cfg.cache} is held out or none is committed")
    if batch > train_rows:
        raise UsageError(f"optim.batch_size {batch} is larger than the {train_rows} training rows of {cfg.cache}: "
                         f"use at most {train_rows}")
    need, free = activation_bytes(cfg) * batch, free_memory(device)
    if free is not None and need > free:
        raise UsageError(f"optim.batch_size {batch} needs at least {need / 2**30:.1f} GiB of activations at "
                         f"resolution {max(cfg.resolution.low + cfg.resolution.high)}, but {device} has "
                         f"{free / 2**30:.1f} GiB free: use a smaller batch (optim.accumulate keeps the effective one)")


def read_mode(cfg: TrainConfig, cache: Cache) -> str:
    """How the loader reads ``cache``: ``data.read``, where "auto" is whole shards on an object store (ranged
    reads there pay a request's latency per window) and windows on a local disk (positional reads)."""
    if cfg.data.read != "auto":
        return cfg.data.read
    return "windows" if cache.capabilities.positional_reads else "shards"


def check_shard_buffer(cfg: TrainConfig, dataset: CacheDataset) -> int:
    """The shard size the plan groups rows by; refused in one line, before anything is read, when the shards a
    reader holds (1 + ``AHEAD`` groups of ``data.shard_buffer`` of every view, in each loader worker) would not fit
    in the host's free memory."""
    readers = [dataset.reader(key) for key in dataset.views.keys]
    shard_size, held = readers[0].view.shard_size, (1 + AHEAD) * cfg.data.shard_buffer
    need = held * shard_size * sum(r.bytes_for(None) for r in readers) * max(1, cfg.data.workers)
    free = free_memory(torch.device("cpu"))
    if free is not None and need > free:
        raise UsageError(f"data.shard_buffer {cfg.data.shard_buffer} holds {held} whole shards of "
                         f"each of {len(readers)} view(s) at once in each loader process, {need / 2**30:.1f} GiB, but this machine has "
                         f"{free / 2**30:.1f} GiB free: lower data.shard_buffer, or read windows (data.read = "
                         "\"windows\")")
    return shard_size


def activation_bytes(cfg: TrainConfig) -> int:
    """A lower bound of the float32 activations one image keeps for the backward pass at the largest
    resolution: per block, the tokens times the width times (4 for q, k, v and the output + 2 times the
    MLP ratio), no attention maps, no teacher targets."""
    vit = StudentConfig.from_dict(cfg.student).vit()
    res = max(cfg.resolution.low + (cfg.resolution.high if cfg.resolution.high_prob > 0 else []))
    tokens = (res // cfg.patch) ** 2
    return int(vit.depth * tokens * vit.width * (4 + 2 * vit.mlp_ratio) * 4)


def free_memory(device: torch.device) -> int | None:
    """Bytes the device can still give: CUDA's free memory, the host's MemAvailable; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action (a log line, an evaluator, a checkpoint) runs at ``step``: every
    ``every`` steps (step 0 included) and at the ``last``."""
    return step % every == 0 or step == last


def step_line(step: int, steps: int, elapsed: float, steps_here: int, terms: str, samples_per_s: float) -> str:
    """The console line of a logged step: elapsed is this process's (a resumed run counts from its restart), the
    ETA the steps left at this process's rate so far (evaluations and checkpoints included)."""
    eta = (steps - step) * elapsed / steps_here if steps_here > 0 else float("nan")
    parts = [f"step {step}/{steps}", f"{duration(elapsed)} elapsed", f"ETA {duration(eta)}", terms,
             f"{samples_per_s:.1f} samples/s"]
    return "  ".join(p for p in parts if p)


def bar_line(step: int, steps: int, elapsed: float, steps_here: int, samples_per_s: float, width: int = 20) -> str:
    """The live line a terminal shows between logged steps: :func:`step_line` with a bar of ``width`` cells."""
    filled = min(width, int(width * step / steps)) if steps else width
    return step_line(step, steps, elapsed, steps_here, "[" + "#" * filled + "." * (width - filled) + "]",
                     samples_per_s)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: not norms, biases, tokens or the position table."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "pos" not in name and "token" not in name else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


class Trainer:
    """One run: its folder, data, student, optimizer, EMA, task and evaluators; :meth:`run` trains to
    ``optim.steps``."""

    def __init__(self, cfg: TrainConfig, out: str | Path, stream=None, ranks: distributed.Ranks | None = None,
                 folder: RunFolder | None = None):
        """Check everything the run needs (device, cache, views, rows, batch size, kNN labels) and
        build it; nothing is written (:meth:`start` creates the folder). ``ranks``: this process's place
        among data-parallel ones (:func:`featcache.train.distributed.join`); only rank 0 writes or evaluates.
        ``folder``: the run folder ``out`` opened (:meth:`featcache.runs.RunFolder.open`; one on an object store is
        its local copy)."""
        self.cfg, self.out = cfg, Path(out)
        self.ranks = ranks or distributed.Ranks()
        self.folder = folder or RunFolder(self.out)  # its layout, resume rules and metrics file
        self.stream = stream or LogStream()
        if not self.ranks.main:  # the console is rank 0's; errors still reach each rank's stderr
            self.stream = open(os.devnull, "w")
        self.device = distributed.local_device(resolve_device(cfg.device), self.ranks.local)
        share = self.ranks.share(cfg.optim.batch_size)
        self.cache = open_cache(cfg.cache)
        self.cfg = cfg = dataclasses.replace(cfg, cache=self.cache.root.uri,  # as config.toml records them
                                             data=dataclasses.replace(cfg.data, read=read_mode(cfg, self.cache)))
        self.targets = describe_targets(self.cache, cfg)
        self.mesa = cfg.loss.mesa > 0
        shards = cfg.data.read == "shards"
        self.dataset = CacheDataset(self.cache.root.uri, {t.name: t.views for t in self.targets}, cfg.patch,
                                    cfg.crop, cfg.data.space, mesa=self.mesa,
                                    whole_shards=(1 + AHEAD) * cfg.data.shard_buffer if shards else 0)
        self._say_rows(len(self.dataset.views.rows))
        self.train_rows, self.heldout_rows = split_rows(self.cache, self.dataset.views.rows, cfg.data.heldout, cfg.seed)
        self.heldout_rows = self.heldout_rows[:cfg.data.heldout_images]
        check_batch(cfg, len(self.train_rows), self.device)
        if shards:
            shard_size = check_shard_buffer(cfg, self.dataset)
            self.plan = ShardPlan(self.train_rows, shard_size, cfg.optim.batch_size, cfg.seed, cfg.resolution.low,
                                  cfg.resolution.high, cfg.resolution.high_prob, self.ranks.rank, self.ranks.world,
                                  cfg.data.shard_buffer)
        else:
            self.plan = BatchPlan(self.train_rows, cfg.optim.batch_size, cfg.seed, cfg.resolution.low,
                                  cfg.resolution.high, cfg.resolution.high_prob, share)
        self.dataset.lookahead = self.plan
        torch.manual_seed(cfg.seed)
        self.student_cfg = student_config(cfg, self.targets)
        self.student = build_student(self.student_cfg).to(self.device)
        if self.ranks.parallel:
            self.student.batch_share = (share[0], cfg.optim.batch_size)
        self.optimizer = torch.optim.AdamW(_param_groups(self.student, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                           betas=tuple(cfg.optim.betas))
        self.ema = EMA(self.student) if self.mesa else None
        self.task = DistillTask(cfg, self.student, self.targets, self.dataset, self.device, self.ema)
        if self.ranks.parallel:
            self.task.data_parallel(self.ranks)
        self.evaluators = evaluators_for(cfg, self.task, self.cache, self.heldout_rows, self.out / "pictures")
        self.step = 0
        self.best = float("inf")

    def _say(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def _say_rows(self, usable: int) -> None:
        """Say when rows are left out: a partly extracted cache trains on its committed rows only."""
        if usable < self.cache.num_images:
            self._say(f"training on the {usable} of {self.cache.num_images} images whose every view is committed "
                      f"and valid; {self.cache.num_images - usable} left out (extraction unfinished or failed "
                      "images: 'featcache inspect' tells which)")

    def start(self) -> None:
        """Create the run folder and write the resolved config (the cache as an absolute path or URL,
        so ``--resume`` works from any directory: :meth:`__init__` resolved it); a folder a failed start left is
        taken over."""
        self.folder.start(self.cfg.to_toml(), self.stream, more=RUN_LOGS)

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train from ``self.step`` to ``optim.steps``, logging, evaluating and saving whenever :func:`due`."""
        cfg, t0 = self.cfg, time.perf_counter()
        loader = self._loader()
        self.student.train()
        window = {"samples": 0, "bytes": 0, "t": time.perf_counter(), "terms": {}}
        batches = iter(loader)
        keep = prune.masks(self.student, cfg.prune) if cfg.prune else {}
        prune.apply(self.student, keep)
        self._say(f"training {self.cfg.optim.steps - self.step} steps of {self.cfg.optim.batch_size} images from "
                  f"{len(self.train_rows)} rows on {self.device}"
                  + (f"; first the untrained student's held-out losses on {len(self.heldout_rows)} images"
                     if self.step == 0 and len(self.heldout_rows) else ""))
        self._began = (time.perf_counter(), self.step)  # this process's clock and first step: elapsed and ETA
        if self.ranks.main:
            self.logs = ((TensorBoardLog(self.out, self.step),) if cfg.log.tensorboard else ()) + \
                ((WandbLog(self.out, cfg.log.wandb, cfg.to_dict()),) if cfg.log.wandb else ())
        try:
            if self.step == 0:
                self._evaluate()  # the held-out losses before any training: the baseline later ones are read against
            while self.step < cfg.optim.steps:
                lr, grad_norm = self._train_step(batches, keep, window)
                if due(self.step, cfg.log_every, cfg.optim.steps):
                    self._log_window(window, lr, float(grad_norm))
                else:
                    self._draw(window)
                self._evaluate()
                if due(self.step, cfg.checkpoint_every, cfg.optim.steps):
                    self.save("last")
        finally:
            self._clear()
            for log in self.logs:
                log.close()
        return self._result(time.perf_counter() - t0)

    # ---- the console ----------------------------------------------------------------------

    _drawn = 0.0  # when the live line was last drawn (0: none is on the terminal)

    def _draw(self, window: dict) -> None:
        """On a terminal, the live line (:func:`bar_line`) at most 5 times a second; plain logs get none."""
        now = time.perf_counter()
        if not getattr(self.stream, "isatty", lambda: False)() or now - self._drawn < 0.2:
            return
        rate = window["samples"] * self.ranks.world / max(now - window["t"], 1e-9)
        line = bar_line(self.step, self.cfg.optim.steps, now - self._began[0], self.step - self._began[1], rate)
        self.stream.write("\r" + line.ljust(78))
        self.stream.flush()
        self._drawn = now

    def _clear(self) -> None:
        """Take the live line off the terminal before a line of its own."""
        if self._drawn:
            self.stream.write("\r" + " " * 78 + "\r")
            self.stream.flush()
            self._drawn = 0.0

    def _loader(self) -> torch.utils.data.DataLoader:
        """The micro-batches of steps ``self.step`` to ``optim.steps``, as the plan draws them. Its iterator
        draws the workers' base seed from a generator of its own: from the global one, a resumed run would
        draw one number more than the uninterrupted run before the student's draws (CPE crops, drop-path)."""
        cfg, acc = self.cfg, self.cfg.optim.accumulate
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=StepSampler(self.plan, self.step * acc, cfg.optim.steps * acc),
            num_workers=cfg.data.workers, collate_fn=collate, pin_memory=self.device.type == "cuda",
            prefetch_factor=cfg.data.prefetch if cfg.data.workers else None,
            generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step))

    def _train_step(self, batches, keep: dict, window: dict) -> tuple[float, torch.Tensor]:
        """One optimizer step (clipped, pruned, then the EMA); returns its learning rate and gradient norm."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        terms = self._backward(batches, window)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.optim.clip)
        self.optimizer.step()
        prune.apply(self.student, keep)
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.student, cfg.loss.ema_decay if self.step >= cfg.loss.mesa_start else 0.0)
        self.step += 1
        for k, v in terms.items():
            window["terms"].setdefault(k, []).append(v)
        return lr, grad_norm

    def _backward(self, batches, window: dict) -> dict[str, float]:
        """The gradient of the step's ``optim.accumulate`` micro-batches; each term's mean over them."""
        acc = self.cfg.optim.accumulate
        terms: dict[str, float] = {}
        for micro in range(acc):
            batch = to_device(_next(batches), self.device, non_blocking=True)
            with self.task.syncing(last=micro == acc - 1):
                values = self.task.forward(batch, self.step * acc + micro)
                (values.pop("loss") / acc).backward()
            for k, v in values.items():
                terms[k] = terms.get(k, 0.0) + v / acc
            window["samples"] += len(batch["row"])
            window["bytes"] += batch["bytes"]
        return terms

    def _result(self, seconds: float) -> TrainResult:
        return TrainResult.of(self.folder.name, self.step, self._last_eval, seconds, self.ranks.rank)

    # ---- records ---------------------------------------------------------------------------

    def _log_window(self, window: dict, lr: float, grad_norm: float) -> None:
        """The logged step's record: each term's mean over the window's steps and the ranks (each rank's value
        is its share's mean: their mean is the global batch's), the samples and bytes of every rank."""
        now = time.perf_counter()
        seconds = max(now - window["t"], 1e-9)
        terms = self.ranks.mean({k: float(np.mean(v)) for k, v in window["terms"].items()})
        samples, read = self.ranks.total([window["samples"], window["bytes"]])
        record = {"step": self.step, "lr": lr, "grad_norm": round(grad_norm, 6), **terms,
                  "samples_per_s": round(samples / seconds, 3), "bytes_read_per_s": round(read / seconds, 1)}
        window.update(samples=0, bytes=0, t=now, terms={})
        if not self.ranks.main:
            return
        self._append(record)
        self._clear()
        said = "  ".join(f"{k} {v:.4f}" for k, v in terms.items())
        print(step_line(self.step, self.cfg.optim.steps, now - self._began[0], self.step - self._began[1], said,
                        record["samples_per_s"]), file=self.stream, flush=True)

    def _append(self, record: dict) -> None:
        self.folder.append(record)
        if self.logs:
            numbers = {k: v for k, v in record.items()
                       if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            for log in self.logs:
                log.write(int(record["step"]), numbers)

    _last_eval: dict = {}
    logs: tuple = ()  # while :meth:`run` runs: the TensorBoard and W&B logs the config asks for

    def _evaluate(self) -> None:
        """Call the evaluators :func:`due` at this step; record what they measure and keep ``best`` at the
        lowest sum of held-out losses. Rank 0 alone evaluates, with torch's generators as they were after: the
        other ranks' draws (the CPE's crops, drop-path) stay in step with its own."""
        if not self.ranks.main:
            return
        ran = [e for e in self.evaluators if due(self.step, e.every, self.cfg.optim.steps)]
        if not ran:
            return
        results: dict[str, float] = {}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for evaluator in ran:
                results.update(evaluator(self.step))
        self._last_eval = results
        if results:
            self._append({"step": self.step, **results})
            total = sum(v for k, v in results.items() if k.startswith("heldout/"))
            said = "  ".join(f"{k} {v:.4f}" for k, v in results.items())
            self._clear()
            print(f"eval at step {self.step}: {said}", file=self.stream, flush=True)
            if total < self.best:
                self.best = total
                self.save("best")

    # ---- checkpoints ----------------------------------------------------------------------

    def save(self, name: str) -> None:
        """``checkpoints/<name>/``: student weights and state (optimizer, EMA, RNG; the rest as JSON
        metadata) written as one set (:func:`featcache.checkpoint.write_set`): a kill at any moment
        leaves the previous pair or the new one, never one of each. Rank 0 alone writes."""
        if not self.ranks.main:
            return
        tensors, meta = checkpoint.optimizer_tensors(self.optimizer)
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        tensors.update(checkpoint.rng_tensors(self.device))
        meta.update({"step": str(self.step), "best": repr(self.best), "world": str(self.ranks.world)})
        wmeta = {"step": str(self.step), "student": json.dumps(self.student_cfg.to_dict()), "format": "featcache-student-1"}
        weights = self.student.state_dict()
        if getattr(self, "_product", None) is None:  # the maps back to the teachers' spaces: read once, never change
            self._product = product.describe(self.cfg, self.targets, self.cache, self.dataset.views.rows)
        maps, pmeta = self._product
        self.folder.save(name, {SET_STATE: lambda path: checkpoint.save(path, tensors, meta),
                                        SET_WEIGHTS: lambda path: checkpoint.save(path, weights, wmeta),
                                        product.PRODUCT: lambda path: product.save_maps(path, maps, pmeta)}, self.step)
        for legacy in legacy_files(self.out, name):  # a resumed older run: its pair is stale now
            legacy.unlink(missing_ok=True)

    def load(self, name: str = "last") -> None:
        found = checkpoint_files(self.out, name)
        if found is None:
            raise UsageError(f"{self.folder.name} holds no '{name}' checkpoint: nothing to resume")
        weights_path, state_path = found
        wmeta, smeta = checkpoint.metadata(weights_path), checkpoint.metadata(state_path)
        if wmeta.get("step") != smeta.get("step"):
            raise UsageError(f"{self.out / 'checkpoints'}: {name} weights (step {wmeta.get('step')}) and state (step "
                             f"{smeta.get('step')}) differ: the run stopped while saving; cannot resume exactly")
        self.student.load_state_dict(load_file(str(weights_path)))
        state = load_file(str(state_path))
        checkpoint.restore_optimizer(self.optimizer, state, smeta, self.device)
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")})
        checkpoint.restore_rng(state, self.device)
        self.step, self.best = int(smeta["step"]), float(smeta["best"])
        world = int(smeta.get("world", "1"))
        if self.cfg.data.read == "shards" and world != self.ranks.world:
            self._say(f"resuming with {self.ranks.world} process(es) a run that read shard by shard with {world}: each "
                      "process's order of shards depends on how many there are, so the batches from here on are not "
                      "the uninterrupted run's (data.read = \"windows\" keeps them with any number)")


def train(cfg: TrainConfig | None, out: str | Path, resume: bool = False, init: str | None = None,
          stream=None) -> TrainResult:
    """Run (``resume``: continue) the training run in folder ``out``, by the rules of every run folder
    (:mod:`featcache.runs`): a new run refuses a folder that holds one (a ``last`` checkpoint; a folder
    without one is taken over); ``resume`` takes the config saved in the folder (``cfg`` may be None,
    or must equal it) and continues from ``checkpoints/last`` exactly (with none yet, from step 0); a
    finished run is refused, saying how to go on. ``init`` starts a new run from the student weights of
    a checkpoint file or run folder. Everything is checked before the folder is created or changed.
    """
    folder = RunFolder.open(out, remote=True)
    ranks = distributed.Ranks()
    try:
        cfg, step = _plan(folder, cfg, resume)
        ranks = distributed.join(resolve_device(cfg.device))
        return _train(Trainer(cfg, folder.path, stream, ranks, folder), folder, step, resume, init)
    finally:
        folder.close(upload=ranks.main)
        distributed.leave(ranks)


def _train(trainer: Trainer, folder: RunFolder, step: int | None, resume: bool, init: str | None) -> TrainResult:
    """:func:`train` once its trainer is built: every rank loads the same weights; rank 0 alone changes the folder."""
    main = trainer.ranks.main
    if step is not None:
        trainer.load("last")
        if main:
            folder.resumed(trainer.step, trainer.stream)
        return trainer.run()
    student = load_bare_student(init) if init is not None and not resume else None
    if main and resume:
        folder.restart(trainer.stream, more=RUN_LOGS)
    elif main:
        trainer.start()
    if student is not None:
        missing = trainer.student.load_state_dict(student.state_dict(), strict=False)
        print(f"initialized from {init} ({len(missing.missing_keys)} tensors not in it)", file=trainer.stream, flush=True)
    return trainer.run()


def recorded(out: str | Path, seconds: float) -> TrainResult:
    """The result of the run in ``out`` as its metrics record it (its last step, its last evaluation): what a
    launcher of other processes (Ray Train) reports when they are done."""
    steps, last = 0, {}
    with RunFolder.open(out, remote=True, checkpoints=False) as folder:  # its metrics say it all
        for line in folder.metrics.read_text().splitlines() if folder.metrics.exists() else ():
            record = json.loads(line)
            steps = max(steps, int(record["step"]))
            if any(k.startswith(("heldout/", "knn/")) for k in record):
                last = record
    return TrainResult.of(folder.name, steps, last, seconds)


def resumable(out: str | Path) -> TrainConfig:
    """The config of the run in ``out``, refused when it holds none or has no steps left."""
    return planned(out, None, True)


def planned(out: str | Path, cfg: TrainConfig | None, resume: bool) -> TrainConfig:
    """The config a run in ``out`` trains with (``resume``: the folder's own), checked by the folder's rules
    before anything starts (a launcher's check: :func:`train` checks again in each process)."""
    with RunFolder.open(out, remote=True) as folder:
        return _plan(folder, cfg, resume)[0]


def _plan(folder: RunFolder, cfg: TrainConfig | None, resume: bool) -> tuple[TrainConfig, int | None]:
    """The config a run trains with and the step it resumes from (:meth:`featcache.runs.RunFolder.plan`). A new
    run saves ``data.read`` resolved (:func:`read_mode`): a saved "auto" is a run from before shard-sequential
    reading, which read windows, and resumes reading windows (its batches stay the uninterrupted run's)."""
    found = checkpoint_files(folder.path, "last")
    last = None if found is None else (lambda: int(checkpoint.metadata(found[1]).get("step", -1)))
    further = (lambda c: f"to train further, start a new run from its weights: featcache train {c.cache} --init "
               f"{folder.name} --out NEW_RUN --steps N")
    own, step = folder.plan(cfg, resume, train_config.load, last, lambda c: c.optim.steps, further)
    if resume and own.data.read == "auto":
        own = dataclasses.replace(own, data=dataclasses.replace(own.data, read="windows"))
    return own, step
