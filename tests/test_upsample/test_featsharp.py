"""FeatSharp's parts against independent computations: JBU and local attention against explicit
loops, tiling against a patch-local teacher on the whole canvas, an untrained fuser, memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from featcache.teachers import create_teacher
from featcache.upsample.featsharp import JBU, FeatSharp, FeatSharpConfig, LocalAttention, assemble, split
from featcache.upsample.run import canvases, teacher_batch, teacher_maps
from tests.support.images import photo_tensors
from tests.support.teachers import save_patch_local


def _jbu_reference(jbu: JBU, low: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """ALGORITHMS.md §7 with explicit loops over output pixels p and window offsets q."""
    H, W = g.shape[-2:]
    up = F.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)
    k = jbu.keys(g)
    r, n = jbu.window // 2, jbu.window
    d = torch.linspace(-1, 1, n)
    sigma2 = math.exp(2 * jbu.log_sigma.item())
    out = torch.zeros_like(up)
    for b in range(len(g)):
        for y in range(H):
            for x in range(W):
                terms = []
                for i in range(n):
                    for j in range(n):
                        qy, qx = y + i - r, x + j - r
                        if 0 <= qy < H and 0 <= qx < W:
                            logit = math.exp(jbu.tau.item()) * float(k[b, :, y, x] @ k[b, :, qy, qx])
                            s = math.exp(-(d[i] ** 2 + d[j] ** 2).item() / (2 * sigma2))
                            terms.append((logit, s, up[b, :, qy, qx]))
                top = max(t[0] for t in terms)
                rs = [math.exp(t[0] - top) for t in terms]
                total_r = sum(rs)
                w = [rr / total_r * s for rr, (_, s, _) in zip(rs, terms)]
                out[b, :, y, x] = sum(wi * t[2] for wi, t in zip(w, terms)) / sum(w)
    return out


def test_jbu_equals_explicit_loops_over_pixels_and_offsets():
    torch.manual_seed(0)
    jbu = JBU(window=7, key_dim=8)
    with torch.no_grad():
        jbu.log_sigma.fill_(-0.3)
        jbu.tau.fill_(0.7)
    low, g = torch.randn(2, 5, 3, 4), torch.randn(2, 3, 9, 12)  # factor 3; windows cross every edge
    with torch.no_grad():
        assert (jbu(low, g) - _jbu_reference(jbu, low, g)).abs().max().item() <= 1e-5


def _attention_reference(attn: LocalAttention, x: torch.Tensor) -> torch.Tensor:
    b, H, W, D = x.shape
    hd, r = D // attn.heads, attn.window // 2
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    out = torch.zeros_like(x)
    for bb in range(b):
        for y in range(H):
            for xx in range(W):
                cells = [(qy, qx) for qy in range(y - r, y + r + 1) for qx in range(xx - r, xx + r + 1)
                         if 0 <= qy < H and 0 <= qx < W]
                for h in range(attn.heads):
                    s = slice(h * hd, (h + 1) * hd)
                    logits = torch.stack([q[bb, y, xx, s] @ k[bb, qy, qx, s] for qy, qx in cells]) / math.sqrt(hd)
                    p = torch.softmax(logits, 0)
                    out[bb, y, xx, s] = sum(pi * v[bb, qy, qx, s] for pi, (qy, qx) in zip(p, cells))
    return attn.proj(out)


def test_local_attention_equals_explicit_loops():
    torch.manual_seed(1)
    attn = LocalAttention(dim=8, heads=2, window=3)
    x = torch.randn(1, 5, 6, 8)
    with torch.no_grad():
        assert (attn(x) - _attention_reference(attn, x)).abs().max().item() <= 1e-5


def test_tiles_split_and_assemble_are_inverse_and_row_major():
    canvas = torch.arange(2 * 3 * 6 * 9, dtype=torch.float32).reshape(2, 3, 6, 9)
    tiles = split(canvas, 3)
    assert tiles.shape == (18, 3, 2, 3)
    assert torch.equal(tiles[9 + 1 * 3 + 2], canvas[1, :, 2:4, 6:9])  # canvas 1, tile row 1, column 2
    assert torch.equal(assemble(tiles, 3), canvas)


@pytest.fixture(scope="module")
def patch_local(tmp_path_factory):
    folder = save_patch_local(tmp_path_factory.mktemp("patch_local") / "t")[0]
    return create_teacher("dinov3", str(folder))


@pytest.mark.parametrize("factor", [2, 3])
def test_a_patch_local_teacher_tiled_equals_its_map_of_the_whole_canvas(patch_local, factor):
    images = photo_tensors(2)
    canvas, _ = canvases(images, patch_local.spec, factor)
    global_raw, tiles_raw, _ = teacher_maps(patch_local, canvas, factor)
    tiled = assemble(tiles_raw.permute(0, 3, 1, 2), factor)
    whole = patch_local.extract(canvas).dense.permute(0, 3, 1, 2)
    assert tiled.shape == whole.shape == (2, patch_local.spec.channels, 4 * factor, 4 * factor)
    assert (tiled - whole).abs().max().item() <= 1e-5
    assert torch.equal(teacher_batch(canvas, patch_local.spec, factor)[1:1 + factor ** 2], split(canvas[:1], factor))


def _model(c=16, grid=(4, 4), factor=3, seed=0) -> FeatSharp:
    torch.manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
    rotation = 1.7 * q
    config = FeatSharpConfig(channels=c, grid=grid, patch=16, factor=factor, heads=4)
    return FeatSharp(config, (torch.randn(c), rotation.float(), torch.linalg.inv(rotation).float()))


@pytest.mark.parametrize("factor", [2, 3])
def test_an_untrained_fuser_returns_the_jbu_map(factor):
    model = _model(factor=factor)
    with torch.no_grad():
        model.debias.normal_()
        model.tile_position.normal_()
    torch.manual_seed(2)
    g, t = torch.randn(2, 4, 4, 16) * 3, torch.randn(2 * factor ** 2, 4, 4, 16) * 3
    gd = torch.randn(2, 3, 4 * factor, 4 * factor)
    with torch.no_grad():
        out = model(g, t, gd)
        jbu = model.jbu(model.normalize(g), gd)
    assert out.shape == (2, 16, 4 * factor, 4 * factor)
    assert (out - jbu).abs().max().item() <= 1e-6 and jbu.abs().max().item() > 1


def test_phis_in_and_out_round_trip():
    model = _model()
    x = torch.randn(3, 4, 4, 16) * 5 + 2
    with torch.no_grad():
        y = model.normalize(x) - model.debias
        assert (model.denormalize(y) - x).abs().max().item() <= 1e-4


MEMORY = textwrap.dedent("""
    import json, sys, torch
    import torch.nn.functional as F
    from featcache.upsample.featsharp import JBU
    torch.set_num_threads(1)
    jbu = JBU(7, 32)
    low, g = torch.randn(1, 1536, 24, 24), torch.randn(1, 3, 72, 72)

    def unfolded(low, g):  # the same sum with the 7x7 neighbourhoods materialized
        up = F.interpolate(low, size=(72, 72), mode="bilinear", align_corners=False)
        w = jbu.weights(g)
        return (F.unfold(up, 7, padding=3).view(1, 1536, 49, 72, 72) * w[:, None]).sum(2)

    def status(field):  # kB in /proc/self/status
        line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    with torch.inference_mode():
        open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from the current RSS
        rss = status("VmRSS")
        out = (jbu if sys.argv[1] == "shifts" else unfolded)(low, g)
        peak = status("VmHWM")
    print(json.dumps({"growth": peak - rss, "shape": list(out.shape)}))
""")


def _peak_growths(*ways: str) -> list[int]:
    """Each way's peak growth, measured in its own process; the processes run side by side (each reads
    its own peak, so they do not see each other)."""
    procs = [subprocess.Popen([sys.executable, "-c", MEMORY, way], stdout=subprocess.PIPE, text=True) for way in ways]
    growths = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        got = json.loads(out)
        assert got["shape"] == [1, 1536, 72, 72]
        growths.append(got["growth"])
    return growths


def test_jbu_peak_memory_at_72x72x1536_is_far_below_an_unfold():
    """Fresh processes: how far one 72x72x1536 JBU call lifts the peak RSS above the RSS before it,
    as featcache computes it and with ``unfold`` (which the measurement must see: >= 1 GiB)."""
    shifts, unfold = _peak_growths("shifts", "unfold")
    assert unfold >= 49 * 1536 * 72 * 72 * 4 * 0.9  # the neighbourhoods: 1.46 GiB
    assert shifts < unfold / 10, f"peak grew by {shifts / 2**20:.0f} MiB"
    print(f"peak growth {shifts / 2**20:.1f} MiB, unfold {unfold / 2**30:.2f} GiB")
