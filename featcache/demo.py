"""The offline demo: tiny random-weight teachers of the three report families, saved to disk.

``featcache demo`` extracts the photos that ship inside scikit-image with these teachers. They are
the real transformers classes with tiny configs, saved as safetensors (SAM3 in the public
checkpoint's video-model layout) and loaded back through the same path real weights take, so the
demo exercises everything but the model size. Seeds are fixed: the same teachers (and weights
hashes) every time, so a rerun of the demo resumes instead of refusing changed weights.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

DEMO_CONFIGS = {
    "siglip2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=64, patch_size=16),
    "dinov3": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   use_gated_mlp=True, hidden_act="silu", num_register_tokens=4, patch_size=16, image_size=64),
    "sam3": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=112,
                 patch_size=14, window_size=4, global_attn_indexes=[1], pretrain_image_size=56),
}
SAM3_VIDEO_PREFIX = "detector_model.vision_encoder.backbone."


def default_home() -> Path:
    return Path(os.environ.get("FEATCACHE_HOME") or Path.home() / ".cache" / "featcache")


def save_sam3_video_layout(model, folder: Path, extra: dict | None = None) -> Path:
    """Save a ``Sam3ViTModel`` as the public facebook/sam3 checkpoint stores its trunk: a sam3_video
    config with the trunk config nested inside, and the trunk weights under the detector's prefix."""
    from safetensors.torch import save_file

    weights = {SAM3_VIDEO_PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}
    weights.update(extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    trunk = {k: v for k, v in model.config.to_diff_dict().items() if k not in ("transformers_version",)}
    trunk["model_type"] = "sam3_vit_model"
    config = {"model_type": "sam3_video", "architectures": ["Sam3VideoModel"],
              "detector_config": {"model_type": "sam3", "vision_config": {
                  "model_type": "sam3_vision_model", "backbone_config": trunk}}}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def build(family: str, seed: int = 0):
    """A tiny random-weight model of ``family`` (seeded)."""
    from featcache.teachers.presets import model_classes

    model_cls, config_cls = model_classes(family)
    torch.manual_seed(seed)
    return model_cls(config_cls(**DEMO_CONFIGS[family])).eval()


def save_demo_teachers(folder: Path | None = None) -> dict[str, str]:
    """Save (once) the three demo teachers; family -> directory."""
    from featcache.teachers.loading import quiet_transformers

    folder = Path(folder or default_home() / "demo-teachers")
    out = {}
    for i, family in enumerate(DEMO_CONFIGS):
        target = folder / family
        if not (target / "config.json").exists():
            with quiet_transformers():
                _save(family, i, folder, target)
        out[family] = str(target)
    return out


def _save(family: str, seed: int, folder: Path, target: Path) -> None:
    """Build one demo teacher and save it at ``target`` (a temporary folder, renamed when complete)."""
    model = build(family, seed=seed)
    tmp = folder / f".{family}.tmp-{os.getpid()}"
    if family == "sam3":
        save_sam3_video_layout(model, tmp)
    else:
        model.save_pretrained(tmp)
    if target.exists():  # another process saved it meanwhile
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)


def demo_photos() -> Path:
    """The folder of photos inside the installed scikit-image wheel (found without importing it)."""
    import importlib.util

    from featcache.errors import UsageError

    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise UsageError("the demo runs on the photos inside scikit-image, which is not installed: "
                         "pip install 'featcache[demo]'")
    return Path(spec.origin).parent / "data"


def demo_config(output: str, source: str, teachers: dict[str, str]) -> dict:
    """The demo job: three families, DINOv3 at two resolutions, SAM3 as a 2x2 mosaic."""
    return {"source": source, "output": output, "shard_size": 8, "batch_size": 8, "teachers": [
        {"family": "siglip2", "source": teachers["siglip2"]},
        {"family": "dinov3", "source": teachers["dinov3"], "resolutions": [64, 128]},
        {"family": "sam3", "source": teachers["sam3"], "mosaic": 2},
    ]}
