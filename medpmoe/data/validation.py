"""Checks of a datalist's files before training: readable, sane images, matching masks, labels, duplicates.

Two depths, one set of rules:
- `validate_datalist(..., check_images=True)` decodes every image and mask (converters, `python -m
  medpmoe.data.validate`);
- `quick_check` reads headers and sizes (decoding only masks, whose values must follow `medpmoe.data.masks`),
  with results cached by file content hash, so a bundle can check its datalist at every start before caching.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from medpmoe.data.errors import DataError, DataReport, check_on_error, problems_message
from medpmoe.data.hashing import find_duplicates
from medpmoe.files import atomic_write_text, file_sha256
from medpmoe.data.masks import mask_to_index
from medpmoe.data.readers import as_viewed, check_readable, read_image, reader_kind

CACHE_VERSION = 2
#: the smallest image side the checks accept when no experts are known (converters, `validate`): the smallest patch
#: size any expert uses; an image smaller than one patch is degenerate (a 1x1 export, a thumbnail). The bundles'
#: start check uses the largest patch size of their own experts instead (`medpmoe.bundle.data.check_data`).
DEFAULT_MIN_SIZE = 8
_JPEG_END = b"\xff\xd9"


def check_class_label(label, classes: list[str] | None, num_classes: int | None, multi_label: bool):
    """The label as int (or multi-hot list); ValueError (message without the file) when outside the class list."""
    n = len(classes) if classes else num_classes
    if isinstance(label, str):
        if classes and label in classes:
            return classes.index(label)
        raise ValueError(f"label {label!r} is not in the class list {classes}")
    if multi_label or isinstance(label, list):
        vals = list(label) if isinstance(label, list) else [label]
        if n is not None and len(vals) != n:
            raise ValueError(f"multi-label vector has {len(vals)} entries, expected {n}")
        if any(v not in (0, 1) for v in vals):
            raise ValueError(f"multi-label vector {vals} must hold only 0/1")
        return vals
    if not isinstance(label, int) or isinstance(label, bool) or label < 0 or (n is not None and label >= n):
        raise ValueError(f"label {label!r} outside the class list 0..{(n or 1) - 1}")
    return label


# --- one file -------------------------------------------------------------------------------------------------

def _tail(path: Path, n: int = 64) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - n))
        return f.read()


def _bomb(path: Path, pixels: int) -> DataError:
    from PIL import Image

    return DataError(f"{path}: decompression bomb: the header claims {pixels / 1e6:.0f} megapixels, over the "
                     f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit (PIL.Image.MAX_IMAGE_PIXELS); a broken or "
                     "hostile file, or a slide that needs tiling first")


def _picture_header(path: Path, decode: bool) -> tuple[dict, np.ndarray | None]:
    import re

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            info = {"shape": [im.height, im.width], "mode": im.mode, "format": im.format}
            if Image.MAX_IMAGE_PIXELS and im.height * im.width > Image.MAX_IMAGE_PIXELS:
                raise _bomb(path, im.height * im.width)
            if decode:
                return info, np.asarray(as_viewed(im))
            if im.format == "PNG":
                im.verify()  # every chunk's CRC: catches truncated and corrupted files without decompressing
            elif im.format != "JPEG" or not _tail(path).rstrip(b"\x00\r\n ").endswith(_JPEG_END):
                im.load()  # no JPEG end marker (or another format): decode to be sure
            return info, None
    except Image.DecompressionBombError as e:  # over twice the limit: PIL refuses to open it at all
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        raise _bomb(path, int(claimed.group(1)) if claimed else 0) from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a picture file (no PNG/JPEG/BMP/GIF header; is it another format renamed?)")
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read picture ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _tiff_header(path: Path, decode: bool) -> tuple[dict, np.ndarray | None]:
    import tifffile

    from medpmoe.data.readers import _tiff_page

    try:
        if decode:
            arr = _tiff_page(str(path))
            return {"shape": list(arr.shape[:2]), "mode": str(arr.dtype)}, arr
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            size = path.stat().st_size
            if any(o + n > size for o, n in zip(page.dataoffsets, page.databytecounts)):
                raise ValueError("image data runs past the end of the file (truncated)")
            shape = page.shape[1:] if page.axes.startswith("S") else page.shape
            if page.dtype.kind == "f" and not np.isfinite(page.asarray()).all():
                raise ValueError("image contains NaN or infinite values")
            return {"shape": list(shape[:2]), "mode": str(page.dtype)}, None
    except Exception as e:
        raise DataError(f"{path}: cannot read TIFF image ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _dicom_file_header(path: Path) -> list[int]:
    import pydicom

    ds = pydicom.dcmread(path)  # reads the pixel bytes without decoding them
    if "PixelData" not in ds:
        raise ValueError("no pixel data")
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        need = rows * cols * frames * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        if len(ds.PixelData) < need:
            raise ValueError(f"pixel data holds {len(ds.PixelData)} bytes, {need} expected (truncated)")
    return [rows, cols] + ([frames] if frames > 1 else [])


def _medical_header(path: Path, kind: str) -> dict:
    try:
        if kind == "dicom":
            if path.is_dir():
                files = sorted(f for f in path.iterdir() if f.is_file())
                shapes = {tuple(_dicom_file_header(f)) for f in files}
                if len(shapes) > 1:
                    raise ValueError(f"slices of different sizes {sorted(shapes)}")
                return {"shape": [*shapes.pop(), len(files)]}
            return {"shape": _dicom_file_header(path)}
        import nibabel as nib

        img = nib.load(str(path))
        if str(path).lower().endswith(".nii"):
            need = int(img.header.get_data_offset()) + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
            if path.stat().st_size < need:
                raise ValueError(f"file holds {path.stat().st_size} bytes, {need} expected (truncated)")
        if img.get_data_dtype().kind == "f":
            bad = int((~np.isfinite(np.asanyarray(img.dataobj))).sum())  # floats can hold NaN: read the voxels
            if bad:
                raise DataError(f"{path}: {bad} voxels are NaN or infinite (every voxel must be a number)")
        return {"shape": list(img.shape[:3])}
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read {kind} image ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _sane(x: torch.Tensor, path: Path) -> None:
    if not torch.isfinite(x).all():
        raise DataError(f"{path}: image contains NaN or infinite values")
    if x.numel() == 0 or x.max() == x.min():
        raise DataError(f"{path}: image is constant (value {float(x.flatten()[0]) if x.numel() else 'none'})")


def _channel_first(arr: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.array(arr, dtype=np.float32))
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)


def inspect_file(path: str | Path, decode: bool = False) -> dict:
    """{'kind', 'shape' (spatial, (H, W[, D]))} of one image file; headers only, or a full decode with the NaN /
    constant-image checks when `decode`. DataError naming the file on any problem."""
    path = check_readable(path)
    kind = reader_kind(path)
    if kind in ("pil", "tiff"):
        info, arr = (_picture_header if kind == "pil" else _tiff_header)(path, decode)
        if arr is not None:
            _sane(_channel_first(arr), path)
    elif decode:
        x = read_image(path)
        _sane(x, path)
        info = {"shape": list(x.shape[1:])}
    else:
        info = _medical_header(path, kind)
    return {"kind": kind, **info}


def mask_problem(path: str | Path, num_classes: int, threshold: float = 128) -> str | None:
    """None when the mask follows `medpmoe.data.masks` (grey/palette, binary or 0..C-1, JPEG thresholded), else
    the problem."""
    path = Path(path)
    try:
        if reader_kind(path) in ("pil", "tiff"):
            x = _channel_first(_picture_header(path, True)[1] if reader_kind(path) == "pil" else
                               _tiff_header(path, True)[1])
        else:
            x = read_image(path)
        mask_to_index(x, num_classes, threshold, str(path))
    except DataError as e:
        return str(e).removeprefix(f"{path}: ")
    return None


# --- whole datalists ---------------------------------------------------------------------------------------------

def _duplicates(items: list[dict], hasher=None) -> dict[int, str]:
    """index -> problem for items whose image repeats an earlier one (same path or content) of another patient."""
    out = {}
    for i, j, why in find_duplicates(items, hasher=hasher):
        a, b = items[i].get("patient_id"), items[j].get("patient_id")
        if a is None or a != b:
            out[j] = f"duplicate of {items[i]['image']} ({why})"
    return out


def _big_enough(image: Path, info: dict, min_size: int) -> dict:
    """`info`, or DataError when the image's height or width is below `min_size` pixels."""
    h, w = (list(info["shape"]) + [0, 0])[:2]
    if min_size and min(h, w) < min_size:
        raise DataError(f"{image}: image is {h}x{w} pixels, below the {min_size}-pixel minimum side (the largest "
                        "expert patch size): too small to hold a picture")
    return info


def _check_item(it: dict, task: str | None, classes, num_classes, multi_label, decode: bool, threshold,
                inspect=inspect_file, mask_check=mask_problem, min_size: int = 0) -> dict:
    it = dict(it)
    image = Path(it["image"])
    if task == "segmentation":
        if "label" not in it:
            raise DataError(f"{image}: no mask ('label') given")
        img = _big_enough(image, inspect(image, decode), min_size)
        mask = inspect(it["label"], False)
        if tuple(img["shape"]) != tuple(mask["shape"]):
            raise DataError(f"{it['label']}: mask size {tuple(mask['shape'])} differs from image {image} "
                            f"size {tuple(img['shape'])}")
        problem = mask_check(it["label"], num_classes or len(classes or ()) or 2, threshold)
        if problem:
            raise DataError(f"{it['label']}: {problem}")
        return it
    if "label" in it:
        try:
            it["label"] = check_class_label(it["label"], classes, num_classes, multi_label)
        except ValueError as e:
            raise DataError(f"{image}: {e}") from None
    _big_enough(image, inspect(image, decode), min_size)
    return it


def _run(items: list[dict], check, workers: int) -> list[tuple[dict | None, str | None, str | None]]:
    """check(item) for every item on a thread pool (decoders release the GIL): (kept item, file, problem)."""
    def one(it):
        try:
            return check(it), None, None
        except DataError as e:
            file, _, problem = str(e).partition(": ")
            return None, file, problem
        except OSError as e:  # e.g. a file that vanished or turned unreadable while being checked
            return None, str(e.filename or it.get("image")), f"cannot read ({e.strerror or type(e).__name__})"

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, items))


def _group_duplicates(items: list[dict], report: DataReport) -> list[dict]:
    """Copies of the items in which an image with the same content as an earlier one shares its patient_id (the
    earlier one's, else 'dup_<its file stem>' for both), so that splits keep the copies together; noted in the
    report. Copies already given different patient_ids stay apart (a problem for `_duplicates`)."""
    items = [dict(it) for it in items]
    for i, j, why in find_duplicates(items):
        a, b = items[i].get("patient_id"), items[j].get("patient_id")
        if why != "same content" or (a is not None and b is not None):
            continue
        pid = a if a is not None else b if b is not None else f"dup_{Path(items[i]['image']).stem}"
        items[i]["patient_id"] = items[j]["patient_id"] = pid
        report.notes.append(f"{items[j]['image']}: same content as {items[i]['image']}; patient_id {pid} for both")
    return items


def _collect(items: list[dict], check, workers: int, group_duplicates: bool = False, hasher=None) -> DataReport:
    """Every item through check (duplicates of another patient's image are problems too, unless grouped),
    problems recorded."""
    if not items:
        raise DataError("datalist has no items")
    report = DataReport()
    if group_duplicates:
        items = _group_duplicates(items, report)
    dup = _duplicates(items, hasher)
    kept = iter(_run([it for j, it in enumerate(items) if j not in dup], check, workers))
    for j, it in enumerate(items):
        if j in dup:
            report.add(it["image"], dup[j])
            continue
        item, file, problem = next(kept)
        if item is None:
            report.add(file, problem)
        else:
            report.items.append(item)
    return report


def check_items(items: list[dict], task: str | None = None, classes: list[str] | None = None,
                num_classes: int | None = None, multi_label: bool = False, decode: bool = True,
                mask_threshold: float = 128, workers: int = 2, group_duplicates: bool = False,
                min_size: int = DEFAULT_MIN_SIZE) -> DataReport:
    """Every item checked (decoded when `decode`), nothing raised for bad items: report.items are the good ones
    (labels as ints), report.problems lists every (file, problem). `group_duplicates`: images with the same
    content share a patient_id (noted in report.notes) instead of being problems. Images with a side below
    `min_size` pixels are problems."""
    def check(it):
        return _check_item(it, task, classes, num_classes, multi_label, decode, mask_threshold, min_size=min_size)

    return _collect(items, check, workers, group_duplicates)


def validate_datalist(items: list[dict], task: str | None = None, classes: list[str] | None = None,
                      num_classes: int | None = None, multi_label: bool = False, on_error: str = "raise",
                      check_images: bool = True, mask_threshold: float = 128, workers: int = 2,
                      min_size: int = DEFAULT_MIN_SIZE) -> DataReport:
    """Open every item (decode images and masks: readable, finite, non-constant, mask size and values, label,
    duplicates of another patient).

    on_error='raise' raises one DataError listing every problem; 'skip' drops the bad items and lists each with its
    problem in the returned report (report.items are the good items, labels as ints). check_images=False checks
    headers and sizes only.
    """
    check_on_error(on_error)
    report = check_items(items, task, classes, num_classes, multi_label, check_images, mask_threshold, workers,
                         min_size=min_size)
    report.raise_if_problems(on_error, "bad items")
    if not report.items:
        raise DataError(f"no usable items left after validation:\n{report.summary()}")
    return report


# --- the fast, cached check for bundles ---------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """`$MEDPMOE_CACHE_DIR`, else `~/.cache/medpmoe`."""
    return Path(os.environ.get("MEDPMOE_CACHE_DIR") or Path.home() / ".cache" / "medpmoe")


class _HashCache:
    """File check results keyed by content hash (sha1; a (path, size, mtime) memo avoids re-hashing)."""

    def __init__(self, cache_dir: str | Path | None):
        self.path = Path(cache_dir or default_cache_dir()) / "data_check.json"
        try:
            doc = json.loads(self.path.read_text())
            ok = doc.get("version") == CACHE_VERSION
        except (OSError, ValueError):
            doc, ok = {}, False
        self.stat: dict = doc.get("stat", {}) if ok else {}
        self.results: dict = doc.get("results", {}) if ok else {}
        self.dirty = False

    def content_hash(self, path: str | Path) -> str:
        """sha1 of the file's bytes, from the memo when its path, size and mtime are unchanged."""
        path = Path(path)
        st = path.stat()
        memo = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if memo not in self.stat:
            self.stat[memo] = file_sha256(path)
            self.dirty = True
        return self.stat[memo]

    def key(self, path: Path, extra: str) -> str:
        """Cache key: the file's content hash, its suffix and what was checked."""
        return f"{self.content_hash(path)}|{''.join(path.suffixes[-2:]).lower()}|{extra}"

    def get(self, path: Path, extra: str, compute):
        """compute() -> JSON-able result, cached; DataErrors are cached as {'problem': ...} and re-raised."""
        if not path.is_file():  # folders (DICOM series) and missing files: not cached
            return compute()
        k = self.key(path, extra)
        if k not in self.results:
            try:
                self.results[k] = {"ok": compute()}
            except DataError as e:
                self.results[k] = {"problem": str(e).removeprefix(f"{path}: ")}
            self.dirty = True
        hit = self.results[k]
        if "problem" in hit:
            raise DataError(f"{path}: {hit['problem']}")
        return hit["ok"]

    def save(self) -> None:
        """Write the cache (atomically) when something new was checked."""
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"version": CACHE_VERSION, "stat": self.stat,
                                                     "results": self.results}))


def quick_check(items: list[dict], task: str | None = None, classes: list[str] | None = None,
                num_classes: int | None = None, multi_label: bool = False, mask_threshold: float = 128,
                cache_dir: str | Path | None = None, where: str = "datalist", workers: int = 2,
                min_size: int = DEFAULT_MIN_SIZE) -> DataReport:
    """Headers, sizes (each side at least `min_size`), mask values, labels, duplicates and the voxels of
    floating-point volumes (NaN) of every item, cached by file content hash under `cache_dir` (default
    `default_cache_dir()`); one DataError listing every bad file when any is found."""
    cache = _HashCache(cache_dir)

    def inspect(path, decode):
        path = Path(path)
        return cache.get(path, "header", lambda: inspect_file(path, False)) if path.exists() else inspect_file(path)

    def masks(path, n, threshold):
        path = Path(path)
        return cache.get(path, f"mask{n}@{threshold:g}", lambda: _raise_mask(path, n, threshold)) and None

    def check(it):
        return _check_item(it, task, classes, num_classes, multi_label, False, mask_threshold, inspect, masks,
                           min_size)

    try:
        report = _collect(items, check, workers, hasher=cache.content_hash)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    finally:
        cache.save()
    if report.problems:
        raise DataError(problems_message(report.problems, f"bad files in {where}",
                                         f" (check them all with: python -m medpmoe.data.validate {where})"))
    return report


def _raise_mask(path: Path, num_classes: int, threshold: float) -> bool:
    problem = mask_problem(path, num_classes, threshold)
    if problem:
        raise DataError(f"{path}: {problem}")
    return True
