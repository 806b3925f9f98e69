"""Divergence and NaN: a checkpoint holding non-finite or blown-up values is never written and, when found at a
resume, stops the run saying to start over; the advised command names a concrete learning rate and runs as printed."""

from __future__ import annotations

import json
import shlex
import subprocess
from types import SimpleNamespace

import pytest
import torch

from medpmoe.training import NonFiniteLossError, ResumableCheckpoint, trainable_parameters
from medpmoe.training.guards import DEFAULT_LEARNING_RATE, diverged_values, lower_learning_rate
from medpmoe.training.checkpoint import read_prompt_checkpoint
from medpmoe.files import atomic_torch_save
from tests.conftest import REPO_ROOT
from tests.helpers import TINY_EXPERTS, bundle_command, bundle_env
from tests.test_bundle_common import TINY

KVASIR = str(REPO_ROOT / "bundles" / "kvasir_seg" / "train.json")


def test_the_advised_rate_is_a_tenth_capped_at_the_recipe_default():
    recipe = json.loads((REPO_ROOT / "configs" / "train.json").read_text())["learning_rate"]
    assert DEFAULT_LEARNING_RATE == recipe
    assert lower_learning_rate(1e6) == 1e-3 and lower_learning_rate(1e-3) == 1e-4 and lower_learning_rate(None) == 1e-3
    assert diverged_values({"a": torch.ones(3)}) is None
    assert diverged_values({"a": torch.tensor([1.0, float("nan")])}) == "a: non-finite values (NaN or inf)"
    assert diverged_values({"b": torch.tensor([5e29])}) == "b: |value| up to 5e+29"


def _model():
    from medpmoe.models import build_model

    return build_model(TINY_EXPERTS[:1], task="classification", num_classes=2, num_tokens=2)


def test_diverged_weights_are_never_written(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    ckpt = ResumableCheckpoint(tmp_path, model, opt)
    engine = SimpleNamespace(state=SimpleNamespace(epoch=1, iteration=3))
    ckpt.save(engine)
    good = read_prompt_checkpoint(ckpt.last_path)["state_dict"]
    with torch.no_grad():
        trainable_parameters(model)[0].fill_(float("nan"))
    engine.state.epoch = 2
    with pytest.raises(NonFiniteLossError, match=r"diverged in epoch 2 .*NaN.* checkpoint of the last completed epoch "
                                                 r"is kept.* with: --learning_rate 0\.0001 --resume_changed True"):
        ckpt.save(engine)
    kept = read_prompt_checkpoint(ckpt.last_path)["state_dict"]
    assert all(torch.equal(kept[k], good[k]) for k in good)  # epoch 1's checkpoint, untouched


@pytest.mark.parametrize("value", [5e29, float("nan")])
def test_a_diverged_checkpoint_is_refused_at_resume(tmp_path, value):
    model = _model()
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    ResumableCheckpoint(tmp_path, model, opt).save(SimpleNamespace(state=SimpleNamespace(epoch=1, iteration=3)))
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name] = torch.full_like(payload["state_dict"][name], value)
    atomic_torch_save(payload, tmp_path / "last.pt")
    fresh = _model()
    ckpt = ResumableCheckpoint(tmp_path, fresh, torch.optim.AdamW(trainable_parameters(fresh), lr=1e-2))
    with pytest.raises(NonFiniteLossError, match=r"holds diverged values .*diverged already.* --learning_rate 0\.001 "
                                                 r"--fresh_start True"):
        ckpt.load(SimpleNamespace(state=SimpleNamespace(epoch=0, iteration=0)))


@pytest.mark.slow
def test_a_blown_up_checkpoint_stops_the_resume_and_the_printed_command_starts_over(tmp_path):
    """The issue's loop: a kept checkpoint holding 5e29 made every resume diverge at once. Now the resume stops,
    says to start over, and the printed command, pasted as printed, trains to the end."""
    tiny = {k: v for k, v in TINY.items() if k != "experts"}
    out = tmp_path / "out"
    args = bundle_command(KVASIR, out, {**tiny, "demo_root": tmp_path / "data"})
    first = subprocess.run(args, cwd=REPO_ROOT, env=bundle_env(), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    payload = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    payload["state_dict"] = {k: v * 1e30 for k, v in payload["state_dict"].items()}
    atomic_torch_save(payload, out / "checkpoints" / "last.pt")
    (out / "results.json").unlink()  # as a killed run leaves it
    resumed = subprocess.run(args + ["--num_epochs", "2", "--learning_rate", "0.0005", "--resume_changed", "True"],
                             cwd=REPO_ROOT, env=bundle_env(), capture_output=True, text=True)
    last = resumed.stderr.strip().splitlines()[-1]
    assert resumed.returncode == 1 and last.startswith("NonFiniteLossError: "), resumed.stderr[-2000:]
    assert "last.pt (epoch 1) holds diverged values" in last and "Start over" in last
    command = shlex.split(last.split(" with: ", 1)[1])
    assert command[:3] == ["python", "-m", "monai.bundle"]
    assert command[-4:] == ["--learning_rate", "0.0001", "--fresh_start", "True"]
    done = subprocess.run([args[0], *command[1:]], cwd=REPO_ROOT, env=bundle_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["epochs"] == 2
    assert (out / "previous_runs").is_dir()
