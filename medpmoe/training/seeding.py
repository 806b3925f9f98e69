"""Per-epoch seeds: a resumed run draws the same shuffling, augmentation and dropout as an uninterrupted one."""

from __future__ import annotations

import random

import numpy as np
import torch


class EpochSeed:
    """Ignite handler: at every EPOCH_STARTED seed torch, numpy and `random` with `seed + epoch` and re-seed the
    trainer's dataset's random transforms (MONAI's `set_rnd`). Epoch e then draws the same random numbers whether
    the run went straight through or was resumed from epoch e-1's checkpoint: the sampler's shuffle and the loader
    workers' seeds come from torch's generator, dropout too, and in-process transforms from their own states."""

    def __init__(self, seed: int = 0) -> None:
        """seed: the run's seed (config key 'seed')."""
        self.seed = int(seed)

    def attach(self, engine) -> None:
        """Register on the engine's EPOCH_STARTED event (before its data iterator of the epoch is made)."""
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        """Seed every generator for this epoch."""
        from monai.data.utils import set_rnd

        seed = (self.seed * 100_003 + engine.state.epoch) % 2**32
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        loader = getattr(engine, "data_loader", None)
        if loader is not None and getattr(loader, "dataset", None) is not None:
            set_rnd(loader.dataset, seed)
        feeder = getattr(getattr(engine, "prepare_batch", None), "__self__", None)  # medpmoe.data.BatchFeeder
        if hasattr(feeder, "set_seed"):  # batch augmentation: its own stream, restarted per epoch
            feeder.set_seed(seed)
