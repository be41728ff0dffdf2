"""DPAM: the dual-path ViT forward of AnomalyCLIP, written once for any pre-norm ViT block.

The last `dpam_layers` blocks run two paths from the same weights: the original block, and a V-V
path whose attention uses V as query and key (softmax(V V^T * scale) V), then the block's output
projection, added to its own residual stream without the MLP. Both paths' attention inputs are
`ln_1` of the *original* path's tokens. Patch features come from the V-V stream; the global
feature from the original stream.

Blocks are reached through small adapters (`BlockAdapter`) so open_clip and timm ViTs share this
code. `fast=True` uses fused attention and skips work whose result is discarded (the last block's
original path only feeds the class token); `fast=False` is the plain reference formulation and is
kept for equivalence tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class BlockAdapter:
    """Uniform view of one pre-norm transformer block.

    norm1 / norm2: the block's two LayerNorms. qkv: (B, N, C) -> three (B, H, N, d) tensors.
    out: merged attention output (B, N, C) -> residual update (output projection + layer scale).
    mlp: normalised tokens -> residual update (MLP + layer scale).
    """

    norm1: Callable[[Tensor], Tensor]
    qkv: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
    out: Callable[[Tensor], Tensor]
    norm2: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    batch, tokens, three_c = qkv.shape
    c = three_c // 3
    qkv = qkv.reshape(batch, tokens, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(x: Tensor) -> Tensor:
    batch, heads, tokens, d = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * d)


def plain_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unfused softmax(q k^T / sqrt(d)) v, as the reference code computes it."""
    scale = q.shape[-1] ** -0.5
    weights = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    return weights @ v


def fused_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def open_clip_block_adapter(block: nn.Module) -> BlockAdapter:
    """Adapter for open_clip's ResidualAttentionBlock (nn.MultiheadAttention inside)."""
    attn: nn.MultiheadAttention = block.attn
    heads = attn.num_heads
    ls_1 = getattr(block, "ls_1", nn.Identity())
    ls_2 = getattr(block, "ls_2", nn.Identity())

    def qkv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return split_heads(F.linear(x, attn.in_proj_weight, attn.in_proj_bias), heads)

    def out(x: Tensor) -> Tensor:
        return ls_1(attn.out_proj(x))

    def mlp(x: Tensor) -> Tensor:
        return ls_2(block.mlp(x))

    return BlockAdapter(norm1=block.ln_1, qkv=qkv, out=out, norm2=block.ln_2, mlp=mlp)


def timm_block_adapter(block: nn.Module) -> BlockAdapter:
    """Adapter for timm's vision_transformer.Block (DINOv2-style layer scale included)."""
    attn = block.attn
    heads = attn.num_heads
    q_norm = getattr(attn, "q_norm", nn.Identity())
    k_norm = getattr(attn, "k_norm", nn.Identity())
    post_norm = getattr(attn, "norm", nn.Identity())

    def qkv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = split_heads(attn.qkv(x), heads)
        return q_norm(q), k_norm(k), v

    def out(x: Tensor) -> Tensor:
        return block.ls1(attn.proj(post_norm(x)))

    def mlp(x: Tensor) -> Tensor:
        return block.ls2(block.mlp(x))

    return BlockAdapter(norm1=block.norm1, qkv=qkv, out=out, norm2=block.norm2, mlp=mlp)


def dpam_forward(
    tokens: Tensor,
    blocks: Sequence[BlockAdapter],
    out_layers: Sequence[int],
    dpam_layers: int,
    fast: bool = True,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Run the blocks with DPAM on the last `dpam_layers` of them.

    Args:
        tokens: (B, 1 + N, C) embedded tokens (class token first), after the pre-norm.
        out_layers: 1-indexed layers whose tokens to return (V-V stream where it exists).
        dpam_layers: number of final blocks with the V-V path (0 disables DPAM).

    Returns:
        The original path's final class token (B, C) and {layer: (B, 1 + N, C)} raw tokens.
    """
    depth = len(blocks)
    if not 0 <= dpam_layers <= depth:
        raise ValueError(f"dpam_layers must be in [0, {depth}], got {dpam_layers}")
    bad = [layer for layer in out_layers if not 1 <= layer <= depth]
    if bad:
        raise ValueError(f"layers {bad} are outside 1..{depth}")
    attention = fused_attention if fast else plain_attention
    first_dpam = depth - dpam_layers  # 0-indexed block where the V-V path starts
    wanted = set(out_layers)

    x = tokens
    vv: Tensor | None = None
    outputs: dict[int, Tensor] = {}
    for index, block in enumerate(blocks):
        layer = index + 1
        is_last = layer == depth
        h = block.norm1(x)
        q, k, v = block.qkv(h)
        if index >= first_dpam:
            if vv is None:
                vv = x
            vv = vv + block.out(merge_heads(attention(v, v, v)))
        # The final original-path tokens only feed the global (class-token) feature, unless DPAM
        # is off and the last layer's patch tokens are requested from this path.
        cls_only = fast and is_last and (vv is not None or layer not in wanted)
        if cls_only:
            x = x[:, :1]
            q = q[:, :, :1]
        x = x + block.out(merge_heads(attention(q, k, v)))
        x = x + block.mlp(block.norm2(x))
        if layer in wanted:
            outputs[layer] = vv if vv is not None else x
    return x[:, 0], outputs
