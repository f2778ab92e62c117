"""Every registered family: parity with the transformers model, shapes, determinism, batch
invariance, spec round-trip through a view's attrs, preprocessing against an independent resize."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from featcache.teachers.views import make_views
from featcache.store import ViewSpec
from featcache.teachers import TeacherSpec, families
from tests.support.images import photo_tensors

FAMILIES = families()


def _photos(n: int) -> list[torch.Tensor]:
    return photo_tensors(n)


def test_all_families_are_registered():
    assert {"siglip2", "dinov3", "sam3", "vit"} <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_the_saved_transformers_model(family, saved, teachers):
    teacher, (_, original) = teachers[family], saved[family]
    pixels, _ = make_views(_photos(3), teacher.spec)
    out = teacher.extract(pixels)
    ref = original(pixel_values=pixels).last_hidden_state  # the model as it was before saving
    h, w = teacher.spec.grid()
    ref_dense = ref[:, teacher.spec.prefix_tokens:].reshape(3, h, w, -1)
    assert (out.dense - ref_dense).abs().max().item() <= 1e-5
    # SigLIP2: attention-pooling head; DINOv3: normalized CLS; vit: the CLS token; SAM3: mean of the patches
    kind = teacher.spec.summary_kind
    assert kind == {"siglip2": "pooler", "dinov3": "pooler", "vit": "cls", "sam3": "mean"}.get(family, kind)
    ref_summary = {"mean": lambda: ref_dense.mean(dim=(1, 2)), "cls": lambda: ref[:, 0],
                   "pooler": lambda: original(pixel_values=pixels).pooler_output}[kind]()
    assert (out.summary - ref_summary).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_dtypes_determinism(family, teachers):
    teacher = teachers[family]
    spec = teacher.spec
    pixels, boxes = make_views(_photos(2), spec)
    a, b = teacher.extract(pixels), teacher.extract(pixels)
    h, w = spec.grid()
    assert a.dense.shape == (2, h, w, spec.channels) and a.summary.shape == (2, spec.summary_channels)
    assert a.dense.dtype == a.summary.dtype == torch.float32
    assert torch.equal(a.dense, b.dense) and torch.equal(a.summary, b.summary)
    assert boxes.tolist()[0] == [0, 0, 512, 512]  # astronaut, squash policy: the whole image


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_invariance(family, teachers):
    teacher = teachers[family]
    pixels, _ = make_views(_photos(4), teacher.spec)
    batch = teacher.extract(pixels)
    alone = teacher.extract(pixels[2:3])
    assert (batch.dense[2:3] - alone.dense).abs().max().item() <= 1e-5
    assert (batch.summary[2:3] - alone.summary).abs().max().item() <= 1e-5
    split = teacher.extract(pixels, batch_size=3)
    assert (split.dense - batch.dense).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_round_trips_through_view_attrs(family, teachers):
    spec = teachers[family].spec
    view = ViewSpec(key=spec.view_key(), grid=spec.grid(), channels=spec.channels,
                    summary_channels=spec.summary_channels, input_size=spec.input_size, teacher=spec.to_dict())
    attrs = json.loads(json.dumps(view.to_dict()))  # what zarr stores
    assert TeacherSpec.from_dict(ViewSpec.from_dict(attrs).teacher) == spec
    assert spec.weights_hash.startswith("sha256:") and spec.family == family


@pytest.mark.parametrize("family", FAMILIES)
def test_preprocessing_equals_an_independent_resize_and_normalize(family, teachers):
    spec = teachers[family].spec
    image = _photos(1)[0]
    pixels, _ = make_views([image], spec)
    x = image[None].double() / 255
    ref = F.interpolate(x, size=spec.input_size, mode=spec.resize, align_corners=False, antialias=True)
    ref = (ref - torch.tensor(spec.mean, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)
    assert (pixels.double() - ref).abs().max().item() < 1e-4  # float32 vs a float64 reference
    # Pillow's bilinear resize (what the HF processors call): an implementation featcache does not share
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[spec.resize]
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize(spec.input_size[::-1], resample)
    pil = torch.from_numpy(np.array(pil)).permute(2, 0, 1).double() / 255
    std, mean = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (spec.std, spec.mean))
    assert (pixels[0].double() * std + mean - pil).abs().mean().item() < 0.01
