"""Data glue for bundles: the datalist (or the embedded synthetic demo), its check before caching, train / val / test
items that respect patients and official splits, and class balance for imbalanced classification."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from medpmoe.bundle.errors import ConfigError, install_excepthook
from medpmoe.data.errors import DataError
from medpmoe.demo import make_synthetic_polyps

logger = logging.getLogger(__name__)
install_excepthook()  # bundle runs: a DataError is the last line printed, never an abort (exit code 134)

DEMOS = ("polyp", "lesion", "classification")
SPLITS = ("train", "val", "test")
CLASS_BALANCE = ("none", "loss", "sampler")
#: what `split_items` can return: an item split, or every item
ITEM_SETS = (*SPLITS, "all")


def datalist_or_demo(datalist: str | None, demo_root: str, kind: str | None = "polyp", demo_images: int = 48,
                     demo_size: int = 64) -> str:
    """The user's datalist (checked to exist) or a generated synthetic set of `kind` in DEMOS, in its own folder
    under `demo_root` per settings (`medpmoe.demo.demo_dir`), so other demo settings never rewrite a run's set."""
    if datalist:
        path = Path(datalist).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"config key 'datalist': no datalist file at {path}")
        return str(path)
    if kind is None:
        raise ConfigError("config key 'datalist' is needed: this bundle has no demo data (its 'demo_kind' is null); "
                          "pass --datalist /path/to/datalist.json")
    from medpmoe.bundle.demo_cls import make_synthetic_classification, make_synthetic_lesions
    from medpmoe.demo import demo_dir

    make = {"polyp": make_synthetic_polyps, "lesion": make_synthetic_lesions,
            "classification": make_synthetic_classification}.get(kind)
    if make is None:
        raise ValueError(f"config key 'demo_kind': {kind!r} is not one of {DEMOS}")
    path = make(demo_dir(demo_root, kind, demo_images, demo_size), num_images=demo_images, size=demo_size)
    logger.info("no 'datalist' given: using the synthetic %s demo set %s", kind, path)
    return str(path)


def task_info(task_name: str | None, datalist: str) -> dict:
    """{'classes', 'multi_label'}: from the Med-VTAB registry when `task_name` is given, else from the datalist."""
    from medpmoe.data import get_task, read_datalist_file

    doc = read_datalist_file(datalist) if not task_name or Path(datalist).is_file() else {}
    if task_name:
        task = get_task(task_name)
        if "synthetic" in doc:
            raise ValueError(f"config key 'task_name' is {task_name!r} but no 'datalist' is given: make one with "
                             f"'python -m medpmoe.data.convert {task.converter or '<layout>'} ...' and pass --datalist")
        return {"classes": list(task.classes), "multi_label": bool(task.multi_label)}
    classes = doc.get("classes")
    if not classes:
        raise ValueError(f"{datalist}: no 'classes' list; set the config key 'task_name' or add 'classes'")
    first = doc["training"][0].get("label") if doc.get("training") else None
    return {"classes": list(classes), "multi_label": bool(doc.get("multi_label", isinstance(first, list)))}


def largest_patch_size(experts) -> int | None:
    """The largest patch size among expert config entries (`patch_size` of a tiny expert, or the `patchN` of a named
    expert's timm architecture), or None when none is known."""
    import re

    from medpmoe.experts.registry import expert_spec

    sizes = []
    for e in experts or []:
        entry = e if isinstance(e, dict) else {"name": e}
        if entry.get("patch_size"):
            sizes.append(int(entry["patch_size"]))
            continue
        try:
            found = re.search(r"patch(\d+)", expert_spec(str(entry.get("name"))).arch)
        except Exception:  # noqa: BLE001 (an unknown name is the model's error to report, not the data check's)
            found = None
        if found:
            sizes.append(int(found.group(1)))
    return max(sizes) if sizes else None


def _configured_min_size() -> int:
    """The largest patch size of the running bundle's `experts`, else `DEFAULT_MIN_SIZE`."""
    from medpmoe.bundle.config_check import _running_parser
    from medpmoe.data.validation import DEFAULT_MIN_SIZE

    parser = _running_parser()
    try:
        experts = parser.get_parsed_content("experts") if parser is not None and "experts" in parser else None
    except Exception:  # noqa: BLE001 (a bad experts entry is reported when the model is built)
        experts = None
    return largest_patch_size(experts) or DEFAULT_MIN_SIZE


def check_data(datalist: str, task: str, class_names: list[str] | None = None, multi_label: bool = False,
               mask_threshold: float = 128, cache_dir: str | None = None, min_size: int | None = None) -> int:
    """Check every file the datalist names (all of its lists) before anything is cached: names that open (no
    symbolic link loop), headers (no decompression bomb), sizes (each side at least `min_size`, default the largest
    patch size of the running bundle's experts), mask values, labels, duplicates, NaN voxels of floating-point
    volumes, with results cached by file content hash (`medpmoe.data.validation.quick_check`; cache in `cache_dir`,
    default `$MEDPMOE_CACHE_DIR` or ~/.cache/medpmoe). One DataError line listing the bad files when any is found;
    returns the number of items checked."""
    from medpmoe.data import load_datalist, read_datalist_file
    from medpmoe.data.validation import quick_check

    if min_size is None:
        min_size = _configured_min_size()

    doc = read_datalist_file(datalist)
    items = []
    for key in ("training", "validation", "test"):
        if isinstance(doc.get(key), list):
            items += load_datalist(datalist, key, task)
    quick_check(items, task, class_names, multi_label=multi_label, mask_threshold=mask_threshold,
                cache_dir=cache_dir, where=str(datalist), min_size=min_size)
    return len(items)


def _official(items: list[dict], split: str) -> list[dict]:
    return [it for it in items if it.get("split", "train") == split]


def _check_split_classes(train: list[dict], val: list[dict], where: str, names: list[str] | None) -> None:
    """DataError when the validation items lack a class the training items have (its AUC would be undefined)."""
    import numpy as np

    from medpmoe.cv import class_matrix, class_counts_text, missing_classes

    matrix = class_matrix(train + val)
    if matrix is None or not val:
        return
    multi = isinstance(val[0].get("label"), list)
    miss = missing_classes(matrix, np.arange(len(train), len(train) + len(val)), multi)
    if miss:
        name = (lambda c: names[c] if names and c < len(names) else str(c))  # noqa: E731
        raise DataError(f"{where}: the validation split has {'no positive or no negative' if multi else 'no image'} "
                        f"of {', '.join(name(c) for c in miss)}, so its AUC would be undefined (class counts: "
                        f"{class_counts_text(matrix, names)}); raise val_fraction, give the split more images of "
                        "those classes, or merge rare classes")


def chain(*parts):
    """One flat `DataCompose` of `parts` (Compose objects, lists of transforms or single transforms), e.g. the
    training transform `chain(@train#preprocessing, @train#augmentation)`: flat, so that a CacheDataset caches
    everything before the first random transform."""
    from monai.transforms import Compose

    from medpmoe.data.transforms import DataCompose

    flat: list = []
    for part in parts:
        if isinstance(part, Compose):
            flat += part.flatten().transforms
        elif isinstance(part, (list, tuple)):
            flat += list(part)
        elif part is not None:
            flat.append(part)
    return DataCompose(flat)


def eval_items(eval_datalist: str | None, datalist: str, split: str = "val", val_fraction: float = 0.2, seed: int = 0,
               folds_file: str | None = None, fold: int = 0, task: str | None = None) -> list[dict]:
    """What evaluation runs on: every item of `eval_datalist` when given, else `split` of the training datalist."""
    if eval_datalist:
        return split_items(eval_datalist, "all", task=task)
    return split_items(datalist, split, val_fraction, seed, folds_file, fold, task)


def split_items(datalist: str, split: str, val_fraction: float = 0.2, seed: int = 0, folds_file: str | None = None,
                fold: int = 0, task: str | None = None) -> list[dict]:
    """Items of `split` ('train', 'val', 'test' or 'all'), paths resolved, in this order of precedence:

    1. a `medpmoe.cv` fold when `folds_file` is given;
    2. the datalist's own `validation` (and `test`) lists;
    3. items' official `split` keys ('train' / 'val' / 'test'; items without one count as 'train'), as the MedMNIST
       converter writes them;
    4. else a seeded split of the training items (`medpmoe.cv.holdout_split`): grouped by `patient_id` whenever
       items carry one (no patient on both sides), stratified by class where possible.

    For classification, the validation items must hold every class the training items hold (else DataError with
    the class counts: an absent class makes the AUC undefined). 'all' returns every `training` item (evaluation on
    a held-out datalist); 'test' the `test` list or the items whose split is 'test'.
    """
    from medpmoe.cv import get_fold, holdout_split, load_folds
    from medpmoe.data import load_datalist, read_datalist_file
    from medpmoe.data.datalist import resolve_item

    if split not in ITEM_SETS:
        raise ValueError(f"split must be 'train', 'val', 'all' or 'test', got {split!r}")
    doc = read_datalist_file(datalist)
    task = task or doc.get("task")
    names = doc.get("classes")
    if split == "all":
        return load_datalist(datalist, "training", task)
    if split == "test":
        if "test" in doc:
            return load_datalist(datalist, "test", task)
        test = _official(load_datalist(datalist, "training", task), "test")
        if not test:
            raise DataError(f"{datalist}: no 'test' list and no item with \"split\": \"test\"")
        return test
    if folds_file:
        train, val = get_fold(load_folds(folds_file), fold)
        base = Path(datalist).parent.resolve()
        train, val = ([resolve_item(it, base, task) for it in part] for part in (train, val))
    elif "validation" in doc:
        train, val = load_datalist(datalist, "training", task), load_datalist(datalist, "validation", task)
    else:
        data = load_datalist(datalist, "training", task)
        unknown = sorted({str(it["split"]) for it in data if "split" in it} - set(SPLITS))
        if unknown:
            raise DataError(f"{datalist}: item 'split' values {unknown} are not one of {SPLITS}")
        pool, val = _official(data, "train"), _official(data, "val")
        if val:
            train = pool
        else:
            if len(pool) < 2:
                raise DataError(f"{datalist}: needs at least 2 items to split into train and val, found {len(pool)}")
            train_idx, val_idx = holdout_split(pool, val_fraction, seed, task)
            train, val = [pool[i] for i in train_idx], [pool[i] for i in val_idx]
    if task != "segmentation":
        _check_split_classes(train, val, datalist, names)
    shared = {it["patient_id"] for it in train if "patient_id" in it} & {it["patient_id"] for it in val
                                                                         if "patient_id" in it}
    if shared and split == "val":  # only a split the datalist fixes can do this: say so (once, no identifiers)
        logger.warning("%s: %d patient(s) in both the training and the validation items of the datalist's own "
                       "split; validation results are optimistic", datalist, len(shared))
    return train if split == "train" else val


def write_split(output_dir: str, datalist: str, train: list[dict], val: list[dict]) -> Path:
    """Record which images trained and which validated in `output_dir/split.json` (paths relative to the
    datalist's folder, with patient counts), so a run's split can be audited; kept out of MLflow, since file names
    can identify patients."""
    import os

    from medpmoe.files import atomic_write_text, file_sha256

    root = Path(datalist).resolve().parent
    patients = [{it["patient_id"] for it in items if "patient_id" in it} for items in (train, val)]
    doc = {"datalist": str(datalist), "datalist_sha256": file_sha256(datalist),
           "patients": {"train": len(patients[0]), "val": len(patients[1]), "in_both": len(patients[0] & patients[1])},
           **{name: [os.path.relpath(str(it["image"]), root) for it in items]
              for name, items in (("train", train), ("val", val))}}
    path = Path(output_dir) / "split.json"
    atomic_write_text(path, json.dumps(doc, indent=1))
    return path


def _label_matrix(items: list[dict], num_classes: int):
    import numpy as np

    labels = [it["label"] for it in items]
    if all(isinstance(v, list) for v in labels):
        return np.asarray(labels, dtype=np.float64), True
    m = np.zeros((len(labels), num_classes))
    m[np.arange(len(labels)), np.asarray(labels, dtype=int)] = 1
    return m, False


def class_weights(items: list[dict], num_classes: int):
    """Per-class loss weights from the training items: n / (C * count_c) for single-label (scikit-learn's
    'balanced'; absent classes get 0), negatives / positives per label for multi-label (BCE pos_weight; 1 when a
    label has no positive or no negative)."""
    import numpy as np
    import torch
    from sklearn.utils.class_weight import compute_class_weight

    m, multi = _label_matrix(items, num_classes)
    if multi:
        pos, neg = m.sum(0), len(m) - m.sum(0)
        return torch.tensor(np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0), dtype=torch.float32)
    y = m.argmax(1)
    present = np.unique(y)
    w = np.zeros(num_classes)
    w[present] = compute_class_weight("balanced", classes=present, y=y)
    return torch.tensor(w, dtype=torch.float32)


def classification_loss(items: list[dict], num_classes: int, multi_label: bool = False, class_balance: str = "none"):
    """CrossEntropyLoss (BCEWithLogitsLoss for multi-label), class-weighted by `class_weights` when
    class_balance='loss'."""
    import torch

    if class_balance not in CLASS_BALANCE:
        raise ValueError(f"config key 'class_balance': {class_balance!r} is not one of {CLASS_BALANCE}")
    weights = class_weights(items, num_classes) if class_balance == "loss" else None
    if multi_label:
        return torch.nn.BCEWithLogitsLoss(pos_weight=weights)
    return torch.nn.CrossEntropyLoss(weight=weights)


def balanced_sampler(items: list[dict], num_classes: int, class_balance: str = "none", seed: int = 0):
    """A WeightedRandomSampler drawing every class equally often (multi-label: each item weighted by its rarest
    positive label) when class_balance='sampler', else None (plain shuffling). Single-process only: with
    DistributedDataParallel use class_balance='loss'."""
    import torch

    if class_balance not in CLASS_BALANCE:
        raise ValueError(f"config key 'class_balance': {class_balance!r} is not one of {CLASS_BALANCE}")
    if class_balance != "sampler":
        return None
    m, multi = _label_matrix(items, num_classes)
    counts = m.sum(0)
    inv = torch.tensor(1.0 / counts.clip(min=1))
    mt = torch.tensor(m)
    per_item = (mt * inv).max(1).values if multi else mt @ inv
    per_item = torch.where(per_item > 0, per_item, inv.min())  # multi-label items without a positive
    return torch.utils.data.WeightedRandomSampler(per_item.double(), num_samples=len(items), replacement=True,
                                                  generator=torch.Generator().manual_seed(seed))
