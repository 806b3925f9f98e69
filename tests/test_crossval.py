"""Cross-validation orchestration: per-fold MLflow runs under a parent, mean ± std, resume, shared Kvasir data."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mlflow
import pytest

from medpmoe.crossval import all_background_miou, main, run_cross_validation, summarise
from medpmoe.cv import load_folds
from medpmoe.demo import make_synthetic_polyps
from tests.conftest import REPO_ROOT

CONFIG = REPO_ROOT / "bundles" / "kvasir_seg" / "train.json"
TINY = {"num_epochs": 1, "image_size": 32, "batch_size": 4, "head_channels": 8}


def test_summarise_mean_and_sample_std():
    s = summarise([{"m": 0.5, "tag": "x"}, {"m": 0.7, "tag": "y"}])
    assert set(s) == {"m"} and s["m"]["mean"] == pytest.approx(0.6) and s["m"]["std"] == pytest.approx(0.1414, 1e-3)


@pytest.mark.slow
def test_two_fold_cv_tracks_folds_under_a_parent_and_resumes(tmp_path, monkeypatch, capsys):
    """A fold interrupted after its first epoch is KILLED with its parent; the resumed CV continues both runs (no
    new fold run); the parent holds mean ± std of every validation metric, the folds file without patient ids and
    the per-fold results."""
    from medpmoe.training import ResumableCheckpoint

    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    datalist = make_synthetic_polyps(tmp_path / "data", num_images=8, size=32)
    doc = json.loads(datalist.read_text())
    for i, item in enumerate(doc["training"]):
        item["patient_id"] = f"PAT-{i // 2:04d}"
    datalist.write_text(json.dumps(doc))
    out, overrides = tmp_path / "cv", {**TINY, "num_epochs": 2}
    save = ResumableCheckpoint.save

    def interrupted(self, engine):  # Ctrl-C in fold 1, once its first epoch is saved
        save(self, engine)
        if self.save_dir.parent.name == "fold_1" and not getattr(interrupted, "done", False):
            interrupted.done = True
            raise KeyboardInterrupt

    monkeypatch.setattr(ResumableCheckpoint, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cross_validation(CONFIG, datalist, out, k=2, overrides=overrides)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("kvasir_seg")
    status = {r.info.run_name.split("_")[-1]: r.info.status for r in client.search_runs([exp.experiment_id])}
    assert sorted(status.values()) == ["FINISHED", "KILLED", "KILLED"]  # fold 0; fold 1 and the parent
    res = run_cross_validation(CONFIG, datalist, out, k=2, overrides=overrides)
    saved = json.loads((out / "cv_results.json").read_text())
    assert saved["summary"]["val_mean_iou"]["mean"] == pytest.approx(res["summary"]["val_mean_iou"]["mean"])
    assert len(saved["summary"]["val_mean_iou"]["values"]) == 2 and "std" in saved["summary"]["val_mean_iou"]
    assert load_folds(out / "folds.json", datalist)["k"] == 2
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == res["parent_run_id"]][0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    fold1 = [r for r in children if r.data.tags["fold"] == "1"][0]
    assert fold1.info.run_id == json.loads((out / "fold_1" / "mlflow_run.json").read_text())["run_id"]
    assert [m.step for m in client.get_metric_history(fold1.info.run_id, "val_mean_iou")] == [1, 2]
    validation = ("val_mean_iou", "val_fg_iou", "val_mean_dice", "best_val_mean_iou", "best_val_fg_iou",
                  "best_val_mean_dice", "baseline_val_mean_iou")
    assert set(parent.data.metrics) == {f"{m}_{s}" for m in validation for s in ("mean", "std")}  # no bookkeeping
    assert parent.data.metrics["val_mean_dice_mean"] == pytest.approx(res["summary"]["val_mean_dice"]["mean"])
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "cv")}
    assert arts == {"cv/folds.json", "cv/fold_results.csv", "cv/cv_results.json", "cv/summary.txt"}
    folds = Path(client.download_artifacts(parent.info.run_id, "cv/folds.json")).read_text()
    assert "PAT-" not in folds and "patient_id" in (out / "folds.json").read_text()
    assert json.loads(folds)["folds"][1]["val"] == [{k: v for k, v in it.items() if k != "patient_id"}
                                                   for it in json.loads((out / "folds.json").read_text())["folds"][1]["val"]]
    table = Path(client.download_artifacts(parent.info.run_id, "cv/fold_results.csv")).read_text().splitlines()
    assert table[0].startswith("fold,run_id,") and "epochs" in table[0] and fold1.info.run_id in table[2]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    capsys.readouterr()
    main(["--config_file", str(CONFIG), "--datalist", str(datalist), "--output_dir", str(out), "--k", "2",
          *[x for k, v in overrides.items() for x in (f"--{k}", str(v))]])
    printed = capsys.readouterr().out
    assert printed.count("done already with these settings, skipped") == 2 and "val_mean_iou" in printed
    assert len(client.search_runs([parent.info.experiment_id])) == 3  # no fold retrained
    args = ["--config_file", str(CONFIG), "--datalist", str(datalist), "--output_dir", str(out), "--k", "2",
            *[x for k, v in {**overrides, "num_epochs": 1}.items() for x in (f"--{k}", str(v))]]
    with pytest.raises(SystemExit) as stop:  # the old results are not reported under the new setting
        main(args)
    assert str(stop.value).startswith("error: RunMismatchError: ") and "training.num_epochs: 2 -> 1" in str(stop.value)
    assert "--fresh_start True" in str(stop.value) and len(client.search_runs([exp.experiment_id])) == 3
    res = main([*args, "--fresh_start", "True"])  # every fold retrained, under a new parent
    assert [r["epochs"] for r in res["folds"]] == [1, 1] and res["parent_run_id"] != parent.info.run_id
    assert len(list((out / "fold_0" / "previous_runs").glob("*/results.json"))) == 1
    new = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{res['parent_run_id']}'")
    assert sorted(r.info.status for r in new) == ["FINISHED", "FINISHED"]
    assert {r.info.run_id for r in new} == set(res["fold_run_ids"])


def test_cv_of_a_named_task_logs_every_fold_under_its_parent(tmp_path, monkeypatch):
    """With --task_name the experiment name comes from an override: parent and fold runs share that experiment,
    and each fold run is the one its training logged into (FINISHED, with metrics)."""
    from medpmoe.crossval.runner import _config_value
    from medpmoe.bundle.demo_cls import make_synthetic_classification

    config = REPO_ROOT / "bundles" / "medvtab_cls" / "train.json"
    assert _config_value(config, "experiment_name", {"task_name": "pneumoniamnist"}) == "medvtab_cls_pneumoniamnist"
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    datalist = make_synthetic_classification(tmp_path / "data", num_images=12, size=32)
    doc = json.loads(datalist.read_text())
    del doc["synthetic"]  # a user's datalist
    datalist.write_text(json.dumps(doc))
    res = run_cross_validation(config, datalist, tmp_path / "cv", k=2,
                               overrides={"num_epochs": 1, "image_size": 32, "batch_size": 6,
                                          "task_name": "pneumoniamnist"})
    client = mlflow.MlflowClient(uri)
    assert [e.name for e in client.search_experiments() if e.name != "Default"] == ["medvtab_cls_pneumoniamnist"]
    runs = client.search_runs([client.get_experiment_by_name("medvtab_cls_pneumoniamnist").experiment_id])
    folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == res["parent_run_id"]]
    assert len(runs) == 3 and {r.info.run_id for r in folds} == set(res["fold_run_ids"])
    assert all(r.info.status == "FINISHED" and "val_auc" in r.data.metrics for r in folds)
    assert sorted(r.data.params["fold"] for r in folds) == ["0", "1"]


def test_all_background_baseline_on_shared_kvasir(shared_data, tmp_path):
    from medpmoe.data.converters import kvasir_seg

    datalist = tmp_path / "datalist.json"
    kvasir_seg(shared_data / "kvasir_seg_dev", datalist)
    from medpmoe.cv import make_folds, save_folds

    folds = save_folds(make_folds(datalist, k=5, seed=0), tmp_path / "folds.json")
    base = all_background_miou(datalist, folds, fold=0, image_size=32)
    assert 0.3 < base < 0.5  # background IoU (~0.8) averaged with 0 for the polyp


def test_a_failing_fold_is_marked_failed_and_not_done(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    datalist = make_synthetic_polyps(tmp_path / "data", num_images=4, size=32)
    with pytest.raises(Exception):  # noqa: B017 (monai wraps the unknown-method error)
        run_cross_validation(CONFIG, datalist, tmp_path / "cv", k=2, overrides={**TINY, "method": "no_such_method"})
    assert not (tmp_path / "cv" / "fold_0" / "results.json").exists()
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("kvasir_seg").experiment_id])
    assert [r.info.status for r in runs if r.data.tags.get("medpmoe.cv") == "fold"] == ["FAILED"]
    assert [r.info.status for r in runs if r.data.tags.get("medpmoe.cv") == "parent"] == ["FAILED"]


def test_an_infeasible_k_ends_the_command_with_one_line(tmp_path, capsys):
    """A user's mistake (too few images of a class for k folds) ends with its message alone: no traceback, no
    sklearn warning, no MLflow run."""
    from medpmoe.bundle.demo_cls import make_synthetic_classification

    datalist = make_synthetic_classification(tmp_path / "data", num_images=12, size=32)
    doc = json.loads(datalist.read_text())
    doc["training"] = [it for it in doc["training"] if it["label"] == 0] + \
        [it for it in doc["training"] if it["label"] == 1][:2]
    datalist.write_text(json.dumps(doc))
    config = REPO_ROOT / "bundles" / "medvtab_cls" / "train.json"
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as stop:
        warnings.simplefilter("always")
        main(["--config_file", str(config), "--datalist", str(datalist), "--output_dir", str(tmp_path / "cv"),
              "--k", "3"])
    message = str(stop.value)
    assert message.startswith("error: DataError: ") and "Largest feasible k: 2" in message and "\n" not in message
    assert not [w for w in caught if "least populated" in str(w.message)]
    assert not (tmp_path / "cv" / "mlruns.db").exists()
