"""The isic_seg bundle: documented train command, evaluate, masks as PNG + NIfTI, a real HAM10000 datalist."""

from __future__ import annotations

import json
import subprocess

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medpmoe.bundle import run_bundle
from medpmoe.data import load_datalist, write_datalist
from medpmoe.data.converters import isic_seg
from tests.conftest import REPO_ROOT
from tests.helpers import bundle_command, bundle_env

BUNDLE = REPO_ROOT / "bundles" / "isic_seg"
TRAIN, EVAL, INFER = (str(BUNDLE / f) for f in ("train.json", "evaluate.json", "inference.json"))
EXPERTS = [
    {"name": "tiny_a", "patch_size": 8, "img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2, "seed": 0},
    {"name": "tiny_b", "patch_size": 16, "img_size": 32, "embed_dim": 24, "depth": 1, "num_heads": 2, "seed": 1},
]
TINY = {"demo_images": 12, "demo_size": 40, "image_size": 32, "batch_size": 4, "num_epochs": 1, "head_channels": 8,
        "experts": EXPERTS}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Output folder of the documented training command (one tiny epoch, a subprocess from the repo root)."""
    out = tmp_path_factory.mktemp("isic") / "out"
    args = bundle_command("bundles/isic_seg/train.json", out, TINY)
    proc = subprocess.run(args, cwd=REPO_ROOT, env=bundle_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final val_mean_iou" in proc.stdout
    return out


@pytest.mark.slow
def test_training_on_synthetic_lesions(trained):
    results = json.loads((trained / "results.json").read_text())
    assert 0.0 <= results["val_mean_iou"] <= 1.0 and results["epochs"] == 1
    doc = json.loads((trained / "synthetic_data" / "lesion_12x40px_seed0" / "datalist.json").read_text())
    assert doc["classes"] == ["background", "lesion"] and len(doc["training"]) == 12
    assert (trained / "checkpoints" / "best.pt").exists()


@pytest.mark.slow
def test_evaluate_writes_metrics_json(trained, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    run_bundle([TRAIN, EVAL], tracking=False, output_dir=str(trained), **TINY)
    metrics = json.loads((trained / "eval_metrics.json").read_text())
    assert 0.0 <= metrics["val_mean_iou"] <= 1.0 and "val_mean_dice" in metrics


@pytest.mark.slow
def test_inference_writes_png_and_nifti_masks_at_input_size(trained, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    images = trained / "synthetic_data" / "lesion_12x40px_seed0" / "images"
    run_bundle([TRAIN, INFER], tracking=False, output_dir=str(trained), input=str(images), **TINY)
    out = trained / "inference"
    pngs, niis = sorted(out.glob("*_seg.png")), sorted(out.glob("*_seg.nii.gz"))
    assert len(pngs) == len(niis) == 12
    png = np.asarray(Image.open(pngs[0]))
    assert png.shape == (40, 40) and set(np.unique(png)) <= {0, 255}  # original size, binary 0/255
    assert np.array_equal(np.asarray(nib.load(niis[0]).dataobj), (png > 0).astype(np.uint8))


@pytest.mark.slow
def test_real_ham10000_datalist_override(shared_data, tmp_path, monkeypatch):
    """The documented override: a datalist made by the isic converter from HAM10000-dev (12 images)."""
    full = tmp_path / "ham_seg.json"
    isic_seg(shared_data / "ham10000_dev", full)
    items = load_datalist(full)[:12]
    small = write_datalist(tmp_path / "ham_seg_small.json", items, ["background", "lesion"], "segmentation")
    monkeypatch.chdir(REPO_ROOT)
    run_bundle(TRAIN, tracking=False, output_dir=str(tmp_path / "out"), datalist=str(small), **TINY)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert 0.0 <= results["val_mean_iou"] <= 1.0
    assert not (tmp_path / "out" / "synthetic_data").exists()
