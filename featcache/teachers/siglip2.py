"""SigLIP2 (fixed-resolution checkpoints, e.g. google/siglip2-giant-opt-patch16-384).

These checkpoints use the SigLIP classes (model_type "siglip"); ``SiglipVisionModel`` loads the
vision tower of a full checkpoint and the text tower's weights are the only keys it may ignore.
Summary = the attention-pooling head's output; dense = the last hidden state, 24x24 at 384.
"""

from __future__ import annotations

import torch

from featcache.teachers.base import ModelSetup, Teacher, TeacherOutput, register


@register
class Siglip2Teacher(Teacher):
    family = "siglip2"
    model_types = ("siglip", "siglip_vision_model")

    @classmethod
    def _model_setup(cls, directory: str, config: dict) -> ModelSetup:
        from transformers import SiglipVisionConfig, SiglipVisionModel

        vision = config.get("vision_config", {}) if config["model_type"] == "siglip" else config
        return ModelSetup(SiglipVisionModel, SiglipVisionConfig.from_dict(vision),
                          ignorable=(r"^text_model\.", r"^logit_(scale|bias)$"))

    @classmethod
    def _spec_fields(cls, model: torch.nn.Module, directory: str) -> dict:
        c = model.config
        return dict(patch_size=c.patch_size, input_size=(c.image_size, c.image_size), size_rule="fixed",
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="bilinear", antialias=True,
                    channels=c.hidden_size, summary_channels=c.hidden_size,
                    summary_kind="pooler" if c.vision_use_head else "mean", prefix_tokens=0)

    def _forward(self, pixels: torch.Tensor) -> TeacherOutput:
        out = self.model(pixel_values=pixels)
        dense = self.tokens_to_grid(out.last_hidden_state, tuple(pixels.shape[-2:]))
        summary = out.pooler_output if self.spec.summary_kind == "pooler" else dense.mean(dim=(1, 2))
        return TeacherOutput(summary, dense)
