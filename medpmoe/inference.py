"""Inference: one path from images to predictions (`predict`, also `medpmoe.predict`), and `run_inference`, which
writes them (the bundles' `inference` workflow).

`predict(model, inputs)` takes a model from `medpmoe.load_model` (its checkpoint gives the task, image size, class
names and the kind of image it was trained on) and paths (files, DICOM series folders, a folder, a datalist) or
in-memory images, and returns one `Prediction` per input: class probabilities, or a segmentation mask and
probabilities at the input's original (H, W[, D]) with its geometry (MONAI's `Invertd` undoes the resize; the
mask carries the source's affine). An input of another kind than the training images (a CT for a model trained
on colour endoscopy frames) is refused. `save_predictions` writes masks with MONAI's `SaveImage` (PNG for 2-D
inputs, NIfTI with the source affine for all) or class probabilities as CSV; `run_inference` predicts and writes,
and skips unreadable or refused files with a report. 3-D volumes: every slice is predicted (or one chosen slice),
with a message.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, Resized, SaveImage

from medpmoe.data.datalist import load_datalist
from medpmoe.data.errors import DataError, check_on_error, problems_message
from medpmoe.data.kinds import InputKindError, image_kind, kind_mismatch
from medpmoe.data.readers import IMAGE_SUFFIXES, read_image
from medpmoe.data.transforms import SOURCE_DTYPE, ScaleUnitd, ToRGBd
from medpmoe.files import atomic_write, atomic_write_text

SLICES = ("all", "middle")
OVERRIDE = "predict it anyway with check_inputs=False (bundle: --check_inputs False)"


@dataclass
class Prediction:
    """One input's prediction.

    `probabilities`: (C,) for classification; (C, H, W[, D]) at the input's original size for segmentation.
    `mask`: segmentation class indices (1, H, W[, D]) as a MetaTensor with the source's affine and file name.
    `label`: classification, the predicted class name (multi-label: names at probability >= 0.5, ';'-joined).
    `slices`: for a 3-D input, the slice indices predicted (last axis); None for 2-D inputs.
    `error`: why this input has no prediction (only with on_error='skip'); `refused`: it was readable but of another
    kind than the training images.
    """

    source: str
    probabilities: torch.Tensor | None = None
    mask: MetaTensor | None = None
    label: str | list[str] | None = None
    slices: list[int] | None = None
    error: str | None = None
    refused: bool = False


def list_inputs(source: str | os.PathLike) -> list[dict]:
    """Items {"image": path}: every image file in a folder (sorted), a datalist's (.json/.csv) items, or one file."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise DataError(f"{path}: config key 'input': no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        return [{"image": str(p)} for p in files]
    if path.suffix.lower() in (".json", ".csv"):
        return [{"image": it["image"]} for it in load_datalist(path)]
    if path.is_file():
        return [{"image": str(path)}]
    raise DataError(f"{path}: config key 'input': not a folder, datalist or image file")


def preprocessing(task: str, image_size: int, window: Sequence[float] | None = None,
                  intensity: str = "auto") -> Compose:
    """The evaluation transform of the training pipelines on a loaded 2-D plane: RGB, [0, 1], resized to a square
    (invertible by MONAI, so predictions go back to the plane's size)."""
    return Compose([ToRGBd("image"), ScaleUnitd("image", intensity, window),
                    Resized("image", spatial_size=(image_size, image_size), mode="bilinear",
                            anti_aliasing=task != "segmentation")])


def _as_image(x, i: int) -> MetaTensor:
    """A path (read with medpmoe's readers) or an in-memory image: numpy (H, W) / (H, W, C) as PIL gives it, or a
    channel-first torch tensor (C, H, W)."""
    if isinstance(x, (str, os.PathLike)):
        return read_image(x)
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.array(x, dtype=np.float32))  # a copy: arrays from PIL are read-only
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    elif isinstance(x, torch.Tensor):
        t = x.detach().float().cpu()
        t = t[None] if t.ndim == 2 else t
    else:
        raise TypeError(f"input {i}: expected a path, a numpy array or a tensor, got {type(x).__name__}")
    img = MetaTensor(t)
    img.meta["filename_or_obj"] = f"<array {i}>"
    img.meta[SOURCE_DTYPE] = str(x.dtype).removeprefix("torch.")  # 'auto' intensity: uint8 as a picture file
    return img


def _planes(img: MetaTensor, slices: str | int) -> list[int] | None:
    """The slice indices (last axis) to predict for a 3-D (C, H, W, D) image; None for a 2-D image."""
    if img.ndim == 3:
        return None
    depth = img.shape[-1]
    if slices == "all":
        return list(range(depth))
    k = depth // 2 if slices == "middle" else int(slices)
    if not -depth <= k < depth:
        raise DataError(f"{img.meta.get('filename_or_obj')}: slice {k} outside 0..{depth - 1}")
    return [k % depth]


def _sources(inputs) -> list:
    if isinstance(inputs, (str, os.PathLike)):
        return [it["image"] for it in list_inputs(inputs)]
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        return [inputs]
    return [it["image"] if isinstance(it, dict) else it for it in inputs]


def _same(a, b) -> bool:
    return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b


def model_settings(network: torch.nn.Module, task: str | None = None, image_size: int | None = None,
                   class_names: list[str] | None = None, multi_label: bool | None = None) -> dict:
    """task, image_size, class_names, multi_label for `network`: its checkpoint's (`medpmoe.load_model` keeps them in
    `network.checkpoint_metadata`) where the argument is None; an argument that contradicts the checkpoint is a
    ValueError. A model built in code needs task (or `network.task`) and image_size."""
    meta = getattr(network, "checkpoint_metadata", None) or {}
    where = getattr(network, "checkpoint_path", None) or "the checkpoint"
    out = {}
    for key, value in dict(task=task, image_size=image_size, class_names=class_names, multi_label=multi_label).items():
        recorded = meta.get(key)
        if value is not None and recorded is not None and not _same(value, recorded):
            raise ValueError(f"{key}={value!r} contradicts {where}, trained with {key}={recorded!r}: leave {key} out "
                             "to use the checkpoint's")
        out[key] = recorded if value is None else value
    out["task"] = out["task"] or getattr(network, "task", None)
    if out["task"] not in ("segmentation", "classification"):
        raise ValueError(f"task must be 'segmentation' or 'classification', got {out['task']!r}")
    if out["image_size"] is None:
        raise ValueError("image_size: the model has no checkpoint metadata (load it with medpmoe.load_model), so pass "
                         "image_size=<the training image size>")
    out["multi_label"] = bool(out["multi_label"])
    return out


def _model_device(network: torch.nn.Module) -> torch.device:
    p = next(iter(network.parameters()), None) if hasattr(network, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict(network: torch.nn.Module, inputs, task: str | None = None, image_size: int | None = None,
            class_names: list[str] | None = None, multi_label: bool | None = None,
            device: str | torch.device | None = None, amp: bool = False, batch_size: int = 8,
            slices: str | int = "all", window: Sequence[float] | None = None, intensity: str = "auto",
            on_error: str = "raise", verbose: bool = True, check_inputs: bool = True) -> list[Prediction]:
    """Predict every input with a model (eval mode, no gradients): the one inference path of medpmoe.

    network: a model from `medpmoe.load_model` (task, image_size, class_names, multi_label default to its
    checkpoint's; an argument that contradicts the checkpoint is refused) or one built in code (then task and
    image_size are needed). inputs: a folder, a datalist (.json/.csv), an image file or DICOM series folder, or a
    list of paths / items / in-memory images. device: default the model's. 3-D volumes: `slices` 'all' (default),
    'middle' or an index along the last axis; a message names each volume. An input of another kind than the
    checkpoint's training images (`medpmoe.data.kinds`: picture or scan modality, colour or grey, 2-D or volume) is
    an InputKindError (a DataError) naming both, unless `check_inputs=False` (then it is predicted, with a warning
    line). on_error='skip' returns a Prediction with `error` for each unreadable or refused input instead of raising.
    """
    check_on_error(on_error)
    settings = model_settings(network, task, image_size, class_names, multi_label)
    task, image_size = settings["task"], settings["image_size"]
    if not (slices in SLICES or isinstance(slices, int)):
        raise ValueError(f"slices must be one of {SLICES} or a slice index, got {slices!r}")
    trained_kinds = (getattr(network, "checkpoint_metadata", None) or {}).get("inputs")
    pre = preprocessing(task, image_size, window, intensity)
    invert = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True)
    network.eval()
    dev = torch.device(device) if device is not None else _model_device(network)
    out: list[Prediction] = []
    sources = _sources(inputs)
    for start in range(0, len(sources), batch_size):
        loaded, planes = [], []  # planes: (index into loaded, slice or None, preprocessed dict)
        for i, src in enumerate(sources[start: start + batch_size], start):
            name = str(src) if isinstance(src, (str, os.PathLike)) else f"<array {i}>"
            try:
                img = _as_image(src, i)
                _check_kind(img, src, name, trained_kinds, check_inputs, verbose)
                ks = _planes(img, slices)
            except DataError as e:
                if on_error == "raise":
                    raise
                out.append(Prediction(name, error=str(e).removeprefix(f"{name}: "),
                                      refused=isinstance(e, InputKindError)))
                continue
            if ks is not None and verbose:
                which = f"all {len(ks)} slices" if slices == "all" else f"slice {ks[0]} of {img.shape[-1]}"
                print(f"inference: {name}: 3-D volume {tuple(img.shape[1:])}, predicting {which} "
                      "(last axis)", flush=True)
            loaded.append((name, img, ks))
            for k in ks if ks is not None else [None]:
                plane = img if k is None else img[..., k]
                planes.append((len(loaded) - 1, k, pre({"image": plane})))
        logits = []
        for b in range(0, len(planes), batch_size):
            x = torch.stack([p[2]["image"].as_tensor() for p in planes[b: b + batch_size]]).to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                logits += list(network(x).float().cpu())
        per_input: dict[int, list[torch.Tensor]] = {}
        for (j, _, d), z in zip(planes, logits):
            if task == "segmentation":
                z = invert({"image": d["image"], "pred": MetaTensor(z)})["pred"].as_tensor()  # the plane's (H, W)
            per_input.setdefault(j, []).append(torch.sigmoid(z) if settings["multi_label"] else torch.softmax(z, 0))
        for j, (name, img, ks) in enumerate(loaded):
            out.append(_assemble(name, img, ks, per_input[j], task, settings["class_names"], settings["multi_label"]))
    return out


def _check_kind(img: MetaTensor, src, name: str, trained_kinds, check_inputs: bool, verbose: bool) -> None:
    """Refuse (InputKindError), or with check_inputs=False warn about, an input of another kind than the training
    images."""
    if not trained_kinds:
        return
    problem = kind_mismatch(image_kind(img, src if isinstance(src, (str, os.PathLike)) else None), trained_kinds)
    if problem is None:
        return
    if check_inputs:
        raise InputKindError(f"{name}: {problem}; {OVERRIDE}")
    if verbose:
        print(f"inference: warning: {name}: {problem}; predicted anyway (check_inputs=False)", flush=True)


def _assemble(name: str, img: MetaTensor, ks, probs: list[torch.Tensor], task: str, class_names, multi_label):
    names = class_names or [str(c) for c in range(probs[0].shape[0])]
    if task == "classification":
        p = probs[0] if ks is None else torch.stack(probs)  # (C,) or (slices, C)
        pick = (lambda q: ";".join(n for n, v in zip(names, q) if v >= 0.5)) if multi_label else \
            (lambda q: names[int(q.argmax())])
        label = pick(p) if ks is None else [pick(q) for q in p]
        return Prediction(name, probabilities=p, label=label, slices=ks)
    p = probs[0] if ks is None else torch.stack(probs, -1)  # (C, H, W) or (C, H, W, slices)
    affine = img.affine.clone()
    if ks is not None and len(ks) == 1:  # one chosen slice: a one-slice volume where that slice lies
        affine[:, 3] += affine[:, 2] * ks[0]
    mask = MetaTensor(p.argmax(0, keepdim=True).to(torch.uint8), affine=affine)
    mask.meta.update({k: v for k, v in img.meta.items() if k not in ("affine", "original_affine", "spatial_shape")})
    mask.meta["spatial_shape"] = np.asarray(mask.shape[1:])
    mask.meta["original_channel_dim"] = float("nan")  # one class-index map: written without a channel axis
    mask.meta["filename_or_obj"] = name
    return Prediction(name, probabilities=p, mask=mask, slices=ks)


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _save(saver: SaveImage, img: MetaTensor, target: Path, ext: str) -> Path:
    """Write with a MONAI writer (which appends `ext` to the name it is given) atomically to `target` + `ext`."""
    return atomic_write(f"{target}{ext}", lambda tmp: saver(img, filename=tmp[: -len(ext)]), to_path=True)


def output_stems(sources: Sequence[str]) -> list[Path]:
    """Where each input's outputs go, relative to the output folder and without suffix: files keep their folders
    below the inputs' common folder and their stem (`images/a.png` -> `images/a`); in-memory images are `array_<i>`.
    Inputs that would share a stem (`a.jpg` beside `a.png`) keep their extension in it (`a_jpg`, `a_png`), so no
    output replaces another."""
    in_memory = [str(s).startswith("<array ") for s in sources]
    folders = [str(Path(s).parent) for s, mem in zip(sources, in_memory) if not mem]
    root = Path(os.path.commonpath(folders)) if folders else Path()
    stems = [Path("array_" + s[len("<array "):-1]) if mem else Path(s).relative_to(root).with_name(_stem(s))
             for s, mem in zip(sources, in_memory)]
    counts = Counter(stems)
    return [stem.with_name(Path(s).name.replace(".", "_")) if counts[stem] > 1 and not mem else stem
            for stem, s, mem in zip(stems, sources, in_memory)]


def write_masks(pred: Prediction, out_dir: Path, stem: Path, num_classes: int,
                probabilities: bool = False) -> list[Path]:
    """`<stem>_seg.nii.gz` (class indices, the source affine) for every input and `<stem>_seg.png` for 2-D inputs
    (binary: 0/255, else class index); `<stem>_prob.nii.gz` (float32, channel last) when `probabilities`."""
    target = out_dir / stem.parent / f"{stem.name}_seg"
    common = dict(output_postfix="", resample=False, separate_folder=False, print_log=False)
    written = [_save(SaveImage(output_ext=".nii.gz", output_dtype=np.uint8, **common), pred.mask, target, ".nii.gz")]
    if pred.slices is None:
        png = SaveImage(output_ext=".png", output_dtype=np.uint8, scale=255 if num_classes == 2 else None, **common)
        png.set_options(write_kwargs={"reverse_indexing": False})  # the mask is (row, column) already
        written.append(_save(png, pred.mask, target, ".png"))
    if probabilities:
        meta = {k: v for k, v in pred.mask.meta.items() if k != "affine"}  # the affine is given once
        prob = MetaTensor(pred.probabilities, affine=pred.mask.affine, meta=meta)
        saver = SaveImage(output_ext=".nii.gz", output_dtype=np.float32, **common)
        written.append(_save(saver, prob, target.with_name(f"{stem.name}_prob"), ".nii.gz"))
    return written


def _probability_rows(preds: list[Prediction], names: list[str]) -> str:
    volumes = any(p.slices is not None for p in preds)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", *(["slice"] if volumes else []), *names, "prediction"])
    for p in preds:
        rows = [(None, p.probabilities, p.label)] if p.slices is None else zip(p.slices, p.probabilities, p.label)
        for k, prob, label in rows:
            writer.writerow([p.source, *([k if k is not None else ""] if volumes else []),
                             *(f"{float(v):.6f}" for v in prob), label])
    return buf.getvalue()


def save_predictions(preds: Sequence[Prediction], output_dir: str | os.PathLike, class_names: list[str] | None = None,
                     save_probabilities: bool = False) -> list[Path]:
    """Write `predict`'s results (those without `error`) under output_dir: for segmentation `<stem>_seg.nii.gz`
    (class indices; source affine: a DICOM's spacing and position, a NIfTI's affine, the ITK picture affine for
    pictures) and, for 2-D inputs, `<stem>_seg.png` (binary 0/255, else class index), at the input's original
    (H, W[, D]), named by `output_stems` (`<stem>_prob.nii.gz` too with `save_probabilities`); for
    classification `probabilities.csv` (image[, slice], one column per class, prediction). Returns the paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    good = [p for p in preds if p.error is None]
    if not good:
        return []
    if good[0].mask is not None:
        written: list[Path] = []
        for p, stem in zip(good, output_stems([p.source for p in good])):
            written += write_masks(p, out, stem, p.probabilities.shape[0], save_probabilities)
        return written
    names = class_names or [str(c) for c in range(good[0].probabilities.shape[-1])]
    atomic_write_text(out / "probabilities.csv", _probability_rows(good, names))
    return [out / "probabilities.csv"]


def run_inference(network: torch.nn.Module, source: str, output_dir: str, task: str | None = None,
                  image_size: int | None = None, class_names: list[str] | None = None,
                  multi_label: bool | None = None, device: str | torch.device | None = None, amp: bool = False,
                  batch_size: int = 8, slices: str | int = "all", save_probabilities: bool = False,
                  window: Sequence[float] | None = None, intensity: str = "auto",
                  check_inputs: bool = True) -> list[Path]:
    """`predict` every input of `source` (folder, datalist or file) and `save_predictions` under output_dir.

    Settings default to the checkpoint's, as in `predict`; a line describes the model first. Unreadable inputs and
    inputs of another kind than the training images (unless `check_inputs=False`) are skipped and listed in
    `skipped.csv` and on the console; DataError when nothing is predicted."""
    from medpmoe.models.loading import describe_model

    settings = model_settings(network, task, image_size, class_names, multi_label)
    if getattr(network, "checkpoint_metadata", None) is not None:
        print(f"inference: model {describe_model(network)}", flush=True)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = [it["image"] for it in list_inputs(source)]
    preds = predict(network, sources, **settings, device=device, amp=amp, batch_size=batch_size, slices=slices,
                    window=window, intensity=intensity, on_error="skip", check_inputs=check_inputs)
    good, bad = [p for p in preds if p.error is None], [(p.source, p.error) for p in preds if p.error]
    what = "refused or unreadable inputs" if any(p.refused for p in preds) else "unreadable inputs"
    if not good:
        raise DataError(problems_message(bad, f"{what} in {source}, nothing predicted"))
    written = save_predictions(good, out, settings["class_names"], save_probabilities)
    skipped = out / "skipped.csv"
    if bad:
        buf = io.StringIO()
        csv.writer(buf).writerows([("image", "problem"), *bad])
        atomic_write_text(skipped, buf.getvalue())
        written.append(skipped)
        print(f"inference: skipped {len(bad)} {what.removesuffix(' inputs')} input(s), listed in {skipped}:",
              flush=True)
        for file, problem in bad:
            print(f"  {file}: {problem}", flush=True)
    elif skipped.exists():
        skipped.unlink()  # from an earlier run of this folder
    print(f"inference: {len(good)} of {len(preds)} inputs -> {out}", flush=True)
    return written
