"""A checkpoint's figures in MLflow: segmentation overlays titled with file name and Dice, confusion matrix and ROC,
the pMoE routing heatmap; `ArtifactLogger`, the ignite handler an evaluation attaches to its evaluator.

Training and evaluation runs use the same artifact paths: `plots/segmentation_overlays.png`,
`plots/confusion_matrix.png`, `plots/roc_curve.png`, `plots/routing_heatmap.png` (+ `routing_table.csv`),
`checkpoint/<file>.pt`, `parameters.json` and `config/config.json`.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from medpmoe.files import shown
from medpmoe.report_step import reporting_step
from medpmoe.tracking.plots import confusion_matrix_figure, overlay_figure, roc_figure
from medpmoe.tracking.scrub import scrub_params

PLOTS = "plots"
logger = logging.getLogger(__name__)


def resolve_run_id(run_id: str | None = None, mlflow_handler=None) -> str:
    """The run to log to: `run_id`, else a MONAI MLFlowHandler's current run, else mlflow's active run."""
    import mlflow

    if run_id:
        return run_id
    cur = getattr(mlflow_handler, "cur_run", None)
    if cur is not None:
        return cur.info.run_id
    active = mlflow.active_run()
    if active is None:
        raise RuntimeError("no MLflow run to log to: pass run_id, an MLFlowHandler that has started, or start a run")
    return active.info.run_id


def _client(tracking_uri: str | None = None, mlflow_handler=None):
    import mlflow

    return getattr(mlflow_handler, "client", None) or mlflow.MlflowClient(tracking_uri=tracking_uri)


def checkpoint_title(checkpoint: str | Path | None, metric_name: str | None = None) -> str:
    """'best.pt (epoch 5, val_mean_iou 0.431)': the checkpoint file and what its metadata says of it."""
    if not checkpoint or not Path(checkpoint).is_file():
        return "model"
    from medpmoe.training.checkpoint import CheckpointMismatchError, read_prompt_checkpoint

    try:
        meta = read_prompt_checkpoint(checkpoint)["metadata"]
    except CheckpointMismatchError:  # not a medpmoe checkpoint: its name is all we know
        return shown(Path(checkpoint).name)
    bits = [f"epoch {meta['epoch']}"] if meta.get("epoch") is not None else []
    if meta.get("metric") is not None:
        bits.append(f"{meta.get('metric_name') or metric_name or 'key metric'} {meta['metric']:.3f}")
    return shown(Path(checkpoint).name) + (f" ({', '.join(bits)})" if bits else "")


def log_routing_heatmap(model, loader: Iterable, run_id: str | None = None, device="cpu",
                        tracking_uri: str | None = None, artifact_path: str = PLOTS, mlflow_handler=None,
                        title: str | None = None, client=None):
    """Compute the pMoE routing table over `loader`, log its heatmap PNG and CSV to MLflow; returns the table."""
    from medpmoe.routing import plot_routing_heatmap, routing_table

    table = routing_table(model, loader, device=device)
    run = resolve_run_id(run_id, mlflow_handler)
    client = client or _client(tracking_uri, mlflow_handler)
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_routing_heatmap(table, Path(tmp) / "routing_heatmap.png",
                                   title=f"pMoE dispatch weights, {title}" if title else "pMoE dispatch weights")
        table.to_csv(Path(tmp) / "routing_table.csv")
        client.log_artifact(run, str(png), artifact_path)
        client.log_artifact(run, str(Path(tmp) / "routing_table.csv"), artifact_path)
    return table


def _file_name(image) -> str:
    meta = getattr(image, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return shown(Path(str(name)).name) if name else "image"


def _class_index(x) -> int:
    x = torch.as_tensor(x).detach().cpu().flatten()
    return int(x.argmax()) if x.numel() > 1 else int(x.item())


def _indices(x, num_classes: int) -> torch.Tensor:
    """(1, H, W) class indices from class indices (1, H, W) or one-hot / probabilities (C, H, W)."""
    x = torch.as_tensor(x).detach().cpu().float()
    return x.round().long() if x.shape[0] == 1 else x.argmax(0, keepdim=True)


def image_dice(pred, label) -> float:
    """Foreground Dice of one image (MONAI's compute_dice, background excluded, averaged over the foreground
    classes present); NaN when the image has no foreground in its label."""
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    n = max(2, torch.as_tensor(pred).shape[0])
    p, y = one_hot(_indices(pred, n)[None], n), one_hot(_indices(label, n)[None], n)
    d = compute_dice(p, y, include_background=False)
    d = d[~torch.isnan(d)]
    return float(d.mean()) if d.numel() else float("nan")


@torch.no_grad()
def predict_items(model, loader: Iterable, device="cpu", amp: bool = False, multi_label: bool = False,
                  limit: int | None = None) -> list[dict]:
    """Per item of `loader` (MONAI dict batches): image, probabilities (softmax, sigmoid for multi-label), label and
    file name, from the model in eval mode (its mode is restored)."""
    from monai.data import decollate_batch

    dev = torch.device(device)
    was_training = model.training
    model.eval()
    items: list[dict] = []
    try:
        for batch in loader:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(batch["image"].to(dev)).float()
            probs = (logits.sigmoid() if multi_label else logits.softmax(1)).cpu()
            for item, p in zip(decollate_batch(batch, detach=True), probs):
                items.append({"image": item["image"], "pred": p, "label": item.get("label"),
                              "name": _file_name(item["image"])})
            if limit is not None and len(items) >= limit:
                break
    finally:
        model.train(was_training)
    return items[:limit] if limit is not None else items


def log_figures(client, run_id: str, items: Sequence[dict], task: str, class_names: Sequence[str] | None = None,
                multi_label: bool = False, title: str = "model", num_examples: int = 4,
                artifact_path: str = PLOTS) -> list[str]:
    """Log a checkpoint's figures made from per-item predictions (`predict_items` or an evaluator's outputs):
    classification: confusion matrix (single-label) and ROC; segmentation: the first `num_examples` overlays, each
    titled with its file name and Dice. Returns the artifact paths."""
    logged = []

    def put(make, name):
        def draw_and_log():
            client.log_figure(run_id, make(), f"{artifact_path}/{name}")
            logged.append(f"{artifact_path}/{name}")

        reporting_step(f"figure {artifact_path}/{name}", draw_and_log)

    if not items:
        return logged
    if task == "classification":
        scores = torch.stack([torch.as_tensor(it["pred"]).float().flatten() for it in items]).numpy()
        if multi_label:
            labels = torch.stack([torch.as_tensor(it["label"]).float().flatten() for it in items]).numpy()
        else:
            labels = [_class_index(it["label"]) for it in items]
            put(lambda: confusion_matrix_figure(labels, scores.argmax(1), class_names, title=title),
                "confusion_matrix.png")
        put(lambda: roc_figure(labels, scores, class_names, title=title), "roc_curve.png")
        return logged
    ex = [it for it in items if it.get("image") is not None][:num_examples]
    if ex:
        titles = []
        for it in ex:
            d = image_dice(it["pred"], it["label"]) if it.get("label") is not None else float("nan")
            titles.append(f"{it.get('name') or _file_name(it['image'])}\n"
                          + (f"Dice {d:.2f}" if not math.isnan(d) else "Dice n/a (no foreground)"))
        put(lambda: overlay_figure([it["image"] for it in ex], [it["pred"] for it in ex],
                                   [it.get("label") for it in ex], titles,
                                   title=f"{title}: first {len(ex)} validation images"), "segmentation_overlays.png")
    return logged


def log_parameter_report(client, run_id: str, model) -> None:
    """`parameters.json`: the model's trainable-parameter report (what training writes to its output folder)."""
    from medpmoe.params import parameter_report

    client.log_text(run_id, json.dumps(parameter_report(model), indent=1), "parameters.json")


class ArtifactLogger:
    """Ignite handler: collects an evaluator's outputs and at COMPLETED logs to MLflow the confusion matrix and ROC
    (classification) or example overlays with per-image Dice (segmentation), titled with the checkpoint and its
    epoch; the routing heatmap (pMoE, when `loader` is given), the prompt checkpoint, `parameters.json` and
    scrubbed `params`."""

    def __init__(self, task: str = "segmentation", class_names: Sequence[str] | None = None, run_id: str | None = None,
                 mlflow_handler=None, tracking_uri: str | None = None, model=None, loader=None, checkpoint=None,
                 params: dict | None = None, num_examples: int = 4, artifact_path: str = PLOTS,
                 device="cpu", multi_label: bool = False, metric_name: str | None = None) -> None:
        if task not in ("segmentation", "classification"):
            raise ValueError(f"ArtifactLogger: task must be 'segmentation' or 'classification', got {task!r}")
        self.task, self.class_names, self.run_id = task, class_names, run_id
        self.mlflow_handler, self.tracking_uri = mlflow_handler, tracking_uri
        self.model, self.loader, self.checkpoint, self.params = model, loader, checkpoint, params
        self.num_examples, self.artifact_path, self.device = num_examples, artifact_path, device
        self.multi_label, self.metric_name = multi_label, metric_name
        self.reset()

    def reset(self, engine=None) -> None:
        """Forget what was collected (called at the evaluator's STARTED)."""
        self.items: list[dict] = []

    def attach(self, engine) -> None:
        """Register on the engine's STARTED, ITERATION_COMPLETED and COMPLETED events."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.log)

    def collect(self, engine) -> None:
        """Keep class scores and labels of every item (classification) or the first `num_examples` items."""
        output = engine.state.output
        if isinstance(output, dict):  # one batch dict: split it into items
            n = len(output["pred"])
            output = [{k: v[i] for k, v in output.items() if hasattr(v, "__len__") and len(v) == n} for i in range(n)]
        for item in output:
            if self.task == "classification":
                pred = torch.as_tensor(item["pred"]).detach().float().cpu().flatten()
                if not self.multi_label and not torch.allclose(pred.sum(), torch.tensor(1.0)):
                    pred = pred.softmax(0)
                self.items.append({"pred": pred, "label": torch.as_tensor(item["label"]).detach().cpu()})
            elif len(self.items) < self.num_examples:
                image = item.get("image")
                self.items.append({"image": image, "pred": item["pred"], "label": item.get("label"),
                                   "name": _file_name(image) if image is not None else None})

    def log(self, engine=None) -> None:
        """Log the figures, routing heatmap, checkpoint, parameter report and scrubbed params to the run; a step that
        fails is a warning (the evaluation's metrics are never lost to it)."""
        reporting_step("evaluation artifacts", self._log)

    def _log(self) -> None:
        run = resolve_run_id(self.run_id, self.mlflow_handler)
        client = _client(self.tracking_uri, self.mlflow_handler)
        title = checkpoint_title(self.checkpoint, self.metric_name)
        log_figures(client, run, self.items, self.task, self.class_names, self.multi_label, title, self.num_examples,
                    self.artifact_path)
        if self.model is not None and self.loader is not None and getattr(self.model, "dispatcher", None) is not None:
            reporting_step("routing heatmap", log_routing_heatmap, self.model, self.loader, run, self.device,
                           artifact_path=self.artifact_path, title=title, client=client)
        if self.model is not None and hasattr(self.model, "experts"):
            log_parameter_report(client, run, self.model)
        if self.checkpoint and Path(self.checkpoint).is_file():
            client.log_artifact(run, str(self.checkpoint), "checkpoint")
        if self.params:
            logged = client.get_run(run).data.params
            for k, v in scrub_params(self.params).items():
                if k not in logged:
                    client.log_param(run, k, shown(v)[:6000])
