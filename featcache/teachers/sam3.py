"""SAM3's vision trunk (facebook/sam3): the ViT before the FPN neck, as RADIO caches it.

The public checkpoint is a video model (model_type "sam3_video") whose trunk weights live under
``detector_model.vision_encoder.backbone.``. A plain ``from_pretrained`` would build a default
model and load nothing; here the trunk config is read from the nested config, the prefix is
mapped away, and any trunk weight left missing fails the load. Everything outside the prefix
(text encoder, detector, tracker) is ignored by design. Input size is fixed by the position
buffers; summary = mean of the patch features (the model has no CLS token).
"""

from __future__ import annotations

import re

import torch

from featcache.teachers.base import ModelSetup, Teacher, TeacherOutput, register

#: model_type → (path to the trunk config inside config.json, key prefix of the trunk weights)
LAYOUTS = {
    "sam3_video": (("detector_config", "vision_config", "backbone_config"), "detector_model.vision_encoder.backbone."),
    "sam3": (("vision_config", "backbone_config"), "vision_encoder.backbone."),
    "sam3_vision_model": (("backbone_config",), "backbone."),
    "sam3_vit_model": ((), ""),
}


def trunk_config(config: dict) -> tuple[dict, str]:
    """The ViT trunk's config dict and weight prefix for any SAM3 checkpoint layout."""
    path, prefix = LAYOUTS[config["model_type"]]
    node = config
    for key in path:
        node = node.get(key) or {}
    return {k: v for k, v in node.items() if k != "model_type"}, prefix


@register
class Sam3Teacher(Teacher):
    family = "sam3"
    model_types = tuple(LAYOUTS)

    @classmethod
    def _model_setup(cls, directory: str, config: dict) -> ModelSetup:
        from transformers import Sam3ViTConfig, Sam3ViTModel

        trunk, prefix = trunk_config(config)
        mapping = {"^" + re.escape(prefix): ""} if prefix else None
        ignorable = (rf"^(?!{re.escape(prefix)})",) if prefix else ()
        return ModelSetup(Sam3ViTModel, Sam3ViTConfig(**trunk), key_mapping=mapping, ignorable=ignorable)

    @classmethod
    def _spec_fields(cls, model: torch.nn.Module, directory: str) -> dict:
        c = model.config
        return dict(patch_size=c.patch_size, input_size=(c.image_size, c.image_size), size_rule="fixed",
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="bilinear", antialias=True,
                    channels=c.hidden_size, summary_channels=c.hidden_size, summary_kind="mean", prefix_tokens=0)

    def _forward(self, pixels: torch.Tensor) -> TeacherOutput:
        out = self.model(pixel_values=pixels)
        dense = self.tokens_to_grid(out.last_hidden_state, tuple(pixels.shape[-2:]))
        return TeacherOutput(dense.mean(dim=(1, 2)), dense)
