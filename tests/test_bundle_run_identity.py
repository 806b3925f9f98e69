"""A re-run means what it says: an unchanged finished run trains nothing and makes no MLflow run, a changed one is
refused with the differing keys, an explicit resume with a new learning rate trains with it, divergence stops."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from medpmoe.bundle import run_bundle
from medpmoe.training import NonFiniteLossError, RunMismatchError
from tests.conftest import REPO_ROOT
from tests.test_bundle_common import TINY

KVASIR = str(REPO_ROOT / "bundles" / "kvasir_seg" / "train.json")


def _runs(out) -> int:
    with sqlite3.connect(out / "mlruns.db") as db:
        return db.execute("select count(*) from runs").fetchone()[0]


@pytest.fixture
def trained(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / "out"
    kw = {**TINY, "output_dir": str(out), "demo_root": str(tmp_path / "data")}
    run_bundle(KVASIR, **kw)
    return out, kw


def test_unchanged_rerun_reports_and_trains_nothing(trained, capsys):
    out, kw = trained
    before, results = _runs(out), json.loads((out / "results.json").read_text())
    capsys.readouterr()
    run_bundle(KVASIR, **kw)
    printed = capsys.readouterr().out
    assert "already holds this run, finished with the same configuration" in printed
    assert _runs(out) == before and json.loads((out / "results.json").read_text()) == results


def test_changed_rerun_is_refused_with_the_keys_and_fresh_start_keeps_the_old_run(trained):
    out, kw = trained
    before = _runs(out)
    with pytest.raises(Exception) as err:
        run_bundle(KVASIR, **{**kw, "learning_rate": 0.5, "seed": 3})
    msg = str(err.value.__cause__ or err.value)
    assert isinstance(err.value.__cause__ or err.value, RunMismatchError)
    assert "training.learning_rate: 0.001 -> 0.5" in msg and "training.seed: 0 -> 3" in msg
    assert "--output_dir" in msg and "--fresh_start True" in msg
    assert _runs(out) == before  # refused before any tracking run was made
    run_bundle(KVASIR, **{**kw, "learning_rate": 0.5, "seed": 3, "fresh_start": True})
    assert json.loads((out / "run.json").read_text())["training"]["learning_rate"] == 0.5
    old = next((out / "previous_runs").iterdir())
    assert json.loads((old / "run.json").read_text())["training"]["learning_rate"] == 0.001
    assert (old / "checkpoints" / "best.pt").is_file() and (old / "results.json").is_file()


def test_explicit_resume_with_a_new_learning_rate_trains_with_it(trained):
    out, kw = trained
    run_bundle(KVASIR, **{**kw, "num_epochs": 2, "learning_rate": 1e-4, "resume_changed": True})
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 2
    resume = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["metadata"]["resume"]
    assert resume["epoch"] == 2 and [g["initial_lr"] for g in resume["optimizer"]["param_groups"]] == [1e-4]
    import mlflow  # the resumed training continued its MLflow run, which says what changed

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("kvasir_seg").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["medpmoe.resumed"] == "1"
    assert "learning_rate: 0.001 -> 0.0001" in run.data.tags["medpmoe.changed_params"]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_mean_iou")) == [1, 2]


def test_a_diverging_run_stops_with_the_command_that_resumes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(Exception) as err:
        run_bundle(KVASIR, tracking=False, **{**TINY, "output_dir": str(tmp_path / "out"),
                                              "demo_root": str(tmp_path / "data"), "learning_rate": 1e6,
                                              "grad_clip": None, "warmup_epochs": 0})
    cause = err.value
    while cause is not None and not isinstance(cause, NonFiniteLossError):
        cause = cause.__cause__ or cause.__context__
    assert cause is not None, err.value
    assert "--learning_rate 0.001 --resume_changed True" in str(cause)  # a tenth, capped at the recipe's default


@pytest.mark.slow
def test_the_printed_resume_command_runs_as_printed(tmp_path):
    """The documented command diverges; its last line is the error with the command to run, and that command,
    pasted as printed (a concrete lower learning rate, explicit resume), trains to the end."""
    import shlex
    import subprocess

    from tests.helpers import bundle_command, bundle_env

    tiny = {k: v for k, v in TINY.items() if k != "experts"}
    args = bundle_command(KVASIR, tmp_path / "out", {**tiny, "demo_root": tmp_path / "data", "warmup_epochs": 0,
                                                     "grad_clip": None, "learning_rate": 1e6})
    proc = subprocess.run(args, cwd=REPO_ROOT, env=bundle_env(), capture_output=True, text=True)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("NonFiniteLossError: training diverged"), proc.stderr[-2000:]
    assert "No epoch completed, so nothing was saved; lower the learning rate and start again with: " in last
    command = shlex.split(last.split(" with: ", 1)[1])
    assert command[:3] == ["python", "-m", "monai.bundle"] and command[-4:] == ["--learning_rate", "0.001",
                                                                                "--resume_changed", "True"]
    done = subprocess.run([args[0], *command[1:]], cwd=REPO_ROOT, env=bundle_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["epochs"] == TINY["num_epochs"]


def test_evaluation_refuses_settings_the_checkpoint_was_not_trained_with(trained):
    out, kw = trained
    evaluate = [KVASIR, str(REPO_ROOT / "bundles" / "kvasir_seg" / "evaluate.json")]
    with pytest.raises(Exception) as err:
        run_bundle(evaluate, tracking=False, **{**kw, "image_size": 48})
    cause = err.value.__cause__ or err.value
    assert "config key 'image_size' is 48 but" in str(cause) and "trained with 32: pass --image_size 32" in str(cause)
    run_bundle(evaluate, tracking=False, **kw)  # the trained settings evaluate
    assert json.loads((out / "eval_metrics.json").read_text())["val_mean_iou"] >= 0
