"""`--resume_changed True` resumes exactly as if the changed settings had been used from the start (schedule length,
warm-up, learning rate, steps per epoch), or refuses the change naming the key."""

from __future__ import annotations

import pytest
import torch

from medpmoe.bundle import run_bundle
from medpmoe.training import RunMismatchError
from tests.conftest import REPO_ROOT
from tests.test_bundle_common import TINY

KVASIR = str(REPO_ROOT / "bundles" / "kvasir_seg" / "train.json")
# 12 demo images, 20% validation: 9 or 10 training images, so batch sizes 4 and 2 give 3 and 5 steps an epoch
CHANGES = {"num_epochs": {"num_epochs": 3}, "learning_rate": {"num_epochs": 2, "learning_rate": 3e-3},
           "batch_size": {"num_epochs": 2, "batch_size": 2}}


def _schedule(out) -> dict:
    resume = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["metadata"]["resume"]
    sched = resume["lr_scheduler"]
    return {"lr": [round(v, 12) for v in sched["_last_lr"]], "base_lrs": sched["base_lrs"],
            "position": sched["last_epoch"], "length": sched["t_total"], "warmup": sched["warmup_steps"],
            "iteration": resume["iteration"], "epoch": resume["epoch"],
            "group_lr": [round(g["lr"], 12) for g in resume["optimizer"]["param_groups"]]}


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_a_resume_with_a_changed_setting_follows_that_settings_schedule(key, tmp_path, monkeypatch):
    """One epoch, then a resume with the change ends where a run with those settings from the start ends."""
    monkeypatch.chdir(REPO_ROOT)
    kw = {**TINY, "demo_root": str(tmp_path / "data"), "warmup_epochs": 1}
    resumed, reference = tmp_path / "resumed", tmp_path / "reference"
    run_bundle(KVASIR, tracking=False, **kw, output_dir=str(resumed))
    run_bundle(KVASIR, tracking=False, **{**kw, **CHANGES[key]}, output_dir=str(resumed), resume_changed=True)
    run_bundle(KVASIR, tracking=False, **{**kw, **CHANGES[key]}, output_dir=str(reference))
    got, want = _schedule(resumed), _schedule(reference)
    assert got == want
    assert got["epoch"] == CHANGES[key]["num_epochs"]
    if key == "num_epochs":  # the case: the old (shorter) schedule kept, the lr ended past its end
        assert got["length"] == got["iteration"] and got["lr"][0] < 1e-4


def test_fewer_epochs_than_trained_are_refused_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    kw = {**TINY, "demo_root": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"), "num_epochs": 2}
    run_bundle(KVASIR, tracking=False, **kw)
    (tmp_path / "out" / "results.json").unlink()  # as if killed after its last checkpoint
    with pytest.raises(Exception) as err:
        run_bundle(KVASIR, tracking=False, **{**kw, "num_epochs": 1}, resume_changed=True)
    cause = err.value
    while cause is not None and not isinstance(cause, RunMismatchError):
        cause = cause.__cause__ or cause.__context__
    assert cause is not None and str(cause).startswith("config key 'num_epochs' is 1 but the checkpoint to resume "
                                                       "has trained 2 epochs already")
