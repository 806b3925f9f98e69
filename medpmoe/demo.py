"""A small synthetic polyp-like segmentation set written to disk as PNG, so the real file loaders are used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from medpmoe.files import atomic_write_text


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    coarse = rng.random((max(2, size // scale), max(2, size // scale)))
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def synthetic_polyp(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 colonoscopy-like frame with 1-2 elliptical polyps, and its 0/255 mask."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    tissue = 0.55 + 0.25 * _smooth_noise(rng, size, 8)
    img = np.stack([tissue * 0.95, tissue * 0.45, tissue * 0.40], axis=-1)
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(rng.integers(1, 3)):
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        ry, rx = rng.uniform(0.08, 0.22, 2) * size
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
        blob = u * u + v * v <= 1.0
        mask |= blob
        shade = 1.0 - 0.35 * np.clip(u * u + v * v, 0, 1)  # brighter dome in the middle
        texture = 0.85 + 0.3 * _smooth_noise(rng, size, 4)
        polyp = np.stack([0.98 * shade, 0.70 * shade, 0.55 * shade], axis=-1) * texture[..., None]
        img = np.where(blob[..., None], polyp, img)
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    return (img * 255).astype(np.uint8), mask.astype(np.uint8) * 255


def demo_dir(root: str | Path, kind: str, num_images: int, size: int, seed: int = 0) -> Path:
    """The folder under `root` for the `kind` demo set made with these settings, e.g. `polyp_48x64px_seed0`: one
    folder per settings, so a set is reused by the same settings and never overwritten by others."""
    return Path(root) / f"{kind}_{num_images}x{size}px_seed{seed}"


def reusable(datalist: Path, settings: dict) -> bool:
    """True when `datalist` was generated with `settings` and all its image/mask files are still there."""
    if not datalist.exists():
        return False
    doc = json.loads(datalist.read_text())
    files = [d["image"] for d in doc["training"]] + [d["label"] for d in doc["training"] if isinstance(d["label"], str)]
    return doc.get("synthetic") == settings and all((datalist.parent / f).exists() for f in files)


def make_synthetic_polyps(root: str | Path, num_images: int = 48, size: int = 64, seed: int = 0) -> Path:
    """Write `images/*.png`, `masks/*.png` and a `datalist.json` under root (reused if already complete)."""
    root = Path(root)
    datalist = root / "datalist.json"
    settings = {"num_images": num_images, "size": size, "seed": seed}
    if reusable(datalist, settings):
        return datalist
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for i in range(num_images):
        img, mask = synthetic_polyp(rng, size)
        name = f"synthetic_{i:04d}.png"
        Image.fromarray(img).save(root / "images" / name)
        Image.fromarray(mask).save(root / "masks" / name)
        items.append({"image": f"images/{name}", "label": f"masks/{name}"})
    payload = {"task": "segmentation", "classes": ["background", "polyp"], "synthetic": settings, "training": items}
    atomic_write_text(datalist, json.dumps(payload, indent=1))
    return datalist
