"""The self-supervised methods around a timm ViT, built from lightly's parts: MAE (masked autoencoding, the
default) and DINO (self-distillation with a momentum teacher)."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("mae", "dino")


def create_vit(arch: str, img_size: int, arch_kwargs: dict | None = None):
    """A randomly initialised timm VisionTransformer without a classifier (`num_classes=0`)."""
    from timm.models.vision_transformer import VisionTransformer

    vit = timm.create_model(arch, pretrained=False, img_size=img_size, num_classes=0, **dict(arch_kwargs or {}))
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"config key 'arch': {arch!r} is not a timm VisionTransformer (use a vit_* name)")
    return vit


class MAE(nn.Module):
    """Masked autoencoder (He et al. 2022): lightly's MaskedVisionTransformerTIMM encodes the kept patches, its
    MaskedVisionTransformerDecoderTIMM predicts the pixels of the masked ones; loss = MSE on masked patches of the
    normalised image (per-patch normalised with `norm_pix_loss`)."""

    def __init__(self, vit, mean: Sequence[float], std: Sequence[float], mask_ratio: float = 0.75,
                 decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4,
                 norm_pix_loss: bool = False) -> None:
        from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM

        super().__init__()
        if vit.num_prefix_tokens > int(vit.has_class_token):
            raise ValueError("config key 'arch_kwargs': MAE pretraining does not support register tokens")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"config key 'mask_ratio' must lie in (0, 1), got {mask_ratio}")
        self.mask_ratio, self.norm_pix_loss = float(mask_ratio), bool(norm_pix_loss)
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.backbone.mask_token.requires_grad_(False)  # the encoder drops masked patches (the decoder has its own)
        self.prefix = vit.num_prefix_tokens
        self.decoder_embed = nn.Linear(vit.embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, embed_dim=decoder_dim, depth=decoder_depth,
            num_heads=decoder_heads, num_prefix_tokens=self.prefix)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * 3)
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1), persistent=False)

    @property
    def encoder(self):
        """The timm ViT being pretrained (what becomes the expert)."""
        return self.backbone.vit

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the data's mean/std (as the expert will see them)."""
        return (images - self.mean) / self.std

    def reconstruct(self, images: torch.Tensor) -> dict:
        """Mask, encode, decode [0, 1] `images`: the masked patch indices, predictions and targets (patch order)."""
        from lightly.models import utils

        x = self.normalise(images)
        n = self.backbone.sequence_length
        idx_keep, idx_mask = utils.random_token_mask((x.shape[0], n), self.mask_ratio,
                                                     mask_class_token=self.prefix == 0, device=x.device)
        tokens = self.decoder_embed(self.backbone.encode(x, idx_keep=idx_keep))
        full = utils.repeat_token(self.decoder.mask_token, (x.shape[0], n))
        full = utils.set_at_index(full, idx_keep, tokens.type_as(full))
        pred = self.decoder_pred(utils.get_at_index(self.decoder(full), idx_mask))
        patches = utils.patchify(x, self.patch_size)
        target = utils.get_at_index(patches, idx_mask - self.prefix)
        if self.norm_pix_loss:
            mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mu) / (var + 1e-6).sqrt()
        return {"idx_mask": idx_mask - self.prefix, "pred": pred, "target": target, "patches": patches}

    def forward(self, images: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        """The MAE loss of a batch of [0, 1] images (B, 3, S, S)."""
        out = self.reconstruct(images)
        return F.mse_loss(out["pred"].float(), out["target"].float())

    def after_step(self, progress: float) -> None:
        """Nothing to do after an optimizer step (DINO updates its teacher here)."""


class DINO(nn.Module):
    """DINO (Caron et al. 2021) with lightly's DINOProjectionHead and DINOLoss: the student sees every view, the
    teacher (an exponential moving average of the student, momentum `momentum` -> 1 on a cosine) the global ones."""

    def __init__(self, vit, output_dim: int = 2048, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 teacher_temp: float = 0.04, momentum: float = 0.996) -> None:
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.student = vit
        self.student_head = DINOProjectionHead(vit.embed_dim, hidden_dim, bottleneck_dim, output_dim)
        self.teacher = copy.deepcopy(vit)
        self.teacher_head = DINOProjectionHead(vit.embed_dim, hidden_dim, bottleneck_dim, output_dim)
        self.teacher_head.load_state_dict(self.student_head.state_dict())  # weight_norm heads refuse deepcopy
        deactivate_requires_grad(self.teacher)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=output_dim, teacher_temp=teacher_temp, warmup_teacher_temp=teacher_temp)
        self.base_momentum = float(momentum)

    @property
    def encoder(self):
        """The teacher ViT (DINO's result)."""
        return self.teacher

    def forward(self, views: list[torch.Tensor], epoch: int = 0) -> torch.Tensor:
        """The DINO loss of a batch of views (the first two global), each (B, 3, s, s), already normalised."""
        with torch.no_grad():
            teacher = [self.teacher_head(self.teacher(v)) for v in views[:2]]
        student = [self.student_head(self.student(v)) for v in views]
        return self.criterion([t.float() for t in teacher], [s.float() for s in student])

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """Move the teacher towards the student; `progress` in [0, 1] sets the momentum (cosine to 1)."""
        from lightly.models.utils import update_momentum

        m = 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * min(1.0, progress)) + 1) / 2
        update_momentum(self.student, self.teacher, m)
        update_momentum(self.student_head, self.teacher_head, m)


def build_method(method: str, vit, mean, std, **kwargs) -> nn.Module:
    """MAE or DINO around `vit`; `kwargs` are the method's own settings (mask_ratio, decoder_dim, output_dim, ...)."""
    if method == "mae":
        return MAE(vit, mean, std, **kwargs)
    if method == "dino":
        return DINO(vit, **kwargs)
    raise ValueError(f"config key 'method' must be one of {METHODS}, got {method!r}")
