"""Loading through the real path: checked keys, the SAM3 video layout, and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from featcache.errors import TeacherLoadError, UsageError
from featcache.teachers.views import make_views
from featcache.teachers import create_teacher
from tests.support.teachers import VIT_PREPROCESSOR, save_dinov3, save_sam3_video_layout, save_siglip, save_vit


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_sam3_video_layout_loads_the_trunk_weights(tmp_path):
    folder, original = save_sam3_video_layout(tmp_path / "sam3", seed=7)
    teacher = create_teacher("sam3", str(folder))
    loaded, saved = _state(teacher.model), _state(original)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    torch.manual_seed(123)  # what a load that silently skipped the weights would leave behind
    fresh = type(original)(original.config)
    assert any(not torch.equal(fresh.state_dict()[k], saved[k]) for k in saved if "weight" in k)


def test_sam3_missing_trunk_weight_fails_loudly(tmp_path):
    folder, _ = save_sam3_video_layout(tmp_path / "sam3")
    weights = load_file(folder / "model.safetensors")
    del weights["detector_model.vision_encoder.backbone.layers.1.mlp.fc1.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TeacherLoadError, match="1 missing weights .*layers.1.mlp.fc1.weight"):
        create_teacher("sam3", str(folder))


def test_unexpected_weight_fails_loudly(tmp_path):
    folder, _ = save_dinov3(tmp_path / "dino")
    weights = load_file(folder / "model.safetensors")
    weights["layer.7.extra.weight"] = torch.zeros(3)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TeacherLoadError, match="unexpected weights"):
        create_teacher("dinov3", str(folder))


def test_siglip_full_checkpoint_ignores_only_the_text_tower(tmp_path):
    folder, vision = save_siglip(tmp_path / "siglip", full=True, seed=3)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "siglip"
    teacher = create_teacher("siglip2", str(folder))
    pixels = torch.randn(2, 3, 64, 64)
    want = vision(pixel_values=pixels).last_hidden_state.reshape(2, 4, 4, -1)
    assert (teacher.extract(pixels).dense - want).abs().max().item() <= 1e-5


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(UsageError, match="unknown teacher family 'clip'; known families: dinov3, sam3, siglip2, vit"):
        create_teacher("clip", "/x")


def test_missing_directory(tmp_path):
    with pytest.raises(TeacherLoadError, match="no such model directory"):
        create_teacher("dinov3", str(tmp_path / "nope"))


def test_directory_of_another_model_type(tmp_path):
    folder, _ = save_dinov3(tmp_path / "dino")
    with pytest.raises(TeacherLoadError, match="holds a 'dinov3_vit' model, not one the siglip2 family loads"):
        create_teacher("siglip2", str(folder))


def test_corrupt_safetensors(tmp_path):
    folder, _ = save_dinov3(tmp_path / "dino")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(TeacherLoadError, match="cannot load weights"):
        create_teacher("dinov3", str(folder))


def test_pickled_weights_are_never_loaded(tmp_path):
    folder, _ = save_dinov3(tmp_path / "dino")
    shutil.move(folder / "model.safetensors", folder / "pytorch_model.bin")
    with pytest.raises(TeacherLoadError, match="no .safetensors weights"):
        create_teacher("dinov3", str(folder))


def test_sam3_refuses_other_input_sizes(tmp_path):
    folder, _ = save_sam3_video_layout(tmp_path / "sam3")
    teacher = create_teacher("sam3", str(folder))
    with pytest.raises(UsageError, match="sam3 takes only 112x112 inputs, not 224x224"):
        teacher.extract(torch.zeros(1, 3, 224, 224))
    with pytest.raises(UsageError, match="takes only 112x112"):
        make_views([torch.zeros(3, 50, 60, dtype=torch.uint8)], teacher.spec, size=(98, 98))


def test_dinov3_takes_any_multiple_of_its_patch(tmp_path):
    folder, _ = save_dinov3(tmp_path / "dino")
    teacher = create_teacher("dinov3", str(folder))
    assert teacher.extract(torch.zeros(1, 3, 48, 80)).dense.shape == (1, 3, 5, 32)
    with pytest.raises(UsageError, match="multiples of its patch 16"):
        teacher.extract(torch.zeros(1, 3, 50, 80))


def test_errors_are_one_line(tmp_path):
    script = "from featcache.teachers import create_teacher; create_teacher('dinov3', '/no/such/dir')"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "TeacherLoadError: no such model directory: /no/such/dir" in proc.stderr.strip().splitlines()[-1]


def test_vit_takes_normalization_from_the_preprocessor_config(tmp_path):
    folder, _ = save_vit(tmp_path / "vit")
    spec = create_teacher("vit", str(folder)).spec
    assert spec.mean == tuple(VIT_PREPROCESSOR["image_mean"]) and spec.std == tuple(VIT_PREPROCESSOR["image_std"])
    assert spec.resize == "bicubic" and spec.model_type == "vit" and spec.prefix_tokens == 1
    assert (spec.input_size, spec.patch_size, spec.size_rule) == ((32, 32), 8, "fixed")


def test_vit_without_preprocessor_config_is_refused_not_guessed(tmp_path):
    folder, _ = save_vit(tmp_path / "vit", preprocessor=None)
    with pytest.raises(TeacherLoadError, match="no preprocessor_config.json.*will not guess"):
        create_teacher("vit", str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5]}))
    with pytest.raises(TeacherLoadError, match="does not give three-channel image_mean and image_std"):
        create_teacher("vit", str(folder))


def test_vit_refuses_models_without_patch_tokens(tmp_path):
    folder, _ = save_siglip(tmp_path / "siglip", full=True)  # two towers: no top-level patch_size
    with pytest.raises(TeacherLoadError, match="without an integer patch_size and image_size"):
        create_teacher("vit", str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    with pytest.raises(TeacherLoadError, match="'no_such_model' is not one transformers knows"):
        create_teacher("vit", str(folder))


def test_loading_leaves_transformers_verbosity_as_the_caller_set_it(tmp_path):
    """featcache quiets transformers while it loads, and restores the caller's settings afterwards."""
    from transformers.utils import logging as hf_logging

    folder, _ = save_dinov3(tmp_path / "d")
    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    try:
        create_teacher("dinov3", str(folder))
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity_warning()


@pytest.mark.parametrize("family, save", [("siglip2", save_siglip), ("dinov3", save_dinov3)])
def test_weights_load_straight_into_bfloat16_for_cuda(tmp_path, family, save):
    """On CUDA a teacher's weights are created in bfloat16 as they are read (no float32 copy of a 7B
    model); every one equals the saved float32 weight rounded to bfloat16."""
    from featcache.teachers import family_class, loading
    from featcache.teachers.base import weights_dtype

    assert weights_dtype("cuda") == torch.bfloat16 and weights_dtype("cpu") == torch.float32
    folder, saved = save(tmp_path / family)
    cls = family_class(family)
    directory, config = cls._open(str(folder), None)
    setup = cls._model_setup(directory, config)
    model = loading.load_checked(setup.model_cls, directory, setup.config, key_mapping=setup.key_mapping,
                                 ignorable=setup.ignorable, dtype=torch.bfloat16)
    want = saved.state_dict()
    params = dict(model.named_parameters())
    assert params and all(p.dtype == torch.bfloat16 for p in params.values())
    for name, p in params.items():
        assert torch.equal(p, want[name].to(torch.bfloat16)), name
