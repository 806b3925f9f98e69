"""Classification metrics beside MONAI's handlers (accuracy, balanced accuracy, per-class ROC-AUC), a macro ROC-AUC
that is never silently NaN, and the evaluation-metrics JSON."""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.handlers.ignite_metric import IgniteMetricHandler
from monai.metrics import ROCAUCMetric
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from medpmoe.files import atomic_write_text, shown
from medpmoe.data.errors import DataError

logger = logging.getLogger(__name__)


def per_class_auc(prob: np.ndarray, onehot: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC-AUC of every class (column) by scikit-learn; NaN where the labels hold one value only."""
    out = np.full(onehot.shape[1], math.nan)
    for j in range(onehot.shape[1]):
        col = onehot[:, j] >= 0.5
        if 0 < col.sum() < len(col):
            out[j] = roc_auc_score(col, prob[:, j])
    return out


def macro_auc(prob: np.ndarray, onehot: np.ndarray, class_names: list[str] | None = None, where: str = "val") -> float:
    """Mean per-class ROC-AUC over the classes where it is defined, with a warning naming the others; DataError
    when it is defined for no class (the evaluated set holds a single class)."""
    auc = per_class_auc(prob, onehot)
    names = list(class_names) if class_names else [str(j) for j in range(len(auc))]
    undefined = [names[j] for j in np.flatnonzero(np.isnan(auc))]
    if len(undefined) == len(auc):
        raise DataError(f"{where}: ROC-AUC is undefined for every class ({len(onehot)} items, label counts "
                        f"{onehot.sum(0).astype(int).tolist()}): the evaluated set holds a single class")
    if undefined:
        logger.warning("%s ROC-AUC: macro average over %d of %d classes; undefined (no positive or no negative among "
                       "%d items) for %s", where, len(auc) - len(undefined), len(auc), len(onehot), undefined)
    return float(np.nanmean(auc))


class DefinedMacroROCAUCMetric(ROCAUCMetric):
    """monai's ROCAUCMetric whose macro average skips (and names, in a warning) the classes where AUC is
    undefined, instead of returning NaN."""

    def __init__(self, class_names: list[str] | None = None, where: str = "val") -> None:
        """class_names name the skipped classes in the warning."""
        super().__init__(average="macro")
        self.class_names, self.where = class_names, where

    def aggregate(self, average=None) -> float:
        """Macro ROC-AUC over the classes where it is defined."""
        y_pred, y = self.get_buffer()
        return macro_auc(y_pred.float().cpu().numpy(), y.float().cpu().numpy(), self.class_names, self.where)


class MacroAUC(IgniteMetricHandler):
    """Key-metric handler: macro ROC-AUC (MONAI's ROCAUC with the undefined classes skipped and named, never a
    silent NaN); expects one-hot (or multi-hot) labels and probabilities, as the classification bundle's
    postprocessing gives them."""

    def __init__(self, class_names: list[str] | None = None, output_transform: Callable = lambda x: x) -> None:
        """output_transform extracts (y_pred, y), e.g. monai.handlers.from_engine(['pred', 'label'])."""
        super().__init__(metric_fn=DefinedMacroROCAUCMetric(class_names), output_transform=output_transform,
                         save_details=False)


def probability_loss(prob: np.ndarray, target: np.ndarray, multi_label: bool = False, eps: float = 1e-7) -> float:
    """Mean cross-entropy of class probabilities (N, C) against one-hot targets, or (multi-label) mean binary
    cross-entropy per label."""
    p = np.clip(prob.astype(np.float64), eps, 1 - eps)
    y = target.astype(np.float64)
    if not multi_label:
        return float(-(y * np.log(p)).sum(1).mean())
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


class ClassificationMetrics:
    """Ignite handler on an evaluator: accuracy, balanced accuracy (single-label) and ROC-AUC per class.

    Reads the decollated output (`pred` probabilities (C,), `label` one-hot or multi-hot (C,)) and writes
    `<prefix>_acc` (multi-label: mean per-label accuracy at 0.5), `<prefix>_balanced_acc` (single-label: mean
    per-class recall, scikit-learn), `<prefix>_auc_<class>` for every class (NaN where undefined, with a warning
    naming the class) and `<prefix>_loss` (the unweighted cross-entropy of the probabilities, binary cross-entropy
    per label for multi-label: scikit-learn's log loss; what breaks ties in the key metric when the best checkpoint
    is chosen) into state.metrics.
    """

    def __init__(self, class_names: list[str], multi_label: bool = False, prefix: str = "val") -> None:
        self.class_names, self.multi_label, self.prefix = list(class_names), multi_label, prefix
        self._pred: list[torch.Tensor] = []
        self._label: list[torch.Tensor] = []

    def attach(self, engine) -> None:
        """Register on the evaluator's EPOCH_STARTED, ITERATION_COMPLETED and EPOCH_COMPLETED events."""
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.compute)

    def reset(self, engine=None) -> None:
        """Forget the collected outputs."""
        self._pred, self._label = [], []

    def update(self, engine) -> None:
        """Collect this iteration's predictions and labels."""
        for item in engine.state.output:
            self._pred.append(torch.as_tensor(item["pred"]).detach().float().cpu().flatten())
            self._label.append(torch.as_tensor(item["label"]).detach().float().cpu().flatten())

    def compute(self, engine) -> dict:
        """Compute the metrics (gathered over ranks under torch.distributed) into engine.state.metrics."""
        from monai.utils import evenly_divisible_all_gather

        pred, label = torch.stack(self._pred), torch.stack(self._label)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            pred, label = evenly_divisible_all_gather(pred), evenly_divisible_all_gather(label)
        p, y = pred.numpy(), label.numpy()
        out = {f"{self.prefix}_loss": probability_loss(p, y, self.multi_label)}
        if self.multi_label:
            out[f"{self.prefix}_acc"] = float(((p >= 0.5) == (y >= 0.5)).mean())
        else:
            truth, guess = y.argmax(1), p.argmax(1)
            out[f"{self.prefix}_acc"] = float((guess == truth).mean())
            with warnings.catch_warnings():  # mean recall over the classes that occur among the labels
                warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
                out[f"{self.prefix}_balanced_acc"] = float(balanced_accuracy_score(truth, guess))
        auc = per_class_auc(p, y)
        for name, value in zip(self.class_names, auc):
            out[f"{self.prefix}_auc_{name}"] = float(value)
        undefined = [n for n, v in zip(self.class_names, auc) if math.isnan(v)]
        if undefined:
            logger.warning("%s: ROC-AUC undefined (no positive or no negative among %d items) for %s",
                           self.prefix, len(y), undefined)
        engine.state.metrics.update(out)
        return out


def _scalars(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float, np.floating)):
            out[k] = float(v)
    return out


def prefixed(prefix: str, metrics: dict) -> dict:
    """`metrics` (name -> metric handler) named `<prefix>_<name>`: the split they are computed on (`val_mean_iou` in
    training, `test_mean_iou` for an evaluation of `--eval_split test`)."""
    return {f"{prefix}_{name}": metric for name, metric in (metrics or {}).items()}


def write_metrics(evaluator, path: str, **extra) -> dict:
    """Write the evaluator's scalar metrics (plus `extra` values) to a JSON file atomically and print them."""
    result = {**_scalars(evaluator.state.metrics), **extra}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1))
    print(shown("evaluation: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in result.items())), flush=True)
    return result
