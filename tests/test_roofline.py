"""The roofline model: FLOPs against torch's counter, bytes against hand-computed cases, the
sparse patterns' effects (2:4 halves a compute-bound linear layer; attention bounds the end-to-end
speedup), and the measured preset."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from featcache import roofline
from featcache.roofline import HARDWARE, Hardware, linear, ops, predict, sparse, speedup
from featcache.train.student import StudentConfig, TeacherHead, build_student


@pytest.mark.parametrize("size, res, window", [("small", 224, None), ("base", 448, None), ("base", 512, 8),
                                               ("small", 1024, 16), ("tiny", 384, 12)])
def test_student_flops_equal_torch_s_counter_within_2_percent(size, res, window):
    cfg = StudentConfig(size=size, vitdet_window_size=window, heads=[TeacherHead("t", 64, 64)])
    with torch.device("meta"):
        student = build_student(cfg)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        student(torch.zeros(1, 3, res, res, device="meta"))
    analytic = roofline.vit_flops(cfg.roofline_shape(), res, res)
    assert abs(analytic / counter.get_total_flops() - 1) < 0.02, (analytic, counter.get_total_flops())


def test_bytes_of_each_pattern_against_hand_computed_cases():
    """M=8 rows, K=4, N=6 at 2 bytes; 75% removed (δ = 0.25); int32 indices and pointers."""
    op = linear("mlp", 8, 4, 6, 2, sparsifiable=True)
    assert (op.flops, op.bytes) == (2 * 8 * 4 * 6, 2 * (32 + 24 + 48))
    csr = sparse(op, "unstructured", 0.75)
    assert (csr.flops, csr.bytes) == (96, 2 * (32 + 48) + 0.25 * 24 * (2 + 4) + 7 * 4)  # 160 + 36 + 28
    bsr = sparse(op, "block", 0.75, block=(2, 2))
    assert (bsr.flops, bsr.bytes) == (96, 160 + 0.25 * 24 * 2 + 0.25 * 24 / 4 * 4 + (6 / 2 + 1) * 4)  # + 12 + 6 + 16
    two4 = sparse(op, "2:4", 0.5)
    assert (two4.flops, two4.bytes, two4.sparse_cores) == (384, 160 + 12 * 2 + 12 * 2 / 8, True)
    assert sparse(op, "dense", 0.9) == op and sparse(linear("head", 8, 4, 6, 2), "unstructured", 0.5).flops == 384
    with pytest.raises(ValueError, match="exactly half"):
        sparse(op, "2:4", 0.75)


def test_2_4_halves_a_compute_bound_linear_and_attention_bounds_the_speedup():
    h100 = HARDWARE["h100"]
    big = linear("mlp", 4096, 4096, 4096, 2, sparsifiable=True)
    [dense], [half] = predict([big], h100), predict([sparse(big, "2:4", 0.5)], h100)
    assert dense.bound == half.bound == "compute"
    assert half.seconds == pytest.approx(dense.seconds * h100.peak / h100.sparse_peak)  # 989 vs 1979 TFLOP/s
    # Wide enough that every linear stays compute-bound once halved: the speedup is Amdahl's exactly.
    model = ops(roofline.VitShape(4096, 16384, 4, 16, prefix_tokens=1), 1024, 1024, batch=8)
    timed = predict(model, h100)
    linear_time = sum(t.seconds for t in timed if t.op.sparsifiable)
    rest = sum(t.seconds for t in timed) - linear_time
    assert all(t.bound == "compute" for t in predict([sparse(o, "2:4", 0.5) for o in model], h100) if t.op.sparsifiable)
    got = speedup(model, h100, "2:4", 0.5)
    assert got == pytest.approx((rest + linear_time) / (rest + linear_time * h100.peak / h100.sparse_peak))
    assert 1.2 < got < 1.8  # the dense attention over 4,097 tokens keeps it well below 2
    # A narrower model whose halved projections turn memory-bound gains less than Amdahl says.
    narrow = ops(roofline.VitShape(1024, 4096, 4, 16, prefix_tokens=1), 1024, 1024, batch=8)
    t_narrow = predict(narrow, h100)
    lin = sum(t.seconds for t in t_narrow if t.op.sparsifiable)
    bound = sum(t.seconds for t in t_narrow) / (sum(t.seconds for t in t_narrow) - lin / 2)
    assert speedup(narrow, h100, "2:4", 0.5) < bound


def test_a_memory_bound_layer_gains_from_fewer_weight_bytes_only():
    """One image's worth of rows (M = 8): the weights dominate the bytes; 90% unstructured sparsity cuts
    the time by the bytes saved, not by the FLOPs removed."""
    op = linear("mlp", 8, 4096, 4096, 2, sparsifiable=True)
    hw = HARDWARE["h100"]
    [d], [s] = predict([op], hw), predict([sparse(op, "unstructured", 0.9)], hw)
    assert d.bound == s.bound == "memory"
    assert s.seconds / d.seconds == pytest.approx(sparse(op, "unstructured", 0.9).bytes / op.bytes)
    assert 0.29 < s.seconds / d.seconds < 0.31  # 0.1 x (2 + 4) bytes per weight instead of 2


def test_the_measured_preset_on_this_cpu():
    hw = roofline.measure("cpu", seconds=0.2)
    assert isinstance(hw, Hardware) and hw.itemsize == 4 and hw.sparse_peak == 2 * hw.peak
    assert 1e8 < hw.peak < 1e14 and 1e8 < hw.bandwidth < 1e12, hw


def test_the_roofline_command(capsys):
    import json

    from featcache.cli import main

    assert main(["roofline", "sam3", "--device", "h200", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"model", "resolution", "batch", "device", "flops", "bytes", "predicted_seconds", "bound", "layers"} <= set(r)
    assert r["resolution"] == 1008 and r["device"] == "H200" and abs(r["flops"] / 5.4e12 - 1) < 0.02
    assert {row["type"] for row in r["layers"]} >= {"qkv", "proj", "mlp", "attention", "patch_embed"}
    assert sum(row["seconds"] for row in r["layers"]) == pytest.approx(r["predicted_seconds"])
    assert main(["roofline", "student-micro", "--res", "64", "--batch", "2", "--measure", "--sparsity", "2:4",
                 "--sparsity", "unstructured:0.5", "--json"]) == 0
    dense, two4, csr = json.loads(capsys.readouterr().out)
    assert dense["measured_seconds"] > 0 and dense["device"].startswith("measured (cpu")
    assert two4["speedup"] > 1 and csr["model"] == "student-micro unstructured:0.5"
    for argv, says in ((["roofline", "vit-z"], "unknown model 'vit-z'; models: siglip2-g-384"),
                       (["roofline", "sam3", "--device", "tpu"], "unknown device 'tpu'"),
                       (["roofline", "sam3", "--sparsity", "2:4:0.9"], "exactly half")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err


def test_the_sparsity_roofline_plot(tmp_path, capsys):
    from PIL import Image

    from featcache.cli import main

    results = tmp_path / "r.csv"
    results.write_text("pattern,degree,speedup,heldout_loss\ndense,0,1,0.5\nunstructured,0.5,1.6,0.52\n"
                       "unstructured,0.9,3.4,0.7\nblock,0.75,2.4,0.6\n2:4,0.5,1.6,0.55\n")
    assert main(["roofline", "plot", str(results), "--out", str(tmp_path / "r.png")]) == 0
    with Image.open(tmp_path / "r.png") as im:
        pixels = set(im.convert("RGB").getdata())
    assert (31, 119, 180) in pixels and (255, 127, 14) in pixels and (44, 160, 44) in pixels  # one colour per pattern
    capsys.readouterr()
    results.write_text("pattern,degree,speedup\ndense,0,1\n")
    assert main(["roofline", "plot", str(results), "--out", str(tmp_path / "x.png")]) == 2
    assert "need columns pattern, degree, speedup and one quality column" in capsys.readouterr().err


# ---- issue 23: the device's own 2:4 peak, block sizes, sizes refused, self-contained help ---------------


def test_2_4_runs_at_the_device_s_sparse_peak():
    """A device whose sparse tensor cores run 1.5x its dense peak (not the nominal 2x): a compute-bound
    linear layer under 2:4 takes 1/1.5 of its dense time, as Hardware.sparse_peak says."""
    hw = Hardware("odd", peak=100e12, sparse_peak=150e12, bandwidth=3e12)
    big = linear("mlp", 8192, 8192, 8192, 2, sparsifiable=True)
    [dense], [half] = predict([big], hw), predict([sparse(big, "2:4", 0.5)], hw)
    assert dense.bound == half.bound == "compute"
    assert half.seconds == pytest.approx(big.flops / 150e12) and dense.seconds == pytest.approx(big.flops / 100e12)


@pytest.mark.parametrize("spec, want", [("block:0.75", ("block", 0.75, (4, 4))),
                                        ("block8x8:0.9", ("block", 0.9, (8, 8))),
                                        ("block16x4:0.5", ("block", 0.5, (16, 4))),
                                        ("unstructured:0.9", ("unstructured", 0.9, (4, 4))),
                                        ("2:4", ("2:4", 0.5, (4, 4)))])
def test_a_sparsity_spec_names_its_block_size(spec, want):
    s = roofline.parse_sparsity(spec)
    assert (s.pattern, s.degree, s.block) == want and str(s) == spec.replace("block:", "block4x4:")


@pytest.mark.parametrize("spec, says", [("block0x4:0.5", "block size"), ("blockAxB:0.5", "block size"),
                                        ("block8:0.5", "block size"), ("block4x4:1.5", "0 < D < 1"),
                                        ("dense:0.5", "unknown sparsity pattern"), ("2:4:0.9", "exactly half"),
                                        ("unstructured", "pattern:degree")])
def test_a_bad_sparsity_spec_says_what_is_wrong(spec, says):
    with pytest.raises(ValueError, match=says):
        roofline.parse_sparsity(spec)


def test_the_roofline_command_takes_the_block_size(capsys):
    import json

    from featcache.cli import main

    assert main(["roofline", "student-small", "--device", "h100", "--batch", "8", "--sparsity", "block:0.75",
                 "--sparsity", "block16x16:0.75", "--json"]) == 0
    dense, b4, b16 = json.loads(capsys.readouterr().out)
    model = ops(StudentConfig(size="small").roofline_shape(), 224, 224, 8, 2)
    for got, block in ((b4, (4, 4)), (b16, (16, 16))):
        want = [sparse(o, "block", 0.75, block) for o in model]
        assert got["bytes"] == pytest.approx(sum(o.bytes * o.count for o in want))
        assert got["speedup"] == pytest.approx(speedup(model, HARDWARE["h100"], "block", 0.75, block))
    assert b4["model"] == "student-small block4x4:0.75" and b16["model"] == "student-small block16x16:0.75"
    assert b16["bytes"] < b4["bytes"]  # fewer, larger blocks: fewer indices


@pytest.mark.parametrize("argv, says", [(["--res", "0"], "--res 0: give an input size of at least 16 px"),
                                        (["--res", "-224"], "--res -224: give an input size of at least"),
                                        (["--res", "8"], "--res 8: give an input size of at least 16 px"),
                                        (["--sparsity", "block0x0:0.5"], "--sparsity 'block0x0:0.5': block size")])
def test_roofline_refuses_sizes_it_cannot_model_in_one_line(argv, says, capsys):
    from featcache.cli import main

    assert main(["roofline", "student-small", *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err


def _help(*argv: str) -> str:
    """``featcache ARGV --help`` as a user sees it on a 100-column terminal (in-process, as the CLI runs it: the
    same text as from ``python -m featcache.cli``), its wrapped lines joined again."""
    from tests.test_cli_ux import _help as help_text

    return help_text(*argv)


def test_roofline_help_is_self_contained():
    """No reference to files a user does not have; the model it uses is said in the help itself."""
    text = _help("roofline")
    assert ".md" not in text, text
    assert "max(FLOPs / peak, bytes / bandwidth)" in text and "block4x4:0.75" in text


def test_roofline_plot_help_is_the_plot_s_own():
    text = _help("roofline", "plot")
    assert text.startswith("Usage: featcache roofline plot [OPTIONS] {results}"), text
    assert "--out" in text and "quality column" in text and "--sparsity" not in text


def test_the_plot_draws_block_sizes_as_their_own_curves(tmp_path):
    """A sweep's pattern names its block size (block4x4, block8x8): one curve each, in distinct colours."""
    from featcache.sparsity_plot import draw

    results = tmp_path / "r.csv"
    results.write_text("pattern,degree,steps,speedup,heldout_loss\ndense,0,9,1,0.5\nblock4x4,0.5,9,1.6,0.6\n"
                       "block4x4,0.9,9,3,0.7\nblock8x8,0.5,9,1.7,0.62\nblock8x8,0.9,9,3.2,0.75\n")
    with draw(str(results), str(tmp_path / "r.png")) as im:
        pixels = set(im.convert("RGB").getdata())
    assert (255, 127, 14) in pixels and (214, 39, 40) in pixels  # block4x4, then the next colour for block8x8
