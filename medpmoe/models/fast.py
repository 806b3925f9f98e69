"""Switching PMoEModel's fast execution on: executor, autocast, compile (with CUDA graphs), FP8, caching.

`accelerate(model, FastConfig(...))` sets everything in place (state-dict keys unchanged). Only `fp8=True`
changes the numbers beyond float rounding; see docs/performance.md for what each setting gains.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Attention
from torch import nn

from medpmoe.models.executor import BatchedExecutor, unsupported_reason

AMP_DTYPES = {None: None, "none": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: torch.compile modes; "reduce-overhead" and "max-autotune" add CUDA graphs on CUDA
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class FastConfig:
    """Which fast paths to switch on (all but `fp8` keep the maths of the plain path)."""

    amp: str | None = None  #: autocast dtype inside the model: None/"fp32", "bf16" or "fp16"
    batched_experts: bool = True  #: run K same-architecture frozen experts through `BatchedExecutor`
    in_place_prompts: bool = True  #: executor: write prompt slots into the token buffer in place (no per-layer cat)
    fused_dispatcher: bool = True  #: executor: the MLP dispatcher on stacked tensors
    fp8: bool = False  #: executor: frozen expert weights in FP8 (Hopper/Ada; changes numbers by FP8 rounding)
    compile: bool | str = False  #: torch.compile the model: True/"default", "reduce-overhead", "max-autotune"
    fullgraph: bool = False  #: with compile: fail on any graph break instead of splitting the graph
    channels_last: bool = False  #: feed the patch-embedding convolution channels-last images
    prefix_cache: int = 0  #: LRU size for frozen outputs before the first prompt block, keyed by sample id; 0 = off


def _hashable(ids) -> list:
    """Sample ids as hashable values (a tensor of ids, as a collated batch gives, becomes a list)."""
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


class PrefixCache:
    """LRU of frozen tokens before the first prompt block, keyed by (sample id, expert index).

    Valid only when a sample id always maps to the same input image (no random augmentation before the model)
    and the experts are frozen; tensors are stored detached on the device they were computed on.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._store: OrderedDict[tuple[Hashable, int], torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, ids: Sequence[Hashable], k: int) -> torch.Tensor | None:
        """Stacked cached tokens (B, T, D) for these ids, or None unless every id is cached."""
        keys = [(i, k) for i in _hashable(ids)]
        if not all(key in self._store for key in keys):
            self.misses += 1
            return None
        self.hits += 1
        for key in keys:
            self._store.move_to_end(key)
        return torch.stack([self._store[key] for key in keys])

    def put(self, ids: Sequence[Hashable], k: int, tokens: torch.Tensor) -> None:
        """Store one expert's tokens (B, T, D) under the batch's sample ids, evicting the least recent."""
        for i, t in zip(_hashable(ids), tokens.detach()):
            self._store[(i, k)] = t.clone()
            self._store.move_to_end((i, k))
        while len(self._store) > self.maxsize:
            self._store.popitem(last=False)


def compile_mode(value: bool | str | None) -> str | None:
    """FastConfig.compile as a torch.compile mode (None = no compile)."""
    if value in (None, False):
        return None
    mode = "default" if value is True else str(value)
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be True/False or one of {COMPILE_MODES}, got {value!r}")
    return mode


def accelerate(model: nn.Module, config: FastConfig | None = None, **overrides) -> nn.Module:
    """Switch on the fast paths of a PMoEModel in place (config or keyword overrides) and return it.

    With `batched_experts` the model delegates its prompted forward to a `BatchedExecutor` when its experts
    allow it (`model.executor`; None, with the plain per-expert loop, otherwise: see `executor_reason`)."""
    cfg = FastConfig(**{**(config.__dict__ if config else {}), **overrides})
    if cfg.amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(k for k in AMP_DTYPES if k)} or None, got {cfg.amp!r}")
    mode = compile_mode(cfg.compile)
    model.amp_dtype = AMP_DTYPES[cfg.amp]
    for e in model.experts:
        for m in e.modules():  # timm's fused attention (F.scaled_dot_product_attention): same maths, flash kernels
            if isinstance(m, Attention):
                m.fused_attn = True
        if cfg.channels_last:
            e.vit.patch_embed.proj.to(memory_format=torch.channels_last)
    reason = unsupported_reason(model) if cfg.batched_experts else "batched_experts=False"
    if cfg.fp8 and reason is not None:
        raise ValueError(f"fp8 expert weights need the batched executor, which cannot run here: {reason}")
    if model.executor is not None:
        model.executor.release(model)
    model.executor = None
    if reason is None:
        model.executor = BatchedExecutor(
            model, mm_dtype=model.amp_dtype, fp8=cfg.fp8, in_place_prompts=cfg.in_place_prompts,
            fused_dispatcher=cfg.fused_dispatcher,
        )
    model.executor_reason = reason
    model.channels_last = cfg.channels_last
    model.prefix_cache = PrefixCache(cfg.prefix_cache) if cfg.prefix_cache > 0 else None
    if mode is not None:
        model.compile(mode=mode, fullgraph=cfg.fullgraph)
    return model


def loader_kwargs(device: str | torch.device, num_workers: int = 4) -> dict:
    """DataLoader settings for a fast input pipeline: pinned memory on CUDA, persistent prefetching workers."""
    cuda = torch.device(device).type == "cuda"
    kw: dict = {"num_workers": num_workers, "pin_memory": cuda}
    if num_workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=4)
    return kw


def to_device(batch, device: str | torch.device):
    """Move tensors (nested in dicts/lists/tuples) to `device` with non_blocking copies from pinned memory."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def use_fast_path(model: nn.Module, amp: bool = False, enabled: bool = True) -> nn.Module:
    """What the bundles call on their network: the batched executor whenever `unsupported_reason` allows it, its
    frozen expert matmul weights in the compute dtype (bf16 when `amp` on CUDA, else the weights' own), the plain
    loop otherwise (`model.executor_reason` says why); `enabled=False` (config key 'fast_path') keeps the plain
    loop. Nothing saved changes: the executor's stacked weights are non-persistent buffers."""
    if not enabled:
        if model.executor is not None:
            model.executor.release(model)
        model.executor, model.executor_reason = None, "config key 'fast_path' is false"
        return model
    cuda = next(model.parameters()).device.type == "cuda"
    return accelerate(model, FastConfig(amp="bf16" if amp and cuda else None))


def execution_path(model: nn.Module) -> str:
    """Which path a model's prompted forward runs, in words: the batched executor (and its weight dtype) or the
    plain per-expert loop and why (a DistributedDataParallel wrapper is looked through)."""
    model = getattr(model, "module", model)
    executor = getattr(model, "executor", None)
    if executor is not None:
        dtype = "fp8" if executor.fp8 else str(executor.mm_dtype).removeprefix("torch.")
        return f"batched executor ({dtype} expert weights)"
    return f"plain loop ({getattr(model, 'executor_reason', None) or 'not accelerated'})"


def ddp_ignore_executor(model: nn.Module) -> nn.Module:
    """Tell DistributedDataParallel not to broadcast the executor's stacked expert weights (derived, identical on
    every rank: broadcasting them each step would move every frozen weight again); returns the model."""
    from torch.nn.parallel import DistributedDataParallel

    names = [f"executor.{n}" for n, _ in model.executor.named_buffers()] if model.executor is not None else []
    if names:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return model
