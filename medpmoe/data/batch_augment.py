"""Random training augmentation of whole batches with torch ops, on whatever device the batch is on.

`BatchAugment` draws, per image, the same kinds and ranges as the per-item MONAI chain it replaces
(`medpmoe.data.transforms._augment`): horizontal flip (p 0.5), optional vertical flip (p 0.5), an affine warp
(p 0.3: rotation uniform in +-0.15 rad, per-axis zoom 1 + uniform(+-0.1), border padding, bilinear for
images and nearest for masks), intensity scaling x * (1 + uniform(+-0.1)) (p 0.3), intensity shift
x + uniform(+-0.05) (p 0.3), then a clamp to [0, 1]. One `affine_grid`/`grid_sample` call warps every chosen
image of the batch at once, so a GPU trainer augments on the GPU and a CPU trainer batched on the CPU.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


class BatchAugment:
    """Random flips, affine warp and intensity changes of a batch {"image": (B, C, H, W) float in [0, 1],
    "label": optional (B, 1, H, W) mask or per-image class labels}; masks follow the images' geometry."""

    def __init__(self, vertical_flip: bool = False, flip_prob: float = 0.5, affine_prob: float = 0.3,
                 rotate_range: float = 0.15, scale_range: float = 0.1, intensity_prob: float = 0.3,
                 scale_factor: float = 0.1, shift_offset: float = 0.05, seed: int | None = None) -> None:
        """Probabilities and ranges as in `medpmoe.data.transforms._augment`; `seed` fixes the random stream."""
        self.vertical_flip, self.flip_prob, self.affine_prob = vertical_flip, flip_prob, affine_prob
        self.rotate_range, self.scale_range = rotate_range, scale_range
        self.intensity_prob, self.scale_factor, self.shift_offset = intensity_prob, scale_factor, shift_offset
        self.generator = torch.Generator()
        self.generator.manual_seed(torch.initial_seed() if seed is None else seed)

    def set_seed(self, seed: int) -> None:
        """Restart the random stream (e.g. per epoch, from the run's seed)."""
        self.generator.manual_seed(seed)

    def _rand(self, n: int) -> torch.Tensor:
        """n uniform [0, 1) draws on the CPU generator (the same stream on every device)."""
        return torch.rand(n, generator=self.generator)

    def __call__(self, batch: dict) -> dict:
        """A new dict with "image" as augmented float in [0, 1] (uint8 images are read as x / 255) and a mask "label"
        warped alike (its dtype kept); other keys as they were. The input tensors are not modified."""
        x = batch["image"]
        label = batch.get("label")
        mask = isinstance(label, torch.Tensor) and label.ndim == x.ndim and label.shape[-2:] == x.shape[-2:]
        b, dev = x.shape[0], x.device
        flips = [(self._rand(b) < self.flip_prob, -1)]
        if self.vertical_flip:
            flips.append((self._rand(b) < self.flip_prob, -2))
        affine = self._rand(b) < self.affine_prob
        angle = (self._rand(b) * 2 - 1) * self.rotate_range
        scale = 1 + (self._rand(2 * b).view(b, 2) * 2 - 1) * self.scale_range
        do_scale, factor = self._rand(b) < self.intensity_prob, 1 + (self._rand(b) * 2 - 1) * self.scale_factor
        do_shift, offset = self._rand(b) < self.intensity_prob, (self._rand(b) * 2 - 1) * self.shift_offset
        x, y = x.clone(), (label.clone() if mask else None)
        for chosen, dim in flips:  # on the stored dtype (uint8 moves a quarter of float's bytes), chosen images only
            idx = chosen.nonzero().flatten().to(dev)
            x[idx] = x[idx].flip(dim)
            if y is not None:
                y[idx] = y[idx].flip(dim)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if affine.any():  # bilinear interpolation stays within [0, 1]: no clamp needed
            idx = affine.nonzero().flatten()
            theta = _theta(angle[idx], scale[idx]).to(dev, x.dtype)
            grid = F.affine_grid(theta, [len(idx), *x.shape[1:]], align_corners=False)
            idx = idx.to(dev)
            x[idx] = F.grid_sample(x[idx], grid, mode="bilinear", padding_mode="border", align_corners=False)
            if y is not None:
                warped = F.grid_sample(y[idx].to(x.dtype), grid, mode="nearest", padding_mode="border",
                                       align_corners=False)
                y[idx] = warped.round().to(y.dtype)
        changed = do_scale | do_shift
        if changed.any():  # x * gain + shift, clamped to [0, 1], on the changed images only
            idx = changed.nonzero().flatten()
            view = (-1, *([1] * (x.ndim - 1)))
            gain = torch.where(do_scale[idx], factor[idx], torch.ones(len(idx))).to(dev, x.dtype).view(view)
            shift = torch.where(do_shift[idx], offset[idx], torch.zeros(len(idx))).to(dev, x.dtype).view(view)
            idx = idx.to(dev)
            x[idx] = torch.addcmul(shift, x[idx], gain).clamp_(0.0, 1.0)
        out = dict(batch)
        out["image"] = x
        if y is not None:
            out["label"] = y
        return out


def _theta(angle: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(n, 2, 3) `affine_grid` matrices mapping output to input coordinates: the inverse of rotating by `angle`
    and zooming by `scale` (per axis; > 1 enlarges, as MONAI's RandAffine), about the image centre."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot_inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # R(-angle)
    m = rot_inv / scale.unsqueeze(-1)  # S^-1 R^-1 on (x, y) rows
    return torch.cat([m, torch.zeros(len(angle), 2, 1)], dim=-1)
