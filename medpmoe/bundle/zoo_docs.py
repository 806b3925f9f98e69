"""What an exported model-zoo bundle says about itself: `configs/metadata.json` and `docs/README.md`."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
PACKAGES = ("timm", "pytorch-ignite", "mlflow", "tqdm", "medpmoe")
LICENSE = ("Apache-2.0 for the code (LICENSE); the weights are also bound by the terms of the training data and of "
           "each expert's weights")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def best_metrics(results: Mapping) -> dict[str, float]:
    """The shared checkpoint's validation metrics from `results.json`: its `best` record when there is one, else
    every metric of the last epoch when that epoch was the best, else the best key metric alone."""
    if isinstance(results.get("best"), Mapping):
        return {k: float(v) for k, v in results["best"].items() if isinstance(v, (int, float))
                and not isinstance(v, bool) and k.startswith("val_")}
    best = {k.removeprefix("best_"): float(v) for k, v in results.items() if k.startswith("best_val_")}
    if results.get("best_epoch") is not None and results.get("best_epoch") == results.get("epochs"):
        best.update({k: float(v) for k, v in results.items() if k.startswith("val_") and isinstance(v, (int, float))})
    return best


def _data_format(base: Mapping, task: str, size: int, classes: list[str]) -> dict:
    """`network_data_format` with the trained shapes: (3, S, S) in; (C, S, S) masks or (C,) class scores out."""
    fmt = json.loads(json.dumps(base.get("network_data_format") or {}))
    image = fmt.setdefault("inputs", {}).setdefault("image", {
        "type": "image", "format": "magnitude", "modality": "any", "num_channels": 3, "dtype": "float32",
        "value_range": [0, 1], "is_patch_data": False, "channel_def": {"0": "R", "1": "G", "2": "B"}})
    image["spatial_shape"] = [size, size]
    outputs = fmt.setdefault("outputs", {})
    key = next(iter(outputs), "pred")
    pred = outputs.setdefault(key, {"type": "image" if task == "segmentation" else "probabilities",
                                    "format": "segmentation" if task == "segmentation" else "classes",
                                    "dtype": "float32", "value_range": [], "is_patch_data": False})
    pred.update(num_channels=len(classes), spatial_shape=[size, size] if task == "segmentation" else [1],
                channel_def={str(i): c for i, c in enumerate(classes)})
    return fmt


def zoo_metadata(base: Mapping, payload: Mapping, results: Mapping, experts: list[dict], checkpoint_sha256: str,
                 settings: Mapping) -> dict:
    """MONAI metadata for the exported bundle: the bundle's own metadata.json with installed versions, the trained
    input/output shapes and classes, the best checkpoint's metrics, and a `medpmoe` record of the checkpoint file
    and of each expert (weights file name and sha256, or architecture and seed for a random-initialised one)."""
    meta = payload.get("metadata", {})
    task, size = meta.get("task") or settings.get("task"), settings["image_size"]
    classes = list(settings["class_names"])
    out = {"schema": SCHEMA_URL, "version": "0.1.0", "changelog": {"0.1.0": "trained pMoE prompts"},
           "name": "medpmoe model", "task": task, "description": "Frozen ViT experts adapted with prompts (medpmoe)",
           "authors": "medpmoe developers", "copyright": "Copyright (c) medpmoe developers", **base}
    out.update(schema=out.get("schema") or SCHEMA_URL, monai_version=_version("monai"),
               pytorch_version=_version("torch"), numpy_version=_version("numpy"),
               required_packages_version={p: _version(p) for p in dict.fromkeys(
                   [*base.get("required_packages_version", {}), *PACKAGES])},
               license=LICENSE, network_data_format=_data_format(base, task, size, classes))
    out.pop("optional_packages_version", None)
    if task == "segmentation":
        out.update(label_classes=", ".join(f"{i} {c}" for i, c in enumerate(classes)),
                   pred_classes=", ".join(f"{i} {c}" for i, c in enumerate(classes)))
    else:
        out.update(label_classes=", ".join(classes), pred_classes=", ".join(classes))
    metrics = best_metrics(results)
    if metrics:
        out["eval_metrics"] = metrics
    else:
        out.pop("eval_metrics", None)
    model = payload["model_config"]
    out["medpmoe"] = {
        "checkpoint": {"file": "models/model.pt", "sha256": checkpoint_sha256, "epoch": meta.get("epoch"),
                       "metric_name": meta.get("metric_name"), "metric": meta.get("metric")},
        "model": {k: model.get(k) for k in ("task", "num_classes", "method", "moe", "num_tokens", "prompt_layers",
                                            "dispatcher")},
        "image_size": size, "class_names": classes, "multi_label": bool(meta.get("multi_label")),
        "experts": experts,
        "training": {k: v for k, v in settings.items() if k not in ("experts", "class_names")},
    }
    return out


def _expert_rows(experts: list[dict]) -> list[str]:
    rows = ["| expert | weights file | sha256 |", "|---|---|---|"]
    for e in experts:
        if e.get("sha256"):
            where = f"`{e['bundled']}` (in this bundle)" if e.get("bundled") else f"`{e['file']}` (not included)"
            rows.append(f"| `{e['name']}` | {where} | `{e['sha256']}` |")
        else:
            arch = ", ".join(f"{k}={v}" for k, v in e.get("architecture", {}).items())
            rows.append(f"| `{e['name']}` | none: random-initialised with seed {e.get('seed')} ({arch}) | - |")
    return rows


def _data_lines(run_dir: Path) -> list[str]:
    split = run_dir / "split.json"
    if not split.is_file():
        return []
    doc = json.loads(split.read_text())
    where = "/".join(Path(str(doc.get("datalist"))).parts[-2:])
    return [f"Trained on {len(doc.get('train', []))} images of `{where}` (sha256 "
            f"`{str(doc.get('datalist_sha256'))[:16]}...`), validated on {len(doc.get('val', []))}."]


def bundle_readme(metadata: Mapping, results: Mapping, workflows: list[str], out: Path, run_dir: Path) -> str:
    """docs/README.md of the exported bundle: what the model is, its metrics, its data, how to run it."""
    rec = metadata["medpmoe"]
    ckpt, model, experts = rec["checkpoint"], rec["model"], rec["experts"]
    moe = f", mixed by the pMoE `{model['dispatcher']}` dispatcher" if model["moe"] and len(experts) > 1 else ""
    lines = [f"# {metadata['name']}", "", metadata.get("description", ""), "",
             f"A MONAI bundle in the model-zoo layout, exported by `python -m medpmoe.bundle.zoo` on "
             f"{time.strftime('%Y-%m-%d')} (medpmoe {metadata['required_packages_version'].get('medpmoe')}, MONAI "
             f"{metadata['monai_version']}, PyTorch {metadata['pytorch_version']}). "
             f"{metadata.get('intended_use', '').rstrip('.')}.",
             "", "## Model", "",
             f"{model['task'].capitalize()} of {rec['image_size']}x{rec['image_size']} RGB images into "
             f"{', '.join(rec['class_names'])}: method `{model['method']}` ({model['num_tokens']} prompt tokens) on "
             f"{len(experts)} frozen ViT expert(s){moe}. `models/model.pt` holds the trained prompts, dispatcher and "
             f"head only (sha256 `{ckpt['sha256']}`, epoch {ckpt['epoch']}); the experts come from their own files:",
             "", *_expert_rows(experts), "",
             "## Metrics", "",
             f"Validation split of the training data, best checkpoint (epoch {ckpt['epoch']} of "
             f"{results.get('epochs', '?')}):", "", "| metric | value |", "|---|---|",
             *(f"| `{k}` | {v:.4f} |" for k, v in metadata.get("eval_metrics", {}).items()), "",
             "## Data", "", metadata.get("data_source", ""), "", *_data_lines(run_dir), "",
             "## Run", "",
             "From any directory where medpmoe is installed (`B` is this folder; outputs go to `$B/eval`, "
             "`--output_dir` moves them):", "", "```bash", f"B={out.resolve()}"]
    files = " --expert_files \"{" + ", ".join(f"'{e['name']}': '/weights/{e['file']}'" for e in experts
                                              if e.get("sha256") and not e.get("bundled")) + "}\""
    files = files if "'" in files else ""
    lines += ["# masks (or probabilities.csv) of a folder, a datalist or one image -> $B/eval/inference/",
              "python -m monai.bundle run inference --config_file $B/configs/inference.json --input /data/images"
              + files]
    if "evaluate" in workflows:
        lines += ["# metrics on a datalist's validation split (--eval_datalist: every item) -> "
                  "$B/eval/eval_metrics.json",
                  "python -m monai.bundle run evaluating --config_file $B/configs/evaluate.json --datalist "
                  f"/data/datalist.json{files}"]
    lines += ["# MONAI's checks (offline with medpmoe's copy of the schema; without --filepath MONAI downloads it)",
              "python -m monai.bundle verify_metadata --meta_file $B/configs/metadata.json --filepath "
              "/path/to/medpmoe/schemas/meta_schema.json",
              "python -m monai.bundle verify_net_in_out network_def --meta_file $B/configs/metadata.json "
              f"--config_file $B/configs/inference.json --bundle_root $B{files}", "```", "",
              "Without `--input` / `--datalist` the commands draw the synthetic demo set under `$B/eval` (a model "
              "trained on it is then evaluated on its own validation split). Every key of `configs/*.json` can be set "
              "with `--key value`; a misspelled key stops the run naming the closest one."]
    return "\n".join(lines) + "\n"
