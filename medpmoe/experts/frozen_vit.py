"""A frozen timm VisionTransformer exposed as embed -> blocks -> norm, with its own input normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medpmoe.experts.base import CLIP_MEAN_STD, IMAGENET_MEAN_STD, Expert, Preprocessing
from medpmoe.experts.positions import POS_INTERPOLATIONS, interpolate_patch_positions

__all__ = ["FrozenViTExpert", "tiny_vit_expert", "IMAGENET_MEAN_STD", "CLIP_MEAN_STD"]


class FrozenViTExpert(Expert):
    """A frozen timm ViT: prefix tokens (CLS, registers) first, prompts after them, the final LayerNorm as `norm`.

    Inputs are images scaled to [0, 1] (B, 3, H, W). The expert resizes them to its own `img_size`
    (so experts of different patch sizes can see one image at sizes giving the same token grid), applies its
    mean/std, and exposes the pieces a prompt method needs: `embed` (patch embedding + prefix tokens +
    position embedding), `blocks`, and `norm`.
    """

    def __init__(
        self,
        vit: VisionTransformer,
        name: str = "vit",
        mean_std: tuple[Sequence[float], Sequence[float]] = IMAGENET_MEAN_STD,
        img_size: int | None = None,
        pooling: str = "cls",
        trainable: bool = False,
        pos_interpolation: str | None = None,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"expert {name!r}: expected a timm VisionTransformer, got {type(vit).__name__}")
        if pos_interpolation not in (None, *POS_INTERPOLATIONS):
            raise ValueError(f"expert {name!r}: pos_interpolation must be None or one of {POS_INTERPOLATIONS}, "
                             f"got {pos_interpolation!r}")
        vit.reset_classifier(0)
        super().__init__(
            vit, name, mean_std, int(img_size or vit.patch_embed.img_size[0]), int(vit.patch_embed.patch_size[0]),
            vit.embed_dim, vit.num_prefix_tokens, vit.has_class_token, pooling, trainable, preprocessing,
        )
        self.pos_interpolation = pos_interpolation

    @property
    def blocks(self) -> nn.Sequential:
        """The transformer blocks, each mapping (B, T, D) -> (B, T, D)."""
        return self.vit.blocks

    @property
    def out_dim(self) -> int:
        """Width of the tokens `norm` returns: the block width."""
        return self.embed_dim

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens entering block 0: (B, prefix + N, D), prefix = CLS and register tokens. With `pos_interpolation`
        the stored position table is interpolated to the patch grid at run time (`medpmoe.experts.positions`)."""
        vit = self.vit
        x = vit.patch_embed(self.preprocess(images))
        x = vit._pos_embed(x) if self.pos_interpolation is None else self._authors_pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def _authors_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, D) -> prefix + patch tokens with the position table interpolated to this input's
        grid as the expert's authors do (the class row, when the table has one, is kept as it is)."""
        vit = self.vit
        x = x.flatten(1, 2) if x.ndim == 4 else x
        n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        pos = vit.pos_embed
        patch_pos = interpolate_patch_positions(pos[:, n_prefix:], self.grid_size, self.pos_interpolation)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if vit.no_embed_class:
            x = torch.cat([*prefix, x + patch_pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + torch.cat([pos[:, :n_prefix], patch_pos], dim=1)
        return vit.pos_drop(x)

    def norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final layer norm of the expert's own tokens (prefix + patches; the model removes prompts first)."""
        return self.vit.norm(tokens)


def tiny_vit_expert(
    name: str = "tiny",
    embed_dim: int = 64,
    depth: int = 2,
    num_heads: int = 4,
    patch_size: int = 16,
    img_size: int = 64,
    reg_tokens: int = 0,
    class_token: bool = True,
    pooling: str = "cls",
    seed: int | None = 0,
    preprocessing: Preprocessing | None = None,
    **kwargs,
) -> FrozenViTExpert:
    """A small randomly initialised frozen ViT expert for tests, demos and CPU smoke runs."""
    if seed is not None:
        torch.manual_seed(seed)
    vit = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        num_classes=0,
        reg_tokens=reg_tokens,
        class_token=class_token,
        global_pool="token" if class_token else "avg",
        dynamic_img_size=True,
        **kwargs,
    )
    return FrozenViTExpert(vit, name=name, img_size=img_size, pooling=pooling if class_token else "mean",
                           preprocessing=preprocessing)
