"""Analytic FLOP counts of ViT forwards (ALGORITHMS.md §8).

Per block with T tokens, width D, MLP hidden F: QKV 6TD², output projection 2TD², MLP 4TDF
(gated 6TDF), attention 4T²D globally or 4TWD in windows of W tokens. A multiply-add counts as
two FLOPs. ``torch.utils.flop_counter.FlopCounterMode`` on the meta device is the cross-check.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def block_flops(tokens: int, width: int, mlp: int, gated: bool, attn_span: int) -> int:
    """One transformer block; ``attn_span`` = tokens each query attends to."""
    linear = 8 * tokens * width**2
    mlp_flops = (6 if gated else 4) * tokens * width * mlp
    return linear + mlp_flops + 4 * tokens * attn_span * width


def vit_flops(shape: VitShape, height: int, width: int, channels: int = 3) -> int:
    """Forward FLOPs for one image of ``height`` x ``width`` pixels."""
    patches = (height // shape.patch) * (width // shape.patch)
    tokens = patches + shape.prefix_tokens
    d = shape.width
    total = 2 * patches * channels * shape.patch**2 * d  # patch embedding
    windowed = shape.layers - shape.global_layers if shape.window else 0
    total += (shape.layers - windowed) * block_flops(tokens, d, shape.mlp, shape.gated, tokens)
    total += windowed * block_flops(tokens, d, shape.mlp, shape.gated, shape.window or tokens)
    if shape.pool_head:  # k, v over all tokens; q, attention, out-proj and MLP for one probe
        total += 4 * tokens * d**2 + 4 * d**2 + 4 * tokens * d + 4 * d * shape.mlp
    return total
