"""A run's identity: the training-relevant resolved configuration, checked before an output folder is reused.

`run_identity(...)` gathers what decides a training run's result: the data (datalist and folds file hashes, fold),
the model (`build_model`'s arguments with each expert file's sha256) and the training settings (learning rate,
epochs, seed, ...). `start_run(output_dir, identity, ...)` compares it with the identity recorded in that folder:
a changed configuration stops with the differing keys and the two ways forward, an unchanged finished run is
reported as finished (nothing is trained and no tracking run is made), an unchanged unfinished run resumes.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from medpmoe.files import atomic_write_text, file_sha256

IDENTITY_FILE = "run.json"
#: what a finished run leaves in its output folder; `fresh_start` moves these (and the checkpoints) aside.
RUN_FILES = ("run.json", "results.json", "parameters.json", "split.json", "checkpoints", "mlflow_run.json")


class RunMismatchError(ValueError):
    """The output folder holds a run with another configuration (the message lists the differing keys)."""


class RunInProgressError(RuntimeError):
    """Another process is training into the same output folder."""


LOCK_FILE = ".run.lock"
_locks: dict[Path, object] = {}


def claim_output_dir(out: Path) -> None:
    """Hold `out/.run.lock` (an advisory file lock, freed when this process ends, however it ends) until
    `release_output_dir`: a second process training into the same folder stops with RunInProgressError instead of
    mixing its checkpoints, results and MLflow steps with the first's. Ranks other than 0 of a distributed run and
    systems without `fcntl` take no lock."""
    import os
    import socket

    import torch.distributed as dist

    key = out.resolve()
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if key in _locks or rank != 0:  # torchrun sets RANK before the process group exists
        return
    try:
        import fcntl
    except ImportError:
        return
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_FILE, "a+")  # noqa: SIM115 (held open on purpose)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunInProgressError(f"{out} is in use: {holder} is training into it now; wait for it to finish (a "
                                 "second run into the same folder would mix their results), or train into another "
                                 "--output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _locks[key] = handle


def release_output_dir(out: str | Path) -> None:
    """Free the lock `claim_output_dir` took on `out` (no-op when this process holds none)."""
    handle = _locks.pop(Path(out).resolve(), None)
    if handle is not None:
        handle.close()


def _sha256(path) -> str | None:
    return file_sha256(path) if path and Path(path).is_file() else None


def run_identity(model, datalist: str | None, folds_file: str | None = None, fold: int | None = None,
                 **training) -> dict:
    """{"data": ..., "model": ..., "training": ...}: plain values that decide the run's result.

    `model` is the built network (its `config` records every option and the experts with their files' sha256);
    `training` are the hyperparameters by config key (learning_rate=..., seed=..., ...)."""
    data = {"datalist_sha256": _sha256(datalist), "folds_sha256": _sha256(folds_file),
            "fold": fold if folds_file else None}
    config = model.config.to_dict() if hasattr(model, "config") else {}
    return json.loads(json.dumps({"data": data, "model": config, "training": training}, default=str))


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out or {prefix: []}
    return {prefix: value}


def identity_diff(old: dict, new: dict) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} for every leaf that differs."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


@dataclass
class RunStart:
    """What `start_run` decided: 'new', 'resume' (same or explicitly changed settings) or 'finished'."""

    status: str
    output_dir: Path
    changed: dict

    @property
    def finished(self) -> bool:
        """True when the folder already holds this run, finished: nothing to train."""
        return self.status == "finished"


def _describe(diff: dict, limit: int = 8) -> str:
    lines = [f"  {k}: {old!r} -> {new!r}" for k, (old, new) in list(diff.items())[:limit]]
    if len(diff) > limit:
        lines.append(f"  ... ({len(diff)} keys differ in all)")
    return "\n".join(lines)


def _move_aside(out: Path, checkpoint_dir: Path) -> Path:
    """Move the previous run's files and checkpoints into `previous_runs/<timestamp>/` (nothing is deleted)."""
    dest = out / "previous_runs" / time.strftime("%Y%m%d_%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (out / name).exists():
            shutil.move(str(out / name), str(dest / name))
    if checkpoint_dir.exists():  # a checkpoint folder set outside the output folder
        shutil.move(str(checkpoint_dir), str(dest / "checkpoints"))
    return dest


def _trained_anything(out: Path, checkpoint_dir: Path) -> bool:
    return (out / "results.json").is_file() or (checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()))


def start_run(output_dir: str, identity: dict, fresh_start: bool = False, resume_changed: bool = False,
              checkpoint_dir: str | None = None) -> RunStart:
    """Check `identity` against the run recorded in `output_dir` and record it; see the module docstring. The
    folder is claimed for this process first (`claim_output_dir`): another process training into it stops this one.

    `fresh_start=True` moves an earlier run's files aside and starts over; `resume_changed=True` resumes the
    last checkpoint although training settings changed (e.g. a lower learning rate after a divergence): the data
    and the model must still be the same. `checkpoint_dir` (default `output_dir/checkpoints`): where the run's
    checkpoints are. A recorded run that saved nothing (it stopped before its first checkpoint) is replaced."""
    out = Path(output_dir)
    claim_output_dir(out)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else out / "checkpoints"
    path = out / IDENTITY_FILE
    old = json.loads(path.read_text()) if path.is_file() else None
    status, diff = "new", {}
    if old is not None:
        diff = identity_diff(old, identity)
        if not diff:
            status = "finished" if (out / "results.json").is_file() else "resume"
        elif fresh_start:
            dest = _move_aside(out, ckpt)
            print(f"fresh start: the previous run in {out} was moved to {dest}", flush=True)
        elif not _trained_anything(out, ckpt):  # e.g. a bad value stopped it: nothing to protect
            dest = _move_aside(out, ckpt)
            print(f"the earlier run in {out} stopped before saving a checkpoint (its files: {dest}); starting with "
                  "these settings:\n" + _describe(diff), flush=True)
        elif resume_changed and all(k.startswith("training.") for k in diff):
            status = "resume"
            (out / "results.json").unlink(missing_ok=True)
            print("resuming with changed settings:\n" + _describe(diff), flush=True)
        else:
            how = ("the data or the model changed, so the checkpoint cannot be resumed; "
                   if resume_changed else "")
            raise RunMismatchError(
                f"{out} holds a run with another configuration ({how}differing keys, recorded -> now):\n"
                f"{_describe(diff)}\nEither train into a new folder (--output_dir <new folder>) or start over here "
                f"with --fresh_start True (the previous run's files are moved to {out / 'previous_runs'}/)")
    elif fresh_start and (any((out / n).exists() for n in RUN_FILES) or ckpt.exists()):
        _move_aside(out, ckpt)
    if status != "finished":
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(identity, indent=1))
    return RunStart(status, out, diff)
