"""What a reviewer finds in the MLflow store after demo runs: one true run per training (killed, resumed: one FINISHED
run, no duplicate steps), its figures, best metrics, dataset, config, source and servable model, whose predictions
equal the bundle's inference; evaluation runs FINISHED and linked to their training; failed runs FAILED."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from PIL import Image

from medpmoe.bundle import run_bundle
from tests.conftest import REPO_ROOT
from tests.expert_files import TINY_VIT, tiny_vit, write_dinov2_hub
from tests.test_bundle_common import EXPERTS, TINY

KILL_SCRIPT = """
import json, os, signal, sys
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
config, overrides, kill_at = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
wf = ConfigWorkflow(config_file=config, meta_file=os.path.join(os.path.dirname(config), 'metadata.json'),
                    workflow_type=None, **overrides)
wf.initialize()
trainer = wf.parser.get_parsed_content('train#trainer')
trainer.add_event_handler(Events.ITERATION_COMPLETED(once=kill_at), lambda e: os.kill(os.getpid(), signal.SIGKILL))
wf.run()
"""


def _bundle(name: str, *files: str) -> list[str]:
    root = REPO_ROOT / "bundles" / name
    return [str(root / "train.json")] + [str(root / f) for f in files]


def _client(out: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")


def _runs(client, experiment: str) -> list:
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _pictures(folder: Path, sizes) -> Path:
    """RGB PNGs of non-square sizes (H, W): inference must return masks at each picture's own size."""
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        rgb = (g.random((h, w, 3)) * 255).astype(np.uint8)
        rgb[h // 4: h // 2, w // 3: w // 2] = (230, 180, 120)
        Image.fromarray(rgb).save(folder / f"case_{i}.png")
    return folder


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """kvasir_seg on the demo set with an expert from a file: a training killed (SIGKILL) in its second epoch and
    resumed, an evaluation, and the bundle's inference on pictures of other sizes."""
    tmp = tmp_path_factory.mktemp("seg")
    weights = tmp / "weights" / "dinov2_vitb14_pretrain.pth"
    weights.parent.mkdir()
    write_dinov2_hub(weights, tiny_vit("vit_base_patch14_dinov2", 28, depth=1))
    experts = [EXPERTS[0], {"name": "dinov2_vitb14", "checkpoint": str(weights), "img_size": 28,
                            "arch_overrides": dict(TINY_VIT, depth=1)}]
    out = tmp / "out"
    kw = {**TINY, "experts": experts, "num_epochs": 3, "learning_rate": 0.01, "output_dir": str(out),
          "demo_root": str(tmp / "data")}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO_ROOT)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
        killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, _bundle("kvasir_seg")[0], json.dumps(kw), "5"],
                                cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert killed.returncode == -9, killed.stderr[-3000:]
        running = [r.info.status for r in _runs(_client(out), "kvasir_seg")]
        run_bundle(_bundle("kvasir_seg"), **kw)
        run_bundle(_bundle("kvasir_seg", "evaluate.json"), **kw)
        pictures = _pictures(tmp / "pictures", [(40, 56), (48, 36)])
        run_bundle(_bundle("kvasir_seg", "inference.json"), **kw, input=str(pictures))
    return {"out": out, "weights": weights, "pictures": pictures, "status_after_kill": running}


def _training_and_eval(client, experiment: str):
    runs = _runs(client, experiment)
    train = [r for r in runs if "_eval_" not in r.info.run_name]
    evals = [r for r in runs if "_eval_" in r.info.run_name]
    return train, evals


def test_a_killed_then_resumed_training_is_one_finished_run_without_duplicate_steps(seg):
    client = _client(seg["out"])
    assert seg["status_after_kill"] == ["RUNNING"]  # SIGKILL: nothing could end it; the resume continues it
    train, _ = _training_and_eval(client, "kvasir_seg")
    assert len(train) == 1 and train[0].info.status == "FINISHED"
    run = train[0]
    assert json.loads((seg["out"] / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
    assert run.data.tags["medpmoe.resumed"] == "1"
    results = json.loads((seg["out"] / "results.json").read_text())
    iterations = results["iterations"]
    assert iterations == 9 and _steps(client, run.info.run_id, "train_loss") == list(range(1, iterations + 1))
    assert _steps(client, run.info.run_id, "val_mean_iou") == [1, 2, 3]


def test_the_training_run_tells_its_whole_story(seg):
    client = _client(seg["out"])
    run = _training_and_eval(client, "kvasir_seg")[0][0]
    rid, data = run.info.run_id, run.data
    results = json.loads((seg["out"] / "results.json").read_text())
    best = torch.load(seg["out"] / "checkpoints" / "best.pt", weights_only=True)["metadata"]
    assert data.metrics["best_val_mean_iou"] == pytest.approx(best["metric"]) == pytest.approx(
        results["best_val_mean_iou"])
    assert data.metrics["best_epoch"] == best["epoch"] == results["best_epoch"]
    assert {"plots/segmentation_overlays.png", "plots/routing_heatmap.png", "plots/routing_table.csv",
            "checkpoint/best.pt", "config/config.json", "parameters.json"} <= _artifacts(client, rid)
    config = json.loads(Path(client.download_artifacts(rid, "config/config.json")).read_text())
    assert config["output_dir"] == str(seg["out"]) and config["num_epochs"] == 3  # the overrides as executed
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout
    assert data.tags["mlflow.source.git.commit"] == commit.strip()
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3's model-training view
    (dataset,) = run.inputs.dataset_inputs
    profile = json.loads(dataset.dataset.profile)
    datalist = seg["out"].parent / "data" / "polyp_12x32px_seed0" / "datalist.json"  # the demo settings folder
    assert profile["datalist_sha256"] == hashlib.sha256(datalist.read_bytes()).hexdigest()
    assert sum(profile["items"].values()) == 12 and set(profile["items"]) == {"train", "val"}
    assert ".png" not in dataset.dataset.profile and {t.value for t in dataset.tags} == {"training"}


def test_the_logged_model_is_servable_and_predicts_what_the_bundle_infers(seg):
    from medpmoe.inference import predict
    from medpmoe.tracking import images_frame

    client = _client(seg["out"])
    run = _training_and_eval(client, "kvasir_seg")[0][0]
    (output,) = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == run.info.run_id and logged.status == LoggedModelStatus.READY
    assert logged.metrics and {m.key for m in logged.metrics} == {"best_val_mean_iou", "best_val_fg_iou",
                                                                  "best_val_mean_dice", "best_epoch"}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{seg['out'] / 'mlruns.db'}"
    try:
        model = mlflow.pyfunc.load_model(f"models:/{output.model_id}")
        info = mlflow.models.get_model_info(f"models:/{output.model_id}")
        files = sorted(seg["pictures"].glob("*.png"))
        masks = model.predict(images_frame(files))["mask"]
        probs = model.predict(images_frame(files), params={"probabilities": True})["probabilities"]
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{output.model_id}"))
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert [i.name for i in info.signature.inputs.inputs] == ["image"] and info.signature.params is not None
    assert (local / "serving_input_example.json").is_file()
    recorded = info.metadata["medpmoe"]["experts"]
    sha = hashlib.sha256(seg["weights"].read_bytes()).hexdigest()
    assert recorded[1] == {"name": "dinov2_vitb14", "path": str(seg["weights"]), "sha256": sha}
    stored = [hashlib.sha256(f.read_bytes()).hexdigest() for f in local.rglob("*") if f.is_file()]
    assert sha not in stored  # the frozen expert weights are recorded, never copied into the store
    import medpmoe

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # as the bundle and the pyfunc choose (bf16 on CUDA)
    reference = predict(medpmoe.load_model(seg["out"] / "checkpoints" / "best.pt", device=dev),
                        [str(f) for f in files], "segmentation", 32, device=dev, amp=dev == "cuda", verbose=False)
    for f, mask, prob, ref in zip(files, masks, probs, reference):
        bundle = np.asarray(Image.open(seg["out"] / "inference" / f"{f.stem}_seg.png")) // 255
        assert mask.shape == bundle.shape == np.asarray(Image.open(f)).shape[:2]
        assert np.array_equal(mask, bundle)
        assert np.allclose(prob, ref.probabilities.numpy(), atol=1e-6) and prob.std() > 1e-3


def test_the_logged_model_loads_with_moved_expert_files_as_the_docs_show(seg):
    """docs/tracking.md: when the expert files moved, `model_config={"expert_files": {name: path}}` (and `device`)
    reach the loader, which predicts what `medpmoe.predict` gives on the checkpoint; another file is refused."""
    import medpmoe
    from medpmoe.experts import ExpertCheckpointError
    from medpmoe.models import ModelLoadError
    from medpmoe.tracking import images_frame

    uri = f"models:/{_training_and_eval(_client(seg['out']), 'kvasir_seg')[0][0].outputs.model_outputs[0].model_id}"
    files = sorted(seg["pictures"].glob("*.png"))
    moved = seg["weights"].parent.parent / "moved" / "dinov2.pth"
    moved.parent.mkdir()
    seg["weights"].rename(moved)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{seg['out'] / 'mlruns.db'}"
    try:
        with pytest.raises(ModelLoadError, match=r"pretrain.pth not found.*model_config=\{'expert_files'"):
            mlflow.pyfunc.load_model(uri)
        os.environ["MLFLOW_PYFUNC_INFERENCE_CONFIG"] = json.dumps({"expert_files": {"dinov2_vitb14": str(moved)}})
        try:  # how `mlflow models serve` is given them
            assert mlflow.pyfunc.load_model(uri).model_config["expert_files"] == {"dinov2_vitb14": str(moved)}
        finally:
            del os.environ["MLFLOW_PYFUNC_INFERENCE_CONFIG"]
        settings = {"expert_files": {"dinov2_vitb14": str(moved)}, "device": "cpu"}
        model = mlflow.pyfunc.load_model(uri, model_config=settings)
        assert model.model_config == {**settings, "amp": True}  # no key dropped by MLflow
        out = model.predict(images_frame(files), params={"probabilities": True})
        other = moved.parent / "other.pth"
        write_dinov2_hub(other, tiny_vit("vit_base_patch14_dinov2", 28, seed=7, depth=1))
        with pytest.raises(ExpertCheckpointError, match="other.pth.*differs from .*the file the model was trained"):
            mlflow.pyfunc.load_model(uri, model_config={"expert_files": {"dinov2_vitb14": str(other)}})
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
        moved.rename(seg["weights"])
    reference = medpmoe.predict(medpmoe.load_model(seg["out"] / "checkpoints" / "best.pt", device="cpu"),
                                [str(f) for f in files], amp=False)
    assert [m.shape for m in out["mask"]] == [np.asarray(Image.open(f)).shape[:2] for f in files]
    for mask, prob, ref in zip(out["mask"], out["probabilities"], reference):
        assert np.array_equal(mask, ref.mask.as_tensor()[0].numpy()) and 0 < mask.sum() < mask.size
        assert np.allclose(prob, ref.probabilities.numpy(), atol=1e-6) and prob.std() > 1e-3


def test_the_evaluation_run_is_finished_linked_and_uses_the_training_artifact_paths(seg):
    client = _client(seg["out"])
    (train,), (evaluation,) = _training_and_eval(client, "kvasir_seg")
    assert evaluation.info.status == "FINISHED"
    assert evaluation.data.tags["mlflow.parentRunId"] == train.info.run_id  # nested under it in the UI
    assert {k: v for k, v in train.data.params.items()} .items() <= evaluation.data.params.items()
    assert "fold" not in train.data.params and train.data.params["learning_rate"]  # no folds file: no fold
    assert "val_mean_dice" in evaluation.data.metrics
    figures = {"plots/segmentation_overlays.png", "plots/routing_heatmap.png", "checkpoint/best.pt",
               "config/config.json", "parameters.json"}
    assert figures <= _artifacts(client, evaluation.info.run_id) and figures <= _artifacts(client, train.info.run_id)
    assert [t.value for t in evaluation.inputs.dataset_inputs[0].tags] == ["evaluation"]


@pytest.mark.slow
def test_classification_runs_figures_abandoned_runs_and_pyfunc_probabilities(tmp_path, monkeypatch):
    """medvtab_cls: confusion matrix and ROC titled with the checkpoint; a run whose process died is ended KILLED
    at the next start; the pyfunc's probabilities equal the bundle's probabilities.csv."""
    from medpmoe.tracking import images_frame

    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    client = _client(out)
    exp = client.create_experiment("medvtab_cls_synthetic", artifact_location=(out / "mlruns").as_uri())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    orphan = client.create_run(exp, run_name="orphan", tags={"medpmoe.host": socket.gethostname(),
                                                             "medpmoe.pid": dead.stdout.strip()}).info.run_id
    kw = {**TINY, "output_dir": str(out), "demo_root": str(tmp_path / "data")}
    run_bundle(_bundle("medvtab_cls"), **kw)
    run_bundle(_bundle("medvtab_cls", "inference.json"), **kw)
    assert client.get_run(orphan).info.status == "KILLED"
    (run,) = [r for r in _runs(client, "medvtab_cls_synthetic") if r.info.run_id != orphan]
    assert run.info.status == "FINISHED" and run.data.tags["medpmoe.best_checkpoint"].startswith("best.pt (epoch 1")
    assert {"plots/confusion_matrix.png", "plots/roc_curve.png", "plots/routing_heatmap.png"} <= _artifacts(
        client, run.info.run_id)
    profile = json.loads(run.inputs.dataset_inputs[0].dataset.profile)
    assert sum(profile["items"].values()) == 12 and set(profile["classes"]["train"]) == {"regular", "irregular"}
    assert all(sum(profile["classes"][split].values()) == n for split, n in profile["items"].items())
    with open(out / "inference" / "probabilities.csv") as f:
        rows = list(csv.DictReader(f))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlruns.db'}")
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    pred = model.predict(images_frame([r["image"] for r in rows]))
    names = [c for c in rows[0] if c not in ("image", "prediction")]
    assert list(pred["prediction"]) == [r["prediction"] for r in rows]
    assert np.allclose(pred[names].to_numpy(), [[float(r[n]) for n in names] for r in rows], atol=2e-6)


def test_a_failed_training_run_is_failed(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    with pytest.raises(Exception):  # noqa: B017 (the divergence guard's error, wrapped by MONAI)
        run_bundle(_bundle("kvasir_seg"), **{**TINY, "output_dir": str(out), "demo_root": str(tmp_path / "data"),
                                             "learning_rate": 1e6, "grad_clip": None, "warmup_epochs": 0})
    (run,) = _runs(_client(out), "kvasir_seg")
    assert run.info.status == "FAILED" and run.info.end_time is not None
