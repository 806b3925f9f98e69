"""Figures a person can judge: MAE reconstructions of held-back images, and the loss curve."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medpmoe.tracking.plots import new_figure


@torch.no_grad()
def mae_outputs(model, images: torch.Tensor, seed: int = 0) -> dict:
    """`model.reconstruct` of [0, 1] `images` with a fixed mask (drawn from `seed`; the run's random state is left
    as it was): {"loss", "original", "masked", "reconstruction"}, images in [0, 1]."""
    from lightly.models import utils

    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.reconstruct(images)
    pred, target, patches, idx = out["pred"].float(), out["target"].float(), out["patches"].float(), out["idx_mask"]
    loss = float(torch.nn.functional.mse_loss(pred, target))
    if model.norm_pix_loss:  # predictions are per-patch normalised: back to the patch's own mean/std
        true = utils.get_at_index(patches, idx)
        pred = pred * (true.var(-1, keepdim=True) + 1e-6).sqrt() + true.mean(-1, keepdim=True)
    masked = utils.set_at_index(patches, idx, torch.zeros_like(pred))  # 0 = the data's mean colour
    recon = utils.set_at_index(patches, idx, pred)

    def image(p):
        x = utils.unpatchify(p, model.patch_size, 3) * model.std + model.mean
        return x.clamp(0, 1).cpu()

    return {"loss": loss, "original": images.float().cpu(), "masked": image(masked), "reconstruction": image(recon)}


def reconstruction_figure(outputs: dict, names: Sequence[str] | None = None, title: str = ""):
    """Three rows (original, masked input, reconstruction with the visible patches kept) by image."""
    rows = ("original", "masked", "reconstruction")
    n = outputs["original"].shape[0]
    fig = new_figure(1.6 * n + 0.8, 5.2)
    axes = fig.subplots(3, n, squeeze=False)
    for r, key in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(outputs[key][c].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(key)
            if r == 0 and names:
                ax.set_title(str(names[c])[-18:], fontsize=7)
    fig.suptitle(title or f"MAE on held-back images (masked-patch MSE {outputs['loss']:.4f})", fontsize=9)
    return fig


def loss_figure(history: Sequence[dict]):
    """Training (and held-back) loss per epoch."""
    fig = new_figure(5, 3.2)
    ax = fig.subplots()
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["loss"] for h in history], marker="o", label="training")
    if any(h.get("holdout_loss") is not None for h in history):
        ax.plot(epochs, [h.get("holdout_loss") for h in history], marker="s", label="held-back images")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    return fig
