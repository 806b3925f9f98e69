"""Read pre-trained checkpoint files safely and load them strictly: any problem names the file, expert and keys."""

from __future__ import annotations

import argparse
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from medpmoe.experts.layouts import LAYOUTS, first_keys, unwrap
from medpmoe.experts.positions import keep_file_table
from medpmoe.files import file_sha256

StateDict = dict[str, torch.Tensor]

#: classes `torch.load(weights_only=True)` may rebuild besides tensors: training scripts (MAE, RETFound) store their
#: hyper-parameters as an `argparse.Namespace` next to the weights; it only holds plain values.
SAFE_GLOBALS = [argparse.Namespace]

#: key endings of the patch-embedding kernel in the layouts we read (timm / SAM, OpenAI CLIP, Hugging Face DINOv2)
PATCH_KERNEL_KEYS = ("patch_embed.proj.weight", "visual.conv1.weight", "patch_embeddings.projection.weight")


class ExpertCheckpointError(ValueError):
    """A pre-trained checkpoint that cannot be loaded into the requested expert (file and keys named)."""


def checkpoint_error(path: Path | str, expert: str, msg: str) -> ExpertCheckpointError:
    """The error for `path` loaded as `expert`, message first naming both."""
    return ExpertCheckpointError(f"checkpoint {str(path)!r} for expert {expert!r}: {msg}")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_checkpoint(path: Path | str, expert: str) -> Mapping:
    """Load a .safetensors file or a torch file with `weights_only=True`; any failure names the file."""
    path = Path(path)
    if not path.is_file():
        raise checkpoint_error(path, expert, "no such file")
    if _is_torchscript(path):
        raise checkpoint_error(
            path, expert, "a TorchScript archive (such as OpenAI's ViT-B-16.pt) cannot be loaded with "
            "weights_only=True: convert it once with torch.save(torch.jit.load(p, map_location='cpu').state_dict(), "
            "'clip_vitb16_state.pt') and point at that file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt zip/pickle, refused globals, bad header: all the same to users
        advice = ""
        if "Unsupported global" in str(e):
            advice = ("; if it is a training checkpoint from a source you trust, keep only its weights once: "
                      "torch.save(torch.load(p, weights_only=False)['model'], 'weights.pth') and point at that file")
        raise checkpoint_error(path, expert, f"unreadable or unsafe file: {type(e).__name__}: "
                                             f"{str(e)[:300]}{advice}") from e
    if not isinstance(obj, Mapping):
        raise checkpoint_error(path, expert, f"expected a dict of tensors, got {type(obj).__name__}")
    return obj


def check_patch_size(obj: Mapping, model: nn.Module, path: Path | str, expert: str) -> None:
    """Refuse a file whose patch-embedding kernel has another size than the expert's (wrong architecture)."""
    want = model.patch_embed.proj.weight.shape[-2:]
    for k, v in unwrap(obj).items():
        if k.endswith(PATCH_KERNEL_KEYS) and v.ndim == 4 and tuple(v.shape[-2:]) != tuple(want):
            raise checkpoint_error(path, expert, f"{k}: patch size {tuple(v.shape[-2:])} but the expert uses "
                                                 f"{tuple(want)}: wrong architecture for this expert name")


def check_state_dict(model: nn.Module, sd: Mapping, path: Path | str, expert: str) -> None:
    """Raise `ExpertCheckpointError` on missing, unexpected or wrongly shaped keys (first few named)."""
    own = model.state_dict()
    missing = set(own) - set(sd)
    unexpected = set(sd) - set(own)
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(sd))
              if sd[k].shape != own[k].shape]
    problems = []
    kernel = "patch_embed.proj.weight"
    if kernel in sd and kernel in own and sd[kernel].shape[0] != own[kernel].shape[0]:
        problems.append(f"the file's width is {sd[kernel].shape[0]}, the expert's {own[kernel].shape[0]} "
                        "(another model size, e.g. a ViT-H or ViT-L file for a ViT-B name)")
    if missing:
        problems.append(f"missing keys: {first_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {first_keys(unexpected)}")
    if shapes:
        more = f"; ... ({len(shapes)} in all)" if len(shapes) > 5 else ""
        problems.append(f"shape mismatches (file vs expert): {'; '.join(shapes[:5])}{more}")
    if problems:
        raise checkpoint_error(path, expert, "; ".join(problems))


def load_pretrained(
    model: nn.Module, path: Path | str, layout: str, expert: str, keep_table_grid: bool = False
) -> str:
    """Load `path` (in `layout`, see `medpmoe.experts.layouts.LAYOUTS`) into `model` strictly; return the file's
    sha256. Never a partial load. `keep_table_grid=True` keeps the file's position table at its own grid (for
    experts that interpolate it at run time) instead of resampling it to the model's."""
    if layout not in LAYOUTS:
        raise ValueError(f"expert {expert!r}: unknown checkpoint layout {layout!r}; known: {sorted(LAYOUTS)}")
    obj = read_checkpoint(path, expert)
    check_patch_size(obj, model, path, expert)
    try:
        sd = LAYOUTS[layout](obj, model)
        if keep_table_grid:
            sd = keep_file_table(sd, unwrap(obj), model)
    except Exception as e:  # noqa: BLE001 - any conversion failure is a bad file for this expert
        reason = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
        raise checkpoint_error(path, expert, f"cannot convert from the {layout!r} layout: {type(e).__name__}: "
                                             f"{reason}") from e
    check_state_dict(model, sd, path, expert)
    model.load_state_dict(sd, strict=True)
    return file_sha256(path)
