"""The student ViT: any-resolution shapes, CLS order, ViTDet windows, config round trips, FLOPs, gradients."""

from __future__ import annotations

import json
import math

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
    h, w = 12, 18
    x = torch.randn(2, h * w, 32)  # patch tokens only: a windowed block takes the prefix out
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    win = (rows // 6 * 100 + cols // 6).flatten()
    qkv = attn.qkv(x).view(2, -1, 3, 4, 8).permute(2, 0, 3, 1, 4)
    ref = attn.proj(torch.nn.functional.scaled_dot_product_attention(*qkv, attn_mask=win[:, None] == win[None, :])
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


def _tokens_into(module, model, pixels: torch.Tensor) -> torch.Tensor:
    """The tokens (B, T, D) that ``module`` (a block of ``model`` or its final norm) receives for ``pixels``."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(pixels)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("global_blocks", [(), (2,)], ids=["all-windowed", "global-last"])
def test_windowed_blocks_keep_each_window_and_the_prefix_to_themselves(global_blocks):
    """RADIO's ViTDet: up to the first global block, a window's tokens depend on its own pixels only, and
    the CLS and register tokens sit the windowed blocks out: they leave them as they came in."""
    model = _student(patch=4, vitdet_window_size=6, global_blocks=global_blocks, heads=HEADS, depth=3)
    after_windows = model.blocks[2] if global_blocks else model.norm
    p, x = model.num_prefix, _pixels(48, 72, b=1)  # 12 x 18 tokens: windows of 6 x 6 tokens = 24 x 24 px
    y = x.clone()
    y[..., 24:48, 48:72] += 1.0  # window A: the bottom-right one
    a, b = _tokens_into(after_windows, model, x), _tokens_into(after_windows, model, y)
    change = (a[:, p:] - b[:, p:]).unflatten(1, (12, 18)).abs()
    assert change[:, 6:, 12:].min() > 0 and change[:, :6].max() == 0 and change[:, :, :12].max() == 0
    prefix = torch.cat([model.cls_tokens, model.register_tokens], dim=1)
    assert torch.equal(a[:, :p], prefix) and torch.equal(b[:, :p], prefix)
    with torch.no_grad():  # nor do the patch tokens read the prefix in a windowed block
        model.cls_tokens.add_(1.0)
        model.register_tokens.add_(1.0)
    assert torch.equal(_tokens_into(after_windows, model, x)[:, p:], a[:, p:])


def test_the_prefix_reads_every_window_in_a_global_block():
    model = _student(patch=4, vitdet_window_size=6, global_blocks=(1,), heads=HEADS, depth=3)
    x = _pixels(48, 72, b=1)
    y = x.clone()
    y[..., :24, :24] += 1.0
    p, a, b = model.num_prefix, _tokens_into(model.blocks[2], model, x), _tokens_into(model.blocks[2], model, y)
    assert (a[:, :p] - b[:, :p]).abs().amin(dim=-1).min() > 0  # every CLS and register token saw the change


def _position_added(model, grid: tuple[int, int], batch: int = 1) -> torch.Tensor:
    """What the student adds to its patch tokens at ``grid``, as (B, D, h, w): with the patch embedding
    zeroed, the patch tokens entering the first block are exactly the position encoding."""
    with torch.no_grad():
        model.patch_embed.weight.zero_()
        model.patch_embed.bias.zero_()
    p = model.cfg.patch
    tokens = _tokens_into(model.blocks[0], model, torch.zeros(batch, 3, grid[0] * p, grid[1] * p))
    return tokens[:, model.num_prefix:].transpose(1, 2).unflatten(2, grid)


def _radio_inference_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """RADIO's CPE at inference (ViTPatchGenerator._get_pos_embeddings, eval): the table as it is at its own
    grid; otherwise resized bilinearly (corners aligned) to a square of the grid's longest side, top-left crop."""
    if tuple(table.shape[-2:]) == grid:
        return table
    side = max(grid)
    square = torch.nn.functional.interpolate(table, size=(side, side), mode="bilinear", align_corners=True)
    return square[..., :grid[0], :grid[1]]


@pytest.mark.parametrize("pos_grid", [(5, 5), (4, 6)])
@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (6, 2), (8, 3), (5, 5), (4, 6)])
def test_cpe_at_inference_is_radio_s_square_resize_and_top_left_crop(pos_grid, grid):
    model = _student(patch=4, pos_grid=pos_grid, heads=HEADS[:1])
    want = _radio_inference_table(model.pos_embed.detach(), grid)
    torch.testing.assert_close(_position_added(model, grid), want, rtol=0, atol=1e-6)


def _bilinear(table: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """(D, H, W) sampled at rows ``ys`` x columns ``xs`` (in table cells, inside the table) -> (D, h, w)."""
    (height, width), y0, x0 = table.shape[-2:], ys.floor().long(), xs.floor().long()
    y1, x1 = (y0 + 1).clamp(max=height - 1), (x0 + 1).clamp(max=width - 1)
    fy, fx = (ys - y0)[:, None], xs - x0
    rows = [table[:, r] for r in (y0.clamp(max=height - 1), y1)]
    top, bottom = (r[:, :, x0] * (1 - fx) + r[:, :, x1] * fx for r in rows)
    return top * (1 - fy) + bottom * fy


def _radio_training_table(table: torch.Tensor, grid: tuple[int, int], batch: int) -> torch.Tensor:
    """RADIO's CPE in training (ViTPatchGenerator._get_pos_embeddings, training), written out: per image a
    random rectangle of the table — area scale^2 with scale uniform in [sqrt(0.1), 1], aspect log-uniform in
    [3/4, 4/3] (width x aspect, height / aspect, clamped to the table), corner uniform where it fits — sampled
    bilinearly on h x w points from corner to corner. Drawn from the global RNG: scales, aspects, corners."""
    lo, log_aspect = 0.1 ** 0.5, math.log(4 / 3)
    scale = torch.rand(batch) * (1 - lo) + lo
    aspect = torch.exp(torch.rand(batch) * 2 * log_aspect - log_aspect)
    size = torch.stack([scale * aspect, scale / aspect], dim=-1).clamp(0, 1)  # (x, y) in table fractions
    corner = torch.rand(batch, 2) * (1 - size)
    (h, w), (height, width) = grid, table.shape[-2:]
    out = []
    for (cx, cy), (sx, sy) in zip(corner.tolist(), size.tolist()):
        ys = (cy + sy * torch.linspace(0, 1, h)) * (height - 1)
        xs = (cx + sx * torch.linspace(0, 1, w)) * (width - 1)
        out.append(_bilinear(table[0], ys, xs))
    return torch.stack(out)


@pytest.mark.parametrize("pos_grid, grid", [((5, 5), (3, 5)), ((4, 6), (6, 2)), ((4, 6), (8, 8))])
def test_cpe_in_training_is_radio_s_random_crop_of_the_table(pos_grid, grid):
    model = _student(patch=4, pos_grid=pos_grid, heads=HEADS[:1]).train()
    torch.manual_seed(7)
    first = _position_added(model, grid, batch=3)
    torch.manual_seed(7)
    want = _radio_training_table(model.pos_embed.detach(), grid, 3)
    torch.testing.assert_close(first, want, rtol=0, atol=1e-5)
    assert not torch.allclose(first[0], first[1], atol=1e-3)  # each image its own crop
    assert not torch.allclose(first, _position_added(model, grid, batch=3), atol=1e-3)  # and each draw
    torch.manual_seed(7)
    assert torch.equal(_position_added(model, grid, batch=3), first)  # seeded: reproducible
    at_own_grid = _position_added(model, pos_grid, batch=2)
    assert torch.equal(at_own_grid, model.pos_embed.detach().expand(2, -1, -1, -1))  # as RADIO: no crop there


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
