"""Training pieces MONAI does not provide: prompt-only checkpoints, resumable state, aux-loss and NaN guards."""

from medpmoe.training.checkpoint import (
    CheckpointMismatchError,
    ResumableCheckpoint,
    atomic_torch_save,
    load_prompt_checkpoint,
    save_prompt_checkpoint,
)
from medpmoe.training.grad_clip import with_grad_clip
from medpmoe.training.guards import DivergenceGuard, NonFiniteLossError
from medpmoe.training.losses import WithAuxLoss, trainable_parameters
from medpmoe.training.run_identity import (
    RunInProgressError, RunMismatchError, claim_output_dir, release_output_dir, run_identity, start_run,
)
from medpmoe.training.seeding import EpochSeed

__all__ = [
    "CheckpointMismatchError",
    "DivergenceGuard",
    "EpochSeed",
    "NonFiniteLossError",
    "ResumableCheckpoint",
    "RunInProgressError",
    "RunMismatchError",
    "WithAuxLoss",
    "atomic_torch_save",
    "claim_output_dir",
    "load_prompt_checkpoint",
    "release_output_dir",
    "run_identity",
    "save_prompt_checkpoint",
    "start_run",
    "trainable_parameters",
    "with_grad_clip",
]
