"""The student ViT: any-resolution shapes, CLS order, ViTDet windows, config round trips, FLOPs, gradients."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from torch.utils.flop_counter import FlopCounterMode

from featcache.errors import UsageError
from featcache.train.student import SIZES, StudentConfig, TeacherHead, build_student
from featcache.train.student import Attention

HEADS = [TeacherHead("siglip", 12, 10), TeacherHead("sam", 6, 0), TeacherHead("dino", 8, 5),
         TeacherHead("clip", 0, 7)]


def _student(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_student(StudentConfig(**{"size": "micro", **kw})).eval()


def _pixels(h: int, w: int, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("heads", [HEADS[1:2], HEADS[:2], HEADS], ids=["0-summary", "1-summary", "3-summary"])
@pytest.mark.parametrize("size", [(64, 64), (48, 80), (112, 32)])
def test_output_shapes_at_any_resolution(heads, size):
    model = _student(heads=heads, registers=2, pos_grid=(5, 7))
    out = model(_pixels(*size))
    h, w = size[0] // 16, size[1] // 16
    assert out.grid == (h, w) and out.features.shape == (2, h, w, 64)
    assert {k: tuple(v.shape) for k, v in out.summary.items()} == {
        t.name: (2, t.summary_channels) for t in heads if t.summary_channels}
    assert {k: tuple(v.shape) for k, v in out.dense.items()} == {
        t.name: (2, h, w, t.dense_channels) for t in heads if t.dense_channels}
    assert model.num_prefix == 2 + sum(t.summary_channels > 0 for t in heads)


def test_each_summary_head_reads_its_own_cls_token():
    model = _student(heads=HEADS, registers=3)
    with torch.no_grad():  # no attention: tokens cannot mix, so a CLS token only reaches its own head
        for block in model.blocks:
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
    x = _pixels(32, 48)
    before = model(x)
    names = [t.name for t in HEADS if t.summary_channels]
    assert names == ["siglip", "dino", "clip"]
    original = model.cls_tokens.detach().clone()
    for i, name in enumerate(names):
        with torch.no_grad():
            model.cls_tokens.copy_(original)
            model.cls_tokens[0, i] += 1.0
            after = model(x)
        changed = {k for k in names if not torch.equal(before.summary[k], after.summary[k])}
        assert changed == {name}
        assert all(torch.equal(before.dense[k], after.dense[k]) for k in before.dense)


def test_windowed_attention_equals_global_attention_under_the_vitdet_mask():
    torch.manual_seed(0)
    attn = Attention(32, 4, window=6).eval()
    h, w, p = 12, 18, 3
    x = torch.randn(2, p + h * w, 32)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    win = torch.cat([torch.full((p,), -1), (rows // 6 * 100 + cols // 6).flatten()])
    mask = (win[:, None] == win[None, :]) | ((win[:, None] >= 0) & (win[None, :] < 0))
    qkv = attn.qkv(x).view(2, -1, 3, 4, 8).permute(2, 0, 3, 1, 4)
    ref = attn.proj(torch.nn.functional.scaled_dot_product_attention(*qkv, attn_mask=mask)
                    .transpose(1, 2).reshape(x.shape))
    torch.testing.assert_close(attn(x, (h, w)), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("global_blocks, isolated", [((), True), ((1,), False)])
def test_vitdet_windows_do_not_see_each_other_without_a_global_block(global_blocks, isolated):
    model = _student(patch=4, vitdet_window_size=6, global_blocks=global_blocks, heads=HEADS, depth=3)
    x = _pixels(48, 72, b=1)  # 12 x 18 tokens: windows of 6 x 6 tokens = 24 x 24 px
    y = x.clone()
    y[..., 24:48, 48:72] += 1.0  # the bottom-right window only
    a, b = model(x).features, model(y).features
    assert (a[:, 6:, 12:] - b[:, 6:, 12:]).abs().max() > 1e-2
    others = (a - b)[:, :6].abs().max().item(), (a - b)[:, :, :12].abs().max().item()
    if isolated:
        assert max(others) == 0.0
    else:
        assert min(others) > 1e-3


def test_inputs_that_do_not_tile_name_the_sizes_that_would():
    model = _student(patch=4, vitdet_window_size=6)
    with pytest.raises(UsageError, match=r"window size times the patch must divide.*24 px.*48x48 or 48x72"):
        model(_pixels(48, 52))
    with pytest.raises(UsageError, match=r"not a multiple of the patch 16 px.*48x48 or 64x64"):
        _student()(_pixels(50, 60))
    assert model.token_grid(72, 48) == (18, 12)


def test_default_global_blocks_close_each_quarter():
    assert StudentConfig(vitdet_window_size=16).global_block_indices() == (2, 5, 8, 11)
    assert StudentConfig("huge", vitdet_window_size=8).global_block_indices() == (7, 15, 23, 31)
    assert StudentConfig("small").global_block_indices() == tuple(range(12))


def test_config_round_trips_through_json():
    cfg = StudentConfig("large", depth=6, num_heads=8, patch=14, registers=2, pos_grid=(24, 16),
                        vitdet_window_size=12, global_blocks=(1, 5), drop_path=0.1, heads=HEADS, adaptor_hidden=96)
    back = StudentConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.heads[2] == TeacherHead("dino", 8, 5)
    assert StudentConfig.from_dict(StudentConfig().to_dict()) == StudentConfig()
    assert "width" not in StudentConfig().to_dict()  # unset overrides stay unset (TOML has no null)


@pytest.mark.parametrize("kwargs, message", [
    (dict(size="gigantic"), "unknown student size 'gigantic'; known sizes: " + ", ".join(SIZES)),
    (dict(vitdet_window_size=4), "vitdet_window_size 4 is outside 6-32"),
    (dict(vitdet_window_size=40), "vitdet_window_size 40 is outside 6-32"),
    (dict(global_blocks=(1,)), "global_blocks needs vitdet_window_size"),
    (dict(vitdet_window_size=8, global_blocks=(12,)), r"global_blocks \(12,\) must be block indices in 0..11"),
    (dict(width=100, num_heads=3), "width 100 must be a positive multiple of num_heads 3"),
    (dict(heads=[TeacherHead("a", 1), TeacherHead("a", 2)]), "names must be unique"),
    (dict(registers=-1), r"need registers >= 0 \(got -1\)"),
])
def test_bad_configs_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        StudentConfig(**kwargs)


def test_unknown_keys_are_usage_errors():
    with pytest.raises(UsageError, match=r"unknown student config keys \['windows'\]"):
        StudentConfig.from_dict({"windows": 8})
    with pytest.raises(UsageError, match=r"unknown teacher head keys \['dims'\]"):
        StudentConfig.from_dict({"heads": [{"name": "a", "dims": 3}]})


def test_state_dict_round_trips_through_safetensors(tmp_path):
    kw = dict(heads=HEADS, vitdet_window_size=6, patch=8, registers=0)
    model, other = _student(seed=0, **kw), _student(seed=1, **kw)
    safetensors.torch.save_file(model.state_dict(), tmp_path / "w.safetensors")
    other.load_state_dict(safetensors.torch.load_file(tmp_path / "w.safetensors"), strict=True)
    x = _pixels(48, 96)
    a, b = model(x), other(x)
    assert torch.equal(a.features, b.features)
    assert all(torch.equal(a.summary[k], b.summary[k]) for k in a.summary)
    assert all(torch.equal(a.dense[k], b.dense[k]) for k in a.dense)


WINDOWED = dict(vitdet_window_size=6, depth=4, global_blocks=(3,), registers=16)  # the prefix matters in windows


@pytest.mark.parametrize("kwargs, size", [(dict(), (64, 96)), (WINDOWED, (96, 192))])
def test_num_flops_matches_the_flop_counter(kwargs, size):
    cfg = StudentConfig("micro", heads=HEADS, adaptor_hidden=48, **kwargs)
    with torch.device("meta"):  # on the CPU the counter does not see scaled_dot_product_attention
        model = build_student(cfg)
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, *size))
    counted = counter.get_total_flops()
    assert abs(model.num_flops(*size) - counted) <= 0.02 * counted


def test_gradients_reach_embeddings_and_every_adaptor():
    model = _student(heads=HEADS, vitdet_window_size=6, patch=4, drop_path=0.2).train()
    out = model(_pixels(24, 48))
    loss = sum(v.square().mean() for v in [*out.summary.values(), *out.dense.values()])
    loss.backward()
    named = dict(model.named_parameters())
    for name in ["patch_embed.weight", "pos_embed", "cls_tokens", "register_tokens"]:
        assert named[name].grad.abs().sum() > 0, name
    adaptors = [n for n in named if n.startswith(("summary_adaptors.", "dense_adaptors."))]
    assert len(adaptors) == 4 * (3 + 3)
    assert all(named[n].grad.abs().sum() > 0 for n in adaptors)
