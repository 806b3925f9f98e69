"""Inference: one MONAI evaluator over the validation chain, used by `predict` (also `medpmoe.predict`: Predictions
in memory), `run_inference` and the bundles' `inference.json` (predictions written as they are made).

Inputs (paths: files, DICOM series folders, a folder, a datalist; or in-memory images) go through
`InferenceDataset`, which applies the one validation chain (`medpmoe.data.preprocessing(task, image_size)`, label
optional) to each input's plane(s) and sets aside unreadable inputs and inputs of another kind than the training
images; a `SupervisedEvaluator` runs the network (`PlaneInferer`); per plane MONAI's `Invertd` undoes the resize
and softmax/sigmoid follow (`postprocessing`); `PredictionCollector` keeps one `Prediction` per input,
`PredictionWriter` writes each batch at once with MONAI's `SaveImage` (masks at each input's own geometry: PNG for
2-D inputs, NIfTI with the source affine for all) or as probabilities.csv rows, records what it wrote so that a
re-run with the same model predicts only what is missing, and lists skipped inputs in skipped.csv.
3-D volumes: the middle slice by default, as in validation (`slices='all'` or an index: others), with a message.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.inferers import Inferer
from monai.transforms import Activationsd, Compose, Invertd, SaveImage

from medpmoe.data.datalist import load_datalist
from medpmoe.data.errors import LISTED, DataError, check_on_error, problems_message
from medpmoe.data.kinds import InputKindError, image_kind, kind_mismatch
from medpmoe.data.readers import IMAGE_SUFFIXES, read_image
from medpmoe.data.transforms import SOURCE_DTYPE
from medpmoe.files import atomic_write, atomic_write_text, file_sha256

SLICES = ("middle", "all")
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


class InferenceDataset(Dataset):
    """Inference items ({"image": path or in-memory image}) through the validation chain `transform`: one item per
    input holding its preprocessed plane(s) (a 3-D volume: the `slices` chosen, each through the chain), or why it is
    skipped (unreadable, or of another kind than `trained_kinds` unless not `check_inputs`). The evaluator's
    `PredictionCollector` sets `trained_kinds` (the model's) and `skip` (inputs already written) when the run
    starts; a skipped input is passed over unread."""

    def __init__(self, data: Sequence, transform, slices: str | int = "middle", check_inputs: bool = True,
                 verbose: bool = True) -> None:
        """slices: 'middle' (the default of the validation chain's `ToPlane2Dd`), 'all', or a slice index."""
        if not (slices in SLICES or (isinstance(slices, int) and not isinstance(slices, bool))):
            raise ValueError(f"slices must be one of {SLICES} or a slice index, got {slices!r}")
        super().__init__(list(data), transform)
        self.slices, self.check_inputs, self.verbose = slices, check_inputs, verbose
        self.trained_kinds: list | None = None
        self.skip: set[str] = set()

    def _transform(self, index: int) -> dict:
        item = self.data[index]
        src = item["image"] if isinstance(item, dict) else item
        name = str(src) if isinstance(src, (str, os.PathLike)) else f"<array {index}>"
        if name in self.skip:
            return {"source": name, "done": True}
        try:
            img = _as_image(src, index)
            _check_kind(img, src, name, self.trained_kinds, self.check_inputs, self.verbose)
            ks = _planes(img, self.slices)
            if ks is not None and self.verbose:
                which = f"all {len(ks)} slices" if self.slices == "all" else f"slice {ks[0]} of {img.shape[-1]}"
                print(f"inference: {name}: 3-D volume {tuple(img.shape[1:])}, predicting {which} (last axis)",
                      flush=True)
            planes = [self.transform({"image": img if k is None else img[..., k]})["image"]
                      for k in (ks if ks is not None else [None])]
        except DataError as e:
            return {"source": name, "error": str(e).removeprefix(f"{name}: "), "refused": isinstance(e, InputKindError),
                    "exception": e}
        meta = {k: v for k, v in img.meta.items() if k not in ("affine", "original_affine", "spatial_shape")}
        return {"source": name, "planes": planes, "slices": ks, "affine": img.affine.clone(), "meta": meta}


def collate(items: list[dict]) -> dict:
    """A batch of `InferenceDataset` items: every plane of every item stacked under "image" (None when all the
    batch's inputs were skipped) and the items themselves under "items"."""
    planes = [p.as_tensor() if isinstance(p, MetaTensor) else p for it in items for p in it.get("planes", ())]
    return {"image": torch.stack(planes) if planes else None, "items": items}


def iteration(engine, batch: dict):
    """The `iteration_update` of the inference evaluator: SupervisedEvaluator's own iteration, except for a batch
    whose inputs were all skipped (nothing to run the network on)."""
    if batch["image"] is None:
        return {"image": None, "label": None, "pred": None}
    return engine._iteration(engine, batch)


class PlaneInferer(Inferer):
    """Runs the network on a batch of planes in chunks of `batch_size` (a volume's slices may be many), in bfloat16
    autocast on the batch's device when `amp` (also on CPU), returning float32 outputs."""

    def __init__(self, amp: bool = False, batch_size: int | None = None) -> None:
        """batch_size: planes per forward pass (None: the whole batch)."""
        super().__init__()
        self.amp, self.batch_size = bool(amp), batch_size

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        """The network's float32 output for `inputs`."""
        chunks = inputs.split(self.batch_size) if self.batch_size else [inputs]
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return torch.cat([network(c, *args, **kwargs).float() for c in chunks])


def postprocessing(task: str, transform, multi_label: bool = False) -> Compose:
    """What each plane's output goes through (what the bundle's `postprocessing` spells out): for segmentation
    MONAI's `Invertd` (back to the plane's own size through the chain `transform`), then softmax (sigmoid when
    multi-label)."""
    t = [Invertd("pred", transform=transform, orig_keys="image", nearest_interp=False, to_tensor=True)] \
        if task == "segmentation" else []
    t.append(Activationsd("pred", softmax=not multi_label, sigmoid=multi_label))
    return Compose(t)


class PredictionCollector:
    """An evaluator handler that turns each batch's output into one `Prediction` per input (`postprocessing` per
    plane, then the input's mask and probabilities at its own geometry) and keeps them (`medpmoe.predict`).
    With on_error='raise' the first skipped input stops the run; `error` holds it."""

    def __init__(self, postprocessing, task: str, class_names: list[str] | None = None, multi_label: bool = False,
                 on_error: str = "skip") -> None:
        """class_names: names of the classes (default '0', '1', ...)."""
        check_on_error(on_error)
        self.postprocessing, self.task, self.class_names = postprocessing, task, class_names
        self.multi_label, self.on_error = bool(multi_label), on_error
        self.predictions: list[Prediction] = []
        self.error: Exception | None = None

    def attach(self, engine) -> None:
        """Run `started` when `engine` starts and `self` after each of its iterations."""
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def started(self, engine) -> None:
        """Tell the engine's `InferenceDataset` the kinds of image its network was trained on."""
        dataset = getattr(engine.data_loader, "dataset", None)
        if isinstance(dataset, InferenceDataset):
            dataset.trained_kinds = trained_kinds(engine.network)

    def __call__(self, engine) -> None:
        """Turn the batch just predicted into Predictions and `take` each."""
        output = engine.state.output["pred"]
        logits, offset = (output.detach().cpu() if output is not None else None), 0
        for item in engine.state.batch["items"]:
            if item.get("done"):
                continue
            if "error" in item:
                if self.on_error == "raise":
                    self.error = item["exception"]
                    engine.terminate()
                    return
                self.take(Prediction(item["source"], error=item["error"], refused=item["refused"]))
                continue
            n = len(item["planes"])
            probs = [self.postprocessing({"image": plane, "pred": MetaTensor(z)})["pred"].as_tensor()
                     for plane, z in zip(item["planes"], logits[offset: offset + n])]
            offset += n
            self.take(_assemble(item, probs, self.task, self.class_names, self.multi_label))
        self.flush()

    def take(self, prediction: Prediction) -> None:
        """Keep one input's prediction."""
        self.predictions.append(prediction)

    def flush(self) -> None:
        """End of a batch (nothing to do when predictions are kept in memory)."""


def trained_kinds(network: torch.nn.Module) -> list | None:
    """The kinds of image the checkpoint of `network` was trained on (None: unknown, nothing is refused)."""
    return (getattr(network, "checkpoint_metadata", None) or {}).get("inputs")


def inference_evaluator(network: torch.nn.Module, items: Sequence, transform, handler, slices: str | int = "middle",
                        check_inputs: bool = True, device: str | torch.device | None = None, amp: bool = False,
                        batch_size: int = 8, num_workers: int = 0, progress: bool = False,
                        verbose: bool = True) -> SupervisedEvaluator:
    """The inference workflow as a MONAI `SupervisedEvaluator` (what the bundle's `inference.json` spells out):
    `InferenceDataset` over the validation chain `transform`, `PlaneInferer`, and `handler` (a PredictionCollector
    or PredictionWriter), with a progress bar when `progress`."""
    from ignite.handlers import ProgressBar

    dataset = InferenceDataset(items, transform, slices, check_inputs, verbose)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    handlers = [handler] + ([ProgressBar(persist=True, desc="inference")] if progress else [])
    dev = torch.device(device) if device is not None else _model_device(network)
    return SupervisedEvaluator(device=dev, val_data_loader=loader, epoch_length=max(len(loader), 1), network=network,
                               inferer=PlaneInferer(amp, batch_size), val_handlers=handlers, decollate=False,
                               iteration_update=iteration)


def predict(network: torch.nn.Module, inputs, task: str | None = None, image_size: int | None = None,
            class_names: list[str] | None = None, multi_label: bool | None = None,
            device: str | torch.device | None = None, amp: bool = False, batch_size: int = 8,
            slices: str | int = "middle", window: Sequence[float] | None = None, intensity: str = "auto",
            on_error: str = "raise", verbose: bool = True, check_inputs: bool = True) -> list[Prediction]:
    """Predict every input with a model (eval mode, no gradients) and return one `Prediction` per input, in memory.

    The same evaluator, chain and postprocessing as `run_inference` and the bundles' inference. network: a model
    from `medpmoe.load_model` (task, image_size, class_names, multi_label default to its checkpoint's; an argument
    that contradicts the checkpoint is refused) or one built in code (then task and image_size are needed). inputs:
    a folder, a datalist (.json/.csv), an image file or DICOM series folder, or a list of paths / items / in-memory
    images. device: default the model's. 3-D volumes: `slices` 'middle' (default, as validation), 'all' or an index
    along the last axis; a message names each volume. An input of another kind than the checkpoint's training
    images (`medpmoe.data.kinds`) is an InputKindError (a DataError) naming both, unless `check_inputs=False` (then
    it is predicted, with a warning line). on_error='skip' returns a Prediction with `error` for each unreadable or
    refused input instead of raising.
    """
    from medpmoe.data.transforms import preprocessing

    check_on_error(on_error)
    settings = model_settings(network, task, image_size, class_names, multi_label)
    task, names, multi = settings["task"], settings["class_names"], settings["multi_label"]
    transform = preprocessing(task, settings["image_size"], False, len(names) if names else None, multi,
                              window=window, intensity=intensity)
    collector = PredictionCollector(postprocessing(task, transform, multi), task, names, multi, on_error)
    items = [{"image": s} for s in _sources(inputs)]
    InferenceDataset([], transform, slices)  # checks `slices` before anything runs
    if items:
        inference_evaluator(network, items, transform, collector, slices, check_inputs, device, amp, batch_size,
                            verbose=verbose).run()
    if collector.error is not None:
        raise collector.error
    return collector.predictions


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


def _assemble(item: dict, probs: list[torch.Tensor], task: str, class_names, multi_label: bool) -> Prediction:
    """One input's Prediction from its planes' probabilities (each at the plane's own size)."""
    name, ks = item["source"], item["slices"]
    names = class_names or [str(c) for c in range(probs[0].shape[0])]
    if task == "classification":
        p = probs[0] if ks is None else torch.stack(probs)  # (C,) or (slices, C)
        pick = (lambda q: ";".join(n for n, v in zip(names, q) if v >= 0.5)) if multi_label else \
            (lambda q: names[int(q.argmax())])
        label = pick(p) if ks is None else [pick(q) for q in p]
        return Prediction(name, probabilities=p, label=label, slices=ks)
    p = probs[0] if ks is None else torch.stack(probs, -1)  # (C, H, W) or (C, H, W, slices)
    affine = item["affine"].clone()
    if ks is not None and len(ks) == 1:  # one chosen slice: a one-slice volume where that slice lies
        affine[:, 3] += affine[:, 2] * ks[0]
    mask = MetaTensor(p.argmax(0, keepdim=True).to(torch.uint8), affine=affine)
    mask.meta.update(item["meta"])
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


def _probability_rows(preds: Sequence[Prediction], volumes: bool) -> list[list]:
    """probabilities.csv rows of `preds`: image[, slice], one probability per class, prediction."""
    rows = []
    for p in preds:
        planes = [(None, p.probabilities, p.label)] if p.slices is None else zip(p.slices, p.probabilities, p.label)
        for k, prob, label in planes:
            rows.append([p.source, *([k if k is not None else ""] if volumes else []),
                         *(f"{float(v):.6f}" for v in prob), label])
    return rows


def _csv_text(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
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
    volumes = any(p.slices is not None for p in good)
    header = ["image", *(["slice"] if volumes else []), *names, "prediction"]
    _write_text(out / "probabilities.csv", _csv_text([header, *_probability_rows(good, volumes)]))
    return [out / "probabilities.csv"]


class InputsSkipped(DataError):
    """Inference wrote what it could, but skipped some inputs (listed in skipped.csv)."""


def model_identity(network: torch.nn.Module) -> dict:
    """What identifies a model's predictions: its checkpoint's file name and sha256 (`medpmoe.load_model`), else the
    sha256 of its state dict."""
    path = getattr(network, "checkpoint_path", None)
    if path and Path(path).is_file():
        return {"checkpoint": Path(path).name, "sha256": file_sha256(path)}
    h = hashlib.sha256()
    for key, t in sorted(network.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return {"state_dict_sha256": h.hexdigest()}


class CheckpointModel(torch.nn.Module):
    """The model of a prompt checkpoint (`medpmoe.load_model`, through `medpmoe.bundle.model_from_checkpoint`),
    loaded when first used, as MONAI bundles load weights when the run starts: the inference objects can be built
    (MONAI's `check_properties`) before training has written the checkpoint."""

    def __init__(self, checkpoint: str | os.PathLike, expert_files: dict | None = None,
                 device: str | torch.device = "cpu", amp: bool = False, fast_path: bool = True) -> None:
        """checkpoint, expert_files, amp, fast_path: the bundle's config keys of those names."""
        super().__init__()
        self.checkpoint, self.expert_files, self.target_device = checkpoint, expert_files, device
        self.amp, self.fast_path = amp, fast_path
        self.loaded = None

    def load(self) -> torch.nn.Module:
        """The model (loaded on the first call; a missing checkpoint is a ConfigError naming the key)."""
        if self.loaded is None:
            from medpmoe.bundle.workflow import model_from_checkpoint

            from medpmoe.models import use_fast_path

            model = model_from_checkpoint(self.checkpoint, self.expert_files, self.target_device)
            self.loaded = use_fast_path(model, self.amp, self.fast_path)
            self.loaded.train(self.training)
        return self.loaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The loaded model's output."""
        return self.load()(x)

    @property
    def checkpoint_metadata(self) -> dict:
        """The checkpoint's metadata (task, image size, classes, kinds of training image, ...)."""
        return self.load().checkpoint_metadata

    @property
    def checkpoint_path(self) -> str:
        """The checkpoint's path."""
        return self.load().checkpoint_path


def checkpoint_settings(checkpoint: str | os.PathLike, **recipe) -> dict:
    """task, image_size, class_names, multi_label of the model in `checkpoint` (its metadata), for the keys it does
    not record (or while it does not exist yet) the `recipe`'s: what the bundle's inference chain is built with."""
    path = Path(checkpoint).expanduser()
    meta = torch.load(path, map_location="cpu", weights_only=True).get("metadata", {}) if path.is_file() else {}
    out = {k: meta.get(k) if meta.get(k) is not None else v for k, v in recipe.items()}
    out["multi_label"] = bool(out.get("multi_label"))
    return out


def start(network: torch.nn.Module) -> torch.nn.Module:
    """The bundle's first inference step: load the model (`CheckpointModel`) and print the line describing it."""
    from medpmoe.models.loading import describe_model

    model = network.load() if isinstance(network, CheckpointModel) else network
    if getattr(model, "checkpoint_metadata", None) is not None:
        print(f"inference: model {describe_model(model)}", flush=True)
    return network


class PredictionWriter(PredictionCollector):
    """An evaluator handler that writes each input's prediction as soon as its batch is predicted (nothing is kept):
    masks by `write_masks` (MONAI's SaveImage) at the input's own geometry, or rows appended to probabilities.csv;
    skipped inputs to skipped.csv. `inference_model.json` records the model (checkpoint sha256) and settings and
    `written.csv` each input written, after its files: a re-run for the same model and settings predicts only the
    inputs not written yet, a re-run for another model or settings starts over."""

    RECORD, WRITTEN, SKIPPED, CSV = "inference_model.json", "written.csv", "skipped.csv", "probabilities.csv"

    def __init__(self, output_dir: str | os.PathLike, postprocessing, task: str, class_names: list[str] | None = None,
                 multi_label: bool = False, image_size: int | None = None, slices: str | int = "middle",
                 save_probabilities: bool = False, settings: dict | None = None,
                 source: str | os.PathLike | None = None) -> None:
        """settings: further settings the predictions depend on (window, intensity), recorded with the model;
        source: where the inputs come from (named in messages)."""
        super().__init__(postprocessing, task, class_names, multi_label)
        self.out, self.source = Path(output_dir), source
        self.save_probabilities = bool(save_probabilities)
        self.settings = dict(task=task, image_size=image_size, class_names=class_names, multi_label=bool(multi_label),
                             slices=slices, save_probabilities=self.save_probabilities, **(settings or {}))
        self.done: set[str] = set()
        self.stems: dict[str, Path] = {}
        self.skipped: list[tuple[str, str]] = []
        self.written: list[Path] = []
        self.batch: list[Prediction] = []
        self.total = self.count = self.before = 0
        self.refused = False
        self.volumes: bool | None = None  # whether probabilities.csv has a slice column (known at its first row)

    def started(self, engine) -> None:
        """Compare the model and settings with the output folder's record: the same, the inputs written already
        are passed over (`InferenceDataset.skip`); else the record is replaced and every input predicted. Names
        every input's outputs (`output_stems`) and prepares probabilities.csv."""
        super().started(engine)
        self.out.mkdir(parents=True, exist_ok=True)
        record = json.loads(json.dumps({"model": model_identity(engine.network), "settings": self.settings},
                                       default=str))
        done, previous = self.out / self.WRITTEN, self.out / self.RECORD
        same = previous.is_file() and json.loads(previous.read_text()) == record
        self.done = set(done.read_text(**TEXT).splitlines()[1:]) if same and done.is_file() else set()
        if previous.is_file() and not same and done.is_file():
            print(f"inference: {self.out} holds predictions of another model or settings: predicting every input "
                  "again", flush=True)
        if not self.done:
            _write_text(done, "image\n")
            atomic_write_text(previous, json.dumps(record, indent=2) + "\n")
        (self.out / self.SKIPPED).unlink(missing_ok=True)  # an earlier run's: those inputs are tried again
        dataset = engine.data_loader.dataset
        sources = [str(it["image"]) if isinstance(it, dict) else str(it) for it in dataset.data]
        self.stems = dict(zip(sources, output_stems(sources)))
        self.total = len(sources)
        dataset.skip = self.done & set(sources)
        self.before = len(dataset.skip)
        if self.before:
            print(f"inference: {self.before} of {self.total} inputs already written for this model "
                  f"({self.RECORD}); predicting the other {self.total - self.before}", flush=True)
        if self.task == "classification":
            self._keep_written_rows()

    def _keep_written_rows(self) -> None:
        """probabilities.csv keeps only the rows of inputs recorded as written (a killed run may have written more)."""
        path = self.out / self.CSV
        if not self.done or not path.is_file():
            path.unlink(missing_ok=True)
            return
        with open(path, newline="", **TEXT) as f:
            rows = list(csv.reader(f))
        if rows:
            self.volumes = len(rows[0]) > 1 and rows[0][1] == "slice"
            _write_text(path, _csv_text([rows[0], *(r for r in rows[1:] if r and r[0] in self.done)]))

    def take(self, prediction: Prediction) -> None:
        """Queue one input's prediction (written by `flush`) or record it as skipped."""
        if prediction.error is None:
            self.batch.append(prediction)
            return
        path = self.out / self.SKIPPED
        rows = [("image", "problem")] if not path.exists() else []
        with open(path, "a", newline="", **TEXT) as f:
            csv.writer(f).writerows([*rows, (prediction.source, prediction.error)])
        self.skipped.append((prediction.source, prediction.error))
        self.refused = self.refused or prediction.refused

    def flush(self) -> None:
        """Write the batch's predictions, then record them in written.csv (synced), so a kill loses at most them."""
        if not self.batch:
            return
        if self.task == "segmentation":
            for p in self.batch:
                self.written += write_masks(p, self.out, self.stems.get(p.source, Path(_stem(p.source))),
                                            p.probabilities.shape[0], self.save_probabilities)
        else:
            self._append_rows(self.batch)
        _append_synced(self.out / self.WRITTEN, "".join(f"{p.source}\n" for p in self.batch))
        self.count += len(self.batch)
        self.batch = []

    def _append_rows(self, preds: list[Prediction]) -> None:
        path = self.out / self.CSV
        volumes = any(p.slices is not None for p in preds)
        if self.volumes is None or not path.exists():
            self.volumes = volumes
            names = self.class_names or [str(c) for c in range(preds[0].probabilities.shape[-1])]
            _write_text(path, _csv_text([["image", *(["slice"] if volumes else []), *names, "prediction"]]))
        elif volumes and not self.volumes:  # a volume after 2-D inputs: give the earlier rows an empty slice column
            with open(path, newline="", **TEXT) as f:
                rows = list(csv.reader(f))
            _write_text(path, _csv_text([[r[0], "slice" if i == 0 else "", *r[1:]] for i, r in enumerate(rows)]))
            self.volumes = True
        _append_synced(path, _csv_text(_probability_rows(preds, self.volumes)))
        if path not in self.written:
            self.written.append(path)

    def finish(self, strict: bool = False) -> list[Path]:
        """After the run: print the summary and return the paths written (this run). DataError when nothing could
        be predicted; with `strict` (the bundle) `InputsSkipped` when any input was skipped, so the command's exit
        code says so."""
        self.flush()
        before = self.before
        what = "refused or unreadable inputs" if self.refused else "unreadable inputs"
        skipped = self.out / self.SKIPPED
        if self.skipped and not self.count and not before:
            where = self.source or "the input"
            raise DataError(problems_message(self.skipped, f"{what} in {where}, nothing predicted"))
        if self.skipped:
            print(f"inference: skipped {len(self.skipped)} {what.removesuffix(' inputs')} input(s), listed in "
                  f"{skipped}:", flush=True)
            for file, problem in self.skipped[:LISTED]:
                print(f"  {file}: {problem}", flush=True)
            if len(self.skipped) > LISTED:
                print(f"  ... and {len(self.skipped) - LISTED} more", flush=True)
            self.written.append(skipped)
        earlier = f" ({before} written by an earlier run)" if before else ""
        print(f"inference: {self.count + before} of {self.total} inputs -> {self.out}{earlier}", flush=True)
        if strict and self.skipped:
            raise InputsSkipped(f"{skipped}: {len(self.skipped)} of {self.total} inputs skipped ({what}, listed "
                                f"there); the other {self.count + before} are written")
        return self.written


#: file names that are not valid UTF-8 (`caf\xe9.jpg` from older exports) are kept as their bytes in the CSV files
TEXT = {"encoding": "utf-8", "errors": "surrogateescape"}


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode(**TEXT)))


def _append_synced(path: Path, text: str) -> None:
    with open(path, "a", newline="", **TEXT) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def run_inference(network: torch.nn.Module, source: str, output_dir: str, task: str | None = None,
                  image_size: int | None = None, class_names: list[str] | None = None,
                  multi_label: bool | None = None, device: str | torch.device | None = None, amp: bool = False,
                  batch_size: int = 8, slices: str | int = "middle", save_probabilities: bool = False,
                  window: Sequence[float] | None = None, intensity: str = "auto", check_inputs: bool = True,
                  num_workers: int = 0, progress: bool = True) -> list[Path]:
    """Predict every input of `source` (folder, datalist or file) and write each batch's predictions under
    output_dir as they are made (`PredictionWriter`): what the bundles' inference runs, in Python.

    Settings default to the checkpoint's, as in `predict`; a line describes the model first. Inputs already written
    for this model by an earlier (e.g. killed) run are not predicted again. Unreadable inputs and inputs of another
    kind than the training images (unless `check_inputs=False`) are skipped and listed in `skipped.csv` and on the
    console; DataError when nothing could be predicted. Returns the paths written by this run."""
    from medpmoe.data.transforms import preprocessing
    from medpmoe.models.loading import describe_model

    settings = model_settings(network, task, image_size, class_names, multi_label)
    task, names, multi = settings["task"], settings["class_names"], settings["multi_label"]
    if getattr(network, "checkpoint_metadata", None) is not None:
        print(f"inference: model {describe_model(network)}", flush=True)
    items = list_inputs(source)
    transform = preprocessing(task, settings["image_size"], False, len(names) if names else None, multi,
                              window=window, intensity=intensity)
    writer = PredictionWriter(output_dir, postprocessing(task, transform, multi), task, names, multi,
                              settings["image_size"], slices, save_probabilities,
                              settings=dict(window=window, intensity=intensity), source=source)
    inference_evaluator(network, items, transform, writer, slices, check_inputs, device, amp, batch_size,
                        num_workers, progress).run()
    return writer.finish()
