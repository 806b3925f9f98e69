"""Deterministic k-fold cross-validation splits: stratified, patient-grouped, duplicate-safe, saved atomically.

Split logic only: `make_folds` -> dict, `save_folds` / `load_folds` for the JSON file, `get_fold` for one fold.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

from medpmoe.data.datalist import read_datalist_file, resolve_item
from medpmoe.files import atomic_write_text
from medpmoe.data.errors import DataError
from medpmoe.data.hashing import find_duplicates

FOLDS_VERSION = 1


def datalist_hash(items: list[dict]) -> str:
    """sha256 of the items' canonical JSON (order matters): ties a folds file to its datalist."""
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


def _mask_bins(resolved: list[dict], bins: int, threshold: float) -> list[str]:
    from medpmoe.data.readers import read_image  # monai: imported only when masks must be read

    fractions = []
    for it in resolved:
        m = read_image(it["label"])[0]
        fg = (m >= threshold) if m.max() > 1 else (m > 0)
        fractions.append(float(fg.float().mean()))
    nonzero = np.array([f for f in fractions if f > 0])
    edges = np.quantile(nonzero, np.linspace(0, 1, bins + 1)[1:-1]) if len(nonzero) else np.array([])
    return ["empty" if f == 0 else f"area{int(np.searchsorted(edges, f, side='right'))}" for f in fractions]


def stratification_keys(raw: list[dict], resolved: list[dict], task: str | None, k: int,
                        mask_bins: int = 3, mask_threshold: float = 128) -> tuple[list[str] | None, str]:
    """One key per item and its name: class label, multi-label combination (or first positive label when a
    combination has fewer than k members), mask foreground-present/area bin for segmentation, or None."""
    labels = [it.get("label") for it in raw]
    if any(lab is None for lab in labels):
        return None, "none"
    if task == "segmentation" or all(isinstance(lab, str) and ("/" in lab or "." in lab) for lab in labels):
        return _mask_bins(resolved, mask_bins, mask_threshold), "mask_area"
    if all(isinstance(lab, list) for lab in labels):
        combo = ["".join(str(int(v)) for v in lab) for lab in labels]
        if min(Counter(combo).values()) >= k:
            return combo, "label_combination"
        return [str(lab.index(1)) if 1 in lab else "none" for lab in labels], "first_positive_label"
    return [str(lab) for lab in labels], "label"


def _load(datalist) -> tuple[list[dict], list[dict], str | None, str | None]:
    if isinstance(datalist, (str, Path)):
        path = Path(datalist)
        doc = read_datalist_file(path)
        raw = doc.get("training")
        if not isinstance(raw, list):
            raise DataError(f"{path}: no 'training' list in the datalist")
        task = doc.get("task")
        return raw, [resolve_item(it, path.parent.resolve(), task) for it in raw], task, str(path)
    raw = list(datalist)
    return raw, [resolve_item(it, Path.cwd(), None) for it in raw], None, None


def make_folds(datalist: str | Path | list[dict], k: int = 5, seed: int = 0, task: str | None = None,
               group_key: str = "patient_id", stratify: bool = True, mask_bins: int = 3,
               mask_threshold: float = 128) -> dict:
    """Split a datalist (file or item list) into k folds; items with `group_key` never share folds.

    Uses StratifiedGroupKFold with groups, StratifiedKFold without (GroupKFold/KFold when not stratifying or
    without labels). Raises DataError on fewer items than k or duplicate files falling in different folds."""
    raw, resolved, file_task, source = _load(datalist)
    task = task or file_task
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    if len(raw) < k:
        raise DataError(f"{source or 'datalist'}: {len(raw)} items cannot make {k} folds")
    keys, how = stratification_keys(raw, resolved, task, k, mask_bins, mask_threshold) if stratify else (None, "none")
    has_groups = any(group_key in it for it in raw)
    groups = [str(it.get(group_key, f"__item{i}")) for i, it in enumerate(raw)] if has_groups else None
    if keys is not None:
        splitter = (StratifiedGroupKFold if has_groups else StratifiedKFold)(k, shuffle=True, random_state=seed)
    else:
        splitter = GroupKFold(k, shuffle=True, random_state=seed) if has_groups else KFold(k, shuffle=True,
                                                                                              random_state=seed)
    X = np.zeros(len(raw))
    y = np.array(keys) if keys is not None else None
    fold_of = np.full(len(raw), -1)
    try:
        with warnings.catch_warnings():  # strata smaller than k: the class check below says what that means
            warnings.filterwarnings("ignore", "The least populated class in y", UserWarning)
            splits = list(splitter.split(X, y, groups))
    except ValueError as e:
        if keys is None:
            raise DataError(f"{source or 'datalist'}: cannot make {k} folds ({e})") from e
        # every stratum smaller than k: fall back to unstratified folds and say so in the file
        splitter = GroupKFold(k, shuffle=True, random_state=seed) if has_groups else KFold(k, shuffle=True,
                                                                                              random_state=seed)
        try:
            splits, how = list(splitter.split(X, None, groups)), f"none ({how} strata smaller than k)"
        except ValueError as e2:
            raise DataError(f"{source or 'datalist'}: cannot make {k} folds ({e2})") from e2
    for f, (_, val) in enumerate(splits):
        fold_of[val] = f
    for i, j, why in find_duplicates(resolved):
        if fold_of[i] != fold_of[j]:
            raise DataError(f"{resolved[j]['image']}: duplicate of {resolved[i]['image']} ({why}) in folds "
                            f"{fold_of[i]} and {fold_of[j]}; remove one or give both the same {group_key}")
    if task != "segmentation":
        _check_folds_hold_every_class(raw, splits, k, seed, groups, source, datalist)
    folds = []
    for f in range(k):
        val_idx = [int(i) for i in np.flatnonzero(fold_of == f)]
        train_idx = [int(i) for i in np.flatnonzero(fold_of != f)]
        folds.append({"fold": f, "train_indices": train_idx, "val_indices": val_idx,
                      "train": [raw[i] for i in train_idx], "val": [raw[i] for i in val_idx]})
    return {"version": FOLDS_VERSION, "k": k, "seed": seed, "method": type(splitter).__name__, "stratify": how,
            "group_key": group_key if has_groups else None, "datalist": source, "datalist_hash": datalist_hash(raw),
            "n_items": len(raw), "folds": folds}


def class_matrix(raw: list[dict]) -> np.ndarray | None:
    """(items, classes) 0/1 matrix of single-label (one-hot) or multi-label items; None for other labels."""
    labels = [it.get("label") for it in raw]
    if labels and all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        m = np.zeros((len(labels), max(labels) + 1), dtype=np.int8)
        m[np.arange(len(labels)), labels] = 1
        return m
    if labels and all(isinstance(v, list) for v in labels) and len({len(v) for v in labels}) == 1:
        return np.array(labels, dtype=np.int8)
    return None


def missing_classes(matrix: np.ndarray, idx, multi_label: bool) -> list[int]:
    """Classes present in `matrix` whose ROC-AUC is undefined on the items `idx`: no positive there (and, for
    multi-label, no negative either)."""
    present = matrix.any(0) & (~matrix.all(0) if multi_label else True)
    sub = matrix[np.asarray(idx, dtype=int)]
    bad = ~sub.any(0) | (sub.all(0) if multi_label else False)
    return [int(c) for c in np.flatnonzero(present & bad)]


def class_counts_text(matrix: np.ndarray, names: list[str] | None, groups: list[str] | None = None) -> str:
    """'name=count' (or 'name=images/patients' with groups) for every class, as refusals quote them."""
    out = []
    for c in range(matrix.shape[1]):
        rows = np.flatnonzero(matrix[:, c])
        name = names[c] if names and c < len(names) else str(c)
        n_groups = len({groups[i] for i in rows}) if groups else None
        out.append(f"{name}={len(rows)}" + (f"/{n_groups}" if groups else ""))
    return ", ".join(out)


def _class_names(datalist) -> list[str] | None:
    if isinstance(datalist, (str, Path)):
        return read_datalist_file(datalist).get("classes")
    return None


def _check_folds_hold_every_class(raw, splits, k, seed, groups, source, datalist) -> None:
    """DataError naming the class counts and the largest feasible k when some validation fold lacks a class (its
    AUC would be NaN in that fold)."""
    matrix = class_matrix(raw)
    if matrix is None:
        return
    multi = isinstance(raw[0].get("label"), list)
    present = np.flatnonzero(matrix.any(0))
    if not multi and len(present) < 2:
        names = _class_names(datalist)
        only = names[present[0]] if names and present[0] < len(names) else str(present[0])
        raise DataError(f"{source or 'datalist'}: every item is of class {only}, so no fold's AUC is defined: a "
                        "classification datalist needs images of at least two classes")
    gaps = [(f, missing_classes(matrix, val, multi)) for f, (_, val) in enumerate(splits)]
    gaps = [(f, m) for f, m in gaps if m]
    if not gaps:
        return
    names = _class_names(datalist)
    name = (lambda c: names[c] if names and c < len(names) else str(c))  # noqa: E731
    feasible = None
    for kk in range(k - 1, 1, -1):  # the stratified splitter with this seed, fewer folds
        splitter = (StratifiedGroupKFold if groups else StratifiedKFold)(kk, shuffle=True, random_state=seed)
        try:
            with warnings.catch_warnings():  # "the least populated class has only ... members": what we test
                warnings.simplefilter("ignore", UserWarning)
                trial = list(splitter.split(np.zeros(len(raw)), np.array(stratification_keys(raw, raw, None, kk)[0]),
                                            groups))
        except ValueError:
            continue
        if not any(missing_classes(matrix, val, multi) for _, val in trial):
            feasible = kk
            break
    f, miss = gaps[0]
    what = "no positive or no negative" if multi else "no image"
    unit = " (images/patients)" if groups else ""
    none = f"none (some class has fewer than 2 {'patients' if groups else 'images'})"
    raise DataError(f"{source or 'datalist'}: cannot make {k} folds whose validation folds each hold every class: "
                    f"fold {f} has {what} of {', '.join(name(c) for c in miss)} ({len(gaps)} of {k} folds lack a "
                    f"class), so its AUC would be undefined. Class counts{unit}: "
                    f"{class_counts_text(matrix, names, groups)}. Largest feasible k: "
                    f"{feasible or none}")


def holdout_split(items: list[dict], val_fraction: float = 0.2, seed: int = 0, task: str | None = None,
                  group_key: str = "patient_id") -> tuple[list[int], list[int]]:
    """(train indices, val indices) of a seeded train/val split: items sharing `group_key` stay on one side
    (sklearn's StratifiedGroupKFold / GroupKFold, val = the first of round(1 / val_fraction) folds), stratified by
    class label (multi-label: label combination, else first positive label) where the strata allow; items without
    groups: monai's partition_dataset_classes / partition_dataset with ratios (1 - val_fraction, val_fraction)."""
    from monai.data import partition_dataset, partition_dataset_classes

    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(items)
    labels = [it.get("label") for it in items]
    keys = None
    if task != "segmentation" and all(lab is not None for lab in labels):
        if all(isinstance(lab, list) for lab in labels):
            keys = stratification_keys(items, items, task, max(2, round(1 / val_fraction)))[0]
        elif all(isinstance(lab, int) for lab in labels):
            keys = [str(lab) for lab in labels]
    if any(group_key in it for it in items):
        groups = [str(it.get(group_key, f"__item{i}")) for i, it in enumerate(items)]
        folds = max(2, min(round(1 / val_fraction), len(set(groups))))
        attempts = [(StratifiedGroupKFold(folds, shuffle=True, random_state=seed), keys)] if keys else []
        attempts.append((GroupKFold(folds, shuffle=True, random_state=seed), None))
        for splitter, y in attempts:
            try:
                train, val = next(iter(splitter.split(np.zeros(n), y, groups)))
                return [int(i) for i in train], [int(i) for i in val]
            except ValueError:  # strata smaller than the number of folds: unstratified
                continue
        raise DataError(f"{len(set(groups))} patients cannot be split into train and val")
    idx = list(range(n))
    ratios = [1 - val_fraction, val_fraction]
    if keys is not None:
        parts = partition_dataset_classes(idx, keys, ratios=ratios, shuffle=True, seed=seed)
    else:
        parts = partition_dataset(idx, ratios=ratios, shuffle=True, seed=seed)
    return list(parts[0]), list(parts[1])


def save_folds(folds: dict, path: str | Path) -> Path:
    """Write the folds JSON atomically (temporary file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(folds, indent=1))
    return path


def load_folds(path: str | Path, datalist: str | Path | list[dict] | None = None) -> dict:
    """Read a folds file, check its structure and, when datalist is given, that it was made from it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: folds file not found")
    try:
        folds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    missing = {"k", "seed", "method", "datalist_hash", "folds"} - set(folds)
    if missing or len(folds["folds"]) != folds["k"]:
        raise DataError(f"{path}: not a medpmoe folds file (missing {sorted(missing)} or wrong number of folds)")
    if datalist is not None:
        raw = _load(datalist)[0]
        if datalist_hash(raw) != folds["datalist_hash"]:
            raise DataError(f"{path}: folds were made from a different datalist than {datalist if not isinstance(datalist, list) else 'the given items'}")
    return folds


def get_fold(folds: dict, fold: int) -> tuple[list[dict], list[dict]]:
    """(train items, val items) of one fold, items as written in the datalist."""
    if not 0 <= fold < folds["k"]:
        raise IndexError(f"fold {fold} outside 0..{folds['k'] - 1}")
    f = folds["folds"][fold]
    return f["train"], f["val"]


if __name__ == "__main__":  # `python -m medpmoe.cv ...`: train and summarise all folds (medpmoe.crossval)
    from medpmoe.crossval import main

    main()
