"""Model-zoo export (`python -m medpmoe.bundle.zoo`) of a demo run: MONAI's three checks pass, inference runs with
`python -m monai.bundle run` from a folder outside the repository and writes the repository bundle's masks, and
evaluation from the exported bundle gives the run's validation metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out
from PIL import Image

from medpmoe.bundle import ConfigError, drop_tracking, run_bundle
from medpmoe.bundle.errors import medpmoe_cause
from medpmoe.bundle.zoo import ZooExportError, export_bundle, main
from medpmoe.files import file_sha256
from tests.conftest import REPO_ROOT
from tests.expert_files import TINY_VIT, tiny_vit, write_dinov2_hub

BUNDLE = REPO_ROOT / "bundles" / "kvasir_seg"
TRAIN, INFER = str(BUNDLE / "train.json"), str(BUNDLE / "inference.json")
SCHEMA = REPO_ROOT / "schemas" / "meta_schema.json"
DEMO = {"demo_images": 12, "demo_size": 32}
TINY = {**DEMO, "image_size": 32, "batch_size": 4, "num_epochs": 3, "learning_rate": 0.01, "warmup_epochs": 0,
        "head_channels": 8}  # masks neither empty nor full after 3 epochs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-epoch demo training of kvasir_seg with one tiny expert and one from a weights file, its inference masks
    (repository bundle), and its export as a model-zoo bundle (expert file referenced by name, not copied)."""
    tmp = tmp_path_factory.mktemp("zoo")
    weights = tmp / "weights" / "dinov2_vitb14_pretrain.pth"
    weights.parent.mkdir()
    write_dinov2_hub(weights, tiny_vit("vit_base_patch14_dinov2", 28, depth=1))
    experts = [{"name": "tiny_a", "patch_size": 8, "img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2,
                "seed": 0},
               {"name": "dinov2_vitb14", "checkpoint": str(weights), "img_size": 28,
                "arch_overrides": dict(TINY_VIT, depth=1)}]
    out = tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO_ROOT)
        run_bundle(TRAIN, tracking=False, output_dir=str(out), experts=experts, **TINY)
        images = next((out / "synthetic_data").glob("polyp_*")) / "images"
        run_bundle([TRAIN, INFER], tracking=False, output_dir=str(out), experts=experts, input=str(images), **TINY)
    bundle = export_bundle(out, TRAIN, tmp / "kvasir_seg_bundle", overrides=DEMO, check=False)  # checked below
    return {"out": out, "bundle": bundle, "weights": weights, "images": images, "tmp": tmp}


@pytest.mark.slow
def test_the_export_has_the_zoo_layout_and_names_every_expert(run):
    b = run["bundle"]
    for f in ("configs/inference.json", "configs/evaluate.json", "configs/metadata.json", "configs/logging.conf",
              "models/model.pt", "docs/README.md", "LICENSE"):
        assert (b / f).is_file(), f
    assert file_sha256(b / "models" / "model.pt") == file_sha256(run["out"] / "checkpoints" / "best.pt")
    meta = json.loads((b / "configs" / "metadata.json").read_text())
    rec = meta["medpmoe"]
    assert rec["checkpoint"] == {**rec["checkpoint"], "file": "models/model.pt",
                                 "sha256": file_sha256(b / "models" / "model.pt")}
    assert rec["experts"][0] == {"name": "tiny_a", "file": None, "sha256": None, "seed": 0, "architecture": {
        "patch_size": 8, "img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2}}
    assert rec["experts"][1] == {"name": "dinov2_vitb14", "file": "dinov2_vitb14_pretrain.pth",
                                 "sha256": file_sha256(run["weights"])}
    assert not (b / "models" / "experts").exists()  # referenced by name, not copied
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["spatial_shape"] == [32, 32] and fmt["outputs"]["pred"]["spatial_shape"] == [32, 32]
    results = json.loads((run["out"] / "results.json").read_text())
    assert meta["eval_metrics"]["val_mean_iou"] == results["best_val_mean_iou"]
    text = "".join(p.read_text() for p in (b / "configs").glob("*.json"))
    assert "%" not in text.replace("'%Y%m%d_%H%M%S'", "") and str(REPO_ROOT) not in text and str(run["out"]) not in text
    readme = (b / "docs" / "README.md").read_text()
    assert "dinov2_vitb14_pretrain.pth" in readme and f"{meta['eval_metrics']['val_mean_iou']:.4f}" in readme
    assert "--expert_files \"{'dinov2_vitb14': '/weights/dinov2_vitb14_pretrain.pth'}\"" in readme


@pytest.mark.slow
def test_monai_checks_pass(run, tmp_path):
    """verify_metadata (offline schema), verify_net_in_out, check_properties after initialize (MONAI FL/Label)."""
    b, files = run["bundle"], {"expert_files": {"dinov2_vitb14": str(run["weights"])}}
    meta = str(b / "configs" / "metadata.json")
    verify_metadata(meta_file=meta, filepath=str(SCHEMA))
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=str(b / "configs" / "inference.json"),
                      bundle_root=str(b), **files)
    for name in ("inference", "evaluate"):
        wf = ConfigWorkflow(config_file=str(b / "configs" / f"{name}.json"), workflow_type="infer",
                            output_dir=str(tmp_path / name), **files)
        drop_tracking(wf)
        wf.initialize()
        assert wf.check_properties() == [], name
        assert wf.bundle_root == str(b) and wf.network_def.config.experts[1]["checkpoint"] == str(run["weights"])


@pytest.mark.slow
def test_inference_runs_from_a_folder_outside_the_repository(run, tmp_path):
    b, elsewhere = run["bundle"], tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)}
    args = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
            str(b / "configs" / "inference.json"), "--input", str(run["images"]),
            "--expert_files", f"{{'dinov2_vitb14': '{run['weights']}'}}"]
    proc = subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, repo = b / "eval" / "inference", run["out"] / "inference"
    pngs = sorted(p.name for p in repo.glob("*_seg.png"))
    assert len(pngs) == 12 and sorted(p.name for p in ours.glob("*_seg.png")) == pngs
    fg = 0
    for name in pngs:
        mask = np.asarray(Image.open(ours / name))
        assert np.array_equal(mask, np.asarray(Image.open(repo / name))), name
        nii = name.replace(".png", ".nii.gz")
        assert np.array_equal(np.asarray(nib.load(ours / nii).dataobj), np.asarray(nib.load(repo / nii).dataobj))
        fg += int((mask > 0).sum())
    assert 0 < fg < 12 * 32 * 32  # the masks compared are neither all background nor all polyp


@pytest.mark.slow
def test_a_missing_expert_file_names_the_option_to_pass(run, tmp_path):
    wf = ConfigWorkflow(config_file=str(run["bundle"] / "configs" / "inference.json"), workflow_type="infer",
                        output_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as info:
        wf.initialize()
    assert str(medpmoe_cause(info.value)) == (
        "config key 'expert_files': expert 'dinov2_vitb14' needs its weights file dinov2_vitb14_pretrain.pth (sha256 "
        f"{file_sha256(run['weights'])}): pass --expert_files \"{{'dinov2_vitb14': "
        "'/path/to/dinov2_vitb14_pretrain.pth'}\"")


@pytest.mark.slow
def test_evaluation_from_the_export_gives_the_runs_metrics(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval"
    run_bundle(str(run["bundle"] / "configs" / "evaluate.json"), tracking=False, output_dir=str(out),
               expert_files={"dinov2_vitb14": str(run["weights"])})
    metrics = json.loads((out / "eval_metrics.json").read_text())
    results = json.loads((run["out"] / "results.json").read_text())
    assert metrics["val_mean_iou"] == pytest.approx(results["best_val_mean_iou"], abs=1e-6)
    if results["best_epoch"] == results["epochs"]:  # then results.json's last-epoch metrics are best.pt's
        for key in ("val_fg_iou", "val_mean_dice"):
            assert metrics[key] == pytest.approx(results[key], abs=1e-6), key


@pytest.mark.slow
def test_copied_experts_travel_with_the_bundle_and_mistakes_name_the_option(run, tmp_path, capsys):
    b = tmp_path / "copied"
    assert main(["--run_dir", str(run["out"]), "--bundle_file", TRAIN, "--out", str(b), "--copy_experts",
                 "--expert_files", f"dinov2_vitb14={run['weights']}", "--demo_images", "12", "--demo_size", "32"]) == 0
    assert file_sha256(b / "models" / "experts" / "dinov2_vitb14_pretrain.pth") == file_sha256(run["weights"])
    meta = json.loads((b / "configs" / "metadata.json").read_text())
    assert meta["medpmoe"]["experts"][1]["bundled"] == "models/experts/dinov2_vitb14_pretrain.pth"
    wf = ConfigWorkflow(config_file=str(b / "configs" / "inference.json"), workflow_type="infer",
                        output_dir=str(tmp_path / "o"))
    drop_tracking(wf)
    wf.initialize()  # no --expert_files needed: the bundle has the file
    assert wf.parser.get_parsed_content("expert_files") == {
        "dinov2_vitb14": str(b / "models" / "experts" / "dinov2_vitb14_pretrain.pth")}
    with pytest.raises(ZooExportError, match="--out: .*copied exists and is not empty"):
        export_bundle(run["out"], TRAIN, b)
    with pytest.raises(ZooExportError, match="--checkpoint: no file at .*nowhere.pt"):
        export_bundle(run["out"], TRAIN, tmp_path / "x", checkpoint=tmp_path / "nowhere.pt")
    with pytest.raises(ZooExportError, match="--demo_imags: not a key of .*train.json's configs; did you mean "
                                             "--demo_images?"):
        export_bundle(run["out"], TRAIN, tmp_path / "z", overrides={"demo_imags": 12})
    with pytest.raises(ZooExportError, match="medvtab_cls/train.json is a classification bundle but .* segmentation"):
        export_bundle(run["out"], REPO_ROOT / "bundles" / "medvtab_cls" / "train.json", tmp_path / "y")
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()  # nothing written before the checks
    wf = ConfigWorkflow(config_file=str(b / "configs" / "inference.json"), workflow_type="infer",
                        output_dir=str(tmp_path / "o"), chekpoint="x.pt")  # a misspelled override
    with pytest.raises(RuntimeError) as info:
        wf.initialize()
    assert str(medpmoe_cause(info.value)).startswith("config key 'chekpoint' is unknown to this workflow; did you "
                                                     "mean 'checkpoint'")


@pytest.mark.slow
def test_the_documented_commands_fit_the_exported_bundle(run):
    """docs/bundles.md's commands for an exported bundle: the files exist in it and every --key is a config key."""
    import re
    import shlex

    doc = (REPO_ROOT / "docs" / "bundles.md").read_text()
    section = doc[doc.index("## Sharing a trained model as a MONAI bundle"):]
    block = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    lines = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert lines[0][0].startswith("ZOO=") and len(lines) == 5
    b = str(run["bundle"])
    for argv in lines[1:]:
        argv = [a.replace("$ZOO", b) for a in argv]
        assert argv[:3] == ["python", "-m", "monai.bundle"], argv
        first = next(i for i, a in enumerate(argv) if a.startswith("--"))
        opts = dict(zip(argv[first::2], argv[first + 1::2]))
        config = opts.pop("--config_file", None)
        assert Path(opts.pop("--meta_file", f"{b}/configs/metadata.json")).is_file()
        if "--filepath" in opts:
            assert (REPO_ROOT / opts.pop("--filepath")).is_file()
        if config:
            keys = json.loads(Path(config).read_text())
            assert all(k[2:] in keys for k in opts), (argv, sorted(keys))


def test_metadata_of_a_classifier_and_the_best_checkpoints_metrics():
    """Classification shapes (C,) out; metrics: the last epoch's only when it was the best (else the key metric)."""
    from medpmoe.bundle.zoo_docs import best_metrics, zoo_metadata

    base = json.loads((REPO_ROOT / "bundles" / "medvtab_cls" / "metadata.json").read_text())
    payload = {"metadata": {"task": "classification", "epoch": 2, "metric_name": "val_auc", "metric": 0.9},
               "model_config": {"task": "classification", "num_classes": 3, "method": "vpt", "moe": False,
                                "num_tokens": 4, "prompt_layers": None, "dispatcher": "mlp", "experts": []}}
    results = {"val_auc": 0.8, "best_val_auc": 0.9, "best_epoch": 2, "epochs": 3, "val_acc": 0.5}
    assert best_metrics(results) == {"val_auc": 0.9}
    assert best_metrics({**results, "epochs": 2}) == {"val_auc": 0.8, "val_acc": 0.5}  # last epoch = best epoch
    assert best_metrics({**results, "best": {"val_auc": 0.9, "val_acc": 0.7, "epoch": 2}}) == {"val_auc": 0.9,
                                                                                               "val_acc": 0.7}
    meta = zoo_metadata(base, payload, results, [], "0" * 64, {"image_size": 48, "class_names": ["a", "b", "c"]})
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 3 and pred["spatial_shape"] == [1] and pred["channel_def"] == {"0": "a", "1": "b",
                                                                                                  "2": "c"}
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [48, 48]
    assert meta["eval_metrics"] == {"val_auc": 0.9} and meta["required_packages_version"]["medpmoe"]
    assert "optional_packages_version" not in meta and meta["pred_classes"] == "a, b, c"
