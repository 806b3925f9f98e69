"""Models: K frozen experts + a prompt method (+ a dispatcher under pMoE) + a task head."""

from medpmoe.models.factory import build_model, resolve_prompt_blocks
from medpmoe.models.fast import ddp_ignore_executor, execution_path, use_fast_path
from medpmoe.models.loading import ModelLoadError, describe_model, load_model
from medpmoe.models.pmoe import PMoEModel

__all__ = [
    "ModelLoadError", "PMoEModel", "build_model", "ddp_ignore_executor", "describe_model", "execution_path", "load_model",
    "resolve_prompt_blocks", "use_fast_path",
]
