"""Analytic FLOPs, bytes and the roofline time of ViT forwards, dense or with sparse linear layers
(ALGORITHMS.md §8; the Sparsity Roofline after Shinn et al., "The Sparsity Roofline", 2023).

Per block with T tokens, width D, MLP hidden F: QKV 6TD², output projection 2TD², MLP 4TDF
(gated 6TDF), attention 4T²D globally or 4TWD in windows of W tokens. A multiply-add counts as
two FLOPs; only matrix products count (``torch.utils.flop_counter.FlopCounterMode`` on the meta
device is the cross-check). Bytes: each input read once, each output written once; a linear layer
of M rows moves b(MK + KN + MN); attention reads q, k, v and writes its output once (a fused
kernel never stores the T x T scores); norms, residual adds and the MLP activation move their
tensors and do no FLOPs here. Per op the time is max(F / peak, Q / bandwidth); the model's is the
sum. A sparse pattern on the blocks' linear layers changes their FLOPs and bytes (formulas in
:func:`sparse`); attention stays dense, which bounds the end-to-end speedup (Amdahl).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

PATTERNS = ("dense", "unstructured", "block", "2:4")
INDEX_BYTES = 4  # a column index of CSR / BSR (int32)
POINTER_BYTES = 4  # a row pointer (int32)
BLOCK = (4, 4)  # the block of ``block:D`` when the spec names none


@dataclass(frozen=True)
class Sparsity:
    """A sparse pattern on the blocks' linear layers: ``str()`` gives its spec back (block size named)."""

    pattern: str  # unstructured, block or 2:4
    degree: float  # the fraction of weights removed
    block: tuple[int, int] = BLOCK  # rows x columns of a block (``block`` only)

    def __str__(self) -> str:
        if self.pattern == "2:4":
            return "2:4"
        name = f"block{self.block[0]}x{self.block[1]}" if self.pattern == "block" else self.pattern
        return f"{name}:{self.degree:g}"


def parse_sparsity(spec: str) -> Sparsity:
    """``unstructured:D``, ``block:D`` (4 x 4 blocks), ``blockRxC:D`` or ``2:4`` (D = 0.5) as a
    :class:`Sparsity`; a ValueError says what is wrong with any other."""
    name, sep, degree = ("2:4", ":", "0.5") if spec == "2:4" else spec.rpartition(":")
    if not sep:
        raise ValueError("give pattern:degree, e.g. unstructured:0.9, block:0.75, block8x8:0.75 or 2:4")
    pattern, block = ("block", _block_size(name[5:])) if name.startswith("block") else (name, BLOCK)
    if pattern not in PATTERNS[1:]:
        raise ValueError(f"unknown sparsity pattern {pattern!r}; patterns: unstructured, block[RxC], 2:4")
    try:
        value = float(degree)
    except ValueError:
        value = -1.0
    if pattern == "2:4" and value != 0.5:
        raise ValueError(f"2:4 sparsity removes exactly half the weights (degree 0.5), not {degree}")
    if not 0 < value < 1:
        raise ValueError(f"the degree is the fraction of weights removed: 0 < D < 1, not {degree}")
    return Sparsity(pattern, value, block)


def _block_size(text: str) -> tuple[int, int]:
    """``RxC`` after ``block`` (empty: 4 x 4), both positive."""
    if not text:
        return BLOCK
    r, x, c = text.partition("x")
    if not (x and r.isdigit() and c.isdigit() and int(r) > 0 and int(c) > 0):
        raise ValueError(f"block size {text!r}: give blockRxC with positive R and C, e.g. block8x8:0.75")
    return int(r), int(c)


@dataclass(frozen=True)
class VitShape:
    """The parts of a ViT that its FLOPs depend on."""

    width: int
    mlp: int
    layers: int
    patch: int
    gated: bool = False
    prefix_tokens: int = 0  # CLS + registers
    window: int | None = None  # tokens per attention window (ViTDet); None = global everywhere
    global_layers: int = 0  # blocks with global attention when ``window`` is set
    pool_head: bool = False  # SigLIP's attention-pooling head (one probe query + MLP)


@dataclass(frozen=True)
class Op:
    """One operation of a forward, ``count`` times: its FLOPs and bytes, and for a linear layer its
    (M, K, N) (what a sparse pattern acts on). ``sparse_cores``: its FLOPs run on 2:4 sparse tensor
    cores, at the device's ``sparse_peak``."""

    kind: str
    flops: float
    bytes: float
    linear: tuple[int, int, int] | None = None
    count: int = 1
    sparsifiable: bool = False
    sparse_cores: bool = False


@dataclass(frozen=True)
class Hardware:
    """Peak rates of a device: dense and 2:4-sparse FLOP/s (the rate of ops on its sparse tensor
    cores), memory bytes/s, and the element size its models run in (2: bf16 on GPUs; 4: float32 on a CPU)."""

    name: str
    peak: float
    sparse_peak: float
    bandwidth: float
    itemsize: int = 2


HARDWARE = {
    "a100": Hardware("A100-80GB", 312e12, 624e12, 2.04e12),
    "h100": Hardware("H100 SXM", 989e12, 1979e12, 3.35e12),
    "h200": Hardware("H200", 989e12, 1979e12, 4.8e12),
}


def block_flops(tokens: int, width: int, mlp: int, gated: bool, attn_span: int) -> int:
    """One transformer block; ``attn_span`` = tokens each query attends to."""
    linear = 8 * tokens * width**2
    mlp_flops = (6 if gated else 4) * tokens * width * mlp
    return linear + mlp_flops + 4 * tokens * attn_span * width


def linear(kind: str, m: int, k: int, n: int, itemsize: int, count: int = 1, sparsifiable: bool = False) -> Op:
    """A dense (M x K) @ (K x N) product."""
    return Op(kind, 2 * m * k * n, itemsize * (m * k + k * n + m * n), (m, k, n), count, sparsifiable)


def attention(queries: int, span: int, width: int, batch: int, itemsize: int, count: int = 1) -> Op:
    """``queries`` tokens each attending over ``span`` tokens: QKᵀ and AV, 4·queries·span·width FLOPs."""
    return Op("attention", 4 * batch * queries * span * width, itemsize * batch * width * (2 * queries + 2 * max(span, queries)),
              None, count)


def elementwise(kind: str, tensors: float, elements: int, itemsize: int, count: int = 1) -> Op:
    """An op that reads and writes ``tensors`` tensors of ``elements`` values and does no counted FLOPs."""
    return Op(kind, 0, itemsize * tensors * elements, None, count)


def ops(shape: VitShape, height: int, width: int, batch: int = 1, itemsize: int = 2, channels: int = 3) -> list[Op]:
    """The forward of ``batch`` images of ``height`` x ``width`` as ops (blocks grouped by kind)."""
    patches = (height // shape.patch) * (width // shape.patch)
    t, d, f = patches + shape.prefix_tokens, shape.width, shape.mlp
    m = batch * t
    windowed = shape.layers - shape.global_layers if shape.window else 0
    out = [linear("patch_embed", batch * patches, channels * shape.patch**2, d, itemsize)]
    for n_blocks, span in ((shape.layers - windowed, t), (windowed, shape.window or t)):
        if n_blocks:
            out += _block(m, d, f, shape.gated, itemsize, n_blocks)
            out.append(attention(t, span, d, batch, itemsize, n_blocks))
    if shape.pool_head:  # k, v over all tokens; q, attention, out-projection and MLP for one probe
        out += [linear("head", m, d, 2 * d, itemsize), linear("head", batch, d, d, itemsize, 2),
                attention(1, t, d, batch, itemsize), linear("head", batch, d, f, itemsize),
                linear("head", batch, f, d, itemsize)]
    return out


def _block(m: int, d: int, f: int, gated: bool, itemsize: int, n: int) -> list[Op]:
    return [linear("qkv", m, d, 3 * d, itemsize, n, True), linear("proj", m, d, d, itemsize, n, True),
            linear("mlp", m, d, (2 if gated else 1) * f, itemsize, n, True), linear("mlp", m, f, d, itemsize, n, True),
            elementwise("norm", 2, m * d, itemsize, 2 * n), elementwise("residual", 3, m * d, itemsize, 2 * n),
            elementwise("activation", 3 if gated else 2, m * f, itemsize, n)]


def vit_flops(shape: VitShape, height: int, width: int, channels: int = 3) -> int:
    """Forward FLOPs for one image of ``height`` x ``width`` pixels."""
    return int(sum(o.flops * o.count for o in ops(shape, height, width, channels=channels)))


def sparse(op: Op, pattern: str, degree: float, block: tuple[int, int] = BLOCK) -> Op:
    """``op`` with a fraction ``degree`` of its weights removed in ``pattern`` (a non-linear op, or one
    not sparsifiable, is returned as it is):

    - unstructured (CSR): b(MK + MN) + δKN(b + i) + (N + 1)p, FLOPs x δ;
    - block r x c (BSR): b(MK + MN) + δKN·b + (δKN / rc)·i + (N/r + 1)p, FLOPs x δ;
    - 2:4 (degree 0.5 only): dense FLOPs on the sparse tensor cores (``Hardware.sparse_peak``);
      weights KN/2·b plus 2 bits per kept value.
    with δ = 1 − degree, b the element size, i and p the index and pointer sizes."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown sparsity pattern {pattern!r}; patterns: {', '.join(PATTERNS)}")
    if pattern == "dense" or op.linear is None or not op.sparsifiable:
        return op
    if not 0 <= degree < 1:
        raise ValueError(f"a sparsity degree is in [0, 1), not {degree}")
    m, k, n = op.linear
    b = op.bytes / (m * k + k * n + m * n)  # the element size
    act, delta = b * (m * k + m * n), 1 - degree
    if pattern == "unstructured":
        return dataclasses.replace(op, flops=op.flops * delta,
                                   bytes=act + delta * k * n * (b + INDEX_BYTES) + (n + 1) * POINTER_BYTES)
    if pattern == "block":
        r, c = block
        return dataclasses.replace(op, flops=op.flops * delta, bytes=act + delta * k * n * b
                                   + delta * k * n / (r * c) * INDEX_BYTES + (n / r + 1) * POINTER_BYTES)
    if degree != 0.5:
        raise ValueError(f"2:4 sparsity removes exactly half the weights (degree 0.5), not {degree}")
    return dataclasses.replace(op, bytes=act + k * n / 2 * b + k * n / 2 * 2 / 8, sparse_cores=True)


@dataclass(frozen=True)
class Timed:
    """An op's predicted seconds (all ``count`` of it) and what bounds it."""

    op: Op
    seconds: float
    bound: str  # "compute" or "memory"


def predict(model: list[Op], hw: Hardware) -> list[Timed]:
    """Per op: t = max(F / peak, Q / bandwidth), times its count (the sparse peak for 2:4 ops)."""
    out = []
    for o in model:
        compute, memory = o.flops / (hw.sparse_peak if o.sparse_cores else hw.peak), o.bytes / hw.bandwidth
        out.append(Timed(o, o.count * max(compute, memory), "compute" if compute >= memory else "memory"))
    return out


def by_kind(timed: list[Timed]) -> dict[str, dict]:
    """Totals per op kind: flops, bytes, seconds and the bound of most of its time."""
    table: dict[str, dict] = {}
    for t in timed:
        row = table.setdefault(t.op.kind, {"flops": 0.0, "bytes": 0.0, "seconds": 0.0, "compute_seconds": 0.0})
        row["flops"] += t.op.flops * t.op.count
        row["bytes"] += t.op.bytes * t.op.count
        row["seconds"] += t.seconds
        row["compute_seconds"] += t.seconds if t.bound == "compute" else 0.0
    for row in table.values():
        row["bound"] = "compute" if row.pop("compute_seconds") >= row["seconds"] / 2 else "memory"
    return table


def speedup(model: list[Op], hw: Hardware, pattern: str, degree: float, block: tuple[int, int] = BLOCK) -> float:
    """Σ t_dense / Σ t_sparse for the pattern on every sparsifiable linear layer."""
    dense = sum(t.seconds for t in predict(model, hw))
    return dense / sum(t.seconds for t in predict([sparse(o, pattern, degree, block) for o in model], hw))


def measure(device: str = "cpu", seconds: float = 0.5) -> Hardware:
    """The ``measured`` preset: a large matmul and a large copy timed on ``device`` (float32 on a CPU,
    bf16 on CUDA). No sparse kernel is timed: its peak is taken as twice the dense one."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = 8192 if device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    peak = 2 * n**3 / fastest(lambda: a @ b, device, seconds)
    x = torch.ones(64 << 20, device=device, dtype=dtype)  # 256 MB (CPU), past any cache; touched pages:
    y = torch.zeros_like(x)  # an untouched source reads the shared zero page, faster than memory
    bandwidth = 2 * x.numel() * x.element_size() / fastest(lambda: y.copy_(x), device, seconds)
    name = f"measured ({torch.cuda.get_device_name() if device == 'cuda' else f'cpu, {torch.get_num_threads()} threads'})"
    return Hardware(name, peak, 2 * peak, bandwidth, torch.empty((), dtype=dtype).element_size())


def fastest(fn, device: str, seconds: float) -> float:
    """The fastest of repeated calls of ``fn`` over about ``seconds`` (after one warm-up call; CUDA
    synchronized around each)."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end or best == float("inf"):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def report(model: str, resolution: int, batch: int, hw: Hardware, timed: list[Timed]) -> dict:
    """The ``featcache roofline --json`` object (DESIGN.md §7), seconds per batch."""
    seconds = sum(t.seconds for t in timed)
    compute = sum(t.seconds for t in timed if t.bound == "compute")
    return {"model": model, "resolution": resolution, "batch": batch, "device": hw.name,
            "flops": sum(t.op.flops * t.op.count for t in timed), "bytes": sum(t.op.bytes * t.op.count for t in timed),
            "predicted_seconds": seconds, "bound": "compute" if compute >= seconds / 2 else "memory",
            "layers": [{"type": kind, **row} for kind, row in by_kind(timed).items()]}


def table(r: dict) -> str:
    """The human-readable form of :func:`report`."""
    lines = [f"{r['model']} at {r['resolution']} px, batch {r['batch']}, on {r['device']}",
             f"{'layer':12s} {'GFLOP':>10s} {'MB':>10s} {'ms':>9s} {'share':>6s}  bound"]
    for row in r["layers"]:
        lines.append(f"{row['type']:12s} {row['flops'] / 1e9:10.2f} {row['bytes'] / 1e6:10.2f} "
                     f"{row['seconds'] * 1e3:9.3f} {row['seconds'] / r['predicted_seconds']:6.1%}  {row['bound']}")
    per_image = r["predicted_seconds"] / r["batch"]
    lines.append(f"{'total':12s} {r['flops'] / 1e9:10.2f} {r['bytes'] / 1e6:10.2f} {r['predicted_seconds'] * 1e3:9.3f} "
                 f"{'':6s}  {r['bound']}; {per_image * 1e3:.3f} ms/image, {1 / per_image:.1f} images/s")
    if "measured_seconds" in r:
        lines.append(f"measured {r['measured_seconds'] * 1e3:.3f} ms per batch: predicted / measured "
                     f"{r['predicted_seconds'] / r['measured_seconds']:.2f}")
    return "\n".join(lines)
