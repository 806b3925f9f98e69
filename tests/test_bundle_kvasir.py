"""The kvasir_seg bundle: the documented command, one tiny epoch in-process, and kill-and-resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch
from monai.bundle import ConfigParser

from tests.conftest import REPO_ROOT
from tests.helpers import bundle_command, bundle_env

CONFIG = REPO_ROOT / "bundles" / "kvasir_seg" / "train.json"
TINY = {"demo_images": 12, "demo_size": 32, "image_size": 32, "batch_size": 4, "head_channels": 8}


def _cli(tmp_path, *extra: str) -> list[str]:
    return bundle_command(str(CONFIG), tmp_path / "out", TINY) + list(extra)


_env = bundle_env


def test_config_has_the_documented_entry_points():
    parser = ConfigParser()
    parser.read_config(CONFIG)
    for key in ("training", "initialize", "run", "finalize", "network_def", "train#trainer", "validate#evaluator"):
        assert key in parser, key
    assert parser["bundle_root"] == "$medpmoe.bundle.bundle_root()"  # the folder of the file MONAI was given


@pytest.mark.slow
def test_documented_command_trains_and_writes_outputs(tmp_path):
    """Issue 22's acceptance command, `... --train#trainer#max_epochs 1` (a nested id), run from another folder."""
    (tmp_path / "elsewhere").mkdir()
    proc = subprocess.run(_cli(tmp_path, "--train#trainer#max_epochs", "1"), cwd=tmp_path / "elsewhere", env=_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["val_mean_iou"] <= 1.0 and results["epochs"] == 1
    assert "final val_mean_iou" in proc.stdout
    # what the user sees: a progress bar with elapsed<remaining and the loss, no per-iteration log lines, no
    # logging.conf / deprecated-metadata warnings, and a summary saying where everything is
    assert re.search(r"Iteration: \[3/3\] 100%\|.*loss=[0-9.]+ \[\d\d:\d\d<\d\d:\d\d\]", proc.stderr)
    assert "Iter:" not in proc.stdout + proc.stderr
    assert "logging.conf does not exist" not in proc.stderr and "deprecated name" not in proc.stderr
    summary = proc.stdout[proc.stdout.index("final val_mean_iou"):]
    assert "mean IoU incl. background" in summary and "foreground IoU (val_fg_iou)" in summary
    assert "foreground Dice (val_mean_dice)" in summary and {"val_fg_iou", "val_mean_dice"} <= set(results)
    assert f"checkpoints: {out / 'checkpoints' / 'best.pt'}" in summary and f"results: {out / 'results.json'}" in summary
    assert f"MLflow: sqlite:///{out / 'mlruns.db'}" in summary
    ckpt = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert not any(k.startswith("experts.") for k in ckpt["state_dict"])  # prompt-only checkpoint
    assert (out / "mlruns.db").exists()
    assert not (REPO_ROOT / "mlruns").exists()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_number_of_steps(tmp_path):
    proc = subprocess.Popen(
        _cli(tmp_path, "--num_epochs", "3"), cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    killed = False
    for line in proc.stdout:  # kill in the middle of epoch 2 (its progress bar moved), after epoch 1's checkpoint
        if "Epoch [2/3]: [" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
    proc.wait(timeout=120)
    assert killed, "training ended before it could be killed"
    last = tmp_path / "out" / "checkpoints" / "last.pt"
    assert torch.load(last, weights_only=True)["metadata"]["resume"]["epoch"] == 1
    time.sleep(0.1)
    done = subprocess.run(_cli(tmp_path, "--num_epochs", "3"), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    per_epoch = 3  # 12 demo images, 80% train -> 9 (ceil 9/4 = 3 batches)
    assert results["epochs"] == 3 and results["iterations"] == 3 * per_epoch
    assert "Epoch [2/3]: [" in done.stderr and "Epoch [1/3]" not in done.stdout + done.stderr  # it did not start over
    straight = subprocess.run(bundle_command(str(CONFIG), tmp_path / "straight", TINY) + ["--num_epochs", "3"],
                              cwd=REPO_ROOT, env=_env(), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]
    uninterrupted = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert results == uninterrupted  # per-epoch seeds: the resumed epochs draw what the uninterrupted ones drew
