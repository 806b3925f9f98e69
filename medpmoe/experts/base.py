"""The interface every frozen expert offers the model: preprocess -> embed -> blocks -> norm -> pool."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
RESIZES = ("square", "longest_side")


@dataclass(frozen=True)
class Preprocessing:
    """How an expert turns [0, 1] images (B, 3, H, W) into its input of `img_size` x `img_size`, in this order:

    1. resize: `"square"` to img_size x img_size; `"longest_side"` the longest side to img_size keeping the aspect
       ratio (SAM's `ResizeLongestSide`: new side int(side * scale + 0.5));
    2. `minmax`: each image scaled to [0, 1] by its own min and max (MedSAM's inference);
    3. the expert's mean/std;
    4. `"longest_side"` only: zeros padded at the bottom and right to img_size x img_size (SAM's `preprocess`).

    `interpolation` ("bilinear" or "bicubic") and `antialias` are passed to `F.interpolate`.
    """

    resize: str = "square"
    interpolation: str = "bilinear"
    antialias: bool = False
    minmax: bool = False

    def __post_init__(self) -> None:
        if self.resize not in RESIZES:
            raise ValueError(f"preprocessing resize must be one of {RESIZES}, got {self.resize!r}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"preprocessing interpolation must be 'bilinear' or 'bicubic', got {self.interpolation!r}")

    def as_dict(self) -> dict:
        """Plain values (for run summaries)."""
        return asdict(self)


class Expert(nn.Module):
    """A frozen pre-trained encoder (`self.vit`, a timm model) driven block by block by `PMoEModel`.

    Images enter in [0, 1] (B, 3, H, W); the expert resizes them to its `img_size` and applies its own mean/std.
    Subclasses provide `embed` (tokens entering block 0: (B, prefix + N, embed_dim)), `blocks` (each maps
    (B, prefix + Np + N, embed_dim) with the Np prompt tokens right after the prefix to the same shape), `norm`
    (the expert's output map on its own prefix + patch tokens, prompts removed: (B, prefix + N, out_dim)) and
    `out_dim`. Weights are frozen (`requires_grad=False`) and eval mode is pinned unless `trainable`.
    """

    checkpoint_sha256: str | None = None  #: sha256 of the loaded weights file (None: random or tiny expert)
    checkpoint_path: str | None = None  #: path of the loaded weights file

    def __init__(
        self,
        vit: nn.Module,
        name: str,
        mean_std: tuple[Sequence[float], Sequence[float]],
        img_size: int,
        patch_size: int,
        embed_dim: int,
        num_prefix_tokens: int,
        has_class_token: bool,
        pooling: str,
        trainable: bool = False,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"expert {name!r}: pooling must be 'cls' or 'mean', got {pooling!r}")
        if pooling == "cls" and not has_class_token:
            raise ValueError(f"expert {name!r} has no CLS token: use pooling='mean'")
        if img_size % patch_size:
            raise ValueError(f"expert {name!r}: img_size {img_size} is not a multiple of the patch size {patch_size}")
        self.vit = vit
        self.name = name
        self.pooling = pooling
        self.trainable = trainable
        self.embed_dim = int(embed_dim)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.patch_size = int(patch_size)
        self.img_size = int(img_size)
        self.preprocessing = preprocessing or Preprocessing()
        self.register_buffer("mean", torch.tensor(mean_std[0]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(mean_std[1]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(trainable)
        self.train(False)

    # --- frozen behaviour -------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Expert:
        """Keep frozen experts in eval mode (no dropout / drop-path) whatever the outer model does."""
        return super().train(mode and self.trainable)

    # --- what subclasses provide ----------------------------------------------------------------------------
    @property
    def blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks, each mapping (B, prefix + Np + N, D) -> same shape."""
        raise NotImplementedError

    @property
    def out_dim(self) -> int:
        """Width of the tokens `norm` returns (what the model averages across experts)."""
        raise NotImplementedError

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens entering block 0: (B, prefix + N, embed_dim)."""
        raise NotImplementedError

    def norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The expert's output map on its own tokens (B, prefix + N, embed_dim) -> (B, prefix + N, out_dim)."""
        raise NotImplementedError

    # --- geometry ---------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch-token grid (h, w) at this expert's input size."""
        g = self.img_size // self.patch_size
        return g, g

    @property
    def num_patches(self) -> int:
        """Number of patch tokens at this expert's input size."""
        h, w = self.grid_size
        return h * w

    def num_backbone_parameters(self) -> int:
        """Parameter count of the wrapped backbone."""
        return sum(p.numel() for p in self.vit.parameters())

    # --- forward pieces ---------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> this expert's input: resized, (min-max scaled,) normalised with its mean/std (and
        padded), as its `preprocessing` says (`Preprocessing`)."""
        p, s = self.preprocessing, self.img_size
        h, w = images.shape[-2:]
        size = (s, s)
        if p.resize == "longest_side":
            scale = s / max(h, w)
            size = (int(h * scale + 0.5), int(w * scale + 0.5))
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode=p.interpolation, align_corners=False,
                                   antialias=p.antialias)
        if p.minmax:
            lo = images.amin(dim=(1, 2, 3), keepdim=True)
            hi = images.amax(dim=(1, 2, 3), keepdim=True)
            images = (images - lo) / (hi - lo).clamp_min(1e-8)
        images = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        if size != (s, s):
            images = F.pad(images, (0, s - size[1], 0, s - size[0]))
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Plain frozen forward (no prompts): output tokens (B, prefix + N, out_dim)."""
        x = self.embed(images)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pool output tokens (prompts removed) to (B, out_dim): CLS token or mean of patch tokens."""
        if self.pooling == "cls":
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens :].mean(dim=1)

    def patch_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, prefix + N, C) -> feature map (B, C, h, w)."""
        h, w = self.grid_size
        patches = tokens[:, self.num_prefix_tokens :]
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, h, w)
