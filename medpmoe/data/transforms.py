"""Dictionary transforms (keys "image" and "label") that turn any supported file into a [0, 1] RGB square."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.transforms import (
    CastToTyped,
    Compose,
    MapTransform,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    ScaleIntensityRanged,
    SelectItemsd,
)

from medpmoe.data.errors import DataError, reraise_data_error
from medpmoe.data.masks import mask_to_index
from medpmoe.data.readers import read_image, reader_kind

PLANES = ("middle", "index", "max", "mean")


def _model_keys() -> SelectItemsd:
    """Keep only "image" and "label": other item keys (patient_id, split, ...), present on some items only, would
    break batching, and patient identifiers have no place in batches."""
    return SelectItemsd(["image", "label"], allow_missing_keys=True)
INTENSITY = ("auto", "uint8", "minmax")


def _name(x) -> str:
    return str(x.meta.get("filename_or_obj", "<in-memory image>")) if isinstance(x, MetaTensor) else "<array>"


class LoadMedicalImaged(MapTransform):
    """Read each key's path with read_image (PIL/DICOM file/DICOM folder/NIfTI), metadata stripped of PHI."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        """Replace paths by channel-first float MetaTensors; drop any `<key>_meta_dict`."""
        d = dict(data)
        for key in self.key_iterator(d):
            if not isinstance(d[key], torch.Tensor):
                d[key] = read_image(d[key])
            d.pop(f"{key}_meta_dict", None)
        return d


class ToPlane2Dd(MapTransform):
    """Reduce (C, H, W, D) volumes to (C, H, W): middle slice, slice `index`, or max/mean projection over D."""

    def __init__(self, keys, mode: str = "middle", index: int | None = None, label_keys: Sequence[str] = ()):
        """mode in PLANES; label keys use 'max' instead of 'mean' so masks stay integer."""
        super().__init__(keys, allow_missing_keys=True)
        if mode not in PLANES:
            raise ValueError(f"plane mode must be one of {PLANES}, got {mode!r}")
        if mode == "index" and index is None:
            raise ValueError("plane mode 'index' needs an index")
        self.mode, self.index, self.label_keys = mode, index, set(label_keys)

    def __call__(self, data):
        """Apply the reduction to every 3-D image; 2-D images pass through."""
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            if x.ndim != 4:
                continue
            mode = "max" if (self.mode == "mean" and key in self.label_keys) else self.mode
            if mode in ("middle", "index"):
                i = x.shape[-1] // 2 if mode == "middle" else self.index
                if not -x.shape[-1] <= i < x.shape[-1]:
                    raise DataError(f"{_name(x)}: slice index {i} outside 0..{x.shape[-1] - 1}")
                d[key] = x[..., i]
            else:
                d[key] = x.amax(-1) if mode == "max" else x.mean(-1)
        return d


class CheckImaged(MapTransform):
    """Fail with DataError on NaN/inf or constant images (naming the file)."""

    def __call__(self, data):
        """Check each key; return the data unchanged."""
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            if not torch.isfinite(x).all():
                raise DataError(f"{_name(x)}: image contains NaN or infinite values")
            if x.numel() == 0 or x.max() == x.min():
                raise DataError(f"{_name(x)}: image is constant (value {float(x.flatten()[0]) if x.numel() else 'none'})")
        return d


class ToRGBd(MapTransform):
    """Grey (1 channel) -> 3 channels; RGBA -> RGB; other channel counts keep the first channel, repeated."""

    def __call__(self, data):
        """Make every key's image 3-channel."""
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            c = x.shape[0]
            d[key] = x[:3] if c in (3, 4) else x[:1].repeat(3, *([1] * (x.ndim - 1)))
        return d


#: meta key of in-memory images (`medpmoe.predict` on numpy arrays or tensors): the dtype they came in.
SOURCE_DTYPE = "source_dtype"


def _auto_intensity(x) -> str:
    """'uint8' for 8-bit pictures, read from a file (PNG, JPEG, TIFF, ...) or given in memory as uint8; 'unit' for
    in-memory float images already in [0, 1]; else 'minmax'."""
    dtype = x.meta.get(SOURCE_DTYPE) if isinstance(x, MetaTensor) else None
    in_range = lambda hi: bool(x.min() >= 0 and x.max() <= hi)  # noqa: E731
    if dtype is not None:
        if dtype == "uint8":
            return "uint8"
        return "unit" if dtype.startswith(("float", "bfloat")) and in_range(1) else "minmax"
    name = _name(x)
    pil = not name.startswith("<") and reader_kind(name) in ("pil", "tiff")
    return "uint8" if pil and in_range(255) else "minmax"


class ScaleUnitd(MapTransform):
    """Intensities to [0, 1]: CT window (center, width), or 'uint8' (/255), 'minmax', 'auto' (uint8 for 8-bit
    pictures, from a file or a uint8 array; in-memory float images in [0, 1] as they are; else minmax)."""

    def __init__(self, keys, intensity: str = "auto", window: Sequence[float] | None = None):
        """window=(center, width) overrides intensity."""
        super().__init__(keys)
        if intensity not in INTENSITY:
            raise ValueError(f"intensity must be one of {INTENSITY}, got {intensity!r}")
        if window is not None and (len(window) != 2 or window[1] <= 0):
            raise ValueError(f"window must be (center, width>0), got {window!r}")
        self.intensity, self.window = intensity, window

    def __call__(self, data):
        """Scale each key's image."""
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key].float()
            if self.window is not None:
                lo = self.window[0] - self.window[1] / 2
                x = ((x - lo) / self.window[1]).clamp(0, 1)
            else:
                mode = self.intensity
                if mode == "auto":
                    mode = _auto_intensity(d[key])
                if mode == "unit":
                    x = x.clamp(0, 1)
                elif mode == "uint8":
                    x = (x / 255.0).clamp(0, 1)
                else:
                    lo, hi = x.min(), x.max()
                    x = (x - lo) / (hi - lo).clamp_min(1e-12)
            d[key] = x
        return d


class MaskToIndexd(MapTransform):
    """Masks to one channel of class indices 0..C-1 by `medpmoe.data.masks.mask_to_index` (grey or palette masks,
    binary or class-index values; lossy JPEG masks thresholded at `threshold`)."""

    def __init__(self, keys, num_classes: int = 2, threshold: float = 128, allow_missing_keys: bool = False):
        """num_classes includes background."""
        super().__init__(keys, allow_missing_keys)
        self.num_classes, self.threshold = num_classes, threshold

    def __call__(self, data):
        """Convert each key's mask; DataError naming the file for colour masks or values outside the rules."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = mask_to_index(d[key], self.num_classes, self.threshold, _name(d[key]))
        return d


class CheckSameSized(MapTransform):
    """DataError when a mask's spatial size differs from its image's (naming both files)."""

    def __init__(self, image_key: str = "image", label_key: str = "label"):
        """Compare label_key against image_key."""
        super().__init__([image_key, label_key])
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data):
        """Check and return the data unchanged (an item without a label passes)."""
        if self.label_key not in data:
            return data
        img, mask = data[self.image_key], data[self.label_key]
        if tuple(img.shape[1:]) != tuple(mask.shape[1:]):
            raise DataError(f"{_name(mask)}: mask size {tuple(mask.shape[1:])} differs from image {_name(img)} "
                            f"size {tuple(img.shape[1:])}")
        return data


class ClassLabeld(MapTransform):
    """Class label -> tensor: int -> long scalar (checked < num_classes); list -> float multi-hot vector."""

    def __init__(self, keys="label", num_classes: int | None = None, multi_label: bool = False,
                 allow_missing_keys: bool = False):
        """num_classes, when given, bounds the labels."""
        super().__init__(keys, allow_missing_keys)
        self.num_classes, self.multi_label = num_classes, multi_label

    def __call__(self, data):
        """Convert the label; DataError naming the image when it is outside the class list."""
        d = dict(data)
        src = d.get("image")
        where = _name(src) if isinstance(src, torch.Tensor) else str(src)
        for key in self.key_iterator(d):
            if isinstance(d[key], str):
                raise DataError(f"{where}: label {d[key]!r} is not a class index (class names need the datalist's "
                                f"'classes' list)")
            y = torch.as_tensor(d[key])
            if self.multi_label:
                y = y.float().flatten()
                if self.num_classes is not None and y.numel() != self.num_classes:
                    raise DataError(f"{where}: {y.numel()} labels, expected {self.num_classes}")
            else:
                y = y.long().reshape(())
                if y < 0 or (self.num_classes is not None and y >= self.num_classes):
                    raise DataError(f"{where}: label {int(y)} outside 0..{(self.num_classes or 1) - 1}")
            d[key] = y
        return d


class DataCompose(Compose):
    """monai Compose that surfaces a DataError (file + problem) instead of monai's wrapping RuntimeError."""

    def __call__(self, data, *args, **kwargs):
        """Apply the transforms; a DataError anywhere inside is re-raised as DataError."""
        try:
            return super().__call__(data, *args, **kwargs)
        except Exception as e:
            reraise_data_error(e)


def _augment(keys: list[str], modes: list[str], vertical_flip: bool) -> list:
    t = [RandFlipd(keys, prob=0.5, spatial_axis=1)]
    if vertical_flip:
        t.append(RandFlipd(keys, prob=0.5, spatial_axis=0))
    t += [
        RandAffined(keys, prob=0.3, rotate_range=0.15, scale_range=0.1, mode=modes, padding_mode="border"),
        RandScaleIntensityd("image", factors=0.1, prob=0.3),
        RandShiftIntensityd("image", offsets=0.05, prob=0.3),
        ScaleIntensityRanged("image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),  # clamp to [0, 1]
    ]
    return t


def segmentation_transforms(image_size: int, train: bool, num_classes: int = 2, plane: str = "middle",
                            plane_index: int | None = None, window: Sequence[float] | None = None,
                            intensity: str = "auto", mask_threshold: float = 128) -> DataCompose:
    """Load "image" and its mask under key "label" -> image (3, S, S) float in [0, 1], label (1, S, S) long.

    Without `train` the label is optional (inference items have none)."""
    keys, opt = ["image", "label"], not train
    t = [_model_keys(), LoadMedicalImaged(keys, allow_missing_keys=opt),
         ToPlane2Dd(keys, plane, plane_index, label_keys=["label"]), CheckSameSized("image", "label"),
         CheckImaged("image"), ToRGBd("image"), ScaleUnitd("image", intensity, window),
         MaskToIndexd("label", num_classes, mask_threshold, allow_missing_keys=opt),
         Resized(keys, spatial_size=(image_size, image_size), mode=("bilinear", "nearest"), anti_aliasing=False,
                 allow_missing_keys=opt)]
    if train:
        t += _augment(keys, ["bilinear", "nearest"], vertical_flip=True)
    t.append(CastToTyped(keys, dtype=(torch.float32, torch.long), allow_missing_keys=opt))
    return DataCompose(t)


def classification_transforms(image_size: int, train: bool, num_classes: int | None = None,
                              multi_label: bool = False, plane: str = "middle", plane_index: int | None = None,
                              window: Sequence[float] | None = None, intensity: str = "auto",
                              vertical_flip: bool = False) -> DataCompose:
    """Load "image" -> (3, S, S) float in [0, 1]; "label" int -> long scalar, list -> float multi-hot (optional
    without `train`: inference items have none)."""
    t = [_model_keys(), LoadMedicalImaged("image"), ToPlane2Dd("image", plane, plane_index), CheckImaged("image"),
         ToRGBd("image"),
         ScaleUnitd("image", intensity, window), Resized("image", spatial_size=(image_size, image_size),
                                                         mode="bilinear", anti_aliasing=True),
         ClassLabeld("label", num_classes, multi_label, allow_missing_keys=not train)]
    if train:
        t += _augment(["image"], ["bilinear"], vertical_flip)
    t.append(CastToTyped("image", dtype=torch.float32))
    return DataCompose(t)


def preprocessing(task: str, image_size: int, train: bool = False, num_classes: int | None = None,
                  multi_label: bool = False, plane: str = "middle", plane_index: int | None = None,
                  window: Sequence[float] | None = None, intensity: str = "auto", mask_threshold: float = 128,
                  vertical_flip: bool = False) -> DataCompose:
    """The one preprocessing chain of a task: training (`train=True`, with augmentation), or the chain that
    validation, evaluation and inference share (label optional; volumes reduced to `plane`, default their middle
    slice). `segmentation_transforms` / `classification_transforms` with the task's arguments."""
    if task == "segmentation":
        return segmentation_transforms(image_size, train, num_classes or 2, plane, plane_index, window, intensity,
                                       mask_threshold)
    if task == "classification":
        return classification_transforms(image_size, train, num_classes, multi_label, plane, plane_index, window,
                                         intensity, vertical_flip)
    raise ValueError(f"task must be 'segmentation' or 'classification', got {task!r}")
