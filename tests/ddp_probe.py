"""Imported by the torchrun tests' overlay config inside each rank: records checkpoint writes and what each rank saw."""

from __future__ import annotations

from pathlib import Path

import torch

WRITES: list[str] = []


def install() -> None:
    """Count this rank's prompt-checkpoint writes."""
    import medpmoe.training.checkpoint as ckpt

    real = ckpt.save_prompt_checkpoint
    if getattr(real, "probe", False):
        return

    def save(path, *args, **kwargs):
        WRITES.append(str(path))
        return real(path, *args, **kwargs)

    save.probe = True
    ckpt.save_prompt_checkpoint = save


def dump(folder: str, model, sampler) -> None:
    """Write rank{r}.pt: trainable weights, the training items' indices of the last epoch, checkpoint writes."""
    import ignite.distributed as idist

    state = {k: v.detach().cpu() for k, v in model.trainable_state_dict().items()}
    indices = list(iter(sampler)) if sampler is not None else None
    torch.save({"state": state, "indices": indices, "writes": list(WRITES), "world": idist.get_world_size()},
               Path(folder) / f"rank{idist.get_rank()}.pt")
