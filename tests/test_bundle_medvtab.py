"""The medvtab_cls bundle: documented train command, evaluate, inference CSV, task lookup, methods by override."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
import torch

from medpmoe.bundle import run_bundle, task_info
from medpmoe.training import CheckpointMismatchError
from tests.conftest import REPO_ROOT
from tests.helpers import bundle_command, bundle_env

BUNDLE = REPO_ROOT / "bundles" / "medvtab_cls"
TRAIN, EVAL, INFER = (str(BUNDLE / f) for f in ("train.json", "evaluate.json", "inference.json"))
EXPERTS = [
    {"name": "tiny_a", "patch_size": 8, "img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2, "seed": 0},
    {"name": "tiny_b", "patch_size": 16, "img_size": 32, "embed_dim": 24, "depth": 1, "num_heads": 2, "seed": 1},
]
TINY = {"demo_images": 12, "demo_size": 32, "image_size": 32, "batch_size": 4, "num_epochs": 1, "experts": EXPERTS}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Output folder of the documented training command (one tiny epoch, a subprocess from the repo root)."""
    out = tmp_path_factory.mktemp("medvtab") / "out"
    args = bundle_command("bundles/medvtab_cls/train.json", out, TINY)
    proc = subprocess.run(args, cwd=REPO_ROOT, env=bundle_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final val_auc" in proc.stdout
    return out


@pytest.mark.slow
def test_training_writes_checkpoint_and_results(trained):
    results = json.loads((trained / "results.json").read_text())
    assert 0.0 <= results["val_auc"] <= 1.0 and results["epochs"] == 1
    ckpt = torch.load(trained / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["metadata"]["task"] == "classification"
    assert not any(k.startswith("experts.") for k in ckpt["state_dict"])
    assert (trained / "mlruns.db").exists()


@pytest.mark.slow
def test_evaluate_writes_metrics_json(trained, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    run_bundle([TRAIN, EVAL], tracking=False, output_dir=str(trained), **TINY)
    metrics = json.loads((trained / "eval_metrics.json").read_text())
    assert 0.0 <= metrics["val_auc"] <= 1.0 and 0.0 <= metrics["val_acc"] <= 1.0
    assert metrics["checkpoint"].endswith("best.pt")


@pytest.mark.slow
def test_evaluation_names_its_metrics_by_the_split_it_ran_on(trained, tmp_path, monkeypatch):
    """`--eval_split test`: eval_metrics.json, the console and the MLflow evaluation run say test_*, not val_*."""
    import mlflow

    monkeypatch.chdir(REPO_ROOT)
    demo = trained / "synthetic_data" / "classification_12x32px_seed0"
    doc = json.loads((demo / "datalist.json").read_text())
    doc["test"], doc["training"] = doc["training"][:6], doc["training"][6:]
    (demo / "with_test.json").write_text(json.dumps(doc))
    out = tmp_path / "test_metrics.json"
    run_bundle([TRAIN, EVAL], output_dir=str(trained), datalist=str(demo / "with_test.json"), eval_split="test",
               eval_output=str(out), **TINY)
    metrics = json.loads(out.read_text())
    assert {"test_auc", "test_acc"} <= set(metrics) and not [k for k in metrics if k.startswith("val_")]
    client = mlflow.MlflowClient(f"sqlite:///{trained / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="params.eval_split = 'test'")
    assert runs and {"test_auc", "test_acc"} <= set(runs[0].data.metrics)
    assert not [k for k in runs[0].data.metrics if k.startswith("val_")]


@pytest.mark.slow
def test_evaluate_refuses_checkpoint_of_other_experts(trained, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    other = [dict(EXPERTS[0], embed_dim=16), EXPERTS[1]]
    with pytest.raises(Exception) as info:  # monai wraps it in RuntimeError; the cause is ours
        run_bundle([TRAIN, EVAL], tracking=False, **{**TINY, "experts": other}, output_dir=str(trained),
                   eval_output=str(trained / "should_not_exist.json"))
    err = info.value
    while err is not None and not isinstance(err, CheckpointMismatchError):
        err = err.__cause__
    assert err is not None and "differs in" in str(err) and "embed_dim" in str(err)
    assert not (trained / "should_not_exist.json").exists()


@pytest.mark.slow
def test_inference_writes_probabilities_csv(trained, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    images = trained / "synthetic_data" / "classification_12x32px_seed0" / "images"
    run_bundle([TRAIN, INFER], tracking=False, output_dir=str(trained), input=str(images), **TINY)
    rows = list(csv.DictReader((trained / "inference" / "probabilities.csv").open()))
    assert len(rows) == 12 and set(rows[0]) == {"image", "regular", "irregular", "prediction"}
    for r in rows:
        assert abs(float(r["regular"]) + float(r["irregular"]) - 1) < 1e-4
        assert r["prediction"] in ("regular", "irregular")


def test_task_name_gives_classes_and_multi_label(tmp_path):
    assert task_info("chestmnist", "unused")["multi_label"] is True
    assert len(task_info("chestmnist", "unused")["classes"]) == 14
    info = task_info("dermamnist", "unused")
    assert info == {"classes": info["classes"], "multi_label": False} and len(info["classes"]) == 7
    with pytest.raises(KeyError, match="unknown task"):
        task_info("no_such_task", "unused")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "moe", "extra"),
    [("vpt_shallow", False, {}), ("gapt_deep", True, {}), ("lspt_style", True, {"dispatcher": "moe_mlp"}), ("vapt", True, {}),
     ("linear_probe", False, {}), ("full_finetune", False, {})],
)
def test_method_and_experts_by_override(method, moe, extra, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    data = tmp_path_factory.getbasetemp() / "shared_cls_demo"  # generated once, reused by every method
    out = tmp_path_factory.mktemp(method)
    wf = run_bundle(TRAIN, tracking=False, output_dir=str(out), demo_root=str(data), method=method, moe=moe,
                    **{**TINY, "demo_images": 8}, **extra)
    net = wf.parser.get_parsed_content("network_def")
    assert (net.dispatcher is not None) == (moe and method not in ("linear_probe", "full_finetune"))
    assert any(p.requires_grad for p in net.experts.parameters()) == (method == "full_finetune")
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["model_config"]["method"] == method
    assert json.loads((out / "results.json").read_text())["epochs"] == 1


def test_classification_metrics_accuracy_and_per_label_auc():
    from types import SimpleNamespace

    from medpmoe.bundle import ClassificationMetrics

    pred = torch.tensor([[0.9, 0.2], [0.8, 0.7], [0.1, 0.6], [0.3, 0.1]])
    label = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    output = [{"pred": p, "label": y} for p, y in zip(pred, label)]
    engine = SimpleNamespace(state=SimpleNamespace(metrics={}, output=output))
    m = ClassificationMetrics(["a", "b"], multi_label=True)
    m.reset(), m.update(engine)
    out = m.compute(engine)
    assert out["val_auc_a"] == 1.0 and out["val_auc_b"] == pytest.approx(2 / 3)
    assert out["val_acc"] == pytest.approx(7 / 8) and engine.state.metrics["val_auc_b"] == out["val_auc_b"]
    single = ClassificationMetrics(["x", "y", "z"])
    engine.state.output = [{"pred": torch.tensor([0.1, 0.7, 0.2]), "label": torch.tensor([0.0, 1.0, 0.0])},
                           {"pred": torch.tensor([0.5, 0.3, 0.2]), "label": torch.tensor([0.0, 0.0, 1.0])}]
    single.reset(), single.update(engine)
    assert single.compute(engine)["val_acc"] == 0.5


@pytest.mark.slow
def test_real_pneumoniamnist_by_task_name(shared_data, tmp_path, monkeypatch):
    """A real Med-VTAB task by name: 16 PneumoniaMNIST images through the medmnist converter."""
    import numpy as np

    from medpmoe.data.converters import medmnist_npz

    src = np.load(shared_data / "pneumoniamnist_dev" / "pneumoniamnist_trainval.npz")
    idx = np.r_[np.flatnonzero(src["train_labels"][:, 0] == 0)[:8], np.flatnonzero(src["train_labels"][:, 0] == 1)[:8]]
    np.savez(tmp_path / "tiny.npz", train_images=src["train_images"][idx], train_labels=src["train_labels"][idx],
             val_images=src["val_images"][:4], val_labels=src["val_labels"][:4])
    medmnist_npz(tmp_path / "tiny.npz", tmp_path / "pneumonia.json", splits=("train",), classes=["normal", "pneumonia"])
    monkeypatch.chdir(REPO_ROOT)
    wf = run_bundle(TRAIN, tracking=False, output_dir=str(tmp_path / "out"), task_name="pneumoniamnist",
                    datalist=str(tmp_path / "pneumonia.json"), **TINY)
    assert wf.parser.get_parsed_content("class_names") == ["normal", "pneumonia"]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert 0.0 <= results["val_auc"] <= 1.0


@pytest.mark.slow
def test_multi_label_datalist_trains_with_bce_and_per_label_auc(tmp_path, monkeypatch):
    from medpmoe.bundle.demo_cls import make_synthetic_classification

    doc = json.loads(make_synthetic_classification(tmp_path / "data", num_images=12, size=32).read_text())
    items = [{"image": it["image"], "label": [it["label"], 1 - it["label"], it["label"]]} for it in doc["training"]]
    ml = tmp_path / "data" / "multi.json"
    ml.write_text(json.dumps({"task": "classification", "classes": ["p", "q", "r"], "training": items}))
    monkeypatch.chdir(REPO_ROOT)
    wf = run_bundle(TRAIN, tracking=False, output_dir=str(tmp_path / "out"), datalist=str(ml), **TINY)
    assert wf.parser.get_parsed_content("multi_label") is True
    assert isinstance(wf.parser.get_parsed_content("loss"), torch.nn.BCEWithLogitsLoss)
    metrics = wf.parser.get_parsed_content("validate#evaluator").state.metrics
    assert {"val_auc", "val_acc", "val_auc_p", "val_auc_q", "val_auc_r"} <= set(metrics)


def test_task_name_without_datalist_is_refused(tmp_path):
    from medpmoe.bundle.demo_cls import make_synthetic_classification

    demo = make_synthetic_classification(tmp_path, num_images=4, size=16)
    with pytest.raises(ValueError, match="'task_name'.*'datalist'"):
        task_info("dermamnist", str(demo))
    assert task_info(None, str(demo)) == {"classes": ["regular", "irregular"], "multi_label": False}
