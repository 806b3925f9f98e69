"""Start-up and final reports for bundle runs, and the MLflow tracking URI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from monai.utils import path_to_sqlite_uri
from torch import nn

from medpmoe.files import atomic_write_text, file_sha256, shown
from medpmoe.params import format_parameter_report, parameter_report

#: How the summary names the segmentation metrics (mIoU includes background; the others are foreground only).
METRIC_LABELS = {"val_mean_iou": "mean IoU incl. background", "val_fg_iou": "foreground IoU",
                 "val_mean_dice": "foreground Dice", "val_auc": "ROC-AUC", "val_acc": "accuracy",
                 "val_balanced_acc": "balanced accuracy", "val_loss": "cross-entropy"}


def tracking_uri(output_dir: str | os.PathLike) -> str:
    """`MLFLOW_TRACKING_URI` when set, else a sqlite store `output_dir/mlruns.db` (monai refuses ./mlruns)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return path_to_sqlite_uri(Path(output_dir) / "mlruns.db")


def start_report(model: nn.Module, output_dir: str, device: torch.device | str | None = None) -> dict:
    """Print the device and the trainable-parameter report; write the report to `output_dir/parameters.json`."""
    rep = parameter_report(model)
    if device is not None:
        print(f"device: {device}", flush=True)
    print(format_parameter_report(rep), flush=True)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(output_dir) / "parameters.json", json.dumps(rep, indent=1))
    return rep


def _best_checkpoint(checkpoint_dir: str | None) -> dict | None:
    """The metadata of `checkpoint_dir/best.pt` (epoch, key metric, every validation metric of that epoch), or
    None."""
    path = Path(checkpoint_dir) / "best.pt" if checkpoint_dir else None
    if path is None or not path.is_file():
        return None
    from medpmoe.training.checkpoint import read_prompt_checkpoint

    meta = read_prompt_checkpoint(path)["metadata"]
    return meta if "epoch" in meta and "metric" in meta else None


def _label_index(label) -> torch.Tensor:
    label = torch.as_tensor(label).detach().cpu().float().flatten()
    return label.argmax() if label.numel() > 1 else label.round().long()[0]


def trivial_baseline(dataset, metric_name: str, num_classes: int = 2, multi_label: bool = False) -> dict:
    """What a model that learnt nothing scores on the validation items of `dataset` (preprocessed as evaluated):
    segmentation (`*_mean_iou`): `baseline_<metric>`, the mean IoU incl. background of predicting all background
    (as `medpmoe.crossval.all_background_miou`); classification: `baseline_<split>_acc`, the accuracy of always
    predicting the most frequent validation class (multi-label: each label's more frequent value). {} when the
    dataset gives no labels."""
    from monai.metrics import MeanIoU

    split = metric_name.partition("_")[0]
    labels = [item["label"] for item in dataset if isinstance(item, dict) and item.get("label") is not None]
    if not labels:
        return {}
    if metric_name.endswith("mean_iou"):
        metric = MeanIoU(include_background=True)
        for y in labels:
            y = torch.as_tensor(y).detach().cpu().long()
            y = y[None] if y.ndim == 2 else y[:1]
            onehot = torch.nn.functional.one_hot(y[0], max(num_classes, int(y.max()) + 1)).movedim(-1, 0)[None]
            pred = torch.zeros_like(onehot)
            pred[:, 0] = 1
            metric(pred.float(), onehot.float())
        return {f"baseline_{metric_name}": float(metric.aggregate())}
    if multi_label:
        y = torch.stack([torch.as_tensor(v).detach().cpu().float().flatten() for v in labels]) >= 0.5
        rate = y.float().mean(0)
        return {f"baseline_{split}_acc": float(torch.maximum(rate, 1 - rate).mean())}
    counts = torch.bincount(torch.stack([_label_index(v) for v in labels]), minlength=num_classes)
    return {f"baseline_{split}_acc": float(counts.max()) / float(counts.sum())}


def _line(values: dict) -> str:
    return ", ".join(f"{METRIC_LABELS.get(k, k)} ({k}) {v:.4f}" for k, v in values.items())


def final_report(evaluator, output_dir: str, metric_name: str, trainer=None, checkpoint_dir: str | None = None,
                 tracking_uri: str | None = None, execution: str | None = None) -> dict:
    """Write `output_dir/results.json` (atomically, before anything else), then print the key metric (last and
    best) beside the last epoch's other validation metrics, the best checkpoint's metrics (`best_*`: the epoch
    `best.pt` holds, ties in the key metric broken by `medpmoe.training.checkpoint.tie_break`), the trivial baseline
    (`baseline_*`, see `trivial_baseline`), and where the checkpoint, the results and the MLflow store are.
    `execution` (e.g. `medpmoe.models.execution_path(network)`) names the path the model ran: the batched executor
    or the plain loop and why.

    An unchanged re-run of a finished run trains nothing (`medpmoe.training.start_run`): its results are reported.
    """
    from medpmoe.report_step import reporting_step
    from medpmoe.training.checkpoint import best_metrics, scalar_metrics, tie_break

    state = evaluator.state
    out = Path(output_dir) / "results.json"
    if state.best_metric_epoch < 0 and out.exists():
        results = json.loads(out.read_text())
        print(f"{shown(output_dir)} already holds this run, finished with the same configuration (nothing trained, "
              f"no new MLflow run); to train again use --fresh_start True or another --output_dir. Its results: "
              f"{results}", flush=True)
        return results
    last = scalar_metrics(state.metrics)
    results = {
        metric_name: last.get(metric_name, float("nan")),
        f"best_{metric_name}": float(state.best_metric),
        "best_epoch": int(state.best_metric_epoch),
    }
    meta = _best_checkpoint(checkpoint_dir)
    if meta is not None:  # the epoch best.pt holds, over every epoch (also those before a resume)
        results.update(best_metrics(meta, metric_name))
    if trainer is not None:
        results.update(epochs=int(trainer.state.epoch), iterations=int(trainer.state.iteration))
    others = {k: v for k, v in last.items() if k != metric_name}
    results.update(others)
    if execution:
        results["execution"] = execution
    baseline = {}
    dataset = getattr(getattr(evaluator, "data_loader", None), "dataset", None)
    if dataset is not None:
        classes = len((meta or {}).get("class_names") or ()) or 2
        baseline = reporting_step("trivial baseline", trivial_baseline, dataset, metric_name, classes,
                                  bool((meta or {}).get("multi_label"))) or {}
    results.update(baseline)
    atomic_write_text(out, json.dumps(results, indent=1))
    print(
        f"final {metric_name} = {results[metric_name]:.4f} (best {results['best_' + metric_name]:.4f} "
        f"at epoch {results['best_epoch']})" + (f"; {METRIC_LABELS[metric_name]}" if metric_name in METRIC_LABELS
                                                  else ""),
        flush=True,
    )
    if others:
        print("last epoch: " + _line(others), flush=True)
    if execution:
        print(f"model execution: {execution}", flush=True)
    best = {k.removeprefix("best_"): v for k, v in results.items() if k.startswith("best_") and k != "best_epoch"}
    if meta is not None:
        tie = tie_break(metric_name)
        print(f"best checkpoint (epoch {results['best_epoch']}" + (f"; ties in {metric_name} broken by the "
              f"{'lower' if tie[1] == 'min' else 'higher'} {tie[0]}" if tie else "") + "): " + _line(best), flush=True)
    for key, value in baseline.items():
        what = ("predicting all background" if key.endswith("mean_iou") else "always predicting the most frequent "
                "validation class")
        print(f"trivial baseline ({what}): {METRIC_LABELS.get(key.removeprefix('baseline_'), key)} ({key}) "
              f"{value:.4f}", flush=True)
    if checkpoint_dir is not None:
        print(f"checkpoints: {shown(Path(checkpoint_dir) / 'best.pt')} (best), "
              f"{shown(Path(checkpoint_dir) / 'last.pt')} (resumable: re-run the same command)", flush=True)
    print(f"results: {shown(out)}", flush=True)
    if tracking_uri:
        view = f"  (mlflow ui --backend-store-uri {tracking_uri} --workers 1)" if tracking_uri.startswith("sqlite:") \
            else ""
        print(shown(f"MLflow: {tracking_uri}{view}"), flush=True)
        run = _recorded_run(output_dir)
        if run:
            print(f"MLflow run: {run['run_name']}, http://127.0.0.1:5000/#/experiments/{run['experiment_id']}/runs/"
                  f"{run['run_id']}?workflowType=machine_learning", flush=True)
    return results


def _recorded_run(output_dir: str) -> dict | None:
    """The training's MLflow run as `medpmoe.tracking` recorded it in the output folder (None without tracking)."""
    path = Path(output_dir) / "mlflow_run.json"
    try:
        run = json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None
    return run if run and {"run_id", "experiment_id", "run_name"} <= set(run) else None


def run_params(datalist: str, **params) -> dict:
    """Run parameters for tracking: the given config values (None ones left out, e.g. the fold of a run without a
    folds file) plus the datalist's sha256 and the git commit."""
    import subprocess

    out = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in params.items() if v is not None}
    out["data_sha256"] = file_sha256(datalist)[:16]
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["git_commit"] = "unknown"
    return out
