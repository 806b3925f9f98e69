"""Start-up and final reports for bundle runs, and the MLflow tracking URI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from monai.utils import path_to_sqlite_uri
from torch import nn

from medpmoe.files import atomic_write_text, file_sha256
from medpmoe.params import format_parameter_report, parameter_report

#: How the summary names the segmentation metrics (mIoU includes background; the others are foreground only).
METRIC_LABELS = {"val_mean_iou": "mean IoU incl. background", "val_fg_iou": "foreground IoU",
                 "val_mean_dice": "foreground Dice", "val_auc": "ROC-AUC", "val_acc": "accuracy"}


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


def _scalars(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        v = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def _best_checkpoint(checkpoint_dir: str | None) -> tuple[int, float] | None:
    """(epoch, metric) recorded in `checkpoint_dir/best.pt`, or None."""
    path = Path(checkpoint_dir) / "best.pt" if checkpoint_dir else None
    if path is None or not path.is_file():
        return None
    from medpmoe.training.checkpoint import read_prompt_checkpoint

    meta = read_prompt_checkpoint(path)["metadata"]
    return (int(meta["epoch"]), float(meta["metric"])) if "epoch" in meta and "metric" in meta else None


def final_report(evaluator, output_dir: str, metric_name: str, trainer=None, checkpoint_dir: str | None = None,
                 tracking_uri: str | None = None, execution: str | None = None) -> dict:
    """Print the key metric (last and best) beside the other validation metrics, and where the checkpoint, the
    results and the MLflow store are; write `output_dir/results.json` (atomically). `execution` (e.g.
    `medpmoe.models.execution_path(network)`) names the path the model ran: the batched executor or the plain loop
    and why.

    An unchanged re-run of a finished run trains nothing (`medpmoe.training.start_run`): its results are reported.
    """
    state = evaluator.state
    out = Path(output_dir) / "results.json"
    if state.best_metric_epoch < 0 and out.exists():
        results = json.loads(out.read_text())
        print(f"{output_dir} already holds this run, finished with the same configuration (nothing trained, no new "
              f"MLflow run); to train again use --fresh_start True or another --output_dir. Its results: {results}",
              flush=True)
        return results
    results = {
        metric_name: float(state.metrics.get(metric_name, float("nan"))),
        f"best_{metric_name}": float(state.best_metric),
        "best_epoch": int(state.best_metric_epoch),
    }
    best = _best_checkpoint(checkpoint_dir)
    if best is not None:  # the best over every epoch, also those before a resume (the evaluator saw only these)
        results.update({f"best_{metric_name}": best[1], "best_epoch": best[0]})
    if trainer is not None:
        results.update(epochs=int(trainer.state.epoch), iterations=int(trainer.state.iteration))
    others = {k: v for k, v in _scalars(state.metrics).items() if k != metric_name}
    results.update(others)
    if execution:
        results["execution"] = execution
    print(
        f"final {metric_name} = {results[metric_name]:.4f} (best {results['best_' + metric_name]:.4f} "
        f"at epoch {results['best_epoch']})" + (f"; {METRIC_LABELS[metric_name]}" if metric_name in METRIC_LABELS
                                                  else ""),
        flush=True,
    )
    if others:
        print("last epoch: " + ", ".join(f"{METRIC_LABELS.get(k, k)} ({k}) {v:.4f}" for k, v in others.items()),
              flush=True)
    if execution:
        print(f"model execution: {execution}", flush=True)
    atomic_write_text(out, json.dumps(results, indent=1))
    if checkpoint_dir is not None:
        print(f"checkpoints: {Path(checkpoint_dir) / 'best.pt'} (best), {Path(checkpoint_dir) / 'last.pt'} "
              "(resumable: re-run the same command)", flush=True)
    print(f"results: {out}", flush=True)
    if tracking_uri:
        view = f"  (mlflow ui --backend-store-uri {tracking_uri} --workers 1)" if tracking_uri.startswith("sqlite:") \
            else ""
        print(f"MLflow: {tracking_uri}{view}", flush=True)
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
