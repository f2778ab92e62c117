"""The report's teachers as presets: HF id, full-size config, and what one image costs.

The configs are the published ones (TEACHERS.md), so the full-size models can be built on the
meta device (no memory, no weights) to count parameters and FLOPs, and timed with random weights
on a GPU, without downloading anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featcache.errors import UsageError
from featcache.roofline import VitShape, vit_flops


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    source: str
    size: int  # native input size
    config: dict
    shape: VitShape
    summary_channels: int

    @property
    def grid(self) -> int:
        return self.size // self.shape.patch

    def flops(self, size: int | None = None) -> int:
        """Analytic forward FLOPs per image at ``size`` (native by default)."""
        s = size or self.size
        return vit_flops(self.shape, s, s)

    def stored_bytes(self, size: int | None = None, itemsize: int = 2) -> int:
        """Bytes one image takes in the cache (float16 dense + summary, box, valid)."""
        g = (size or self.size) // self.shape.patch
        return (g * g * self.shape.width + self.summary_channels) * itemsize + 4 * 4 + 1

    def random_teacher(self, device: str = "cpu"):
        """The full-size teacher with random weights on ``device``: for timing, never for features."""
        from featcache.teachers.base import family_class
        from featcache.teachers.spec import TeacherSpec

        cls, config_cls = model_classes(self.family)
        with torch.device(device):
            model = cls(config_cls(**self.config)).eval()
        teacher_cls = family_class(self.family)
        spec = TeacherSpec(family=self.family, name=self.family, source=f"random:{self.name}", revision=None,
                           weights_hash=None, model_type=model.config.model_type,
                           **teacher_cls._spec_fields(model, ""))
        return teacher_cls(model, spec, device=device)

    def build_meta(self) -> torch.nn.Module:
        """The full-size model on the meta device: real shapes, no memory, no weights."""
        cls, config_cls = model_classes(self.family)
        with torch.device("meta"):
            return cls(config_cls(**self.config)).eval()


def model_classes(family: str):
    """The transformers (model class, config class) of a report family."""
    import transformers as t

    return {"siglip2": (t.SiglipVisionModel, t.SiglipVisionConfig),
            "dinov3": (t.DINOv3ViTModel, t.DINOv3ViTConfig),
            "sam3": (t.Sam3ViTModel, t.Sam3ViTConfig)}[family]


_SIGLIP2_G = dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=40, num_attention_heads=16,
                  image_size=384, patch_size=16)
_DINOV3_7B = dict(hidden_size=4096, intermediate_size=8192, num_hidden_layers=40, num_attention_heads=32,
                  use_gated_mlp=True, hidden_act="silu", num_register_tokens=4, patch_size=16, query_bias=False,
                  key_bias=False, value_bias=False, image_size=224)
_SAM3 = dict(hidden_size=1024, intermediate_size=4736, num_hidden_layers=32, num_attention_heads=16, image_size=1008,
             patch_size=14, window_size=24, global_attn_indexes=[7, 15, 23, 31])

PRESETS = {p.name: p for p in (
    Preset("siglip2-g-384", "siglip2", "google/siglip2-giant-opt-patch16-384", 384, _SIGLIP2_G,
           VitShape(1536, 6144, 40, 16, pool_head=True), 1536),
    Preset("dinov3-7b", "dinov3", "facebook/dinov3-vit7b16-pretrain-lvd1689m", 224, _DINOV3_7B,
           VitShape(4096, 8192, 40, 16, gated=True, prefix_tokens=5), 4096),
    Preset("sam3", "sam3", "facebook/sam3", 1008, _SAM3,
           VitShape(1024, 4736, 32, 14, window=24 * 24, global_layers=4), 1024),
)}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]
