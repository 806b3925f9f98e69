"""The trained model as an MLflow model: a pyfunc that holds the prompt checkpoint, records the frozen expert files by
path and sha256 (never copies them) and predicts through `medpmoe.inference.predict`, the bundle's inference path.

Input: a DataFrame with one binary column `image`, each cell the bytes of an image file (PNG, JPEG, TIFF, BMP,
DICOM, NIfTI); `images_frame(paths)` builds it. Over REST (`mlflow models serve`) the bytes are base64 strings.
Output: one row per image. Segmentation: `mask`, the class-index mask at the image's size ((H, W), or (H, W, D) for
a volume), and `probabilities` ((C, H, W[, D])) when `params={"probabilities": True}`. Classification: `prediction`
(the class name; ';'-joined names at probability >= 0.5 for multi-label) and one probability column per class.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from medpmoe.files import file_sha256

try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # mlflow is a pinned dependency; this keeps `import medpmoe.tracking` light in odd setups
    PythonModel = object

#: How a pyfunc's loader finds the checkpoint inside the MLflow model.
CHECKPOINT_ARTIFACT = "checkpoint"
#: The artifact recording each expert file (name, absolute path, sha256) as it was when the model was logged.
EXPERTS_ARTIFACT = "experts"
#: The logged model_config: every setting `mlflow.pyfunc.load_model(uri, model_config=...)` may change (MLflow drops,
#: with a warning, keys the logged model_config lacks). `expert_files`: expert name -> path of a moved file (the
#: others keep their recorded paths); `device`: "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...;
#: `amp`: bf16 autocast on CUDA.
LOAD_SETTINGS = {"expert_files": {}, "device": "auto", "amp": True}


def _recorded_experts(context, config: dict) -> list[dict]:
    """The expert files recorded at logging time: the `experts` artifact (a model logged before it existed kept
    them in model_config `experts`)."""
    path = (getattr(context, "artifacts", None) or {}).get(EXPERTS_ARTIFACT)
    return json.loads(Path(path).read_text()) if path else list(config.get("experts") or [])


def _device(value) -> str:
    """model_config `device` as a torch device string; "auto" (or unset): CUDA when present."""
    import torch

    if value in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"model_config 'device': {value!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model_config 'device' is {value!r}, but no CUDA device is available here")
    return str(device)


def _suffix(data: bytes) -> str:
    """A file suffix medpmoe's readers accept, from an image file's first bytes."""
    if len(data) > 132 and data[128:132] == b"DICM":
        return ".dcm"
    if data[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if len(data) > 348 and data[344:348] in (b"n+1\x00", b"ni1\x00"):
        return ".nii"
    from PIL import Image, UnidentifiedImageError

    try:
        kind = Image.open(io.BytesIO(data)).format
    except UnidentifiedImageError as err:
        raise ValueError("an 'image' cell is not an image file medpmoe reads (PNG, JPEG, TIFF, BMP, GIF, DICOM, "
                         "NIfTI)") from err
    return {"JPEG": ".jpg", "TIFF": ".tif"}.get(kind, f".{kind.lower()}")


def images_frame(paths) -> pd.DataFrame:
    """The pyfunc's input for image files: a DataFrame with their bytes in the `image` column."""
    return pd.DataFrame({"image": [Path(p).read_bytes() for p in paths]})


def _example_png(size: int, colour: bool = True) -> bytes:
    """A synthetic gradient PNG (no patient data) for the model's input example: colour, or grey."""
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.float32)
    r, g = np.meshgrid(ramp, ramp[::-1])
    rgb = np.stack([r, g, np.full_like(r, 128)] if colour else [(r + g) / 2] * 3, axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def input_example(meta: dict) -> pd.DataFrame | None:
    """A one-image input example of the kind the model was trained on (checkpoint metadata `inputs`, when recorded:
    a grey or colour picture); None when it was trained on scans only (a PNG would be refused as another kind)."""
    kinds = meta.get("inputs")
    pictures = [k for k in kinds if k.get("source") in ("picture", None)] if kinds else [{"colour": True}]
    if not pictures:
        return None
    colour = any(k.get("colour") for k in pictures)
    return pd.DataFrame({"image": [_example_png(int(meta["image_size"]), colour)]})


class PromptModel(PythonModel):
    """MLflow pyfunc of a medpmoe prompt checkpoint: `load_context` rebuilds the model with `medpmoe.load_model`
    (expert files from the recorded paths, or `model_config={"expert_files": {name: path}}`), `predict` runs
    `medpmoe.inference.predict` on the images' bytes."""

    def load_context(self, context) -> None:
        """Rebuild the model from the checkpoint artifact and the expert files (`LOAD_SETTINGS` in model_config)."""
        from medpmoe.models.loading import ModelLoadError, load_model

        config = dict(getattr(context, "model_config", None) or {})
        given = config.get("expert_files") or {}
        if not isinstance(given, Mapping):
            raise ModelLoadError(f"model_config 'expert_files' must map expert name to file path, got {given!r}")
        recorded = {e["name"]: e["path"] for e in _recorded_experts(context, config) if e.get("path")}
        self.device = _device(config.get("device"))
        try:
            self.model = load_model(context.artifacts[CHECKPOINT_ARTIFACT], expert_files={**recorded, **given} or None,
                                    device=self.device)
        except ModelLoadError as err:
            how = ("{'expert_files': {'<expert name>': '/path/to/file'}}" if "expert_files" in config else
                   "{'experts': [{'name': '<expert name>', 'path': '/path/to/file'}]}")  # a model logged before
            raise ModelLoadError(f"{err}. With MLflow pass the files as mlflow.pyfunc.load_model(uri, model_config="
                                 f"{how})") from err
        meta = self.model.checkpoint_metadata
        self.task, self.image_size = meta["task"], int(meta["image_size"])
        self.class_names, self.multi_label = list(meta.get("class_names") or []), bool(meta.get("multi_label"))
        self.amp = self.device != "cpu" and bool(config.get("amp", True))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """One row per image of `model_input["image"]` (see the module docstring)."""
        from medpmoe.inference import predict

        params = params or {}
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"image": list(model_input)})
        with tempfile.TemporaryDirectory(prefix="medpmoe_pyfunc_") as tmp:
            paths = []
            for i, data in enumerate(frame["image"]):
                data = bytes(data)
                path = Path(tmp) / f"image_{i:05d}{_suffix(data)}"
                path.write_bytes(data)
                paths.append(str(path))
            preds = predict(self.model, paths, self.task, self.image_size, self.class_names or None,
                            self.multi_label, self.device, self.amp, verbose=False)
        if self.task == "classification":
            names = self.class_names or [str(c) for c in range(preds[0].probabilities.shape[-1])]
            return pd.DataFrame([{"prediction": p.label, **{n: float(v) for n, v in zip(names, p.probabilities)}}
                                 for p in preds])
        rows = []
        for p in preds:
            row = {"mask": p.mask.as_tensor()[0].numpy().astype(np.uint8)}
            if params.get("probabilities"):
                row["probabilities"] = p.probabilities.numpy().astype(np.float32)
            rows.append(row)
        return pd.DataFrame(rows)


def _signature(task: str, class_names: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec(DataType.binary, "image")])
    if task == "classification":
        outputs = Schema([ColSpec(DataType.string, "prediction")] + [ColSpec(DataType.double, n) for n in class_names])
        return ModelSignature(inputs, outputs)
    outputs = Schema([ColSpec(Array(Array(DataType.integer)), "mask"),
                      ColSpec(Array(Array(Array(DataType.float))), "probabilities", required=False)])
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("probabilities", DataType.boolean, False)]))


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("medpmoe", "torch", "torchvision", "monai", "pytorch-ignite", "timm", "mlflow", "pillow", "pydicom",
                 "nibabel", "tifffile", "scikit-learn", "pandas"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            if name == "medpmoe":
                import medpmoe

                out.append(f"medpmoe=={medpmoe.__version__}")
    return out


def expert_files(checkpoint: str | os.PathLike) -> list[dict]:
    """The frozen expert files a prompt checkpoint was trained with: name, absolute path (or None for an expert
    built without a file) and sha256 (the recorded one; checked against the file when it exists)."""
    from medpmoe.training.checkpoint import read_prompt_checkpoint

    config = read_prompt_checkpoint(checkpoint).get("model_config") or {}
    out = []
    for e in config.get("experts", []):
        path = e.get("checkpoint")
        path = str(Path(path).expanduser().resolve()) if path else None
        digest = e.get("checkpoint_sha256") or (file_sha256(path) if path and Path(path).is_file() else None)
        out.append({"name": e["name"], "path": path, "sha256": digest})
    return out


def log_prompt_model(client, run_id: str, checkpoint: str | os.PathLike, name: str = "model", step: int = 0,
                     metrics: dict | None = None) -> str:
    """Log `checkpoint` as an MLflow model (MLflow 3 LoggedModel, output of run `run_id`) with a signature and a
    synthetic input example; `metrics` are attached to the model. Returns the model id (`models:/<id>`)."""
    import time

    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model
    from mlflow.pyfunc import save_model

    from medpmoe.training.checkpoint import read_prompt_checkpoint

    meta = read_prompt_checkpoint(checkpoint)["metadata"]
    task, image_size = meta["task"], int(meta["image_size"])
    class_names = list(meta.get("class_names") or [])
    experts = expert_files(checkpoint)
    info = {"task": task, "image_size": image_size, "class_names": class_names,
            "multi_label": bool(meta.get("multi_label")), "epoch": meta.get("epoch"), "metric": meta.get("metric"),
            "experts": experts}
    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                       model_type="medpmoe-prompt", params=dict(run.data.params),
                                       tags={"medpmoe.checkpoint": Path(checkpoint).name})
    quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no "Downloading artifacts" bar for a local copy
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
        mlflow_model = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                             model_id=model.model_id)
        with tempfile.TemporaryDirectory(prefix="medpmoe_model_") as tmp:
            record = Path(tmp) / "experts.json"
            record.write_text(json.dumps(experts, indent=1))
            save_model(Path(tmp) / "model", python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
                       artifacts={CHECKPOINT_ARTIFACT: str(checkpoint), EXPERTS_ARTIFACT: str(record)},
                       signature=_signature(task, class_names), input_example=input_example(meta),
                       pip_requirements=_requirements(), mlflow_model=mlflow_model, metadata={"medpmoe": info},
                       model_config=dict(LOAD_SETTINGS))
            client.log_model_artifacts(model.model_id, str(Path(tmp) / "model"))
        if metrics:
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, step, model_id=model.model_id)
                                              for k, v in metrics.items()])
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    finally:
        if quiet is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = quiet
    return model.model_id
