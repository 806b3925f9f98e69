"""Position embeddings interpolated at run time to the input's patch grid, the way each expert's authors do it.

DINOv2 (facebookresearch/dinov2 `DinoVisionTransformer.interpolate_pos_encoding`, the hub models' settings
`interpolate_offset=0.1`, `interpolate_antialias=False`): the M x M patch table is resampled in float32 with
`F.interpolate(mode="bicubic", scale_factor=((h + 0.1) / M, (w + 0.1) / M))`, no antialiasing; the offset makes
the output size h x w while the bicubic kernel samples with the scale (h + 0.1) / M, not h / M.

Hugging Face `transformers` Dinov2Model (`Dinov2Embeddings.interpolate_pos_encoding`, what RAD-DINO runs through):
the same table resampled in float32 with `F.interpolate(mode="bicubic", size=(h, w), align_corners=False)`, no
antialiasing.

Both return the stored table unchanged when the grid is square with the table's number of patches. The class
token's row is never resampled. timm instead resamples once at load (`resample_abs_pos_embed`, antialiased), which
is what every other expert keeps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

#: run-time interpolation styles: the DINOv2 code's and Hugging Face's Dinov2Model's
POS_INTERPOLATIONS = ("dinov2", "hf")
#: DINOv2's `interpolate_offset` (its hub models' value)
DINOV2_OFFSET = 0.1


def interpolate_patch_positions(table: torch.Tensor, grid: tuple[int, int], style: str) -> torch.Tensor:
    """A (1, M*M, D) patch position table resampled to the (h, w) grid -> (1, h*w, D), as `style`'s authors do."""
    if style not in POS_INTERPOLATIONS:
        raise ValueError(f"position interpolation must be one of {POS_INTERPOLATIONS}, got {style!r}")
    n, dim = table.shape[1], table.shape[2]
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position table with {n} patch rows is not a square grid")
    h, w = grid
    if h * w == n and h == w:
        return table
    t = table.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if style == "dinov2":
        scale = ((h + DINOV2_OFFSET) / m, (w + DINOV2_OFFSET) / m)
        t = F.interpolate(t, scale_factor=scale, mode="bicubic", antialias=False)
    else:
        t = F.interpolate(t, size=(h, w), mode="bicubic", align_corners=False)
    if tuple(t.shape[-2:]) != (h, w):
        raise ValueError(f"position table {m}x{m} resampled to {tuple(t.shape[-2:])}, expected {h}x{w}")
    return t.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(table.dtype)


def _file_table(raw: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The single position table of a raw state dict (DINOv2 `pos_embed`, Hugging Face
    `embeddings.position_embeddings`), or None."""
    keys = [k for k, v in raw.items() if k.endswith(("pos_embed", "embeddings.position_embeddings"))
            and "decoder" not in k and isinstance(v, torch.Tensor) and v.ndim == 3]
    return raw[keys[0]] if len(keys) == 1 else None


def keep_file_table(sd: dict[str, torch.Tensor], raw: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """`sd` (converted to timm keys, table resampled by timm's filter) with the file's own position table
    instead, at its own grid, and `model.pos_embed` given that shape (filled by the strict load that follows):
    the table stays as trained and is interpolated to each input at run time. The class row is kept where the
    model has one (DINOv2 without registers, Hugging Face); register models fold it into `cls_token` (timm's
    conversion) and keep the M x M patch rows."""
    table = _file_table(raw)
    if table is None or getattr(model, "pos_embed", None) is None or "pos_embed" not in sd:
        return sd
    n_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    rows = table.shape[1]
    m = next((math.isqrt(n) for n in (rows, rows - 1) if n > 0 and math.isqrt(n) ** 2 == n), None)
    if m is None or rows < m * m + n_prefix:
        return sd
    sd = dict(sd, pos_embed=table[:, rows - (m * m + n_prefix):])
    if model.pos_embed.shape != sd["pos_embed"].shape:
        model.pos_embed = nn.Parameter(model.pos_embed.new_zeros(sd["pos_embed"].shape),
                                       requires_grad=model.pos_embed.requires_grad)
    return sd
