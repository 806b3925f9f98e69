"""SAM-family image encoders (SAM, MedSAM, LVM-Med ViT-B) as prompted experts, on timm's SAM ViT.

SAM's `ImageEncoderViT` (timm `VisionTransformerSAM`) has no CLS token, windowed attention in most blocks, global
attention in a few, decomposed relative position terms in every block and a conv neck. Prompts enter it the way
VPT prompts Swin (Jia et al. 2022, `PromptedSwinTransformerBlock`): in a windowed block every window attends to
[prompts, its window tokens], the prompts' outputs are averaged over the windows of their image; in a global
block the prompts join the flattened grid. Relative position terms act between grid tokens only (prompts get
none, as query or key). See docs/methods.md ("Prompts in SAM encoders") for the equations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import timm
import torch
from timm.layers import resample_abs_pos_embed_nhwc
from timm.models import vision_transformer_sam as tsam
from torch import nn
from torch.nn import functional as F

from medpmoe.experts.base import IMAGENET_MEAN_STD, Expert, Preprocessing

StateDict = dict[str, torch.Tensor]


def prompted_attention(
    attn: tsam.Attention, grid: torch.Tensor, prompts: torch.Tensor, temperature: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """timm SAM attention over [prompts, grid tokens]: (B, h, w, C) grid and (B, Np, C) prompts ->
    (prompt outputs (B, Np, C), grid outputs (B, h, w, C)).

    The decomposed relative position bias of SAM applies between grid tokens; rows and columns of prompt tokens
    get zero bias. With Np = 0 this is timm's `Attention.forward` operation for operation. `temperature` (GaPT's
    learnable scalar t) divides the whole attention logits, `softmax((q k^T * scale + bias(q)) / t)`, computed as
    attention on q / t (SAM's decomposed relative terms are linear in q, so they are divided too); t = 1 is the
    untempered block bit for bit.
    """
    B, h, w, _ = grid.shape
    n_p = prompts.shape[1]
    n = n_p + h * w
    x = torch.cat([prompts, grid.reshape(B, h * w, -1)], dim=1) if n_p else grid.reshape(B, h * w, -1)
    qkv = attn.qkv(x).view(B, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * attn.num_heads, n, -1).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if temperature is not None:
        q = q / temperature  # before the bias: SAM's relative terms are linear in q, so they are divided too
    bias = None
    if attn.use_rel_pos:
        bias = tsam.get_decomposed_rel_pos_bias(q[:, n_p:], attn.rel_pos_h, attn.rel_pos_w, (h, w), (h, w))
        if n_p:
            bias = F.pad(bias, (n_p, 0, n_p, 0))  # zero bias for prompt rows (queries) and columns (keys)
    if attn.fused_attn:
        drop = attn.attn_drop.p if attn.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
    else:
        a = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            a = a + bias
        x = attn.attn_drop(a.softmax(dim=-1)) @ v
    x = x.view(B, attn.num_heads, n, -1).transpose(1, 2).reshape(B, n, -1)
    x = attn.proj_drop(attn.proj(x))
    return x[:, :n_p], x[:, n_p:].view(B, h, w, -1)


class PromptedSamBlock(tsam.Block):
    """timm's SAM block, also taking a flat (B, Np + h*w, D) sequence with the Np prompt tokens first.

    A (B, h, w, D) input runs timm's own forward unchanged. A flat input is split into prompts and the grid
    (`grid_size`, set by the expert); windowed blocks attend per window to [prompts, window] and average the
    prompt outputs over the image's windows (VPT's prompted Swin); global blocks attend over [prompts, grid].
    """

    grid_size: tuple[int, int] = (0, 0)  #: the expert's patch grid (h, w), set by `SamExpert`

    def forward(self, x: torch.Tensor, temperature: torch.Tensor | None = None) -> torch.Tensor:
        """(B, h, w, D) -> timm's SAM block; (B, Np + h*w, D) -> the prompted block, same shape. `temperature`
        (a scalar tensor, GaPT) divides the attention logits of the flat path (`prompted_attention`)."""
        if x.ndim == 4:
            if temperature is not None:
                raise ValueError("SAM block: an attention temperature needs the flat (B, Np + h*w, D) input")
            return super().forward(x)
        h, w = self.grid_size
        B, T, C = x.shape
        n_p = T - h * w
        if n_p < 0:
            raise ValueError(f"SAM block got {T} tokens for a {h}x{w} grid")
        y = self.norm1(x)
        prompts, grid = y[:, :n_p], y[:, n_p:].reshape(B, h, w, C)
        if self.window_size > 0:
            windows, pad_hw = tsam.window_partition(grid, self.window_size)
            n_win = windows.shape[0] // B
            p_out, g_out = prompted_attention(self.attn, windows, prompts.repeat_interleave(n_win, dim=0), temperature)
            g_out = tsam.window_unpartition(g_out, self.window_size, (h, w), pad_hw)
            p_out = p_out.view(B, n_win, n_p, C).mean(dim=1)  # one prompt output per image: mean over its windows
        else:
            p_out, g_out = prompted_attention(self.attn, grid, prompts, temperature)
        y = torch.cat([p_out, g_out.reshape(B, h * w, C)], dim=1) if n_p else g_out.reshape(B, h * w, C)
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class SamExpert(Expert):
    """A frozen timm `VisionTransformerSAM` (SAM / MedSAM / LVM-Med image encoder) as a prompted expert.

    No prefix tokens (no CLS): the "patch tokens" are the h x w grid and pooling is the mean over it. `features`
    picks the expert's output tokens: `"neck"` (default) the conv neck's LayerNorm-ed 256-channel map (what SAM's
    mask decoder reads; `out_dim` 256), or `"blocks"` the last block's raw 768-d tokens (what LVM-Med's
    classification code pools). The neck runs on the (h, w) grid after the model removed the prompts.
    """

    def __init__(
        self,
        vit: tsam.VisionTransformerSAM,
        name: str = "sam",
        mean_std: tuple[Sequence[float], Sequence[float]] = IMAGENET_MEAN_STD,
        img_size: int | None = None,
        pooling: str = "mean",
        features: str = "neck",
        trainable: bool = False,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        if not isinstance(vit, tsam.VisionTransformerSAM):
            raise TypeError(f"expert {name!r}: expected a timm VisionTransformerSAM, got {type(vit).__name__}")
        if not all(isinstance(b, PromptedSamBlock) for b in vit.blocks):
            raise TypeError(f"expert {name!r}: build the SAM ViT with block_fn=PromptedSamBlock (see create_sam_vit)")
        if any(b.attn.rope is not None for b in vit.blocks):
            raise ValueError(f"expert {name!r}: rotary-embedding SAM variants are not supported")
        if features not in ("neck", "blocks"):
            raise ValueError(f"expert {name!r}: features must be 'neck' or 'blocks', got {features!r}")
        if features == "neck" and not isinstance(vit.neck, nn.Sequential):
            raise ValueError(f"expert {name!r}: this SAM ViT has no conv neck; use features='blocks'")
        vit.reset_classifier(0)
        super().__init__(
            vit, name, mean_std, int(img_size or vit.patch_embed.img_size[0]), int(vit.patch_embed.patch_size[0]),
            vit.embed_dim, 0, False, pooling, trainable, preprocessing,
        )
        self.features = features
        for blk in vit.blocks:
            blk.grid_size = self.grid_size

    @property
    def blocks(self) -> nn.Sequential:
        """The prompted SAM blocks, each mapping (B, Np + h*w, D) -> same shape."""
        return self.vit.blocks

    @property
    def out_dim(self) -> int:
        """Width of `norm`'s tokens: the neck's channels (256 for SAM ViT-B) or the block width."""
        return int(self.vit.neck[0].out_channels) if self.features == "neck" else self.embed_dim

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + absolute position embedding (when the model has one): (B, h*w, D), row-major grid."""
        vit = self.vit
        x = vit.patch_embed(self.preprocess(images))  # (B, h, w, D)
        if vit.pos_embed is not None:
            x = x + resample_abs_pos_embed_nhwc(vit.pos_embed, x.shape[1:3])  # a no-op at the loaded grid
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))
        return x.flatten(1, 2)

    def norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The conv neck on the (h, w) grid -> (B, h*w, 256), or the block tokens unchanged (`features='blocks'`)."""
        if self.features == "blocks":
            return tokens
        h, w = self.grid_size
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        return self.vit.neck(grid).flatten(2).transpose(1, 2)


def create_sam_vit(arch: str, img_size: int, **kwargs) -> tsam.VisionTransformerSAM:
    """`timm.create_model(arch)` for a SAM ViT with prompt-capable blocks, built at `img_size` (no classifier)."""
    return timm.create_model(arch, pretrained=False, img_size=img_size, num_classes=0, block_fn=PromptedSamBlock,
                             **kwargs)


def resample_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """A (L, C) relative position table linearly resampled to `length` rows, as SAM's `get_rel_pos` does."""
    if rel_pos.shape[0] == length:
        return rel_pos
    out = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
    return out.reshape(-1, length).permute(1, 0)


def fit_sam_geometry(sd: Mapping[str, torch.Tensor], model: tsam.VisionTransformerSAM) -> StateDict:
    """Resample a SAM state dict's grid-dependent tensors to `model`'s input size (same widths only).

    `pos_embed` (1, H, W, D) is resampled bicubically (timm's `resample_abs_pos_embed_nhwc`, what timm's SAM does
    at run time for another input size) and the global blocks' `rel_pos_h/w` (2H-1, C) linearly (SAM's
    `get_rel_pos`). Tensors whose widths differ are left alone so the strict check reports them.
    """
    own = model.state_dict()
    out = dict(sd)
    for k, v in sd.items():
        want = own.get(k)
        if want is None or v.shape == want.shape:
            continue
        if k == "pos_embed" and v.ndim == 4 and v.shape[-1] == want.shape[-1]:
            out[k] = resample_abs_pos_embed_nhwc(v, list(want.shape[1:3]))
        elif k.endswith(("attn.rel_pos_h", "attn.rel_pos_w")) and v.ndim == 2 and v.shape[1] == want.shape[1]:
            out[k] = resample_rel_pos(v, want.shape[0])
    return out


def tiny_sam_expert(
    name: str = "tiny_sam",
    embed_dim: int = 32,
    depth: int = 2,
    num_heads: int = 2,
    patch_size: int = 8,
    img_size: int = 48,
    window_size: int = 4,
    global_attn_indexes: Sequence[int] = (1,),
    neck_chans: int = 16,
    seed: int | None = 0,
    **kwargs,
) -> SamExpert:
    """A small randomly initialised SAM-style expert (windowed + global blocks, relative positions, conv neck)."""
    if seed is not None:
        torch.manual_seed(seed)
    vit = create_sam_vit("samvit_base_patch16", img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, window_size=window_size, global_attn_indexes=tuple(global_attn_indexes),
                         neck_chans=neck_chans)
    with torch.no_grad():  # SAM zero-initialises its position tables: make them random so they matter in tests
        for n, p in vit.named_parameters():
            if "rel_pos" in n or n == "pos_embed":
                p.normal_(0, 0.5)
    return SamExpert(vit, name=name, img_size=img_size, **kwargs)
