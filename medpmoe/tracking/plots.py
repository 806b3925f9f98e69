"""Figures for MLflow: confusion matrix and ROC (scikit-learn's displays), segmentation overlays (MONAI's
`blend_images`) titled with file name and Dice. `*_figure` returns a matplotlib Figure (Agg canvas, no display) for
`MlflowClient.log_figure`; `*_png` writes it to a file atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medpmoe.files import atomic_write, shown

PRED_COLOUR, TRUE_COLOUR = "yellow", "cyan"


def new_figure(w: float, h: float):
    """A matplotlib Figure on an Agg canvas (pyplot's global state and a display are never touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write `fig` as a PNG atomically (`medpmoe.files.atomic_write`)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi), to_path=True)


def _np(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x)


def _names(class_names: Sequence[str] | None, n: int) -> list[str]:
    return [shown(c) for c in class_names] if class_names else [str(i) for i in range(n)]


def confusion_matrix_figure(y_true, y_pred, class_names: Sequence[str] | None = None, normalize: bool = False,
                            title: str | None = None):
    """Confusion matrix (rows: true class, columns: predicted) of integer labels: scikit-learn's display."""
    from sklearn.metrics import ConfusionMatrixDisplay

    y_true, y_pred = _np(y_true).astype(int).ravel(), _np(y_pred).astype(int).ravel()
    n = len(class_names) if class_names else int(max(y_true.max(initial=0), y_pred.max(initial=0))) + 1
    fig = new_figure(2.2 + 0.65 * n, 2.0 + 0.6 * n)
    ax = fig.add_subplot()
    ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, labels=list(range(n)), display_labels=_names(class_names, n), ax=ax, cmap="Blues",
        normalize="true" if normalize else None, values_format=".2f" if normalize else "d", xticks_rotation=30,
        colorbar=True)
    ax.set_title(shown(title or "confusion matrix"), fontsize=9)
    return fig


def roc_figure(y_true, scores, class_names: Sequence[str] | None = None, title: str | None = None):
    """ROC curve(s) with AUC in the legend (scikit-learn's RocCurveDisplay): binary (scores (N,) or (N, 2)),
    one-vs-rest per class (labels (N,), scores (N, C)) or per label (multi-label 0/1 matrix (N, C))."""
    from sklearn.metrics import RocCurveDisplay

    y_true, scores = _np(y_true), _np(scores)
    if scores.ndim == 2 and scores.shape[1] == 2 and y_true.ndim == 1:
        scores = scores[:, 1]
    if scores.ndim == 1:
        curves = [(shown(class_names[1]) if class_names else "positive", y_true.astype(int).ravel() == 1, scores)]
    elif y_true.ndim == 2:  # multi-label
        curves = [(n, y_true[:, c] > 0.5, scores[:, c]) for c, n in enumerate(_names(class_names, scores.shape[1]))]
    else:
        y = y_true.astype(int).ravel()
        curves = [(n, y == c, scores[:, c]) for c, n in enumerate(_names(class_names, scores.shape[1]))]
    fig = new_figure(4.8, 4.4)
    ax = fig.add_subplot()
    for name, positive, s in curves:
        if positive.all() or not positive.any():
            continue  # a ROC curve needs both classes
        RocCurveDisplay.from_predictions(positive, s, name=name, ax=ax, plot_chance_level=False)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(shown(title or "ROC"), fontsize=9)
    return fig


def _chw(image) -> np.ndarray:
    """(C, H, W) in [0, 1] from (C, H, W), (H, W, C) or (H, W)."""
    img = _np(image).astype(np.float32)
    if img.ndim == 2:
        img = img[None]
    elif img.shape[0] not in (1, 3) and img.shape[-1] in (1, 3):
        img = np.moveaxis(img, -1, 0)
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def _mask(m) -> np.ndarray | None:
    """A (H, W) 0/1 foreground mask from class indices (1, H, W) / (H, W) or one-hot / probabilities (C, H, W)."""
    if m is None:
        return None
    m = _np(m)
    if m.ndim == 3:
        m = m[0] if m.shape[0] == 1 else m.argmax(0)
    return (m > 0.5).astype(np.float32)


def overlay_figure(images, pred_masks, true_masks=None, titles: Sequence[str] | None = None,
                   title: str | None = None, max_items: int = 8):
    """Images side by side, the predicted foreground blended in (MONAI's `blend_images`) and outlined in yellow,
    the true foreground outlined in cyan, a legend naming both; one title per image (file name, Dice)."""
    from matplotlib.lines import Line2D
    from monai.visualize import blend_images

    images = list(images)[:max_items]
    preds = list(pred_masks)[: len(images)]
    trues = list(true_masks)[: len(images)] if true_masks is not None else [None] * len(images)
    fig = new_figure(max(4.0, 2.5 * len(images)), 3.3)
    for i, (img, p, t) in enumerate(zip(images, preds, trues)):
        ax = fig.add_subplot(1, len(images), i + 1)
        chw, pm, tm = _chw(img), _mask(p), _mask(t)
        blended = blend_images(chw, pm[None], alpha=0.3, cmap="autumn") if pm is not None else chw
        ax.imshow(np.moveaxis(np.asarray(blended), 0, -1).clip(0, 1) if blended.shape[0] == 3 else blended[0],
                  cmap="gray")
        for m, colour in ((tm, TRUE_COLOUR), (pm, PRED_COLOUR)):
            if m is not None and 0 < m.sum() < m.size:
                ax.contour(m, levels=[0.5], colors=colour, linewidths=1.2)
        ax.set_title(shown(titles[i]) if titles else f"#{i}", fontsize=7)
        ax.axis("off")
    handles = [Line2D([], [], color=PRED_COLOUR, lw=2, label="prediction")]
    if any(t is not None for t in trues):
        handles.append(Line2D([], [], color=TRUE_COLOUR, lw=2, label="ground truth"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.get_layout_engine().set(rect=(0, 0.08, 1, 0.92))
    if title:
        fig.suptitle(shown(title), fontsize=9)
    return fig


def confusion_matrix_png(y_true, y_pred, path, class_names: Sequence[str] | None = None,
                         normalize: bool = False, title: str | None = None) -> Path:
    """`confusion_matrix_figure` written to `path` as a PNG."""
    return save_png(confusion_matrix_figure(y_true, y_pred, class_names, normalize, title), path)


def roc_curve_png(y_true, scores, path, class_names: Sequence[str] | None = None, title: str | None = None) -> Path:
    """`roc_figure` written to `path` as a PNG."""
    return save_png(roc_figure(y_true, scores, class_names, title), path)


def overlay_png(images, pred_masks, true_masks=None, path="overlay.png", titles: Sequence[str] | None = None,
                max_items: int = 8, title: str | None = None) -> Path:
    """`overlay_figure` written to `path` as a PNG."""
    return save_png(overlay_figure(images, pred_masks, true_masks, titles, title, max_items), path)
