"""SETR progressive upsampling head and its auxiliary heads (Zheng et al., CVPR 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

#: SETR-PUP's auxiliary heads read the outputs of 4 blocks: 10, 15, 20 and 24 of ViT-L's 24 (0-based 9, 14, 19, 23:
#: the SETR authors' `configs/SETR/SETR_PUP_768x768_*_cityscapes_bs_8.py`, `in_index=9/14/19/23`, and
#: mmsegmentation's `_base_/models/setr_pup.py`, `out_indices=(9, 14, 19, 23)` with 4 auxiliary heads), and 5, 8,
#: 10 and 12 of a 12-block ViT-B (0-based 4, 7, 9, 11: the SETR authors' `SETR_PUP_DeiT_768x768_*` configs);
#: as fractions of the depth. (mmsegmentation's ADE20K / Cityscapes PUP configs keep only the first three.)
SETR_AUX_FRACTIONS = (10 / 24, 15 / 24, 20 / 24, 24 / 24)
#: auxiliary-head variants: "mmseg" = mmsegmentation's `SETRUPHead(num_convs=2, up_scale=4, kernel_size=3)`, two
#: conv stages; "setr" = the SETR authors' `VisionTransformerUpHead(num_conv=2, num_upsampe_layer=2)`, one conv stage
AUX_VARIANTS = ("mmseg", "setr")


def setr_aux_blocks(depth: int, fractions: Sequence[float] = SETR_AUX_FRACTIONS) -> list[int]:
    """0-based blocks whose outputs feed the auxiliary heads: block round(f * depth) (1-based) for each fraction,
    repeats dropped (shallow experts get fewer heads).

    Depth 24 gives SETR's 9, 14, 19, 23; depth 12 (ViT-B) gives 4, 7, 9, 11 (the SETR authors' DeiT-B config);
    depth 4 gives 1, 2, 3; depth 2 (the tiny demo experts) gives 0, 1."""
    return sorted({min(depth - 1, max(0, math.floor(f * depth + 0.5) - 1)) for f in fractions})


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    raise ValueError(f"SETR-PUP norm must be 'batch' or 'group', got {kind!r}")


class SETRPUPHead(nn.Module):
    """Patch-token grid (B, D, h, w) -> per-pixel logits (B, C, H, W).

    A LayerNorm on the tokens (eps 1e-6, as SETR), then `num_stages` x [conv3x3 -> norm -> ReLU -> x`up_scale`
    bilinear upsampling] with `channels` channels, a 1x1 classifier, and a final bilinear resize to the
    requested output size (which covers patch sizes other than 16). The main head is 4 stages of x2 (SETR-PUP;
    the SETR authors apply the classifier before the last x2, which commutes with it). Auxiliary heads
    (`setr_aux_heads`): mmsegmentation's are 2 stages of x4 (`num_stages=2, up_scale=4`), the SETR authors' one
    stage of x4 (`num_stages=1, up_scale=4`).

    The input LayerNorm: in SETR it is the only norm on the last block's tokens. Here the tokens have already
    passed each expert's own final norm (with its pre-trained affine) and been averaged over experts; the head's
    LayerNorm re-standardises that average per token (an average of K normalised token sets has a smaller,
    expert-dependent scale) and learns its own affine. `input_norm=False` removes it (tokens go to the first
    convolution as the experts' norms left them). Auxiliary heads read intermediate tokens that no norm has
    seen, so there it is SETR's LayerNorm exactly.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        num_stages: int = 4,
        norm: str = "batch",
        up_scale: int = 2,
        input_norm: bool = True,
    ) -> None:
        super().__init__()
        self.input_norm = nn.LayerNorm(in_channels, eps=1e-6) if input_norm else nn.Identity()
        stages = []
        for i in range(num_stages):
            stages.append(
                nn.Sequential(
                    nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=False),
                    _norm(norm, channels),
                    nn.ReLU(inplace=True),
                    nn.Upsample(scale_factor=up_scale, mode="bilinear", align_corners=False),
                )
            )
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, grid: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits at `out_size` (default: up_scale**num_stages times the grid)."""
        x = self.input_norm(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.classifier(self.stages(x))
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        return x


def setr_aux_heads(
    in_channels: int, num_classes: int, count: int = 4, channels: int = 256, norm: str = "batch",
    variant: str = "mmseg",
) -> nn.ModuleList:
    """SETR-PUP's auxiliary heads (training-time only), `count` of them, each a LayerNorm then

    - `variant="mmseg"` (default): mmsegmentation's `SETRUPHead(num_convs=2, up_scale=4, kernel_size=3)`,
      2 x [conv3x3 -> norm -> ReLU -> x4 bilinear], a 1x1 classifier;
    - `variant="setr"`: the SETR authors' `VisionTransformerUpHead(num_conv=2, num_upsampe_layer=2)`
      (fudan-zvg/SETR `vit_up_head.py`), conv3x3 -> norm -> ReLU -> x4 bilinear, a 1x1 classifier (its "two
      convs" are the 3x3 and the classifier);

    then a bilinear resize to the output size."""
    if variant not in AUX_VARIANTS:
        raise ValueError(f"SETR auxiliary head variant must be one of {AUX_VARIANTS}, got {variant!r}")
    stages = 2 if variant == "mmseg" else 1
    return nn.ModuleList(
        SETRPUPHead(in_channels, num_classes, channels=channels, num_stages=stages, norm=norm, up_scale=4)
        for _ in range(count)
    )
