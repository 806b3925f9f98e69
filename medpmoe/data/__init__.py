"""Data: MONAI-based loaders and transforms, datalists, converters, the Med-VTAB task registry, validation.

Names are imported on first access, so light users (fold splitting, datalists) do not pay monai's import time.
"""

import importlib

_NAMES = {
    "DataCacheDataset": "dataset", "make_dataset": "dataset",
    "BatchAugment": "batch_augment",
    "BatchFeeder": "feeding", "Compactd": "feeding", "auto_workers": "feeding", "cached_dataset": "feeding",
    "train_loader": "feeding",
    "atomic_write_text": "datalist", "load_datalist": "datalist", "read_datalist_file": "datalist",
    "write_datalist": "datalist",
    "DataError": "errors", "DataReport": "errors",
    "find_duplicates": "hashing",
    "InputKindError": "kinds", "sample_kinds": "kinds",
    "mask_to_index": "masks", "read_mask": "masks",
    "read_image": "readers", "strip_phi": "readers",
    "TASKS": "tasks", "Task": "tasks", "get_task": "tasks",
    "classification_transforms": "transforms", "preprocessing": "transforms", "segmentation_transforms": "transforms",
    "check_items": "validation", "inspect_file": "validation", "quick_check": "validation",
    "validate_datalist": "validation",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    """Import the defining submodule on first access of a public name."""
    if name in _NAMES:
        return getattr(importlib.import_module(f"medpmoe.data.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'medpmoe.data' has no attribute {name!r}")
