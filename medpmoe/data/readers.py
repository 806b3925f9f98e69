"""Image loading through MONAI readers (PIL, tifffile, pydicom, nibabel), chosen by path, with PHI-free metadata.

Pictures (PNG, JPEG, BMP, GIF, TIFF) come out in numpy (row, column) order, as a viewer shows them: palette images
through their palette, bilevel images as 0/255. Their `spatial_shape` is (H, W) and their affine the one ITK (so
3D Slicer / ITK-SNAP) gives a picture: row r, column c at RAS (-c, -r, 0), so a NIfTI mask written with it overlays
the picture in those viewers.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import ImageReader, MetaTensor, NibabelReader, PILReader, PydicomReader
from monai.transforms import LoadImage
from monai.utils import ensure_tuple
from PIL import Image

from medpmoe.data.errors import DataError

logger = logging.getLogger(__name__)

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
TIFF_SUFFIXES = (".tif", ".tiff")
PICTURE_SUFFIXES = PIL_SUFFIXES + TIFF_SUFFIXES
LOSSY_SUFFIXES = (".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr", ".mgz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
IMAGE_SUFFIXES = PICTURE_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES
# DICOM tags (group+element hex) that carry geometry or display settings only; every other tag is dropped.
SAFE_DICOM_TAGS = frozenset({"00200037", "00200032", "00280030", "00180050", "00281050", "00281051", "00280010",
                             "00280011", "00280004", "00080060"})
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_PHI_WORDS = re.compile(r"patient|name|birth|date|time|physician|institution|accession|operator|address|"
                        r"phone|study_?id|uid|descrip|aux_file", re.IGNORECASE)


def reader_kind(path: str | Path) -> str:
    """'dicom', 'nifti', 'tiff' or 'pil' from the path: a folder is a DICOM series; otherwise by file suffix."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir() or name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    if name.endswith(PIL_SUFFIXES):
        return "pil"
    raise DataError(f"{path}: unknown image type (expected a folder of DICOM files or one of {IMAGE_SUFFIXES})")


def picture_affine() -> np.ndarray:
    """RAS affine of a (row, column) picture array as ITK reads pictures (index (x=c, y=r), LPS identity)."""
    return np.array([[0.0, -1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def _grey_if_grey(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3|4) -> (H, W) when R = G = B and alpha (if any) is opaque everywhere."""
    opaque = rgb.shape[-1] == 3 or bool((rgb[..., 3] == rgb[..., 3].max()).all())
    if opaque and np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return rgb[..., 0]
    return rgb[..., :3] if opaque else rgb


def as_viewed(img: Image.Image) -> Image.Image:
    """A PIL image converted to the values a viewer shows: palette ('P'/'PA') through its palette (grey palettes
    to 'L', others to 'RGB'/'RGBA'), bilevel '1' to 0/255 'L', CMYK/YCbCr/LAB/HSV to 'RGB'; others unchanged."""
    if img.mode in ("P", "PA"):
        rgb = np.asarray(img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB"))
        return Image.fromarray(_grey_if_grey(rgb))
    if img.mode == "1":
        return img.convert("L")
    if img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    return img


class PictureReader(PILReader):
    """MONAI's PILReader in (row, column) order with `as_viewed` conversion, (H, W) `spatial_shape` and the
    picture affine (MONAI's own reader reports (W, H) whatever the axis order)."""

    def __init__(self, **kwargs):
        """kwargs go to `PIL.Image.open`."""
        super().__init__(converter=as_viewed, reverse_indexing=False, **kwargs)

    def verify_suffix(self, filename) -> bool:
        """True for the PIL picture suffixes."""
        return all(str(f).lower().endswith(PIL_SUFFIXES) for f in ensure_tuple(filename))

    def _get_spatial_shape(self, img):
        return np.asarray((img.height, img.width))

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """(H, W[, C]) array and its metadata, with the picture affine."""
        data, meta = super().get_data(img)
        meta["affine"] = meta["original_affine"] = picture_affine()
        return data, meta


def _tiff_page(path: str) -> np.ndarray:
    """First page of a TIFF as (H, W) or (H, W, C), as a viewer shows it (palette applied, min-is-white inverted);
    PIL decodes codecs tifffile lacks without `imagecodecs` (LZW, JPEG)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.pages:
            raise ValueError("no image in the TIFF file")
        page = tif.pages[0]
        if len(tif.pages) > 1:
            logger.warning("%s: %d TIFF pages, reading the first", path, len(tif.pages))
        try:
            arr = page.asarray()
        except (KeyError, ValueError) as e:
            if "imagecodecs" not in str(e):
                raise
            with Image.open(path) as im:
                return np.asarray(as_viewed(im))
        axes = page.axes
        if axes.startswith("S") and arr.ndim == 3:  # planar configuration 'separate'
            arr = np.moveaxis(arr, 0, -1)
        photometric = getattr(page.photometric, "name", str(page.photometric))
        if photometric == "PALETTE" and page.colormap is not None:
            cmap = np.asarray(page.colormap)  # (3, 2**bits), 16-bit colour values
            arr = _grey_if_grey((cmap[:, arr].transpose(1, 2, 0) // 257).astype(np.uint8))
        elif photometric == "MINISWHITE":
            arr = (np.iinfo(arr.dtype).max if arr.dtype.kind in "ui" else arr.max()) - arr
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        return arr


class TiffReader(ImageReader):
    """MONAI reader for TIFF pictures through tifffile: grey (H, W) or colour (H, W, C), first page, picture
    affine."""

    def verify_suffix(self, filename) -> bool:
        """True for .tif / .tiff files."""
        return all(str(f).lower().endswith(TIFF_SUFFIXES) for f in ensure_tuple(filename))

    def read(self, data, **kwargs):
        """The first page of each file as a numpy array."""
        arrays = [_tiff_page(str(f)) for f in ensure_tuple(data)]
        return arrays if len(arrays) > 1 else arrays[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """The array (several files stacked on a new first axis) and its metadata."""
        arrays: Sequence[np.ndarray] = img if isinstance(img, list) else [img]
        first = arrays[0]
        meta = {"spatial_shape": np.asarray(first.shape[:2]), "original_channel_dim": -1 if first.ndim == 3 else
                float("nan"), "affine": picture_affine(), "original_affine": picture_affine()}
        if len(arrays) > 1:
            meta["original_channel_dim"] = 0
            return np.stack(arrays), meta
        return first, meta


KIND_NAMES = {"pil": "picture", "tiff": "TIFF", "dicom": "dicom", "nifti": "nifti"}
_LOADERS: dict[str, LoadImage] = {}


def _loader(kind: str) -> LoadImage:
    """One LoadImage per reader kind, built once (building one instantiates monai's readers and logs)."""
    if kind not in _LOADERS:
        if kind == "dicom":  # numpy (row, column) order, metadata pruned to a few tags by monai
            reader = PydicomReader(swap_ij=False, prune_metadata=True)
        elif kind == "nifti":
            reader = NibabelReader()
        elif kind == "tiff":
            reader = TiffReader()
        else:
            reader = PictureReader()
        with warnings.catch_warnings():  # LoadImage also builds MONAI's GPU DICOM reader, which warns without CUDA
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            nvimgcodec = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
            level = nvimgcodec.level
            nvimgcodec.setLevel(logging.ERROR)
            try:
                _LOADERS[kind] = LoadImage(reader=reader, image_only=True, ensure_channel_first=True,
                                           dtype=torch.float32)
            finally:
                nvimgcodec.setLevel(level)
    return _LOADERS[kind]


def strip_phi(meta: dict) -> dict:
    """Drop DICOM tags outside SAFE_DICOM_TAGS and any key naming patient/date/identifier data (in place)."""
    for key in list(meta.keys()):
        k = str(key)
        if k in ("filename_or_obj", "spatial_shape", "original_channel_dim", "spacing", "space", "affine",
                 "original_affine"):
            continue
        if (_TAG.match(k) and k not in SAFE_DICOM_TAGS) or (not _TAG.match(k) and _PHI_WORDS.search(k)):
            del meta[key]
    return meta


def _missing(path: Path) -> str:
    """Why `path` cannot be opened: its name, a symbolic link loop or a dangling link, permissions, absence."""
    import errno
    import os

    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        return "unreadable file name (it holds characters no file system name can hold)"
    if "\x00" in str(path):
        return "unreadable file name (it holds a NUL character)"
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop (the link points, through other links, back to itself)"
        if e.errno == errno.ENAMETOOLONG:
            return "unreadable file name (longer than the file system allows)"
        if e.errno in (errno.EACCES, errno.EPERM):
            return "permission denied (cannot look into its folder)"
        if path.is_symlink():
            return f"broken symbolic link (points to {os.readlink(path)}, which does not exist)"
        return "file not found"
    return ""


def check_readable(path: str | Path) -> Path:
    """The path, after the checks every reader shares: a name the system can open (no symbolic link loop, no dangling
    link, readable), not empty, a known type."""
    path = Path(path)
    problem = _missing(path)
    if problem:
        raise DataError(f"{path}: {problem}")
    reader_kind(path)
    if path.is_dir():
        if not any(f.is_file() for f in path.iterdir()):
            raise DataError(f"{path}: empty DICOM series folder")
        return path
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or type(e).__name__})") from None
    return path


def read_image(path: str | Path) -> MetaTensor:
    """Load one picture, DICOM file, DICOM series folder or NIfTI volume as a channel-first float MetaTensor."""
    path = check_readable(path)
    kind = reader_kind(path)
    try:
        img = _loader(kind)(str(path))
    except Exception as e:  # monai wraps reader errors in RuntimeError / ValueError
        if kind in ("pil", "tiff"):  # monai drops the reader's own error: ask the header check for the problem
            from medpmoe.data.validation import inspect_file

            inspect_file(path)
        cause = e.__cause__ or e
        raise DataError(f"{path}: cannot read {KIND_NAMES[kind]} image ({type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else ''})") from e
    if not isinstance(img, MetaTensor):
        img = MetaTensor(img)
    strip_phi(img.meta)
    img.meta["filename_or_obj"] = str(path)
    img.meta["spatial_shape"] = np.asarray(img.shape[1:])
    return img
