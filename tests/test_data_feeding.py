"""The fed data path: compact cache (uint8, memory/disk/none, no decoding after the first pass), batch augmentation
with torch ops (kinds, ranges, masks following images), BatchFeeder on CPU and accelerator trainers."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from medpmoe.data import BatchAugment, BatchFeeder, Compactd, cached_dataset, segmentation_transforms, train_loader


@pytest.fixture
def seg_items(tmp_path):
    """Six 40 x 48 RGB pictures with binary masks (a bright square = the mask)."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        img = rng.integers(0, 120, (40, 48, 3), dtype=np.uint8)
        m = np.zeros((40, 48), np.uint8)
        m[5 + i : 25 + i, 10:30] = 255
        img[m > 0] += 120
        Image.fromarray(img).save(tmp_path / f"i{i}.png")
        Image.fromarray(m).save(tmp_path / f"m{i}.png")
        items.append({"image": str(tmp_path / f"i{i}.png"), "label": str(tmp_path / f"m{i}.png"), "patient_id": "p"})
    return items


def test_compact_items_are_uint8_within_half_a_level():
    x = torch.rand(3, 16, 16)
    out = Compactd()({"image": x, "label": torch.randint(0, 3, (1, 16, 16))})
    assert out["image"].dtype == torch.uint8 and out["label"].dtype == torch.uint8
    assert float((out["image"].float() / 255 - x).abs().max()) <= 1 / 510 + 1e-7
    cls = Compactd()({"image": x, "label": torch.tensor(2)})
    assert cls["label"].dtype == torch.int64  # class labels stay as they are


def test_memory_cache_never_decodes_after_the_first_pass(seg_items, monkeypatch, caplog):
    import medpmoe.data.transforms as tr

    calls = []
    real = tr.read_image
    monkeypatch.setattr(tr, "read_image", lambda p: calls.append(p) or real(p))
    with caplog.at_level(logging.INFO, logger="medpmoe.data"):
        ds = cached_dataset(seg_items, segmentation_transforms(32, False, 2), progress=False)
    assert ds.cache_info == {"cache": "memory", "items": 6, "bytes": ds.cache_info["bytes"]}
    assert "training data cache: memory, 6 of 6 items" in caplog.text
    decoded = len(calls)
    assert decoded == 2 * 6 + 2  # image + mask per item, plus the first item once to size the cache
    loader = train_loader(ds, BatchFeeder(BatchAugment(vertical_flip=True, seed=0)), batch_size=4)
    for _ in range(2):
        batches = list(loader)
    assert len(calls) == decoded
    x, y = batches[0]["image"], batches[0]["label"]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (4, 3, 32, 32) and y.shape == (4, 1, 32, 32)
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and set(y.unique().tolist()) <= {0, 1}


def test_disk_cache_when_memory_is_too_small(seg_items, tmp_path):
    transform = segmentation_transforms(32, False, 2)
    mem = cached_dataset(seg_items, transform, progress=False)
    disk = cached_dataset(seg_items, transform, cache_dir=str(tmp_path / "cache"), max_bytes=100, progress=False)
    assert disk.cache_info["cache"] == "disk"
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 6  # filled up front, keyed by the data hash
    for i in range(6):
        assert torch.equal(mem[i]["image"], disk[i]["image"]) and torch.equal(mem[i]["label"], disk[i]["label"])
    again = cached_dataset(seg_items, segmentation_transforms(48, False, 2), cache_dir=str(tmp_path / "cache"),
                           max_bytes=100, progress=False)
    assert again.cache_info["dir"] != disk.cache_info["dir"]  # another image size: another cache
    partial = cached_dataset(seg_items, transform, max_bytes=mem.cache_info["bytes"] // 2, progress=False)
    assert partial.cache_info["cache"] == "memory" and partial.cache_info["items"] == 3
    none = cached_dataset(seg_items, transform, cache="none")
    assert none.cache_info["cache"] == "none" and torch.equal(none[0]["image"], mem[0]["image"])


def _batch(b=8, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)
    y = (x[:, :1] > 127).to(torch.uint8)  # the mask is a function of the image: geometry must follow it
    return {"image": x, "label": y}


def test_no_augmentation_is_the_scaled_image():
    batch = _batch()
    out = BatchAugment(flip_prob=0, affine_prob=0, intensity_prob=0)(batch)
    assert torch.equal(out["image"], batch["image"].float() / 255) and torch.equal(out["label"], batch["label"])


def test_flips_move_image_and_mask_together():
    batch = _batch()
    out = BatchAugment(vertical_flip=True, flip_prob=1, affine_prob=0, intensity_prob=0)(batch)
    assert torch.equal(out["image"], batch["image"].flip(-1).flip(-2).float() / 255)
    assert torch.equal(out["label"], batch["label"].flip(-1).flip(-2))
    assert torch.equal(batch["image"], _batch()["image"])  # the input is left as it was


def test_identity_affine_is_exact_and_warps_follow_the_mask():
    batch = _batch()
    ident = BatchAugment(flip_prob=0, affine_prob=1, rotate_range=0, scale_range=0, intensity_prob=0)(batch)
    assert torch.allclose(ident["image"], batch["image"].float() / 255, atol=1e-6)
    assert torch.equal(ident["label"], batch["label"])
    square = torch.zeros(8, 1, 32, 32, dtype=torch.uint8)
    for i in range(8):
        square[i, :, 4 + i : 20 + i, 6:22] = 1  # mask and image share one square, off centre
    smooth = {"image": (square * 255).repeat(1, 3, 1, 1), "label": square}
    out = BatchAugment(flip_prob=0, affine_prob=1, intensity_prob=0, seed=3)(smooth)
    assert not torch.allclose(out["image"], smooth["image"].float() / 255)  # something moved
    agree = ((out["image"][:, :1] > 0.5).to(torch.uint8) == out["label"]).float().mean()
    assert agree > 0.97, float(agree)


def test_intensity_ranges_and_seeded_stream():
    x = torch.full((64, 3, 8, 8), 128, dtype=torch.uint8)
    aug = BatchAugment(flip_prob=0, affine_prob=0, intensity_prob=1, seed=1)
    out = aug({"image": x})["image"]
    ratio = out[:, 0, 0, 0] / (128 / 255)
    assert float(ratio.min()) >= 0.9 * 0.9 - 0.11 and float(ratio.max()) <= 1.1 + 0.05 / (128 / 255) + 1e-6
    assert out.std() > 0  # per-image draws
    aug.set_seed(1)
    assert torch.equal(aug({"image": x})["image"], out)
    frac = (BatchAugment(flip_prob=0.5, affine_prob=0, intensity_prob=0, seed=0)(_batch(b=400, size=4))["image"]
            != _batch(b=400, size=4)["image"].float() / 255).flatten(1).any(1).float().mean()
    assert 0.4 < float(frac) < 0.6  # about half of the images flipped


def test_feeder_hands_uint8_to_an_accelerator_and_finishes_in_prepare(seg_items):
    ds = cached_dataset(seg_items, segmentation_transforms(32, False, 2), progress=False)
    gpu = BatchFeeder(BatchAugment(seed=0), device="cuda")  # no CUDA needed: only where the work happens
    batch = gpu.collate([ds[i] for i in range(4)])
    assert batch["image"].dtype == torch.uint8 and batch["label"].dtype == torch.uint8
    x, y = gpu.prepare(batch, torch.device("cpu"))
    cpu = BatchFeeder(BatchAugment(seed=0), device="cpu")
    ref = cpu.collate([ds[i] for i in range(4)])
    assert torch.equal(x, ref["image"]) and torch.equal(y, ref["label"]) and x.dtype == torch.float32
    x2, _ = cpu.prepare(ref, "cpu")
    assert torch.equal(x2, ref["image"])  # already finished on the CPU: only moved
