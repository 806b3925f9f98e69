"""Build datalists from common dataset layouts: Kvasir-SEG, CVC-ClinicDB, ISIC/HAM10000, MedMNIST .npz,
folder-per-class.

Every converter opens every image and mask it finds (`medpmoe.data.validation.check_items`; a file it cannot
open, a symbolic link loop included, is a problem too, never dropped unlisted): on_error='raise' stops with one
DataError listing every problem; 'skip' writes the good items and returns the skipped ones, each with its problem,
in the report. Images with identical content share a patient_id (listed in report.notes).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
from PIL import Image

from medpmoe.data.datalist import write_datalist
from medpmoe.data.errors import DataError, DataReport, check_on_error
from medpmoe.data.readers import PICTURE_SUFFIXES
from medpmoe.data.tasks import HAM10000_DX

_MASK = re.compile(r"_segmentation$", re.IGNORECASE)
MEDMNIST_SPLITS = ("train", "val", "test")


def _images(folder: Path) -> list[Path]:
    """Every entry with a picture suffix that is not a folder: files, and also symbolic link loops and dangling
    links, so that the checks list them by name instead of the converter dropping them unseen."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in PICTURE_SUFFIXES and not p.is_dir())


def _need_dir(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} folder not found")
    if not _images(folder):
        raise DataError(f"{folder}: {what} folder holds no images")


def _pair(images: list[Path], masks: dict[str, Path], report: DataReport) -> list[dict]:
    items = []
    for img in images:
        mask = masks.get(img.stem.lower())
        if mask is None:
            report.add(str(img), "no mask with the same name")
            continue
        items.append({"image": str(img), "label": str(mask)})
    return items


def _finish(report: DataReport, items: list[dict], out, classes: list[str] | None, task: str, on_error: str,
            multi_label: bool = False, **extra) -> DataReport:
    """Open every item; raise listing every problem, or write the good items (report.items) and return. Images
    with the same content share a patient_id (noted), so that splits and folds keep them on one side."""
    from medpmoe.data.validation import check_items

    checked = check_items(items, task, classes, multi_label=multi_label, group_duplicates=True)
    report.problems += checked.problems
    report.skipped += checked.skipped
    report.notes += checked.notes
    report.items = checked.items
    report.raise_if_problems(on_error, "problems")
    if not report.items:
        raise DataError(f"{out}: no usable items left:\n{report.summary()}")
    if task == "classification":
        extra["multi_label"] = multi_label
    write_datalist(out, report.items, classes, task, **extra)
    return report


def kvasir_seg(root: str | Path, out: str | Path, on_error: str = "raise") -> DataReport:
    """Kvasir-SEG: root/images/NAME.jpg with root/masks/NAME.jpg (0/255 JPEG masks) -> segmentation datalist."""
    check_on_error(on_error)
    root, report = Path(root), DataReport()
    _need_dir(root / "images", "images")
    _need_dir(root / "masks", "masks")
    masks = {p.stem.lower(): p for p in _images(root / "masks")}
    items = _pair(_images(root / "images"), masks, report)
    return _finish(report, items, out, ["background", "polyp"], "segmentation", on_error, source="kvasir_seg")


def cvc_clinicdb(root: str | Path, out: str | Path, on_error: str = "raise",
                 sequences: str | Path | None = None) -> DataReport:
    """CVC-ClinicDB: root/Original/N.tif (384x288 RGB) with root/Ground Truth/N.tif (or GroundTruth/, or the PNG
    release) -> segmentation datalist. Frames of one video are near-duplicates: `sequences`, a CSV with columns
    `image` (file stem) and `sequence`, sets `patient_id` so that splits keep each video on one side."""
    check_on_error(on_error)
    root, report = Path(root), DataReport()
    _need_dir(root / "Original", "Original")
    gt = next((root / n for n in ("Ground Truth", "GroundTruth", "Ground_Truth") if (root / n).is_dir()),
              root / "Ground Truth")
    _need_dir(gt, "Ground Truth")
    masks = {p.stem.lower(): p for p in _images(gt)}
    items = _pair(_images(root / "Original"), masks, report)
    if sequences:
        with open(sequences, newline="") as f:
            seq = {row["image"].strip().lower(): row["sequence"].strip() for row in csv.DictReader(f)}
        for it in items:
            if Path(it["image"]).stem.lower() in seq:
                it["patient_id"] = f"seq{seq[Path(it['image']).stem.lower()]}"
    return _finish(report, items, out, ["background", "polyp"], "segmentation", on_error, source="cvc_clinicdb")


def _ham_metadata(root: Path) -> dict[str, dict]:
    meta = root / "metadata.csv"
    if not meta.is_file():
        return {}
    with open(meta, newline="") as f:
        return {row["image_id"]: row for row in csv.DictReader(f)}


def isic_seg(root: str | Path, out: str | Path, on_error: str = "raise") -> DataReport:
    """ISIC 2016/2018 or HAM10000-dev: ISIC_x.jpg + ISIC_x_[Ss]egmentation.png anywhere under root; a
    metadata.csv (HAM10000) adds patient_id = lesion_id."""
    check_on_error(on_error)
    root, report = Path(root), DataReport()
    files = _images(root)
    masks = {_MASK.sub("", p.stem).lower(): p for p in files if _MASK.search(p.stem)}
    if not masks:
        raise DataError(f"{root}: no ISIC_*_segmentation masks found (empty mask folder?)")
    images = [p for p in files if not _MASK.search(p.stem)]
    if not images:
        raise DataError(f"{root}: no ISIC images found")
    meta = _ham_metadata(root)
    items = _pair(images, masks, report)
    for it in items:
        row = meta.get(Path(it["image"]).stem)
        if row:
            it["patient_id"] = row["lesion_id"]
    return _finish(report, items, out, ["background", "lesion"], "segmentation", on_error, source="isic_seg")


def ham10000(root: str | Path, out: str | Path, on_error: str = "raise") -> DataReport:
    """HAM10000 classification: root/images/*.jpg + metadata.csv (dx -> class, lesion_id -> patient_id)."""
    check_on_error(on_error)
    root, report = Path(root), DataReport()
    meta = _ham_metadata(root)
    if not meta:
        raise DataError(f"{root / 'metadata.csv'}: missing or empty HAM10000 metadata")
    _need_dir(root / "images", "images")
    items = []
    for img in _images(root / "images"):
        row = meta.get(img.stem)
        if row is None:
            report.add(str(img), "no row in metadata.csv")
        elif row["dx"] not in HAM10000_DX:
            report.add(str(img), f"diagnosis {row['dx']!r} not in the class list {list(HAM10000_DX)}")
        else:
            items.append({"image": str(img), "label": HAM10000_DX.index(row["dx"]), "patient_id": row["lesion_id"]})
    return _finish(report, items, out, list(HAM10000_DX), "classification", on_error, source="ham10000")


def medmnist_npz(npz: str | Path, out: str | Path, image_dir: str | Path | None = None,
                 splits: tuple[str, ...] | None = None, classes: list[str] | None = None,
                 on_error: str = "raise") -> DataReport:
    """MedMNIST .npz -> PNG files under image_dir (default: beside out) and a classification datalist whose items
    keep their official `split` (train/val/test; `splits` defaults to every split the file holds); label arrays
    with more than one column become multi-hot lists (multi-label)."""
    check_on_error(on_error)
    npz, out = Path(npz), Path(out)
    image_dir = Path(image_dir) if image_dir else out.parent / f"{npz.stem}_images"
    report = DataReport()
    try:
        arrays = np.load(npz)
    except Exception as e:
        raise DataError(f"{npz}: cannot read MedMNIST npz ({type(e).__name__}: {e})") from e
    present = [s for s in MEDMNIST_SPLITS if f"{s}_images" in arrays and f"{s}_labels" in arrays]
    splits = tuple(splits) if splits else tuple(present)
    if not splits:
        raise DataError(f"{npz}: no train/val/test '<split>_images'/'<split>_labels' arrays "
                        f"(found {sorted(arrays.files)})")
    multi, items = False, []
    for split in splits:
        if split not in MEDMNIST_SPLITS:
            raise DataError(f"{npz}: split {split!r} is not one of {MEDMNIST_SPLITS}")
        if split not in present:
            raise DataError(f"{npz}: no '{split}_images'/'{split}_labels' arrays (found {sorted(arrays.files)})")
        imgs, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(imgs) != len(labels):
            raise DataError(f"{npz}: {len(imgs)} {split} images but {len(labels)} labels")
        labels = labels.reshape(len(labels), -1)
        multi = multi or labels.shape[1] > 1
        (image_dir / split).mkdir(parents=True, exist_ok=True)
        for i, (img, lab) in enumerate(zip(imgs, labels)):
            path = image_dir / split / f"{split}_{i:06d}.png"
            Image.fromarray(np.asarray(img, dtype=np.uint8)).save(path)
            label = [int(v) for v in lab] if labels.shape[1] > 1 else int(lab[0])
            items.append({"image": str(path), "label": label, "split": split})
    return _finish(report, items, out, classes, "classification", on_error, multi_label=multi, source=npz.name)


def folder_classes(root: str | Path, out: str | Path, on_error: str = "raise") -> DataReport:
    """root/<class name>/*.{png,jpg,tif,...} -> classification datalist, classes in sorted folder order."""
    check_on_error(on_error)
    root, report = Path(root), DataReport()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise DataError(f"{root}: no class folders found")
    items = []
    for i, name in enumerate(classes):
        files = _images(root / name)
        if not files:
            raise DataError(f"{root / name}: class folder holds no images")
        items += [{"image": str(p), "label": i} for p in files]
    return _finish(report, items, out, classes, "classification", on_error, source="folders")


LAYOUTS = {"kvasir": kvasir_seg, "cvc": cvc_clinicdb, "isic": isic_seg, "ham10000": ham10000,
           "medmnist": medmnist_npz, "folders": folder_classes}
