"""The pretrained expert: a timm-layout state dict (`expert.pt`) and its record beside it (`expert.json`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from medpmoe.files import atomic_torch_save, atomic_write_text, file_sha256

FORMAT = "medpmoe-expert-record/1"


def record_path(checkpoint: str | Path) -> Path:
    """Where the record of an expert file lives: same folder and stem, suffix `.json`."""
    return Path(checkpoint).expanduser().with_suffix(".json")


def read_record(checkpoint: str | Path) -> dict | None:
    """The record beside `checkpoint` (architecture, sizes, mean/std, method, ...), or None when there is none.

    A `.json` beside the file that is not a medpmoe expert record is ignored (it belongs to someone else)."""
    path = record_path(checkpoint)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable expert record ({e})") from None
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else None


def write_expert(path: str | Path, vit, *, arch: str, arch_kwargs: dict, img_size: int, mean: list[float],
                 std: list[float], method: str, epochs: int, images: int, data_sha256: str, **extra) -> Path:
    """Write `vit`'s state dict (timm's layout, no classifier head) to `path` and its record beside it, both
    atomically; returns the record's path."""
    path = Path(path)
    state = {k: v.detach().cpu().clone() for k, v in vit.state_dict().items() if not k.startswith("head.")}
    atomic_torch_save(state, path)
    record = {
        "format": FORMAT,
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "img_size": int(img_size),
        "patch_size": int(vit.patch_embed.patch_size[0]),
        "embed_dim": int(vit.embed_dim),
        "depth": len(vit.blocks),
        "pooling": "cls" if vit.has_class_token else "mean",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "method": method,
        "epochs": int(epochs),
        "images": int(images),
        "data_sha256": data_sha256,
        "file": path.name,
        "file_sha256": file_sha256(path),
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    return atomic_write_text(record_path(path), json.dumps(record, indent=1))
