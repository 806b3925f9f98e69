"""The best checkpoint and what is reported agree: ties in the key metric are broken by a second metric, the summary
and the MLflow run show every metric of the best checkpoint beside the last epoch's, and the trivial baseline."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medpmoe.bundle import run_bundle
from medpmoe.bundle.metrics import probability_loss
from medpmoe.bundle.reporting import trivial_baseline
from medpmoe.training import ResumableCheckpoint, trainable_parameters
from medpmoe.training.checkpoint import read_prompt_checkpoint, tie_break
from tests.conftest import REPO_ROOT
from tests.helpers import TINY_EXPERTS
from tests.test_bundle_common import TINY


def test_tie_break_metrics():
    assert tie_break("val_auc") == ("val_loss", "min") and tie_break("test_auc") == ("test_loss", "min")
    assert tie_break("val_mean_iou") == ("val_mean_dice", "max") and tie_break("val_other") is None
    p, y = np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([[1.0, 0.0], [0.0, 1.0]])
    assert probability_loss(p, y) == pytest.approx(-(np.log(0.9) + np.log(0.8)) / 2)
    assert probability_loss(p, y, multi_label=True) == pytest.approx(-(2 * np.log(0.9) + 2 * np.log(0.8)) / 4)


@pytest.mark.parametrize("key, tie, values, best", [
    ("val_auc", "val_loss", [(1.0, 0.5), (1.0, 0.3), (1.0, 0.4), (0.9, 0.1)], 2),  # equal AUC: the lower loss
    ("val_mean_iou", "val_mean_dice", [(0.6, 0.2), (0.6, 0.5), (0.5, 0.9)], 2),  # equal mIoU: the higher Dice
])
def test_ties_in_the_key_metric_are_broken_by_the_second(tmp_path, key, tie, values, best):
    from medpmoe.models import build_model

    model = build_model(TINY_EXPERTS[:1], task="classification", num_classes=2, num_tokens=2)
    evaluator = SimpleNamespace(state=SimpleNamespace(metrics={}))
    ckpt = ResumableCheckpoint(tmp_path, model, torch.optim.AdamW(trainable_parameters(model)), evaluator=evaluator,
                               metric_name=key)
    for epoch, (k, t) in enumerate(values, 1):
        evaluator.state.metrics = {key: k, tie: t, "val_acc": epoch / 10}
        ckpt.save(SimpleNamespace(state=SimpleNamespace(epoch=epoch, iteration=epoch)))
    meta = read_prompt_checkpoint(tmp_path / "best.pt")["metadata"]
    assert meta["epoch"] == best and meta["metrics"] == {key: values[best - 1][0], tie: values[best - 1][1],
                                                         "val_acc": best / 10}


def test_trivial_baselines():
    seg = [{"label": torch.tensor([[[0, 0], [0, 1]]])}, {"label": torch.zeros(1, 2, 2)}]
    # image 1: background IoU 3/4, polyp IoU 0; image 2: background IoU 1, polyp undefined (no polyp)
    assert trivial_baseline(seg, "val_mean_iou")["baseline_val_mean_iou"] == pytest.approx((0.375 + 1.0) / 2)
    cls = [{"label": torch.tensor(c)} for c in (0, 1, 1, 2)]
    assert trivial_baseline(cls, "val_auc", 3) == {"baseline_val_acc": 0.5}
    multi = [{"label": torch.tensor(v)} for v in ([1, 0], [1, 1], [0, 0], [1, 0])]
    assert trivial_baseline(multi, "val_auc", 2, multi_label=True) == {"baseline_val_acc": pytest.approx(0.75)}


def test_summary_and_mlflow_show_the_best_checkpoints_metrics_and_the_baseline(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / "out"
    run_bundle(str(REPO_ROOT / "bundles" / "medvtab_cls" / "train.json"),
               **{**TINY, "num_epochs": 2, "output_dir": str(out), "demo_root": str(tmp_path / "data")})
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    meta = read_prompt_checkpoint(out / "checkpoints" / "best.pt")["metadata"]
    assert results["best_epoch"] == meta["epoch"]
    for name in ("val_auc", "val_loss", "val_acc", "val_balanced_acc"):
        assert results[f"best_{name}"] == pytest.approx(meta["metrics"][name])  # the deployed model's, not the last
        assert name in results  # the last epoch's beside it
    assert 0 < results["baseline_val_acc"] <= 1
    assert f"best checkpoint (epoch {meta['epoch']}; ties in val_auc broken by the lower val_loss): " in printed
    assert f"trivial baseline (always predicting the most frequent validation class): accuracy (baseline_val_acc) " \
           f"{results['baseline_val_acc']:.4f}" in printed
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medvtab_cls_synthetic").experiment_id])
    for name in ("val_auc", "val_loss", "val_acc", "val_balanced_acc"):
        assert run.data.metrics[f"best_{name}"] == pytest.approx(results[f"best_{name}"])
        assert run.data.metrics[name] == pytest.approx(results[name])
    assert run.data.metrics["best_epoch"] == results["best_epoch"]
