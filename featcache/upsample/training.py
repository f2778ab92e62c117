"""Training a FeatSharp upsampler by multi-view consistency (ALGORITHMS.md §7), no labels.

    featcache featsharp train --teacher family=siglip2,source=DIR --images SRC --steps 3000 --out CKPT

Each step takes canvases of a few training images and jittered views of each (zoom, rotation,
perspective, shift), with the homography from canvas to view. The upsampler's map of the canvas,
warped into a view and brought to the teacher's grid by a learned downsampler, is the prediction;
the teacher's own map of the view (PHI-S space, de-biased) is the target. Loss: MSE weighted by a
learned per-cell uncertainty u, e^(−u)·MSE + u/2, cells next to tile seams weighted more, cells a
view sees outside the canvas left out. NAdam, linear warm-up then cosine decay; bf16 autocast on
CUDA. The teacher's PHI-S statistics at its native size are fitted first on training images.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from featcache import checkpoint
from featcache.decode import decode
from featcache.errors import ImageError, UsageError
from featcache.store.location import locate
from featcache.log import LogStream
from featcache.manifest import list_source
from featcache.stats.moments import Moments
from featcache.stats.phis import PhiS
from featcache.teachers import create_teacher
from featcache.upsample import run
from featcache.upsample.checkpoint import (DESCRIPTION, WEIGHTS, current, describe_upsampler, load_upsampler,
                                           save_upsampler)
from featcache.upsample.featsharp import FeatSharp, FeatSharpConfig
from featcache.runs import Layout, RunFolder
from featcache.upsample.settings import Settings, from_dict, settings_from, torch_device  # noqa: F401 (the API)
from featcache.upsample import settings as settings_file
from featcache.upsample.warp import homographies, render, seam_map, warp

STATE = "state.safetensors"
#: runs written before the shared run-folder layout: train.json, the checkpoint set in the folder itself
OLDER = (Layout(config="train.json", last="."),)


def is_heldout(image_id: str, fraction: float, seed: int) -> bool:
    """Whether training leaves ``image_id`` out: a hash of the id and seed below ``fraction``
    (stable when images are added or removed; ``eval`` applies the same rule)."""
    h = hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


class Downsampler(nn.Module):
    """Learned f x downsampling: one (f+2) x (f+2) kernel for every channel, stride f, its weights a
    softmax (they sum to one), starting close to a box over the central f x f."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor
        init = torch.full((factor + 2, factor + 2), -4.0)
        init[1:-1, 1:-1] = 0.0
        self.logits = nn.Parameter(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        k = self.logits.shape[0]
        kernel = torch.softmax(self.logits.flatten(), 0).view(1, 1, k, k).to(x.dtype)
        return F.conv2d(x.reshape(n * c, 1, h, w), kernel, stride=self.factor, padding=1).reshape(
            n, c, h // self.factor, w // self.factor)


class Trainer:
    """One run in folder ``out``: teacher, images, upsampler, the training-only modules, optimizer."""

    PROGRESS_SECONDS = 5.0  # the longest quiet stretch between steps (a line says how far the run is)

    def __init__(self, settings: Settings, out: Path, stream=None, folder: RunFolder | None = None):
        self.s, self.out = settings, Path(out)
        self.folder = folder or RunFolder.open(out, "FeatSharp ", OLDER)
        self.stream = stream or LogStream()
        self.device = torch_device(settings.device)
        self._said = time.perf_counter()
        self._say(f"loading the teacher {settings.family} from {settings.source} on {self.device}…")
        self.teacher = create_teacher(settings.family, settings.source, settings.revision, device=str(self.device))
        self.train_ids, self.uris = self._images()
        self.step = 0
        self.model: FeatSharp | None = None

    def _images(self) -> tuple[list[str], dict[str, str]]:
        entries, _ = list_source(self.s.images)
        uris = {e.image_id: e.loc.uri for e in entries}
        train = sorted(i for i in uris if not is_heldout(i, self.s.heldout, self.s.seed))
        if not train:
            raise UsageError(f"every image of {self.s.images} is held out (heldout={self.s.heldout}): add images")
        return train, uris

    def image(self, image_id: str) -> torch.Tensor:
        uri = self.uris[image_id]
        return decode(locate(uri).read_bytes(), uri)

    # ---- set-up -------------------------------------------------------------------------------

    def build(self) -> None:
        """Fit the teacher's PHI-S statistics, then the upsampler and the training-only modules."""
        spec = self.teacher.spec
        try:
            config = FeatSharpConfig(channels=spec.channels, grid=spec.grid(), patch=spec.patch_size,
                                     factor=self.s.factor, window=self.s.window, key_dim=self.s.key_dim,
                                     heads=self.s.heads, mlp_ratio=self.s.mlp_ratio)
        except ValueError as e:
            raise UsageError(f"featsharp settings for {spec.name}: {e}") from None
        self._make(config, self._fit_phis())

    def _make(self, config: FeatSharpConfig, phis) -> None:
        torch.manual_seed(self.s.seed)
        self.model = FeatSharp(config, phis).to(self.device)
        self.down = Downsampler(config.factor).to(self.device)
        self.uncertainty = nn.Conv2d(config.channels, 1, 1).to(self.device)
        nn.init.zeros_(self.uncertainty.weight)
        nn.init.zeros_(self.uncertainty.bias)
        params = [*self.model.parameters(), *self.down.parameters(), *self.uncertainty.parameters()]
        self.optimizer = torch.optim.NAdam(params, lr=self.s.lr)
        self.seams = seam_map(config.grid, config.factor).to(self.device)

    def _fit_phis(self):
        """PHI-S of the teacher's maps of canvases' global views (its native size), on up to
        ``stats_images`` training images."""
        ids = self.train_ids[:: max(1, len(self.train_ids) // self.s.stats_images)][: self.s.stats_images]
        self._say(f"fitting PHI-S of {self.teacher.spec.name} on {len(ids)} images…")
        moments = Moments.empty(self.teacher.spec.channels)
        for start in range(0, len(ids), self.s.batch_size):
            canvas = self._canvases(ids[start:start + self.s.batch_size])
            whole = run.global_view(canvas, self.teacher.spec)  # no tiles: the statistics are of the native view
            dense = self.teacher.extract(whole, dtype=torch.float32).dense
            moments.add(dense.reshape(-1, dense.shape[-1]).cpu().double().numpy())
        phis = PhiS.fit(moments, seed=self.s.seed)
        self._say(f"PHI-S of {self.teacher.spec.name} fitted on {len(ids)} images ({moments.count} tokens), "
                  f"alpha {phis.alpha:.4g}")
        return tuple(torch.from_numpy(a).float() for a in (phis.mean, phis.rotation, phis.inverse))

    def _canvases(self, ids: list[str]) -> torch.Tensor:
        images = []
        for i in ids:
            try:
                images.append(self.image(i))
            except ImageError as e:
                raise UsageError(f"training image {i}: {e}") from None
        return run.canvases(images, self.teacher.spec, self.s.factor, self.s.policy, self.device)[0]

    # ---- one step -----------------------------------------------------------------------------

    def batch_ids(self, step: int) -> list[str]:
        rng = np.random.default_rng([self.s.seed, step])
        picks = rng.choice(len(self.train_ids), size=self.s.batch_size, replace=len(self.train_ids) < self.s.batch_size)
        return [self.train_ids[i] for i in picks]

    def loss(self, step: int) -> tuple[torch.Tensor, dict]:
        """The step's loss and its parts."""
        f, spec, v = self.s.factor, self.teacher.spec, self.s.views
        canvas = self._canvases(self.batch_ids(step))
        generator = torch.Generator().manual_seed(self.s.seed * 1_000_003 + step)
        t = homographies(len(canvas) * v, self.s.jitter, generator)
        with torch.no_grad():
            global_raw, tiles_raw, _ = run.teacher_maps(self.teacher, canvas, f)
            views = render(canvas.repeat_interleave(v, 0), t, spec.input_size, spec.resize, spec.antialias)
            target_raw = self.teacher.extract(views, dtype=torch.float32).dense
        autocast = torch.autocast("cuda", torch.bfloat16) if self.device.type == "cuda" else torch.autocast("cpu", enabled=False)
        with autocast:
            up = self.model(global_raw, tiles_raw, run.guide(canvas, self.model.config.out_grid))
            return self._consistency(up, target_raw, t)

    def _consistency(self, up: torch.Tensor, target_raw: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict]:
        v, f = self.s.views, self.s.factor
        warped, inside = warp(up.float().repeat_interleave(v, 0), t)
        seams, _ = warp(self.seams.expand(len(t), -1, -1, -1), t)
        pred = self.down(warped)
        target = self.model.normalize(target_raw)
        whole = F.avg_pool2d(inside, f) > 0.999  # every fine cell of a coarse cell inside the canvas
        weight = whole * (1 + self.s.seam_weight * F.avg_pool2d(seams, f))
        mse = ((pred - target) ** 2).mean(dim=1, keepdim=True)
        u = self.uncertainty(pred)
        total = (weight * (torch.exp(-u) * mse + u / 2)).sum() / weight.sum().clamp(min=1)
        plain = (whole * mse).sum() / whole.sum().clamp(min=1)
        return total, {"loss": total.item(), "mse": plain.item(), "uncertainty": (whole * u).sum().item() / max(1, whole.sum().item())}

    # ---- the loop -----------------------------------------------------------------------------

    def run(self) -> dict:
        """Train to ``steps``; log every ``log_every``, checkpoint every ``save_every`` and at the end."""
        window, began = [], time.perf_counter()
        self._say(f"training {self.s.steps - self.step} steps of {self.s.batch_size} canvases x {self.s.views} "
                  f"views (a line every {self.s.log_every} steps; the first step warms up)…")
        while self.step < self.s.steps:
            lr = checkpoint.warmup_cosine(self.step, self.s.steps, self.s.warmup, self.s.lr, self.s.min_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, parts = self.loss(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            window.append(parts)
            if self.step % self.s.log_every == 0 or self.step == self.s.steps:
                self._log(window, lr, time.perf_counter() - began)
                window, began = [], time.perf_counter()
            elif time.perf_counter() - self._said >= self.PROGRESS_SECONDS:
                self._say(f"step {self.step}/{self.s.steps} ({(time.perf_counter() - began) / len(window):.2f} s/step)")
            if self.step % self.s.save_every == 0 or self.step == self.s.steps:
                self.save()
        return {"steps": self.step, "out": str(self.out)}

    def _log(self, window: list[dict], lr: float, seconds: float) -> None:
        record = {"step": self.step, "lr": lr, "seconds_per_step": seconds / len(window),
                  **{k: float(np.mean([w[k] for w in window])) for k in window[0]}}
        self.folder.append(record)
        self._say(f"step {self.step}/{self.s.steps}: loss {record['loss']:.4f}, mse {record['mse']:.4f}, "
                  f"lr {lr:.2e}, {record['seconds_per_step']:.2f} s/step")

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
        self._said = time.perf_counter()

    # ---- checkpoints --------------------------------------------------------------------------

    def save(self) -> None:
        """The step's upsampler and training state, written as one checkpoint set."""
        tensors, meta = checkpoint.optimizer_tensors(self.optimizer)
        tensors.update({f"down.{k}": x for k, x in self.down.state_dict().items()})
        tensors.update({f"uncertainty.{k}": x for k, x in self.uncertainty.state_dict().items()})
        tensors.update(checkpoint.rng_tensors(self.device))
        state = {STATE: lambda path: checkpoint.save(path, tensors, {**meta, "step": str(self.step)})}
        save_upsampler(self.folder.checkpoints("last"), self.model, self.teacher.spec, self.step,
                       {"fraction": self.s.heldout, "seed": self.s.seed, "images": self.s.images}, more=state)

    def resume(self) -> None:
        """Everything as the last checkpoint left it, read from one set (or from the first layout)."""
        where = current(self.folder.checkpoints("last"))
        model, description = load_upsampler(where, self.device)
        meta, state = _state(where / STATE)
        if int(meta["step"]) != description.step:  # the first layout only: a set is never mixed
            raise UsageError(f"{self.out}: upsampler (step {description.step}) and state (step {meta['step']}) differ: "
                             "the run stopped while saving; cannot resume exactly")
        c = description.config
        self._make(c, (model.phis_mean.cpu(), model.phis_rotation.cpu(), model.phis_inverse.cpu()))
        self.model.load_state_dict(model.state_dict())
        self.down.load_state_dict({k[5:]: x for k, x in state.items() if k.startswith("down.")})
        self.uncertainty.load_state_dict({k[12:]: x for k, x in state.items() if k.startswith("uncertainty.")})
        checkpoint.restore_optimizer(self.optimizer, state, meta, self.device)
        checkpoint.restore_rng(state, self.device)
        self.step = description.step


def _state(path: Path) -> tuple[dict, dict]:
    """A training state file's metadata and tensors, refused in one line when damaged."""
    try:
        meta = checkpoint.metadata(path)
        int(meta["step"])
        return meta, load_file(str(path))
    except (SafetensorError, KeyError, ValueError, OSError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"{path} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                         "the run cannot resume exactly") from None


def train(settings: Settings | None, out: str | Path, resume: bool = False, stream=None) -> dict:
    """Run (``resume``: continue) the FeatSharp training run in folder ``out``, by the rules of every
    run folder (:mod:`featcache.runs`): a new run refuses a folder that holds one; ``resume`` continues
    with the folder's own settings (``settings``, when given, must equal them) from its last
    checkpoint, exactly. A teacher, images or settings that cannot be used leave no folder behind."""
    folder = RunFolder.open(out, "FeatSharp ", OLDER)
    settings, step = _plan(folder, settings, resume)
    trainer = Trainer(settings, folder.path, stream, folder)
    if step is not None:
        trainer.resume()
        folder.resumed(trainer.step, trainer.stream)
        return trainer.run()
    trainer.build()
    if resume:
        folder.restart(trainer.stream)
    else:
        folder.start(settings.to_toml(), trainer.stream)
    return trainer.run()


def resumable(out: str | Path) -> Settings:
    """The settings of the run in ``out``, refused when it holds none or has no steps left."""
    return _plan(RunFolder.open(out, "FeatSharp ", OLDER), None, True)[0]


def _plan(folder: RunFolder, settings: Settings | None, resume: bool) -> tuple[Settings, int | None]:
    """The settings a run trains with and the step it resumes from (:meth:`featcache.runs.RunFolder.plan`)."""
    return folder.plan(settings, resume, _saved_settings, _last_step(folder), lambda s: s.steps,
                       lambda s: "to train longer, start a new run with more --steps")


def _last_step(folder: RunFolder):
    """The step of the folder's last checkpoint, as :meth:`RunFolder.plan` asks for it (None: none)."""
    last = folder.checkpoints("last")
    found = current(last)
    if found != last or any((last / n).exists() for n in (STATE, WEIGHTS, DESCRIPTION)):
        return lambda: describe_upsampler(last).step
    return None


def _saved_settings(path: Path) -> Settings:
    """A run folder's own settings (its ``config.toml``; ``train.json`` in older runs), refused in one
    line when the file is damaged."""
    if path.suffix != ".json":
        return settings_file.load(path)
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is damaged ({e}): start a new run in another --out") from None
    return from_dict(values, str(path))
