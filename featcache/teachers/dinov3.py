"""DINOv3 ViTs (e.g. facebook/dinov3-vit7b16-pretrain-lvd1689m).

Tokens are [CLS, registers, patches]; RoPE only, so any multiple of the patch size is a valid
input. Summary = ``pooler_output`` (the normalized CLS); dense = the patch tokens, registers dropped.
"""

from __future__ import annotations

import torch

from featcache.teachers.base import ModelSetup, Teacher, TeacherOutput, register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@register
class Dinov3Teacher(Teacher):
    family = "dinov3"
    model_types = ("dinov3_vit",)

    @classmethod
    def _model_setup(cls, directory: str, config: dict) -> ModelSetup:
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        return ModelSetup(DINOv3ViTModel, DINOv3ViTConfig.from_dict(config))

    @classmethod
    def _spec_fields(cls, model: torch.nn.Module, directory: str) -> dict:
        c = model.config
        return dict(patch_size=c.patch_size, input_size=(c.image_size, c.image_size), size_rule="multiple",
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, resize="bilinear", antialias=True,
                    channels=c.hidden_size, summary_channels=c.hidden_size, summary_kind="pooler",
                    prefix_tokens=1 + c.num_register_tokens)

    def _forward(self, pixels: torch.Tensor) -> TeacherOutput:
        out = self.model(pixel_values=pixels)
        return TeacherOutput(out.pooler_output, self.tokens_to_grid(out.last_hidden_state, tuple(pixels.shape[-2:])))
