"""Any other transformers vision model with patch tokens (ViT, DeiT, DINOv2, ...): the ``vit`` family.

The model class comes from transformers' own ``AutoModel`` mapping for the directory's
``model_type`` (never remote code). Preprocessing is read from the checkpoint's
``preprocessor_config.json`` (``image_mean``, ``image_std``, ``resample``); featcache does not guess
normalization constants, so a checkpoint without them is refused. Input size is fixed at the
config's ``image_size`` (absolute position embeddings). Tokens are [CLS?, registers?, patches]:
summary = the CLS token when the model has one, else the mean of the patches.
"""

from __future__ import annotations

import json
import os

import torch

from featcache.errors import TeacherLoadError
from featcache.teachers.base import ModelSetup, Teacher, TeacherOutput, register

#: PIL resample codes in preprocessor configs → torch interpolation modes
RESAMPLE = {2: "bilinear", 3: "bicubic"}


def preprocessing(directory: str) -> dict:
    """mean, std and resize mode from ``preprocessor_config.json``; refuses to guess them."""
    path = os.path.join(directory, "preprocessor_config.json")
    try:
        with open(path) as f:
            pre = json.load(f)
    except FileNotFoundError:
        raise TeacherLoadError(f"{directory} has no preprocessor_config.json: the vit family takes the "
                               "normalization constants from it and will not guess them") from None
    except ValueError as e:
        raise TeacherLoadError(f"{path} is not valid JSON: {e}") from e
    mean, std = pre.get("image_mean"), pre.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
        raise TeacherLoadError(f"{path} does not give three-channel image_mean and image_std")
    resample = pre.get("resample", 2)
    if resample not in RESAMPLE:
        raise TeacherLoadError(f"{path}: resample {resample!r} is not one featcache reproduces "
                               f"({', '.join(f'{k}={v}' for k, v in RESAMPLE.items())})")
    return dict(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std), resize=RESAMPLE[resample])


@register
class VitTeacher(Teacher):
    family = "vit"
    model_types = ()  # any model_type transformers knows that has patch_size and image_size

    @classmethod
    def check_model_type(cls, config: dict, directory: str) -> None:
        from transformers import CONFIG_MAPPING

        model_type = config.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise TeacherLoadError(f"{directory}: model_type {model_type!r} is not one transformers knows")
        if not isinstance(config.get("patch_size"), int) or not isinstance(config.get("image_size"), int):
            raise TeacherLoadError(f"{directory} holds a {model_type!r} model without an integer patch_size and "
                                   "image_size: the vit family takes single-tower patch-token vision models")

    @classmethod
    def _model_setup(cls, directory: str, config: dict) -> ModelSetup:
        from transformers import AutoConfig, AutoModel

        settings = {k: v for k, v in config.items() if k != "model_type"}
        preprocessing(directory)  # refuse before loading weights
        return ModelSetup(AutoModel, AutoConfig.for_model(config["model_type"], **settings))

    @classmethod
    def _spec_fields(cls, model: torch.nn.Module, directory: str) -> dict:
        c = model.config
        embeddings = getattr(model, "embeddings", None)
        cls_tokens = int(getattr(embeddings, "cls_token", None) is not None)
        prefix = cls_tokens + int(getattr(c, "num_register_tokens", 0) or 0)
        return dict(patch_size=c.patch_size, input_size=(c.image_size, c.image_size), size_rule="fixed",
                    antialias=True, channels=c.hidden_size, summary_channels=c.hidden_size,
                    summary_kind="cls" if cls_tokens else "mean", prefix_tokens=prefix,
                    **preprocessing(directory))

    def _forward(self, pixels: torch.Tensor) -> TeacherOutput:
        tokens = self.model(pixel_values=pixels).last_hidden_state
        dense = self.tokens_to_grid(tokens, tuple(pixels.shape[-2:]))
        summary = tokens[:, 0] if self.spec.summary_kind == "cls" else dense.mean(dim=(1, 2))
        return TeacherOutput(summary, dense)
