"""The distillation losses, DAMP and the EMA against hand-computed values and independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from featcache import geometry
from featcache.errors import UsageError
from featcache.train.ema import EMA
from featcache.train.losses import angle_loss, damp_call, mesa_loss, spatial_mse
from featcache.train.losses.damp import damped_names

# ---------------------------------------------------------------- spatial MSE


def _spatial_loop(pred, target, omega) -> float:
    """The definition, one cell at a time."""
    per_image = []
    for b in range(pred.shape[0]):
        cells = [((pred[b, i, j] - target[b, i, j]) ** 2).mean().item()
                 for i in range(pred.shape[1]) for j in range(pred.shape[2]) if omega[b, i, j]]
        if cells:
            per_image.append(sum(cells) / len(cells))
    return sum(per_image) / len(per_image) if per_image else 0.0


def test_spatial_mse_hand_computed_partial_omega_and_an_empty_image():
    pred = torch.zeros(3, 2, 2, 2)
    pred[2] = 1.0
    target = torch.zeros(3, 2, 2, 2)
    target[0, 0, 0] = torch.tensor([1.0, 3.0])  # (1 + 9) / 2 = 5
    target[0, 0, 1] = torch.tensor([2.0, 2.0])  # (4 + 4) / 2 = 4
    target[0, 1, 0] = 100.0  # outside Ω
    target[0, 1, 1] = float("nan")  # outside Ω: no teacher value there
    target[1] = 7.0  # image 1 has an empty Ω: excluded from the mean
    target[2, 1, 1] = 1.0  # cells 1, 1, 1, 0 -> 0.75
    omega = torch.tensor([[[True, True], [False, False]],
                          [[False, False], [False, False]],
                          [[True, True], [True, True]]])
    pred.requires_grad_(True)
    loss = spatial_mse(pred, target, omega)
    assert loss.item() == pytest.approx((4.5 + 0.75) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(_spatial_loop(pred.detach(), target, omega), abs=1e-6)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    # d/dpred[0,0,0,0] = 1/2 (images) · 1/2 (cells) · 1/2 (channels) · 2 (0 − 1)
    assert pred.grad[0, 0, 0, 0].item() == pytest.approx(-0.25)
    assert pred.grad[0, 1].abs().max() == 0 and pred.grad[1].abs().max() == 0


def test_spatial_mse_matches_the_loop_on_random_masks():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 3, 5, 6, generator=gen), torch.randn(4, 3, 5, 6, generator=gen)
    omega = torch.rand(4, 3, 5, generator=gen) > 0.4
    omega[1] = False
    assert spatial_mse(pred, target, omega).item() == pytest.approx(_spatial_loop(pred, target, omega), rel=1e-5)


def test_spatial_mse_with_no_common_cell_is_a_connected_zero():
    pred = torch.randn(2, 2, 3, 4, requires_grad=True)
    loss = spatial_mse(pred, torch.randn(2, 2, 3, 4), torch.zeros(2, 2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().max() == 0


def test_spatial_mse_refuses_bad_shapes():
    with pytest.raises(UsageError, match="pred and target"):
        spatial_mse(torch.zeros(1, 2, 2, 3), torch.zeros(1, 2, 2, 4), torch.ones(1, 2, 2, dtype=torch.bool))
    with pytest.raises(UsageError, match="omega"):
        spatial_mse(torch.zeros(1, 2, 2, 3), torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 2))


# ---------------------------------------------------------------- balanced summary (angle) loss

_CLAMP = 1 - 1e-7


def _t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("x, y, theta", [
    ((1.0, 0.0, 0.0), (0.0, 2.0, 0.0), math.pi / 2),  # orthogonal
    ((1.0, 2.0), (-3.0, -6.0), math.acos(-_CLAMP)),  # antiparallel: the clamp bounds Θ just below π
    ((2.0, 0.0), (1.0, math.sqrt(3.0)), math.pi / 3),  # 60°
    ((0.0, 5.0), (1.0, 1.0), math.pi / 4),  # 45°
])
def test_angle_loss_is_theta_squared_over_dispersion(x, y, theta):
    assert angle_loss(_t(x), _t(y), 0.5).item() == pytest.approx(theta ** 2 / 0.5, rel=1e-12)


def test_angle_loss_is_the_batch_mean_and_scale_invariant():
    x = _t((1.0, 0.0), (2.0, 0.0), (0.0, 5.0))
    y = _t((0.0, 1.0), (1.0, math.sqrt(3.0)), (1.0, 1.0))
    expected = ((math.pi / 2) ** 2 + (math.pi / 3) ** 2 + (math.pi / 4) ** 2) / 3 / 2.12
    assert angle_loss(x, y, 2.12).item() == pytest.approx(expected, rel=1e-12)
    assert angle_loss(7.0 * x, 0.01 * y, 2.12).item() == pytest.approx(expected, rel=1e-12)


def test_angle_loss_gradient_hand_computed_at_ninety_degrees():
    x = _t((1.0, 0.0)).requires_grad_(True)
    angle_loss(x, _t((0.0, 1.0)), 0.5).backward()
    # dΘ/dcos = −1/sin Θ = −1, dcos/dx = y/(‖x‖‖y‖) − cos·x/‖x‖² = (0, 1): dL/dx = 2Θ·(−1)·(0, 1)/Disp
    assert torch.allclose(x.grad, _t((0.0, -math.pi / 0.5)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_angle_loss_has_finite_gradients_when_parallel(dtype):
    y = torch.tensor([[0.3, -1.2, 2.0], [1.0, 1.0, 1.0]], dtype=dtype)
    x = torch.stack([y[0], 3.0 * y[1]]).clone().requires_grad_(True)
    loss = angle_loss(x, y, 0.694)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert 0 <= loss.item() <= math.acos(_CLAMP) ** 2 / 0.694 * 4  # Θ at most a few clamp widths


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "2.1", None])
def test_angle_loss_refuses_dispersion_that_is_not_positive(bad):
    with pytest.raises(UsageError, match="dispersion"):
        angle_loss(torch.ones(1, 2), torch.ones(1, 2), bad)


# ---------------------------------------------------------------- MESA


def _centres(box, grid, flip):
    """Footprint centres (X, Y) in source pixels of every cell of a crop resized to ``grid`` (DESIGN.md §3)."""
    (x0, y0, x1, y1), (h, w) = box, grid
    cols = np.arange(w)[::-1] if flip else np.arange(w)
    xs = x0 + (cols + 0.5) * (x1 - x0) / w
    ys = y0 + (np.arange(h) + 0.5) * (y1 - y0) / h
    return np.meshgrid(xs, ys)  # each (h, w)


def _sampled(field, box, grid, flip):
    """``field(X, Y) -> (h, w, D)`` evaluated at the crop's cell centres, as a float32 tensor."""
    return torch.tensor(field(*_centres(box, grid, flip)), dtype=torch.float32)


def _mesa_batch(field, crops):
    """Student and EMA features of the same field through each (student crop, EMA crop) pair."""
    x = torch.stack([_sampled(field, *s) for s, _ in crops])
    x_ema = torch.stack([_sampled(field, *e) for _, e in crops])
    maps = torch.tensor(np.stack([geometry.crop_to_crop_map(*e, *s).as_array() for s, e in crops]),
                        dtype=torch.float32)
    omega = torch.tensor(np.stack([geometry.omega(e[0], e[1], s[0], e[2]) for s, e in crops]))
    return x, x_ema, maps, omega


def _lattice_field(seed: int, cell: int = 8, size: int = 12, depth: int = 6):
    """A random field constant on the cells of an 8-pixel lattice: a crop aligned to it samples it exactly."""
    values = np.random.default_rng(seed).standard_normal((size, size, depth))
    return lambda xs, ys: values[(ys // cell).astype(int), (xs // cell).astype(int)]


# (box, grid, flip) for the student and the EMA student, both aligned to the 8-pixel lattice
_ALIGNED = [(((0, 0, 64, 64), (8, 8), True), ((16, 8, 80, 72), (8, 8), False)),
            (((8, 16, 72, 80), (8, 8), False), ((0, 0, 64, 64), (8, 8), True))]


def test_mesa_is_zero_for_the_same_field_through_two_aligned_crops():
    x, x_ema, maps, omega = _mesa_batch(_lattice_field(0), _ALIGNED)
    # Ω = EMA cells whose centre lies in the student's box: 7 rows × 6 columns, then 6 × 7 (flipped)
    assert omega[0].sum() == 42 and omega[0, :7, :6].all() and omega[1].sum() == 42 and omega[1, 2:, :7].all()
    assert mesa_loss(x, x_ema, maps, omega).item() < 1e-10
    swapped = torch.tensor(np.stack([geometry.crop_to_crop_map(*s, *e).as_array() for s, e in _ALIGNED]),
                           dtype=torch.float32)  # the map read the wrong way round: misaligned
    assert mesa_loss(x, x_ema, swapped, omega).item() > 0.1


def test_mesa_gradient_reaches_the_student_only_and_only_where_omega_sees_it():
    x, x_ema, maps, omega = _mesa_batch(_lattice_field(1), _ALIGNED[:1])
    x = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).requires_grad_(True)
    x_ema.requires_grad_(True)
    loss = mesa_loss(x, x_ema, maps, omega)
    loss.backward()
    assert loss.item() > 0 and x_ema.grad is None
    # EMA Ω rows 0..6, cols 0..5 see the student's rows 1..7 and (flipped) cols 5..0
    seen = torch.zeros(8, 8, dtype=torch.bool)
    seen[1:, :6] = True
    norms = x.grad[0].abs().sum(-1)
    assert norms[~seen].max() < 1e-6 * norms[seen].min()  # zero up to the rounding of sample positions


def _nearly_affine_layer_norm(xs, ys, k: float = 1e4):
    """A field whose layer norm is affine in (X, Y) to O((r/k)²): mean 0, variance ≈ k²/3 everywhere."""
    return np.stack([xs, -xs, ys, -ys, np.full_like(xs, k), np.full_like(xs, -k)], axis=-1)


def test_mesa_is_zero_for_the_same_field_through_scaled_flipped_crops():
    crops = [(((0, 0, 96, 64), (8, 12), False), ((20, 12, 76, 54), (3, 4), True)),  # EMA cells 1.75 student cells
             (((10, 4, 90, 60), (8, 12), True), ((25, 15, 70, 50), (3, 4), False))]
    x, x_ema, maps, omega = _mesa_batch(_nearly_affine_layer_norm, crops)
    assert omega.all()  # every EMA footprint lies inside the hull of the student's cell centres
    aligned = mesa_loss(x, x_ema, maps, omega).item()
    shifted = maps.clone()
    shifted[:, 1] += 2.0  # two student cells off
    misaligned = mesa_loss(x, x_ema, shifted, omega).item()
    assert misaligned > 1e-7 and aligned < 1e-5 * misaligned  # aligned: float32 rounding only (~5e-14)


def test_mesa_refuses_bad_shapes():
    with pytest.raises(UsageError, match="maps"):
        mesa_loss(torch.zeros(2, 3, 3, 4), torch.zeros(2, 2, 2, 4), torch.zeros(2, 3), torch.ones(2, 2, 2).bool())
    with pytest.raises(UsageError, match="x_ema"):
        mesa_loss(torch.zeros(2, 3, 3, 4), torch.zeros(2, 2, 2, 5), torch.zeros(2, 4), torch.ones(2, 2, 2).bool())


# ---------------------------------------------------------------- DAMP


class _Student(nn.Module):
    """Every kind of layer DAMP must tell apart: conv, linear, norm, embedding, free tokens."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 4, kernel_size=2, stride=2)
        self.tokens = nn.Parameter(torch.randn(1, 1, 4))
        self.embed = nn.Embedding(5, 4)
        self.norm = nn.LayerNorm(4)
        self.blocks = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4, bias=False))

    def forward(self, image, ids):
        x = self.patch(image).flatten(2).transpose(1, 2) + self.embed(ids)
        return self.blocks(self.norm(torch.cat([self.tokens.expand(len(x), -1, -1), x], dim=1)))


def _inputs():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 4, 4, generator=gen), torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1]])


def test_damp_perturbs_only_linear_and_conv_weights():
    torch.manual_seed(0)
    assert damped_names(_Student()) == ["patch.weight", "blocks.0.weight", "blocks.2.weight"]
    torch.manual_seed(0)
    lookup = nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4)).train()
    ids = torch.tensor([0, 4, 2])
    assert torch.equal(damp_call(lookup, 0.5, ids), lookup(ids))  # nothing to perturb
    zero = nn.Linear(3, 2).train()
    nn.init.zeros_(zero.weight)
    assert torch.equal(damp_call(zero, 0.5, torch.randn(4, 3)), zero.bias.expand(4, 2))  # the bias stays clean


def test_damp_is_off_in_eval_and_at_sigma_zero_and_noisy_in_training():
    torch.manual_seed(0)
    model, (image, ids) = _Student(), _inputs()
    clean = model(image, ids)
    assert torch.equal(damp_call(model, 0.0, image, ids), clean)
    assert torch.equal(damp_call(model.eval(), 0.3, image, ids=ids), clean)
    model.train()
    a, b = damp_call(model, 0.3, image, ids), damp_call(model, 0.3, image, ids)
    assert (a - clean).abs().max() > 1e-3 and (a - b).abs().max() > 1e-3
    again = [damp_call(model, 0.3, image, ids, generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(*again)
    with pytest.raises(UsageError, match="sigma"):
        damp_call(model, -0.1, image, ids)


def test_damp_noise_averages_to_the_clean_output():
    torch.manual_seed(0)
    layer, x, sigma, n = nn.Linear(16, 3).train(), torch.randn(1, 16), 0.2, 4000
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        clean = layer(x)
        outs = torch.stack([damp_call(layer, sigma, x, generator=gen) for _ in range(n)])
    # each output is clean + σ Σ_i W_oi ε_oi x_i: standard deviation σ ‖W_o ⊙ x‖
    std = sigma * (layer.weight * x).norm(dim=1)
    assert torch.allclose(outs.std(dim=0)[0], std, rtol=0.1)
    assert ((outs.mean(dim=0) - clean).abs()[0] < 4 * std / math.sqrt(n)).all()


def test_damp_output_and_gradients_match_an_independent_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).train()
    image, sigma = torch.randn(2, 2, 4, 4), 0.25
    out = damp_call(model, sigma, image, generator=torch.Generator().manual_seed(11))
    out.square().sum().backward()
    # the same draws, in damped_names order (the conv, then the linear layer)
    gen = torch.Generator().manual_seed(11)
    scale = [1 + sigma * torch.randn(model[0].weight.shape, generator=gen),
             1 + sigma * torch.randn(model[2].weight.shape, generator=gen)]
    noisy = [(model[0].weight * scale[0]).detach().requires_grad_(True),
             (model[2].weight * scale[1]).detach().requires_grad_(True)]
    expected = F.linear(F.conv2d(image, noisy[0], model[0].bias, padding=1).flatten(1), noisy[1], model[2].bias)
    assert torch.allclose(out, expected, atol=1e-6)
    expected.square().sum().backward()
    assert torch.allclose(model[0].weight.grad, scale[0] * noisy[0].grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(model[2].weight.grad, scale[1] * noisy[1].grad, rtol=1e-5, atol=1e-6)
    assert model[0].weight.grad.abs().min() > 0  # the clean weights did get a gradient


def test_damp_leaves_the_module_unchanged():
    torch.manual_seed(0)
    model, (image, ids) = _Student().train(), _inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    damp_call(model, 0.5, image, ids).sum().backward()
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not hasattr(model.blocks[0], "parametrizations")


# ---------------------------------------------------------------- EMA


def _ema_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False))


def _fill(model: nn.Module, start: float) -> None:
    """Dyadic values (multiples of 1/4): every EMA step with decay 0.75 is exact in float32."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(start + i + torch.arange(p.numel()).reshape(p.shape) / 4)


def test_ema_update_is_the_exact_convex_combination():
    model = _ema_model()
    _fill(model, 0.0)
    ema = EMA(model)
    assert all(torch.equal(e, p) and e is not p and not e.requires_grad
               for e, p in zip(ema.module.parameters(), model.parameters()))
    old = [p.detach().clone() for p in ema.module.parameters()]
    _fill(model, 8.0)
    model.train()(torch.randn(5, 3))  # moves BatchNorm's running statistics
    assert not torch.equal(ema.module[1].running_mean, model[1].running_mean)
    ema.update(model, 0.75)
    for e, o, p in zip(ema.module.parameters(), old, model.parameters()):
        assert torch.equal(e, 0.75 * o + 0.25 * p.detach())
    for e, b in zip(ema.module.buffers(), model.buffers()):
        assert torch.equal(e, b)
    with pytest.raises(UsageError, match="decay"):
        ema.update(model, 1.5)


def test_ema_update_on_random_weights():
    torch.manual_seed(0)
    model = _ema_model()
    ema = EMA(model)
    old = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model, 0.999)
    for e, o, p in zip(ema.module.parameters(), old, model.parameters()):
        assert torch.allclose(e, 0.999 * o + 0.001 * p.detach(), rtol=0, atol=1e-6)
        assert not torch.equal(e, o)


def test_ema_state_dict_round_trip_through_safetensors():
    torch.manual_seed(0)
    model = _ema_model()
    ema = EMA(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model, 0.5)
    state = ema.state_dict()
    assert list(state) == list(model.state_dict())
    restored = EMA(_ema_model())
    restored.load_state_dict(load_safetensors(save_safetensors(state)))
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), state.values()))
    image = torch.randn(4, 3)
    assert torch.equal(restored.module(image), ema.module(image))
