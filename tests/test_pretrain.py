"""Self-supervised pretraining (`medpmoe.pretrain`): the loss falls, the expert file loads strictly through the
expert registry and trains beside a plain expert, a killed run resumes to the same result, bad files are named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medpmoe.pretrain import pretrain, read_record

TINY = {"arch": "vit_base_patch16_224", "arch_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2},
        "image_size": 32, "patch_size": 8, "batch_size": 8, "holdout": 4, "tracking": False}


def _blobs(folder, n: int = 20, size: int = 40, seed: int = 0):
    """`n` PNGs of one bright disc on a dark background (easy to reconstruct from their visible patches)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        img = np.zeros((size, size, 3), np.uint8) + rng.integers(10, 60, 3).astype(np.uint8)
        cx, cy, r = *rng.uniform(10, size - 10, 2), rng.uniform(5, 10)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(160, 255, 3)
        Image.fromarray(img).save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny ViT pretrained with MAE for 6 epochs (18 steps) on generated images."""
    root = tmp_path_factory.mktemp("pretrain")
    images = _blobs(root / "images")
    res = pretrain(str(images), output_dir=str(root / "run"), epochs=6, learning_rate=2e-3,
                   **dict(TINY, tracking=True))
    return root, res


def test_mae_lowers_its_loss_and_writes_the_expert(trained):
    root, res = trained
    hist = res["history"]
    assert len(hist) == 6
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"], hist
    assert hist[-1]["holdout_loss"] < hist[0]["holdout_loss"], hist
    rec = read_record(res["expert"])
    assert rec["method"] == "mae" and rec["img_size"] == 32 and rec["patch_size"] == 8 and rec["epochs"] == 6
    assert rec["images"] == 16 and len(rec["data_sha256"]) == 64
    assert all(0.0 < m < 1.0 for m in rec["mean"]) and all(0.0 < s < 1.0 for s in rec["std"])
    sd = torch.load(res["expert"], weights_only=True)
    import timm

    vit = timm.create_model(rec["arch"], pretrained=False, img_size=32, num_classes=0, **rec["arch_kwargs"])
    vit.load_state_dict(sd, strict=True)  # timm's own layout, nothing left over
    assert (root / "run" / "reconstructions.png").stat().st_size > 1000


def test_mlflow_run_has_the_loss_curve_and_the_figure(trained):
    import mlflow

    root, _ = trained
    rec = json.loads((root / "run" / "mlflow_run.json").read_text())
    client = mlflow.MlflowClient(rec["tracking_uri"])
    run = client.get_run(rec["run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    figures = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
    assert "figures/reconstructions.png" in figures and "figures/loss.png" in figures


def test_expert_file_loads_through_the_registry_and_trains_beside_a_plain_expert(trained):
    from medpmoe.experts import build_expert
    from medpmoe.models import build_model
    from tests.helpers import step_and_check_only_trainable_parts_learn

    _, res = trained
    own = build_expert("own", checkpoint=res["expert"])
    sd = torch.load(res["expert"], weights_only=True)
    assert torch.equal(own.vit.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    rec = read_record(res["expert"])
    assert own.img_size == 32 and own.mean.flatten().tolist() == pytest.approx(rec["mean"])
    model = build_model([{"name": "own", "checkpoint": res["expert"]},
                         {"name": "tiny_b", "img_size": 32, "embed_dim": 24, "depth": 2, "num_heads": 2}],
                        method="vpt", moe=True, num_tokens=2)
    step_and_check_only_trainable_parts_learn(model, torch.rand(2, 3, 32, 32))


def test_killed_pretraining_resumes_to_the_same_result(tmp_path, monkeypatch):
    from medpmoe.pretrain import run as run_module

    images = _blobs(tmp_path / "images", n=12)
    settings = dict(TINY, epochs=3, learning_rate=1e-3, holdout=0)
    whole = pretrain(str(images), output_dir=str(tmp_path / "whole"), **settings)

    real_save, calls = run_module.atomic_torch_save, []

    def save_then_die(obj, path):
        real_save(obj, path)
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed after epoch 2's checkpoint")

    monkeypatch.setattr(run_module, "atomic_torch_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain(str(images), output_dir=str(tmp_path / "killed"), **settings)
    monkeypatch.setattr(run_module, "atomic_torch_save", real_save)
    resumed = pretrain(str(images), output_dir=str(tmp_path / "killed"), **settings)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    a, b = torch.load(whole["expert"], weights_only=True), torch.load(resumed["expert"], weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="epochs"):  # run identity: other settings into the same folder
        pretrain(str(images), output_dir=str(tmp_path / "killed"), **dict(settings, epochs=4))


def test_a_bad_image_among_good_ones_is_named(tmp_path):
    images = _blobs(tmp_path / "images", n=6)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    proc = subprocess.run([sys.executable, "-m", "medpmoe.pretrain", "--images", str(images), "--output_dir",
                           str(tmp_path / "run"), "--image_size", "32", "--epochs", "1", "--tracking", "False"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "broken.png" in last and "img00.png" not in last, proc.stderr[-2000:]


def test_dino_with_local_views_on_dicom_nifti_tiff_and_png_writes_a_loadable_expert(tmp_path):
    import os
    import shutil

    import nibabel.testing
    import pydicom.data
    import tifffile

    from medpmoe.experts import build_expert

    images = _blobs(tmp_path / "images", n=6)
    (images / "copy.png").write_bytes((images / "img03.png").read_bytes())  # a duplicate is left out, not an error
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), images / "ct.dcm")
    shutil.copy(os.path.join(nibabel.testing.data_path, "example4d.nii.gz"), images / "volume.nii.gz")
    tifffile.imwrite(images / "grey16.tif", (np.random.default_rng(0).random((40, 40)) * 65535).astype(np.uint16))
    res = pretrain(str(images), output_dir=str(tmp_path / "dino"), method="dino", epochs=1, dino_output_dim=64,
                   dino_local_views=2, **dict(TINY, holdout=0))
    assert np.isfinite(res["history"][0]["loss"])
    rec = json.loads((tmp_path / "dino" / "expert.json").read_text())
    assert rec["method"] == "dino" and rec["images"] == 9
    assert build_expert("mine", checkpoint=res["expert"]).patch_size == 8


def test_bundle_runs_on_its_demo_images_and_its_metadata_is_valid(tmp_path, monkeypatch):
    from monai.bundle import verify_metadata

    from medpmoe.bundle import run_bundle
    from tests.test_bundle_common import REPO_ROOT, SCHEMA

    root = REPO_ROOT / "bundles" / "pretrain_expert"
    verify_metadata(meta_file=str(root / "metadata.json"), filepath=str(SCHEMA))
    monkeypatch.chdir(tmp_path)  # self-contained: runs from any folder
    run_bundle(str(root / "train.json"), output_dir=str(tmp_path / "out"), demo_images=12, demo_size=32,
               image_size=32, epochs=1, batch_size=4, holdout=2, tracking=False,
               arch_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2})
    rec = read_record(tmp_path / "out" / "expert.pt")
    assert rec["images"] == 10 and rec["img_size"] == 32 and rec["depth"] == 1


def test_ddp_under_torchrun_writes_one_expert(tmp_path):
    import os
    import shutil

    torchrun = shutil.which("torchrun") or str(__import__("pathlib").Path(sys.executable).parent / "torchrun")
    images = _blobs(tmp_path / "images", n=12)
    proc = subprocess.run([torchrun, "--nproc_per_node=2", "-m", "medpmoe.pretrain", "--images", str(images),
                           "--output_dir", str(tmp_path / "ddp"), "--arch", "vit_base_patch16_224", "--arch_kwargs",
                           "{'embed_dim': 32, 'depth': 1, 'num_heads': 2}", "--image_size", "32", "--patch_size", "8",
                           "--epochs", "1", "--batch_size", "4", "--holdout", "0", "--tracking", "False"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("pretraining vit_base_patch16_224") == 1  # rank 0 speaks
    rec = read_record(tmp_path / "ddp" / "expert.pt")
    assert rec["images"] == 12 and np.isfinite(rec["final_loss"])


@pytest.mark.gpu
def test_bf16_pretraining_on_a_gpu(tmp_path):
    images = _blobs(tmp_path / "images", n=12)
    res = pretrain(str(images), output_dir=str(tmp_path / "gpu"), epochs=2, device="cuda", amp=True,
                   learning_rate=2e-3, **dict(TINY, holdout=0))
    assert all(np.isfinite(h["loss"]) for h in res["history"])


def test_bundle_stops_on_a_misspelled_key(tmp_path):
    from medpmoe.bundle import run_bundle
    from medpmoe.bundle.errors import ConfigError, medpmoe_cause
    from tests.test_bundle_common import REPO_ROOT

    with pytest.raises(Exception) as info:
        run_bundle(str(REPO_ROOT / "bundles" / "pretrain_expert" / "train.json"), output_dir=str(tmp_path),
                   epochss=3, tracking=False)
    cause = medpmoe_cause(info.value) or info.value
    assert isinstance(cause, ConfigError) and "'epochss'" in str(cause)


def test_a_bundle_config_naming_the_own_expert_passes_the_config_check(trained, monkeypatch, tmp_path):
    from monai.bundle import ConfigParser

    from medpmoe.bundle import ConfigError, check_parser
    from tests.test_bundle_common import REPO_ROOT

    _, res = trained
    monkeypatch.chdir(REPO_ROOT)
    parser = ConfigParser()
    parser.read_config("bundles/kvasir_seg/train.json")
    parser.resolve_macro_and_relative_ids()
    parser["experts"] = [{"name": "own", "checkpoint": res["expert"]}, {"name": "tiny_b"}]
    check_parser(parser)
    parser["experts"] = [{"name": "own", "checkpoint": res["expert"] + ".missing"}]
    with pytest.raises(ConfigError, match=r"experts\[0\]\.checkpoint': no file at .*\.missing"):  # the file first
        check_parser(parser)
    bare = tmp_path / "expert.pt"
    bare.write_bytes(Path(res["expert"]).read_bytes())  # the weights without their record
    parser["experts"] = [{"name": "own", "checkpoint": str(bare)}]
    with pytest.raises(ConfigError, match="unknown expert 'own'"):  # no record: the name alone is unknown
        check_parser(parser)


def test_timing_counts_the_step_flops_and_cpu_time():
    from medpmoe.pretrain.timing import measure

    a = measure("vit_base_patch16_224", {"embed_dim": 32, "depth": 1, "num_heads": 2}, 32, 8, batch_size=4, steps=1)
    b = measure("vit_base_patch16_224", {"embed_dim": 32, "depth": 2, "num_heads": 2}, 32, 8, batch_size=4, steps=1)
    assert 0 < a["GFLOPs_per_image"] < b["GFLOPs_per_image"] and a["cpu_core_s_per_10k"] > 0
    assert a["A100_s_per_10k"] > a["H100/H200 (SXM)_s_per_10k"] > 0
