"""Divergence is an error: stop a run whose loss is NaN/inf or has grown by orders of magnitude, saying what to run."""

from __future__ import annotations

import math
import shlex
import sys


#: the recipe's learning rate (configs/train.json): the highest rate a diverged run is advised to go on with
DEFAULT_LEARNING_RATE = 1e-3
#: a trainable value (prompt, head weight) above this magnitude has blown up: AdamW moves a value by about the
#: learning rate per step, so no stable run gets there
BLOWN_UP = 1e4


class NonFiniteLossError(FloatingPointError):
    """The training loss is NaN or infinite, or has grown by orders of magnitude over its first value."""


def lower_learning_rate(learning_rate: float | None) -> float:
    """The rate to go on with after a divergence at `learning_rate`: a tenth of it, and never above the recipe's
    default (a run diverging at 1e6 is pointed at 1e-3 at once, not at 1e5); the default when it is unknown."""
    if not learning_rate or not math.isfinite(learning_rate) or learning_rate <= 0:
        return DEFAULT_LEARNING_RATE
    return float(f"{min(learning_rate / 10, DEFAULT_LEARNING_RATE):.3g}")


def configured_learning_rate() -> float | None:
    """The running bundle's `learning_rate` (None outside a bundle)."""
    from medpmoe.bundle.config_check import _running_parser

    parser = _running_parser()
    try:
        value = parser.get_parsed_content("learning_rate") if parser is not None and "learning_rate" in parser else None
        return float(value) if value is not None else None
    except Exception:  # noqa: BLE001 (only used to word an error message)
        return None


def diverged_values(tensors: dict, limit: float = BLOWN_UP) -> str | None:
    """None when every tensor in `tensors` (name -> tensor) is finite and below `limit` in magnitude, else which
    one is not ('prompts.0: NaN' or 'head.weight: |value| up to 5e+29')."""
    import torch

    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        t = t.detach()
        if not torch.isfinite(t).all():
            return f"{name}: non-finite values (NaN or inf)"
        peak = float(t.abs().max())
        if peak > limit:
            return f"{name}: |value| up to {peak:.3g}"
    return None


def rerun_command(**overrides) -> str:
    """This process's command line with `--key value` overrides replaced or appended (how to resume it)."""
    argv = list(sys.argv)
    if argv and argv[0].replace("\\", "/").endswith("monai/bundle/__main__.py"):
        head = ["python", "-m", "monai.bundle"]
    elif argv and argv[0].replace("\\", "/").endswith("medpmoe/crossval/__main__.py"):
        head = ["python", "-m", "medpmoe.crossval"]
    else:
        return " ".join(f"--{k} {v}" for k, v in overrides.items())
    args, i = [], 1
    while i < len(argv):
        key = argv[i][2:] if argv[i].startswith("--") else None
        if key in overrides:
            i += 2
            continue
        args.append(argv[i])
        i += 1
    args += [x for k, v in overrides.items() for x in (f"--{k}", str(v))]
    return " ".join(shlex.quote(a) for a in head + args)


def divergence_message(problem: str, learning_rate: float | None = None, epochs_done: int | None = None,
                       checkpoint_diverged: bool = False, suggested: float | None = None) -> str:
    """The error text: what happened, what is kept (the last completed epoch's checkpoint, nothing before the first
    epoch ends, or a checkpoint that has itself diverged; `epochs_done` None: not known here) and the exact command
    to go on, runnable as printed (`learning_rate`: the rate that diverged, default the running bundle's; the
    command names `lower_learning_rate` of it, or `suggested`). `checkpoint_diverged`: the checkpoint resumed from
    has diverged itself, so the command starts over (`--fresh_start True`)."""
    lower = f"{suggested or lower_learning_rate(learning_rate or configured_learning_rate()):g}"
    if checkpoint_diverged:
        command = rerun_command(learning_rate=lower, fresh_start="True")
        return (f"{problem}: the checkpoint it resumed from has diverged already, so resuming cannot help. Start over "
                f"with a lower learning rate (the earlier run is kept in previous_runs/) with: {command}")
    command = rerun_command(learning_rate=lower, resume_changed="True")
    if epochs_done is None:
        kept = ("The checkpoint of the last completed epoch, if one completed, is kept; lower the learning rate and "
                "go on")
    elif epochs_done:
        kept = "The checkpoint of the last completed epoch is kept; lower the learning rate and resume it"
    else:
        kept = "No epoch completed, so nothing was saved; lower the learning rate and start again"
    return f"{problem}. {kept} with: {command}"


def _loss_of(output):
    """The loss in a trainer's output: MONAI decollates it into a list of per-item dicts sharing one 'loss'."""
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], dict):
        output = output[0]
    return output["loss"] if isinstance(output, dict) else output


class DivergenceGuard:
    """Ignite handler on a trainer: after every iteration, stop with `NonFiniteLossError` when the loss is NaN/inf
    or larger than `factor` times the run's first loss (a diverging run must not end with exit code 0). The first
    loss is kept in `engine.state.first_loss`, which `ResumableCheckpoint` saves and restores, so a resumed run is
    measured against the run's own start, and a checkpoint that has diverged already is caught at once."""

    def __init__(self, factor: float = 100.0, learning_rate: float | None = None, output_transform=None) -> None:
        """`output_transform` reads the loss from the engine's output; default: the 'loss' of MONAI's (decollated)
        trainer output, or the output itself."""
        self.factor, self.learning_rate = factor, learning_rate
        self.output_transform = output_transform or _loss_of
        self.checked = 0  # iterations checked by this process

    def attach(self, engine) -> None:
        """Register on the engine's ITERATION_COMPLETED event."""
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        """Check this iteration's loss."""
        state = engine.state
        loss = float(self.output_transform(state.output))
        where = f"at epoch {state.epoch}, iteration {state.iteration}"
        first = getattr(state, "first_loss", None)
        resumed = self.checked == 0 and state.epoch > 1  # the first step after a resume: the checkpoint is to blame
        after = ", at the first step after resuming" if resumed else ""
        if not math.isfinite(loss):
            raise NonFiniteLossError(divergence_message(f"training loss is {loss} {where}{after}", self.learning_rate,
                                                        state.epoch - 1, checkpoint_diverged=resumed))
        if first is None:
            state.first_loss = abs(loss)
        elif first > 0 and abs(loss) > self.factor * first:
            resumed = self.checked == 0  # a first loss is known at the first step only when it was restored
            raise NonFiniteLossError(divergence_message(
                f"training diverged: loss {loss:.3g} {where} is over {self.factor:g}x the run's first loss "
                f"{first:.3g}" + (", at the first step after resuming" if resumed else ""), self.learning_rate,
                state.epoch - 1, checkpoint_diverged=resumed))
        self.checked += 1
