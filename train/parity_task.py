"""A labelled task built offline, and a small teacher of a real teacher class trained on it: what the parity
benchmark (DESIGN.md §8, ALGORITHMS.md §9) scores students against.

Each scene is a random crop of one of scikit-image's photos with one of scikit-learn's 8×8 digits upscaled
and pasted (an opaque square, white strokes on black) at a random place and size. Labels: the digit (image
level) and, per teacher patch, the digit's class where the patch lies mostly inside the pasted square and
:data:`BACKGROUND` elsewhere. The digits are split by :func:`featcache.train.digits.choose_split` (stratified,
seeded): training scenes use training digits only, held-out scenes held-out digits only.

    task = ParityTask(size=128, patch=16)
    teacher = train_teacher(task, folder, steps=1500)     # DINOv3ViTModel + its two linear probes, saved
    csv = write_scenes(task, folder / "scenes", 512, 128)  # PNGs + uri,label,split for 'featcache index'
    cache = extract_cache(folder / "cache", csv, teacher, ("f16",))  # a view per codec given, with statistics
    probe_scores(load_probes(teacher), *features_of(load_student(run), scenes.images), scenes)
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from featcache.demo import demo_photos
from featcache.teachers.dinov3 import IMAGENET_MEAN, IMAGENET_STD
from featcache.teachers.views import normalize
from featcache.train.digits import choose_split

BACKGROUND = 10  # the per-patch class of a patch that is mostly photo
CLASSES = 10
PHOTO_SUFFIXES = (".png", ".jpg")
PROBES = "probes.safetensors"
#: a small DINOv3 (the real transformers class): trains to the task in a minute or two on one CPU core
TEACHER = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
               use_gated_mlp=True, hidden_act="silu", num_register_tokens=4, patch_size=16, image_size=128)


@dataclass(frozen=True)
class Scenes:
    """A batch of scenes: uint8 images (N, 3, S, S), digit labels (N,), per-patch labels (N, g, g)."""

    images: torch.Tensor
    labels: torch.Tensor
    patches: torch.Tensor


@dataclass
class ParityTask:
    """Digits on photos at ``size`` pixels, labelled per ``patch``; ``side``: the digit's side as a fraction
    of the image's (uniform); ``seed`` fixes the digit split and the background pools."""

    size: int = 128
    patch: int = 16
    side: tuple[float, float] = (0.35, 0.65)
    seed: int = 0
    pool: int = 256  # background crops per split
    classes: tuple[int, ...] = tuple(range(CLASSES))  # the digits drawn (a test may keep a few: it learns faster)
    _bg: dict = field(default_factory=dict, repr=False)

    @property
    def grid(self) -> int:
        return self.size // self.patch

    @cached_property
    def digits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(8×8 images, labels) of the training and held-out digits."""
        from sklearn.datasets import load_digits

        d = load_digits()
        chosen, test = choose_split(d.target, None, self.seed)
        chosen, test = chosen[np.isin(d.target[chosen], self.classes)], test[np.isin(d.target[chosen], self.classes)]
        return {"train": (d.images[chosen[~test]], d.target[chosen[~test]]),
                "test": (d.images[chosen[test]], d.target[chosen[test]])}

    def backgrounds(self, split: str) -> torch.Tensor:
        """``pool`` random square crops of the photos, resized to ``size``: uint8 (pool, 3, S, S), per split."""
        if split not in self._bg:
            rng = np.random.default_rng([self.seed, 1, split == "test"])
            photos = [Image.open(p).convert("RGB") for p in sorted(demo_photos().iterdir())
                      if p.suffix in PHOTO_SUFFIXES]
            self._bg[split] = torch.stack([_random_crop(rng, photos[rng.integers(len(photos))], self.size)
                                           for _ in range(self.pool)])
        return self._bg[split]

    def sample(self, rng: np.random.Generator, n: int, split: str = "train") -> Scenes:
        """``n`` scenes of ``split``'s digits on ``split``'s backgrounds, drawn with ``rng``."""
        images, digits = self.digits[split]
        bg = self.backgrounds(split)
        picks = rng.integers(len(images), size=n)
        out = [self._compose(rng, bg[rng.integers(len(bg))], images[k], int(digits[k])) for k in picks]
        return Scenes(torch.stack([o[0] for o in out]), torch.as_tensor(digits[picks], dtype=torch.long),
                      torch.stack([o[1] for o in out]))

    def _compose(self, rng: np.random.Generator, bg: torch.Tensor, digit: np.ndarray, label: int):
        """One scene (uint8 (3, S, S)) and its patch labels (g, g): the digit pasted as an opaque square."""
        s = int(round(self.size * rng.uniform(*self.side)))
        x, y = (int(v) for v in rng.integers(0, self.size - s + 1, size=2))
        ink = F.interpolate(torch.from_numpy(digit).float()[None, None] / 16, size=(s, s), mode="bilinear",
                            align_corners=False)[0]
        image = bg.clone()
        image[:, y:y + s, x:x + s] = (ink * 255).round().clamp(0, 255).to(torch.uint8).expand(3, s, s)
        inside = torch.zeros(1, 1, self.size, self.size)
        inside[..., y:y + s, x:x + s] = 1
        mostly = F.avg_pool2d(inside, self.patch)[0, 0] > 0.5
        return image, torch.full(mostly.shape, BACKGROUND, dtype=torch.long).masked_fill(mostly, label)


def _random_crop(rng: np.random.Generator, photo: Image.Image, size: int) -> torch.Tensor:
    """A random square crop (side 30–100% of the photo's shorter side) resized to ``size``: uint8 (3, S, S)."""
    W, H = photo.size
    side = int(min(W, H) * rng.uniform(0.3, 1.0))
    x0, y0 = int(rng.integers(0, W - side + 1)), int(rng.integers(0, H - side + 1))
    crop = photo.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    return torch.from_numpy(np.asarray(crop).transpose(2, 0, 1).copy())


# ---- the teacher and its probes ---------------------------------------------------------------------------

class Probes(nn.Module):
    """The teacher's two heads: linear on its summary (digit), linear on each patch token (digit or background)."""

    def __init__(self, channels: int):
        super().__init__()
        self.summary = nn.Linear(channels, CLASSES)
        self.dense = nn.Linear(channels, CLASSES + 1)

    def forward(self, summary: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, 10) of summaries (B, C) and (B, h, w, 11) of dense features (B, h, w, C)."""
        return self.summary(summary), self.dense(dense)


def teacher_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 scenes as the DINOv3 teacher's normalized input: what featcache's extract gives it for a
    scene of its own input size (no resize; ImageNet mean/std from the family's spec)."""
    return normalize(images.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)


def _teacher_forward(model, probes: Probes, images: torch.Tensor):
    out = model(pixel_values=teacher_inputs(images))
    g = images.shape[-1] // model.config.patch_size
    dense = out.last_hidden_state[:, 1 + model.config.num_register_tokens:].reshape(len(images), g, g, -1)
    return probes(out.pooler_output, dense)


def train_teacher(task: ParityTask, folder: Path, steps: int = 1500, batch: int = 64, lr: float = 2e-3,
                  seed: int = 0, config: dict | None = None) -> Path:
    """Train a DINOv3ViTModel (``TEACHER``, ``config`` on top) with its :class:`Probes` on fresh training
    scenes every step (cross-entropy on the digit and on every patch), then save the model in HF layout
    (loaded back by featcache's real loading path) and the probes (:data:`PROBES`) into ``folder``."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    model = DINOv3ViTModel(DINOv3ViTConfig(**{**TEACHER, "patch_size": task.patch, "image_size": task.size,
                                              **(config or {})}))
    probes = Probes(model.config.hidden_size)
    params = list(model.parameters()) + list(probes.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    rng = np.random.default_rng([seed, 2])
    for step in range(steps):
        for g in opt.param_groups:  # warm-up, then cosine
            g["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / steps))
        scenes = task.sample(rng, batch, "train")
        s_logits, d_logits = _teacher_forward(model, probes, scenes.images)
        loss = F.cross_entropy(s_logits, scenes.labels) + F.cross_entropy(d_logits.flatten(0, 2),
                                                                          scenes.patches.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(folder)
    save_file(probes.state_dict(), str(folder / PROBES))
    return folder


def load_probes(folder: Path) -> Probes:
    """The probes :func:`train_teacher` saved beside the teacher."""
    weights = load_file(str(Path(folder) / PROBES))
    probes = Probes(weights["summary.weight"].shape[1])
    probes.load_state_dict(weights)
    return probes.eval()


@torch.no_grad()
def probe_scores(probes: Probes, summary: torch.Tensor, dense: torch.Tensor, scenes: Scenes) -> dict[str, float]:
    """Accuracy of the probes on features in the teacher's space: ``summary`` (digit), ``dense`` (per patch on
    the digit: the object's patches) and ``dense_all`` (every patch, background included)."""
    s_logits, d_logits = probes(summary.float(), dense.float())
    hit = d_logits.argmax(-1) == scenes.patches
    on = scenes.patches != BACKGROUND
    return {"summary": float((s_logits.argmax(-1) == scenes.labels).float().mean()),
            "dense": float(hit[on].float().mean()), "dense_all": float(hit.float().mean())}


# ---- the scenes as files, for featcache index ---------------------------------------------------------------

PATCH_LABELS = "patch_labels.npy"


def write_scenes(task: ParityTask, folder: Path, n_train: int, n_test: int) -> Path:
    """``n_train`` training and ``n_test`` held-out scenes as PNGs in ``folder``, with ``scenes.csv`` (uri,
    label, split; for ``featcache index``) and their patch labels (``patch_labels.npy``, csv order)."""
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    rows, patches = [], []
    for split, n in (("train", n_train), ("test", n_test)):
        scenes = task.sample(np.random.default_rng([task.seed, 3, split == "test"]), n, split)
        for k in range(n):
            path = folder / f"{split}-{k:05d}.png"
            Image.fromarray(scenes.images[k].permute(1, 2, 0).numpy()).save(path, compress_level=1)
            rows.append((str(path), int(scenes.labels[k]), split))
        patches.append(scenes.patches.numpy().astype(np.int8))
    np.save(folder / PATCH_LABELS, np.concatenate(patches), allow_pickle=False)
    out = folder / "scenes.csv"
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("uri", "label", "split"))
        writer.writerows(rows)
    return out


def read_scenes(csv_path: Path, split: str) -> tuple[list[str], Scenes]:
    """The uris and scenes (images decoded from their files) of ``split`` in ``csv_path``."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    patches = np.load(Path(csv_path).parent / PATCH_LABELS, allow_pickle=False)
    keep = [k for k, r in enumerate(rows) if r["split"] == split]
    images = [np.asarray(Image.open(rows[k]["uri"]).convert("RGB")).transpose(2, 0, 1) for k in keep]
    return [rows[k]["uri"] for k in keep], Scenes(torch.from_numpy(np.stack(images)),
                                                 torch.tensor([int(rows[k]["label"]) for k in keep]),
                                                 torch.from_numpy(patches[keep].astype(np.int64)))


# ---- the teacher's cache ----------------------------------------------------------------------------------

def view_name(codec: str) -> str:
    """The name of the teacher's view stored with ``codec`` (one cache holds a view per codec: the same teacher,
    the same images), e.g. ``dinov3-f16``."""
    return f"dinov3-{codec}"


def view_key(task: ParityTask, codec: str) -> str:
    """The key of the teacher's whole-scene view stored with ``codec`` in the cache :func:`extract_cache` builds."""
    return f"{view_name(codec)}@{task.size}"


def extract_cache(root: Path, scenes_csv: Path, teacher: Path, codecs: tuple[str, ...], shard_size: int = 32):
    """Index the scenes into ``root`` and extract the teacher through featcache's own library path (the plan,
    the per-shard worker the Ray job runs, codec calibration), one view per codec (the caller's choice), with
    statistics. A cache already there gains the views it lacks (an earlier run's teacher and scenes are reused)."""
    import featcache
    from featcache.extract.calibration import calibrate_locally
    from featcache.extract.config import from_dict
    from featcache.extract.plan import prepare
    from featcache.extract.worker import ShardWorker
    from featcache.stats.compute import compute_view
    from featcache.store.cache import Cache

    if not (root / "manifest.parquet").exists():
        featcache.index(str(scenes_csv), str(root))
    job = from_dict({"source": str(root), "output": str(root), "shard_size": shard_size, "batch_size": 32,
                     "teachers": [{"family": "dinov3", "name": view_name(c), "source": str(teacher), "codec": c}
                                  for c in codecs]}, "parity cache")
    plan = prepare(job)
    worker = ShardWorker(str(root), [t.to_dict() for t in plan.teachers], [v.to_dict() for v in plan.views])
    calibrate_locally(plan, worker)
    for shard in sorted(plan.todo):
        worker.process(shard)
    worker.close()
    for view in Cache.open(str(root)).views.values():
        if not view.spec.codec_type.needs_calibration and not view.stats:
            compute_view(view)
    return Cache.open(str(root))


# ---- students: trained from the cache (or online), read in the teacher's space ---------------------------------

def student_overrides(task: ParityTask, view: str, steps: int, batch: int, seed: int = 0) -> list[str]:
    """The run's config (``featcache.train.config.load`` overrides): one teacher head on ``view``, the task's
    patch, the view's resolution for evaluation, checkpoints and evaluations at the end only."""
    return [f'teachers=[{{name="teacher", low="{view}"}}]', f"student.patch={task.patch}",
            f"optim.steps={steps}", f"optim.batch_size={batch}", f"seed={seed}", f"eval.every={steps}",
            f"eval.resolution={task.size}", "eval.pictures=false", f"checkpoint_every={steps}",
            f"log_every={max(1, steps // 20)}", "data.heldout_images=16"]


@torch.no_grad()
def features_of(student, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(summaries (N, C), dense (N, h, w, C)) of a :func:`featcache.train.product.load_student` module's
    ``"teacher"`` head on uint8 scenes, in the space it was loaded for."""
    parts = [student(images[k:k + batch])["teacher"] for k in range(0, len(images), batch)]
    return torch.cat([p["summary"] for p in parts]), torch.cat([p["dense"] for p in parts])


@torch.no_grad()
def teacher_features(teacher: Path, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(summaries, dense) of the saved teacher on uint8 scenes, loaded and run as extract runs it
    (``create_teacher``, the views' resize and normalization from its spec)."""
    from featcache.teachers import create_teacher
    from featcache.teachers.views import make_views

    model = create_teacher("dinov3", str(teacher), hash_weights=False)
    outs = [model.extract(make_views(list(images[k:k + batch]), model.spec)[0]) for k in range(0, len(images), batch)]
    return torch.cat([o.summary for o in outs]), torch.cat([o.dense for o in outs])
