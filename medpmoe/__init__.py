"""medpmoe: prompt-based mixtures of frozen ViT experts for medical imaging (pMoE, VPT, GaPT, LSPT, VAPT)."""

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "bundle", "crossval", "cv", "data", "demo", "dispatch", "experts", "export", "heads", "inference", "models",
    "params", "pretrain", "prompts", "routing", "tracking", "training",
}


def __getattr__(name: str):
    """Import submodules on first access, so `$import medpmoe` in a bundle config reaches `medpmoe.models`; the
    user-facing functions `load_model`, `predict` (and `build_model`) likewise."""
    if name in _SUBMODULES:
        return importlib.import_module(f"medpmoe.{name}")
    if name in ("build_model", "load_model"):
        return getattr(importlib.import_module("medpmoe.models"), name)
    if name == "predict":
        return importlib.import_module("medpmoe.inference").predict
    raise AttributeError(f"module 'medpmoe' has no attribute {name!r}")
