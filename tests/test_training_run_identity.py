"""A run's identity: a changed configuration is refused with its keys, fresh starts keep the old files, resumes with
changed settings use them, and diverging losses stop the run with the command that resumes it."""

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from medpmoe.models import build_model
from medpmoe.training import DivergenceGuard, NonFiniteLossError, ResumableCheckpoint, RunMismatchError
from medpmoe.training import run_identity, start_run

TINY = [{"name": "tiny_a", "patch_size": 16, "img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}]


@pytest.fixture
def model():
    return build_model(TINY, num_classes=2, num_tokens=2)


def _identity(model, datalist, **training):
    return run_identity(model, str(datalist), learning_rate=training.pop("learning_rate", 1e-3), seed=0, **training)


def test_new_resume_finished(tmp_path, model):
    datalist = tmp_path / "d.json"
    datalist.write_text('{"training": []}')
    out = tmp_path / "run"
    ident = _identity(model, datalist)
    assert start_run(out, ident).status == "new"
    assert json.loads((out / "run.json").read_text())["training"]["learning_rate"] == 1e-3
    assert start_run(out, ident).status == "resume"  # killed before it finished
    (out / "results.json").write_text("{}")
    assert start_run(out, ident).finished


def test_changed_configuration_is_refused_naming_the_keys_and_the_ways_forward(tmp_path, model):
    datalist = tmp_path / "d.json"
    datalist.write_text('{"training": []}')
    out = tmp_path / "run"
    start_run(out, _identity(model, datalist))
    (out / "results.json").write_text("{}")
    datalist.write_text('{"training": [{"image": "x.png"}]}')
    with pytest.raises(RunMismatchError) as err:
        start_run(out, _identity(model, datalist, learning_rate=0.5))
    msg = str(err.value)
    assert "training.learning_rate: 0.001 -> 0.5" in msg and "data.datalist_sha256" in msg
    assert "--output_dir" in msg and "--fresh_start True" in msg
    assert (out / "results.json").is_file()  # nothing touched


def test_fresh_start_moves_the_old_run_aside(tmp_path, model):
    datalist = tmp_path / "d.json"
    datalist.write_text("{}")
    out = tmp_path / "run"
    start_run(out, _identity(model, datalist))
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.pt").write_text("old")
    (out / "results.json").write_text('{"old": 1}')
    started = start_run(out, _identity(model, datalist, learning_rate=0.5), fresh_start=True)
    assert started.status == "new" and not (out / "results.json").exists()
    moved = list((out / "previous_runs").iterdir())
    assert len(moved) == 1 and (moved[0] / "checkpoints" / "last.pt").read_text() == "old"
    assert json.loads((moved[0] / "results.json").read_text()) == {"old": 1}


def test_a_run_that_saved_nothing_does_not_block_the_corrected_command(tmp_path, model, capsys):
    """A bad value that stopped the first run before its first checkpoint: the corrected command starts (the
    aborted run's files kept aside); once a checkpoint exists, a change is refused again."""
    datalist = tmp_path / "d.json"
    datalist.write_text("{}")
    out = tmp_path / "run"
    start_run(out, _identity(model, datalist, class_balance="balanced"))
    (out / "checkpoints").mkdir()  # created empty by the checkpoint handler
    started = start_run(out, _identity(model, datalist, class_balance="sampler"))
    assert started.status == "new" and "stopped before saving a checkpoint" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["training"]["class_balance"] == "sampler"
    assert len(list((out / "previous_runs").glob("*/run.json"))) == 1
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "checkpoints" / "last.pt").write_text("epoch 1")
    with pytest.raises(RunMismatchError, match="training.class_balance: 'sampler' -> 'loss'"):
        start_run(out, _identity(model, datalist, class_balance="loss"))


def test_fresh_start_moves_a_checkpoint_folder_outside_the_output_folder(tmp_path, model):
    datalist = tmp_path / "d.json"
    datalist.write_text("{}")
    out, ckpt = tmp_path / "run", tmp_path / "elsewhere" / "ckpt"
    start_run(out, _identity(model, datalist), checkpoint_dir=str(ckpt))
    ckpt.mkdir(parents=True)
    (ckpt / "last.pt").write_text("old")
    with pytest.raises(RunMismatchError):  # the checkpoint there counts as a trained run
        start_run(out, _identity(model, datalist, learning_rate=0.5), checkpoint_dir=str(ckpt))
    start_run(out, _identity(model, datalist, learning_rate=0.5), fresh_start=True, checkpoint_dir=str(ckpt))
    assert not ckpt.exists()  # a new run cannot resume the old last.pt
    assert [p.read_text() for p in (out / "previous_runs").glob("*/checkpoints/last.pt")] == ["old"]


def test_resume_changed_accepts_training_settings_only(tmp_path, model):
    datalist = tmp_path / "d.json"
    datalist.write_text("{}")
    out = tmp_path / "run"
    start_run(out, _identity(model, datalist, learning_rate=1e30))
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.pt").write_text("diverged")
    started = start_run(out, _identity(model, datalist, learning_rate=1e-4), resume_changed=True)
    assert started.status == "resume" and set(started.changed) == {"training.learning_rate"}
    other = build_model(TINY, num_classes=2, num_tokens=3)
    with pytest.raises(RunMismatchError, match="model.num_tokens.*cannot be resumed|cannot be resumed"):
        start_run(out, _identity(other, datalist, learning_rate=1e-4), resume_changed=True)


def test_resume_uses_the_configured_learning_rate_not_the_saved_one(tmp_path, model):
    from monai.optimizers import WarmupCosineSchedule

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt = torch.optim.AdamW(params, lr=0.5)  # far from the configured rate, not blown up (those are never saved)
    sched = WarmupCosineSchedule(opt, warmup_steps=2, t_total=20)
    for _ in range(5):
        opt.step()
        sched.step()
    engine = SimpleNamespace(state=SimpleNamespace(epoch=1, iteration=5))
    ResumableCheckpoint(tmp_path, model, opt, sched).save(engine)
    new_opt = torch.optim.AdamW(params, lr=1e-3)
    new_sched = WarmupCosineSchedule(new_opt, warmup_steps=2, t_total=20)
    ResumableCheckpoint(tmp_path, model, new_opt, new_sched).load(engine)
    assert new_sched.last_epoch == 5 and new_sched.base_lrs == [1e-3]
    assert new_opt.param_groups[0]["lr"] == pytest.approx(1e-3 * new_sched.lr_lambdas[0](5))
    assert new_opt.state_dict()["state"][0]["step"] == 5  # AdamW moments resumed


def _run_guard(losses, lr=0.5, state=None):
    guard = DivergenceGuard(factor=100, learning_rate=lr)
    state = state or SimpleNamespace(epoch=1, iteration=0)
    for loss in losses:
        state.output = [{"loss": torch.tensor(loss), "pred": None}] * 2  # as MONAI's trainer decollates it
        state.iteration += 1
        guard(SimpleNamespace(state=state))
    return state


def test_divergence_and_nan_stop_with_the_resume_command(monkeypatch):
    argv = ["/x/monai/bundle/__main__.py", "run", "training", "--config_file", "b/train.json", "--learning_rate", "0.5"]
    monkeypatch.setattr(sys, "argv", argv)
    _run_guard([1.2, 0.9, 30.0])  # noisy but not diverging
    with pytest.raises(NonFiniteLossError) as err:
        _run_guard([1.2, 5.0, 7e17])
    msg = str(err.value)
    assert "diverged: loss 7e+17 at epoch 1, iteration 3" in msg
    assert msg.endswith("python -m monai.bundle run training --config_file b/train.json --learning_rate 0.001 "
                        "--resume_changed True")  # a tenth of 0.5, capped at the recipe's default
    with pytest.raises(NonFiniteLossError, match="loss is nan"):
        _run_guard([1.0, float("nan")])
    resumed = _run_guard([1.2, 0.9, 30.0])  # a resumed process (another guard) keeps the run's first loss
    resumed.epoch = 2
    with pytest.raises(NonFiniteLossError) as err:
        _run_guard([200.0], state=resumed)
    assert "the checkpoint it resumed from has diverged already" in str(err.value)
    assert str(err.value).endswith("--learning_rate 0.001 --fresh_start True")


def test_a_second_process_cannot_train_into_a_folder_in_use(tmp_path, model, monkeypatch):
    """While one process trains into a folder (it holds the folder's lock), the same command from another process
    stops naming the holder; once the holder ends, however it ends, the folder is free."""
    import subprocess
    import textwrap

    from medpmoe.training import RunInProgressError, release_output_dir
    from tests.conftest import REPO_ROOT

    datalist = tmp_path / "d.json"
    datalist.write_text("{}")
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from medpmoe.training import claim_output_dir
        claim_output_dir(Path({str(out)!r}))
        print("claimed", flush=True)
        time.sleep(60)
        """)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(RunInProgressError, match=rf"{out} is in use: pid {holder.pid} on .* is training into it"):
            start_run(out, _identity(model, datalist))
        assert not (out / "run.json").exists()  # nothing recorded by the refused process
        monkeypatch.setenv("RANK", "1")  # another rank of the holder's torchrun job checks without the lock
        assert start_run(out, _identity(model, datalist)).status == "new"
        monkeypatch.delenv("RANK")
        (out / "run.json").unlink()
    finally:
        holder.kill()  # as abruptly as a crash
        holder.wait()
    assert start_run(out, _identity(model, datalist)).status == "new"
    assert start_run(out, _identity(model, datalist)).status == "resume"  # the same process may check again
    release_output_dir(out)
