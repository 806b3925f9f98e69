"""Running one frozen expert block, optionally with a learnable attention temperature (GaPT's attention shaping)."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Attention, Block
from torch import nn
from torch.nn import functional as F

from medpmoe.experts.sam import PromptedSamBlock


def temperature_unsupported_reason(block: nn.Module) -> str | None:
    """Why `run_block(block, x, temperature)` cannot shape this block's attention (None when it can): timm ViT
    `Block`s and the SAM-family `PromptedSamBlock`s can."""
    if isinstance(block, PromptedSamBlock):
        return None
    if type(block) is not Block or type(getattr(block, "attn", None)) is not Attention:
        return f"attention temperature needs timm Block/Attention or SAM blocks, got {type(block).__name__}"
    return None


def run_block(block: nn.Module, x: torch.Tensor, temperature: torch.Tensor | None = None) -> torch.Tensor:
    """`block(x)`, or timm's `Block.forward` with the attention logits divided by `temperature` (a scalar tensor).

    `softmax(q k^T * scale / t)` is computed as attention on `q / t`, so the frozen weights are read, never
    copied or changed, and `t = 1` gives exactly `block(x)` (q / 1 == q bit for bit; same ops in the same order).
    SAM-family blocks divide their q (and so their relative position terms) inside `prompted_attention`.
    """
    if temperature is None:
        return block(x)
    if isinstance(block, PromptedSamBlock):
        return block(x, temperature)
    x = x + block.drop_path1(block.ls1(_tempered_attention(block.attn, block.norm1(x), temperature)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _tempered_attention(a: Attention, x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """timm `Attention.forward` (no mask) with q divided by the temperature."""
    B, N, _ = x.shape
    attn_dim = getattr(a, "attn_dim", a.num_heads * a.head_dim)
    gate = a.gate(x).sigmoid() if getattr(a, "gate", None) is not None else None
    qkv = a.qkv(x).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    q = q / temperature
    if a.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if a.training else 0.0)
    else:
        attn = (q * a.scale) @ k.transpose(-2, -1)
        x = a.attn_drop(attn.softmax(dim=-1)) @ v
    x = x.transpose(1, 2).reshape(B, N, attn_dim)
    x = a.norm(x) if hasattr(a, "norm") else x
    if gate is not None:
        x = x * gate
    return a.proj_drop(a.proj(x))
