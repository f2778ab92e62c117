"""Tiny random-weight teachers of the real transformers classes, saved to disk in HF layout.

Tests load them back through featcache's real loading path (the one real weights take). Each
``save_*`` returns the directory and the in-memory model that was saved, so a test can prove the
loaded weights are the saved ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SIGLIP = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=64,
              patch_size=16)
DINOV3 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              use_gated_mlp=True, hidden_act="silu", num_register_tokens=4, patch_size=16, image_size=64)
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
           patch_size=8)
#: what a ViT checkpoint's preprocessor_config.json says (CLIP constants, bicubic), deliberately not ImageNet's
VIT_PREPROCESSOR = {"image_processor_type": "ViTImageProcessor", "image_mean": [0.4815, 0.4578, 0.4082],
                    "image_std": [0.2686, 0.2613, 0.2758], "resample": 3, "size": {"height": 32, "width": 32}}
SAM3_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=112,
                patch_size=14, window_size=4, global_attn_indexes=[1], pretrain_image_size=56)


def _seeded(seed: int):
    torch.manual_seed(seed)


def save_siglip(folder: Path, full: bool = False, seed: int = 0):
    """A SigLIP vision tower; ``full`` saves a whole SiglipModel (vision + text towers) instead."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    _seeded(seed)
    if full:
        text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=99)
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=SIGLIP)).eval()
        model.save_pretrained(folder)
        return folder, model.vision_model
    model = SiglipVisionModel(SiglipVisionConfig(**SIGLIP)).eval()
    model.save_pretrained(folder)
    return folder, model


def save_dinov3(folder: Path, seed: int = 0):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    _seeded(seed)
    model = DINOv3ViTModel(DINOv3ViTConfig(**DINOV3)).eval()
    model.save_pretrained(folder)
    return folder, model


def save_vit(folder: Path, seed: int = 0, preprocessor: dict | None = VIT_PREPROCESSOR):
    """A plain transformers ViT (model_type "vit") with its preprocessor_config.json."""
    from transformers import ViTConfig, ViTModel

    _seeded(seed)
    model = ViTModel(ViTConfig(**VIT)).eval()
    model.save_pretrained(folder)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder, model


def save_patch_local(folder: Path, seed: int = 0):
    """A DINOv3 with no transformer blocks: patch embedding + final norm, so each patch's features
    depend on that patch's pixels only (RoPE acts inside attention, and there is none)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    _seeded(seed)
    model = DINOv3ViTModel(DINOv3ViTConfig(**{**DINOV3, "num_hidden_layers": 0})).eval()
    model.save_pretrained(folder)
    return folder, model


def save_sam3_video_layout(folder: Path, seed: int = 0):
    """A SAM3 trunk saved the way the public facebook/sam3 checkpoint is: a sam3_video model whose
    trunk weights sit under ``detector_model.vision_encoder.backbone.`` next to other towers' keys."""
    from transformers import Sam3ViTConfig, Sam3ViTModel

    from featcache.demo import save_sam3_video_layout as save_layout

    _seeded(seed)
    model = Sam3ViTModel(Sam3ViTConfig(**SAM3_VIT)).eval()
    others = {"detector_model.text_encoder.embed.weight": torch.randn(8, 4),
              "tracker_model.memory.weight": torch.randn(4, 4)}
    return save_layout(model, folder, extra=others), model


SAVERS = {"siglip2": save_siglip, "dinov3": save_dinov3, "sam3": save_sam3_video_layout, "vit": save_vit}
