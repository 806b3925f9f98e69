"""The training data path that keeps a GPU fed: a compact cache of the deterministic chain, batch augmentation on
the training device, loader threads chosen from the machine's cores.

- `cached_dataset`: the deterministic transforms (decode, plane, orientation, resize, intensity scaling) run once
  per item; images are kept as uint8 (`Compactd`: round(x * 255), at most 1/510 from the float value), masks as
  uint8 class indices. The cache lives in memory when its estimated size fits `max_bytes` (default a quarter of
  the available memory), else on disk under `cache_dir/<data hash>` (MONAI's PersistentDataset), else partly in
  memory; the choice and its size are logged, and filling it shows a progress bar.
- `BatchFeeder`: collates cached items into uint8 batches; `prepare` (SupervisedTrainer's `prepare_batch`) moves
  a batch to the device (non-blocking), turns it into float [0, 1] images and long masks and runs the batch
  augmentation (`BatchAugment`) there. On a CPU trainer the loader thread does that work instead, batched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from monai.data import ThreadDataLoader
from monai.transforms import Compose, MapTransform

from medpmoe.data.dataset import DataCacheDataset, DataDataset, DataPersistentDataset, _progress, _split_problem
from medpmoe.data.errors import DataError, find_data_error, problems_message, reraise_data_error

log = logging.getLogger("medpmoe.data")
CACHES = ("auto", "memory", "disk", "none")


def auto_workers(num_workers: int | None = None) -> int:
    """`num_workers` when set, else the cores this process may use minus one for the trainer (at least 1, at most 8)."""
    if num_workers is not None:
        return int(num_workers)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


def available_memory() -> int:
    """Bytes of memory available now (psutil when installed, else /proc/meminfo or the physical size)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class Compactd(MapTransform):
    """Float images in [0, 1] -> uint8 (round(x * 255), error <= 1/510); integer masks -> uint8 class indices;
    metadata dropped (plain tensors pickle small and load with weights_only=True)."""

    def __init__(self, image_key: str = "image", label_key: str = "label") -> None:
        """Keys of the image and of its label (a mask, or a class label left as it is)."""
        super().__init__([image_key, label_key], allow_missing_keys=True)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data: Mapping) -> dict:
        """The compact copy of one item."""
        d = dict(data)
        x = torch.as_tensor(d[self.image_key]).as_subclass(torch.Tensor)
        d[self.image_key] = (x.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        y = d.get(self.label_key)
        if isinstance(y, torch.Tensor):
            y = y.as_subclass(torch.Tensor)
            small = y.numel() == 0 or 0 <= int(y.min()) and int(y.max()) < 256
            if y.ndim == x.ndim and not y.is_floating_point() and small:
                y = y.to(torch.uint8)
            d[self.label_key] = y
        return d


def _describe(obj, depth: int = 3):
    """A stable description of a transform chain (class names, simple settings, nested transforms' settings) for
    the disk cache key; memory addresses never enter it."""
    if isinstance(obj, (int, float, str, bool, type(None))):
        return obj
    if isinstance(obj, (tuple, list)):
        return [_describe(v, depth) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(str(v) for v in obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    if depth == 0 or not hasattr(obj, "__dict__") or isinstance(obj, type):
        return type(obj).__name__
    return [type(obj).__name__, {k: _describe(v, depth - 1) for k, v in sorted(vars(obj).items())
                                 if not k.startswith("_") and k not in ("R", "lazy", "tracing")}]


def data_hash(items: Sequence[Mapping], transform=None) -> str:
    """sha256 over the items' files (path, size, modification time) and the transform chain's settings."""
    h = hashlib.sha256()
    for it in items:
        for key in sorted(it):
            value = it[key]
            h.update(f"{key}={value}".encode())
            if isinstance(value, str) and os.path.isfile(value):
                st = os.stat(value)
                h.update(f":{st.st_size}:{st.st_mtime_ns}".encode())
    if transform is not None:
        h.update(json.dumps(_describe(transform), sort_keys=True, default=lambda o: type(o).__name__).encode())
    return h.hexdigest()[:24]


def _fill_disk(ds: DataPersistentDataset, workers: int, progress: bool) -> None:
    """Write every item's cache file now (threads, a progress bar), reporting all bad items in one DataError."""
    from concurrent.futures import ThreadPoolExecutor

    bar, problems = _progress(len(ds.data), "caching to disk", progress), []
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(ds._cachecheck, item) for item in ds.data]
        for item, fut in zip(ds.data, futures):
            try:
                fut.result()
            except Exception as e:
                err = find_data_error(e)
                if err is None:
                    for f in futures:
                        f.cancel()
                    raise
                problems.append(_split_problem(str(err), item))
            bar.update()
    bar.close()
    if problems:
        raise DataError(problems_message(problems, "bad items while caching the dataset"))


def cached_dataset(data: Sequence[Mapping], transform: Callable, cache: str = "auto", cache_dir: str | None = None,
                   max_bytes: int | None = None, num_workers: int | None = None, progress: bool = True):
    """A dataset of `transform(item)` computed once per item and kept compact (`Compactd`), in memory, on disk or
    not at all (`cache`: 'auto', 'memory', 'disk', 'none'); see the module docstring. `.cache_info` says what
    was chosen: {"cache": ..., "items": ..., "bytes": ...}."""
    if cache not in CACHES:
        raise ValueError(f"config key 'train#dataset#cache' must be one of {CACHES}, got {cache!r}")
    data, workers = list(data), auto_workers(num_workers)
    # one flat chain: MONAI caches up to the first random transform, and a nested Compose counts as random
    parts = list(getattr(transform, "transforms", [transform]))
    chain = (type(transform) if isinstance(transform, Compose) else Compose)([*parts, Compactd()])
    if cache == "none" or not data:
        ds = DataDataset(data, chain)
        ds.cache_info = {"cache": "none", "items": len(data), "bytes": 0}
        log.info("training data: no cache (%d items decoded every epoch)", len(data))
        return ds
    try:
        first = chain(dict(data[0]))
    except Exception as e:
        reraise_data_error(e)
    per_item = sum(v.nbytes for v in first.values() if isinstance(v, torch.Tensor)) + 256
    total = per_item * len(data)
    budget = int(max_bytes) if max_bytes is not None else available_memory() // 4
    if cache == "auto":
        cache = "memory" if total <= budget or not cache_dir else "disk"
    if cache == "disk":
        if not cache_dir:
            raise ValueError("config key 'train#dataset#cache' is 'disk' but no cache_dir is set")
        folder = Path(cache_dir).expanduser() / data_hash(data, transform)
        ds = DataPersistentDataset(data, chain, cache_dir=folder)
        _fill_disk(ds, workers, progress)
        ds.cache_info = {"cache": "disk", "items": len(data), "bytes": total, "dir": str(folder)}
        log.info("training data cache: disk, %d items, %.1f MiB (uint8) in %s", len(data), total / 2**20, folder)
        return ds
    rate = 1.0 if total <= budget else budget / total
    ds = DataCacheDataset(data, chain, cache_rate=rate, num_workers=workers, progress=progress, copy_cache=False)
    ds.cache_info = {"cache": "memory", "items": ds.cache_num, "bytes": per_item * ds.cache_num}
    log.info("training data cache: memory, %d of %d items, %.1f MiB (uint8; budget %.0f MiB)", ds.cache_num,
             len(data), per_item * ds.cache_num / 2**20, budget / 2**20)
    return ds


class BatchFeeder:
    """Collate compact items and finish batches on the training device: uint8 -> float [0, 1] images, uint8 ->
    long masks, then `augmentation` (e.g. `BatchAugment`) when given. `device` is the training device: on CUDA the
    loader hands over uint8 batches and `prepare` does the rest on the GPU; on the CPU `collate` does it in the
    loader's thread, so `prepare` only moves tensors."""

    def __init__(self, augmentation: Callable | None = None, device: str | torch.device = "cpu") -> None:
        """augmentation: a callable on batch dicts (None: no augmentation, e.g. validation)."""
        self.augmentation = augmentation
        self.device = torch.device(device)

    @property
    def on_device(self) -> bool:
        """True when the batches are finished in `prepare` (training on an accelerator)."""
        return self.device.type != "cpu"

    def set_seed(self, seed: int) -> None:
        """Restart the augmentation's random stream (called per epoch by `medpmoe.training.EpochSeed`)."""
        if hasattr(self.augmentation, "set_seed"):
            self.augmentation.set_seed(seed)

    def finish(self, batch: dict) -> dict:
        """Float images, long masks, augmented: on whatever device the batch is on."""
        out = self.augmentation(batch) if self.augmentation is not None else dict(batch)  # uint8 in, float out
        x = out["image"]
        out["image"] = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        y = out.get("label")
        if isinstance(y, torch.Tensor) and y.dtype == torch.uint8:
            out["label"] = y.long()
        return out

    def collate(self, items: Sequence[Mapping]) -> dict:
        """Stack items (keys "image" and "label") into a batch; finished here on a CPU trainer."""
        from torch.utils.data import default_collate

        batch = default_collate([{k: v for k, v in it.items() if k in ("image", "label")} for it in items])
        return batch if self.on_device else self.finish(batch)

    def prepare(self, batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
        """SupervisedTrainer's `prepare_batch`: (images, labels) on `device`, finished when still uint8."""
        device = torch.device(device) if device is not None else self.device
        batch = {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
                 for k, v in batchdata.items()}
        if batch["image"].dtype == torch.uint8:
            batch = self.finish(batch)
        return batch["image"], batch.get("label")


def train_loader(dataset, feeder: BatchFeeder, batch_size: int, sampler=None, num_workers: int | None = 0,
                 buffer_size: int = 2, drop_last: bool = False) -> ThreadDataLoader:
    """MONAI ThreadDataLoader over `dataset` whose batches `feeder.collate` makes, prefetched `buffer_size` ahead
    in a background thread (overlapping the training step); `num_workers` worker processes (None: none for a
    dataset wholly cached in memory, else from the cores). Shuffled unless a `sampler` is given; pinned memory on
    CUDA."""
    if num_workers is None:  # a cache wholly in memory needs no worker processes: the loader thread stacks
        info = getattr(dataset, "cache_info", {})
        num_workers = 0 if info.get("cache") == "memory" and info.get("items") == len(dataset) else auto_workers()
    return ThreadDataLoader(dataset, buffer_size=buffer_size, batch_size=batch_size, sampler=sampler,
                            shuffle=sampler is None, num_workers=int(num_workers),
                            collate_fn=feeder.collate, pin_memory=feeder.on_device and torch.cuda.is_available(),
                            drop_last=drop_last)
