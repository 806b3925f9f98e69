"""Unlabeled images for pretraining: folders and datalists gathered, checked, cached (deterministic part) and
augmented, with the data's mean/std and a content hash. Kept small so a faster loader can replace `make_loader`."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader
from monai.transforms import (CastToTyped, MapTransform, RandFlipd, RandSpatialCropd, Resized)

from medpmoe.data.dataset import DataCacheDataset, DataDataset
from medpmoe.data.errors import DataError
from medpmoe.data.readers import IMAGE_SUFFIXES
from medpmoe.data.transforms import CheckImaged, DataCompose, LoadMedicalImaged, ScaleUnitd, ToPlane2Dd, ToRGBd

DATALIST_SUFFIXES = (".json", ".csv")


def _folder_images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_SUFFIXES))


def _datalist_images(path: Path) -> list[str]:
    from medpmoe.data.datalist import load_datalist, read_datalist_file

    doc = read_datalist_file(path)
    keys = [k for k in ("training", "validation", "test") if isinstance(doc.get(k), list)]
    if not keys:
        raise DataError(f"{path}: no 'training', 'validation' or 'test' list in the datalist")
    return [it["image"] for k in keys for it in load_datalist(path, k, "classification")]


def gather_images(sources: str | Sequence[str]) -> list[str]:
    """Every image of the given folders (searched recursively) and datalists (JSON/CSV: their training, validation
    and test items), in order, each path once."""
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources or [])
    if not sources:
        raise DataError("no images given: pass --images with a folder, a datalist, or a list of them")
    paths: list[str] = []
    for src in sources:
        p = Path(str(src)).expanduser()
        if p.is_dir():
            found = _folder_images(p)
        elif p.is_file() and p.suffix.lower() in DATALIST_SUFFIXES:
            found = _datalist_images(p)
        elif p.is_file():
            found = [str(p)]
        else:
            raise DataError(f"{p}: no such folder or datalist")
        if not found:
            raise DataError(f"{p}: no images in it (looked for {', '.join(IMAGE_SUFFIXES)})")
        paths += found
    return list(dict.fromkeys(paths))


def check_images(paths: Sequence[str], where: str = "images") -> list[str]:
    """Headers and sizes of every file (cached by content, `medpmoe.data.quick_check`): one DataError naming every
    bad file. Returns the paths with exact duplicates (same bytes) left out: harmless for self-supervision, they
    would only count twice."""
    from medpmoe.data.validation import _HashCache, quick_check  # the content memo quick_check itself uses

    cache = _HashCache(None)
    seen: dict[str, str] = {}
    kept = []
    for p in paths:
        key = cache.content_hash(p) if Path(p).is_file() else p
        if key not in seen:
            seen[key] = p
            kept.append(p)
    cache.save()
    if len(kept) < len(paths):
        print(f"{where}: {len(paths) - len(kept)} exact duplicate images left out", flush=True)
    quick_check([{"image": p} for p in kept], where=where)
    return kept


def data_sha256(paths: Sequence[str]) -> str:
    """One hash of the images' contents in order (each file's sha256, memoised like `quick_check`'s)."""
    from medpmoe.data.validation import _HashCache

    cache = _HashCache(None)
    h = hashlib.sha256()
    for p in paths:
        h.update(cache.content_hash(p).encode() if Path(p).is_file() else p.encode())
    cache.save()
    return h.hexdigest()


def deterministic_transforms(image_size: int, plane: str = "middle", intensity: str = "auto",
                             window: Sequence[float] | None = None) -> list:
    """Read -> 2-D plane -> checked -> RGB -> [0, 1] -> (3, S, S) float32: the part a cache keeps."""
    return [LoadMedicalImaged("image"), ToPlane2Dd("image", plane), CheckImaged("image"), ToRGBd("image"),
            ScaleUnitd("image", intensity, window),
            Resized("image", spatial_size=(image_size, image_size), mode="bilinear", anti_aliasing=True),
            CastToTyped("image", dtype=torch.float32)]


class MultiViewd(MapTransform):
    """Apply a lightly multi-view transform (DINO's crops) to "image" ([0, 1] tensor -> PIL -> list of views)."""

    def __init__(self, transform) -> None:
        """transform: e.g. `lightly.transforms.DINOTransform(...)`."""
        super().__init__("image")
        self.transform = transform

    def __call__(self, data):
        """Replace "image" by the list of views."""
        from torchvision.transforms.functional import to_pil_image

        d = dict(data)
        d["image"] = self.transform(to_pil_image(d["image"].as_tensor() if hasattr(d["image"], "as_tensor")
                                                 else d["image"]))
        return d


def random_transforms(method: str, image_size: int, mean: Sequence[float], std: Sequence[float],
                      min_crop: float = 0.4, local_views: int = 0, local_size: int | None = None) -> list:
    """MAE: random crop (side >= `min_crop` of the image) resized back, horizontal flip. DINO: lightly's
    DINOTransform (two global views, `local_views` small ones, colour jitter, blur, solarisation), normalised."""
    if method == "mae":
        return [RandSpatialCropd("image", roi_size=max(1, int(image_size * min_crop)), max_roi_size=image_size,
                                 random_size=True),
                Resized("image", spatial_size=(image_size, image_size), mode="bilinear", anti_aliasing=False),
                RandFlipd("image", prob=0.5, spatial_axis=1), CastToTyped("image", dtype=torch.float32)]
    from lightly.transforms import DINOTransform

    return [MultiViewd(DINOTransform(global_crop_size=image_size, local_crop_size=local_size or image_size // 2,
                                     n_local_views=local_views, normalize={"mean": list(mean), "std": list(std)}))]


def cached_dataset(paths: Sequence[str], image_size: int, cache: bool = True, num_workers: int = 0, **read):
    """The deterministic images, in memory (MONAI CacheDataset, every bad file named in one DataError) or read
    on each access."""
    items = [{"image": p} for p in paths]
    t = DataCompose(deterministic_transforms(image_size, **read))
    return DataCacheDataset(items, t, num_workers=num_workers or None, progress=False) if cache \
        else DataDataset(items, t)


def mean_std(dataset, max_images: int = 2000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of up to `max_images` evenly spaced images of `dataset` ([0, 1] scale)."""
    n = len(dataset)
    idx = np.unique(np.linspace(0, n - 1, min(n, max_images)).astype(int))
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    count = 0
    for i in idx:
        x = torch.as_tensor(dataset[int(i)]["image"]).double()
        s += x.sum((1, 2))
        s2 += (x * x).sum((1, 2))
        count += x[0].numel()
    mean = s / count
    std = (s2 / count - mean**2).clamp_min(1e-12).sqrt().clamp_min(1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def make_loader(base, augment: list, batch_size: int, seed: int, num_workers: int = 0, pin_memory: bool = False):
    """A loader over `base` (the cached images) with `augment` applied per item; its DistributedSampler (also in
    one process) shuffles by `seed` and the epoch (`sampler.set_epoch`), so a resumed run sees the same order."""
    import ignite.distributed as idist
    from torch.utils.data import DistributedSampler

    ds = DataDataset(base, DataCompose(augment))
    world = idist.get_world_size()
    sampler = DistributedSampler(ds, num_replicas=world, rank=idist.get_rank(), shuffle=True, seed=seed,
                                 drop_last=len(ds) >= batch_size * world)
    per_rank = max(1, len(ds) // world)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      drop_last=per_rank >= batch_size, persistent_workers=num_workers > 0)
