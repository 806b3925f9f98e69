"""Prompt-only checkpoints (kilobytes, refused on a mismatched backbone), atomic writes, and resumable training."""

from __future__ import annotations

import logging
import math
import numbers
import os
from pathlib import Path

import torch
from torch import nn

from medpmoe.files import atomic_torch_save

logger = logging.getLogger(__name__)
FORMAT = "medpmoe-prompt-checkpoint/1"
#: what a resume takes from the checkpoint's LR scheduler: its position; the rest (length, warm-up, ...) is the
#: current configuration's
_SCHEDULER_POSITION = frozenset({"optimizer", "lr_lambdas", "base_lrs", "last_epoch", "_step_count", "_last_lr",
                                 "_get_lr_called_within_step", "_is_initial", "verbose"})


class CheckpointMismatchError(ValueError):
    """A prompt checkpoint does not fit the model (other experts, missing or unexpected keys)."""


def expert_signature(model: nn.Module) -> list[dict]:
    """What identifies each expert: name, geometry and the checkpoint file's sha256 where known."""
    return [
        {
            "name": e.name,
            "embed_dim": e.embed_dim,
            "depth": e.depth,
            "patch_size": e.patch_size,
            "img_size": e.img_size,
            "checkpoint_sha256": getattr(e, "checkpoint_sha256", None),
        }
        for e in model.experts
    ]


def save_prompt_checkpoint(path: str | os.PathLike, model: nn.Module, **metadata) -> Path:
    """Write the trainable state and the experts' signature atomically; `metadata` holds plain config values."""
    payload = {
        "format": FORMAT,
        "state_dict": model.trainable_state_dict(),
        "experts": expert_signature(model),
        "model_config": model.config.to_dict() if hasattr(model, "config") else None,
        "metadata": metadata,
    }
    return atomic_torch_save(payload, path)


def read_prompt_checkpoint(path: str | os.PathLike) -> dict:
    """The raw payload of a prompt checkpoint (`weights_only=True`); errors name the file."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # unpickling refused, truncated file, ...
        raise CheckpointMismatchError(f"{path}: not a readable medpmoe checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path}: not a medpmoe prompt checkpoint (format {payload.get('format')!r})")
    return payload


def load_prompt_checkpoint(path: str | os.PathLike, model: nn.Module) -> dict:
    """Load a prompt checkpoint into `model` (weights_only=True); refuse other experts or mismatched keys.

    Returns the checkpoint's metadata.
    """
    payload = read_prompt_checkpoint(path)
    ours, theirs = expert_signature(model), payload["experts"]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        diffs = [k for k in a if a[k] != b.get(k) and not (k == "checkpoint_sha256" and None in (a[k], b.get(k)))]
        if diffs:
            raise CheckpointMismatchError(
                f"{path}: expert {i} differs in {diffs}: checkpoint has {b}, model has {a}"
            )
    if len(ours) != len(theirs):
        raise CheckpointMismatchError(f"{path}: trained with {len(theirs)} experts, model has {len(ours)}")
    expected = set(model.trainable_state_dict())
    got = set(payload["state_dict"])
    if expected != got:
        raise CheckpointMismatchError(
            f"{path}: missing keys {sorted(expected - got)[:5]}, unexpected keys {sorted(got - expected)[:5]}"
        )
    try:
        model.load_state_dict(payload["state_dict"], strict=False)
    except RuntimeError as err:
        raise CheckpointMismatchError(f"{path}: {err}") from err
    return payload["metadata"]


#: how an equal key metric is decided, by the key metric's name without its split prefix (`val_`): classification
#: (ROC-AUC) by the lower validation loss (`<split>_loss`, cross-entropy of the probabilities), segmentation (mIoU
#: incl. background) by the higher foreground Dice (`<split>_mean_dice`)
TIE_BREAKS = {"auc": ("loss", "min"), "mean_iou": ("mean_dice", "max")}


def tie_break(metric_name: str | None) -> tuple[str, str] | None:
    """(metric name, 'min' or 'max') that breaks ties in `metric_name` (`TIE_BREAKS`), or None."""
    if not metric_name or "_" not in metric_name:
        return None
    split, _, kind = metric_name.partition("_")
    found = TIE_BREAKS.get(kind)
    return (f"{split}_{found[0]}", found[1]) if found else None


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The scalar (number or one-element tensor) entries of an engine's metrics, as floats."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            out[str(k)] = float(v)
    return out


class ResumableCheckpoint:
    """Ignite handler: after each epoch write `last.pt` (trainable state, optimizer, scheduler, engine counters)
    and `best.pt` when the validation metric improves (an equal one with a better `tie_break` metric counts; its
    metadata keeps every validation metric of that epoch); at start, resume from `last.pt` when it exists.

    A killed run re-started with the same config continues from the last completed epoch and ends with the same
    number of iterations as an uninterrupted run. (ignite's `Checkpoint` + `DiskSaver(atomic=True)` is not used: with
    a fixed file name it deletes the previous `last.pt` before writing the new one, so a kill between the two
    leaves nothing to resume; here the new file replaces the old one in a single `os.replace`. MONAI's
    `CheckpointLoader` loads strictly into the whole network, which a prompt-only file cannot satisfy.)
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler=None,
        evaluator=None,
        metric_name: str | None = None,
        resume: bool = True,
        metadata: dict | None = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.evaluator, self.metric_name = evaluator, metric_name
        self.resume = resume
        self.metadata = metadata or {}
        self.best = float("-inf")
        self.best_tie: float | None = None  # the tie-break metric's value at the best epoch

    @property
    def last_path(self) -> Path:
        """Where the resumable state is written."""
        return self.save_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        """Where the best prompt checkpoint is written."""
        return self.save_dir / "best.pt"

    def attach(self, engine) -> None:
        """Register on the trainer's STARTED and EPOCH_COMPLETED events."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def load(self, engine) -> None:
        """Resume model, optimizer, scheduler and engine counters from `last.pt`, if present; a checkpoint whose
        values are non-finite or blown up stops the run with NonFiniteLossError saying to start over."""
        if not (self.resume and self.last_path.exists()):
            return
        extra = read_prompt_checkpoint(self.last_path)["metadata"]["resume"]
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        base_lrs = list(getattr(self.lr_scheduler, "base_lrs", []))
        schedule = {k: v for k, v in vars(self.lr_scheduler).items() if k not in _SCHEDULER_POSITION} \
            if self.lr_scheduler is not None else {}
        self._refuse_diverged(extra, base_lrs)
        self._refuse_fewer_epochs(engine, extra["epoch"])
        load_prompt_checkpoint(self.last_path, self.model)
        self.optimizer.load_state_dict(extra["optimizer"])
        # "as if these settings had been used from the start": the steps an epoch takes now (batch_size) times the
        # epochs done; the same as recorded when nothing changed
        epoch_length = getattr(engine.state, "epoch_length", None)
        iteration = extra["epoch"] * epoch_length if epoch_length else extra["iteration"]
        if self.lr_scheduler is not None and extra.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
            vars(self.lr_scheduler).update(schedule)  # length, warm-up, ... as configured now (num_epochs, ...)
            if hasattr(self.lr_scheduler, "last_epoch"):
                self.lr_scheduler.last_epoch = iteration  # the recipe steps its scheduler once per iteration
        self._apply_configured_hyperparameters(configured, base_lrs)
        engine.state.epoch = extra["epoch"]
        engine.state.iteration = iteration
        if extra.get("first_loss") is not None:  # DivergenceGuard's baseline: the run's own first loss
            engine.state.first_loss = extra["first_loss"]
        self.best = extra.get("best", float("-inf"))
        self.best_tie = extra.get("best_tie")
        logger.info("resumed from %s at epoch %d, iteration %d", self.last_path, extra["epoch"], extra["iteration"])

    def _refuse_diverged(self, extra: dict, base_lrs: list[float]) -> None:
        """NonFiniteLossError when `last.pt` holds non-finite or blown-up values (weights or optimizer moments): a
        resume from it diverges again whatever the learning rate, so the message says to start over, with a rate
        below the one the checkpoint trained with."""
        from medpmoe.training.guards import NonFiniteLossError, diverged_values, divergence_message, lower_learning_rate

        state = read_prompt_checkpoint(self.last_path)["state_dict"]
        moments = {f"optimizer state {k}.{n}": v for k, s in extra["optimizer"].get("state", {}).items()
                   for n, v in s.items() if n != "step"}
        bad = diverged_values(state) or diverged_values(moments, limit=float("inf"))
        if bad is None:
            return
        groups = extra["optimizer"].get("param_groups") or [{}]
        trained = groups[0].get("initial_lr", groups[0].get("lr"))
        rate = lower_learning_rate(trained)  # below the rate it diverged at, or what is configured now if lower
        rate = min(rate, base_lrs[0]) if base_lrs and base_lrs[0] else rate
        raise NonFiniteLossError(divergence_message(
            f"{self.last_path} (epoch {extra.get('epoch')}) holds diverged values ({bad})", checkpoint_diverged=True,
            suggested=rate))

    @staticmethod
    def _refuse_fewer_epochs(engine, done: int) -> None:
        """RunMismatchError naming `num_epochs` when fewer epochs are configured than the checkpoint has trained
        (no schedule of that length passes through the checkpoint's position)."""
        from medpmoe.training.run_identity import RunMismatchError

        wanted = getattr(engine.state, "max_epochs", None)
        if wanted is not None and wanted < done:
            raise RunMismatchError(f"config key 'num_epochs' is {wanted} but the checkpoint to resume has trained "
                                   f"{done} epochs already: pass --num_epochs {done} or more, or start over with "
                                   "--fresh_start True")

    def _apply_configured_hyperparameters(self, configured: list[dict], base_lrs: list[float]) -> None:
        """Keep the optimizer state (moments, step) but the hyperparameters of the current configuration, so a
        resume with a changed learning rate (`resume_changed`) trains with it from its first step."""
        for group, now in zip(self.optimizer.param_groups, configured):
            group.update({k: v for k, v in now.items() if k != "lr"})
            group["lr"] = now["lr"]
        sched = self.lr_scheduler
        if sched is not None and base_lrs:
            sched.base_lrs = base_lrs
            for group, base in zip(self.optimizer.param_groups, base_lrs):
                group["initial_lr"] = base
            lambdas = getattr(sched, "lr_lambdas", None)
            if lambdas is not None:  # LambdaLR family (MONAI's WarmupCosineSchedule): the lr for the current step
                for group, base, fn in zip(self.optimizer.param_groups, base_lrs, lambdas):
                    group["lr"] = base * fn(sched.last_epoch)
                sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _better(self, metric: float, metrics: dict) -> bool:
        """True when this epoch beats the best so far: a higher key metric, or an equal one (within 1e-12) and a
        better tie-break metric (`tie_break`)."""
        if metric > self.best + 1e-12:
            return True
        tie = tie_break(self.metric_name)
        if not tie or abs(metric - self.best) > 1e-12 or metrics.get(tie[0]) is None:
            return False
        value = metrics[tie[0]]
        if self.best_tie is None:
            return math.isfinite(value)
        return value < self.best_tie if tie[1] == "min" else value > self.best_tie

    def save(self, engine) -> None:
        """Write `best.pt` on improvement and `last.pt` every epoch, both atomically; weights that have diverged
        (non-finite, or blown up) are never written: NonFiniteLossError, the previous epoch's checkpoint is kept. Under
        torch.distributed only rank 0 writes (every rank still loads `last.pt` to resume)."""
        from medpmoe.training.guards import NonFiniteLossError, diverged_values, divergence_message

        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        bad = diverged_values(self.model.trainable_state_dict())
        if bad is not None:
            lr = [g.get("initial_lr", g.get("lr")) for g in self.optimizer.param_groups][0]
            raise NonFiniteLossError(divergence_message(
                f"the trainable values diverged in epoch {engine.state.epoch} ({bad})", lr, engine.state.epoch - 1))
        metrics = scalar_metrics(self.evaluator.state.metrics) if self.evaluator is not None else {}
        metric = metrics.get(self.metric_name) if self.metric_name else None
        if metric is not None and self._better(metric, metrics):
            self.best = metric
            tie = tie_break(self.metric_name)
            self.best_tie = metrics.get(tie[0]) if tie else None
            save_prompt_checkpoint(self.best_path, self.model, epoch=engine.state.epoch, metric=self.best,
                                   metrics=metrics, **self.metadata)
        resume = {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
            "best": self.best,
            "best_tie": self.best_tie,
            "first_loss": getattr(engine.state, "first_loss", None),
        }
        save_prompt_checkpoint(self.last_path, self.model, resume=resume, **self.metadata)


def best_metrics(meta: dict, metric_name: str) -> dict[str, float]:
    """{'best_epoch', 'best_<name>' ...}: every validation metric of a best checkpoint's epoch, from its metadata
    (`metrics`; older checkpoints hold the key metric only)."""
    values = dict(meta.get("metrics") or {})
    if meta.get("metric") is not None:
        values.setdefault(metric_name, float(meta["metric"]))
    out = {"best_epoch": int(meta.get("epoch") or 0)}
    out.update({f"best_{k}": float(v) for k, v in values.items()})
    return out
