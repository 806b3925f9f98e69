"""Build a PMoEModel from plain config values (what bundles and notebooks call)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence

from torch import nn

from medpmoe.dispatch import DISPATCHERS, build_dispatcher
from medpmoe.experts import Expert, ExpertCheckpointError
from medpmoe.experts.registry import build_expert
from medpmoe.heads import LinearHead, SETRPUPHead, setr_aux_blocks, setr_aux_heads
from medpmoe.heads.setr_pup import SETR_AUX_FRACTIONS
from medpmoe.models.blocks import temperature_unsupported_reason
from medpmoe.models.config import ModelConfig, resolve_options
from medpmoe.models.pmoe import PMoEModel
from medpmoe.prompts import METHODS, build_method, canonical_method_name, default_prompt_dropout, method_needs_grid

PromptLayerSpec = int | Sequence[int] | Sequence[float] | None
AuxLayerSpec = bool | Sequence[int] | Sequence[float] | None

#: Baselines through the same model: no prompts and no dispatcher; full fine-tuning also trains the experts.
BASELINES = ("linear_probe", "full_finetune")
#: What to use instead when a shallow method (prompts at the first prompt layer only) is asked for under pMoE.
DEEP_FOR_PMOE = {"vpt_shallow": "method='vpt_deep' with prompt_layers=1 (VPT-shallow + pMoE, exactly)",
                 "gapt": "method='gapt_deep'"}


def spread_blocks(layers: int, depth: int) -> list[int]:
    """`layers` prompt blocks spread evenly over `depth` blocks: block floor(i * depth / layers) for i < layers
    (every block when layers == depth; every second block of a 24-block expert beside 12-block ones)."""
    return [i * depth // layers for i in range(layers)]


def resolve_all_prompt_blocks(spec: PromptLayerSpec, depths: Sequence[int]) -> list[list[int]]:
    """Prompt blocks of every expert. `None` (the default): as many prompt layers as the shallowest expert has
    blocks, every block of the shallowest, spread evenly over deeper ones (`spread_blocks`), so experts of
    different depths get one count; otherwise `resolve_prompt_blocks` per expert."""
    if spec is None:
        layers = min(depths)
        return [spread_blocks(layers, d) for d in depths]
    return [resolve_prompt_blocks(spec, d) for d in depths]


def resolve_prompt_blocks(spec: PromptLayerSpec, depth: int) -> list[int]:
    """Block indices that get prompts: None = every block, n = the first n blocks, a list of block indices,
    or a list of fractions in [0, 1) of the depth (for experts of different depths)."""
    if spec is None:
        return list(range(depth))
    if isinstance(spec, int):
        if not 1 <= spec <= depth:
            raise ValueError(f"prompt_layers={spec} must be between 1 and the expert depth {depth}")
        return list(range(spec))
    spec = list(spec)
    if all(isinstance(s, float) for s in spec):
        if not all(0.0 <= s < 1.0 for s in spec):
            raise ValueError(f"fractional prompt_layers must lie in [0, 1), got {spec}")
        blocks = [int(s * depth) for s in spec]
    else:
        blocks = [int(s) for s in spec]
    if blocks != sorted(set(blocks)) or not all(0 <= b < depth for b in blocks):
        raise ValueError(f"prompt_layers {spec} give blocks {blocks}: need distinct increasing indices < {depth}")
    return blocks


def build_model(
    experts: Sequence[Expert | Mapping],
    task: str = "classification",
    num_classes: int = 2,
    method: str = "vpt",
    moe: bool = True,
    num_tokens: int = 10,
    prompt_layers: PromptLayerSpec = None,
    dispatcher: str = "mlp",
    shared_dim: int | None = None,
    prompt_dropout: float | None = None,
    method_kwargs: Mapping | None = None,
    dispatcher_kwargs: Mapping | None = None,
    head_kwargs: Mapping | None = None,
    aux_layers: AuxLayerSpec = None,
    aux_head_kwargs: Mapping | None = None,
    pool_prompts: bool = False,
) -> PMoEModel:
    """Experts (built or as config dicts for `build_expert`) + method + optional pMoE dispatcher + head.

    `moe=True` with K >= 2 experts adds the dispatcher; with one expert pMoE reduces to the method itself
    (softmax over one expert is 1) so none is built. Method names: see `medpmoe.prompts.METHODS`, plus the
    baselines `method="linear_probe"` (Np = 0, no dispatcher: only the head trains) and
    `method="full_finetune"` (Np = 0, no dispatcher, every expert weight trains; the experts are unfrozen in place).
    `prompt_layers=None` prompts every block when the experts have one depth; with different depths, every block
    of the shallowest expert and as many blocks spread evenly over each deeper one (`spread_blocks`: a 24-block
    expert beside 12-block ones gets blocks 0, 2, ..., 22); an int, fractions or block indices override it.
    GaPT's attention temperature (on by default) is switched off, with a warning and a line in `model.notices`,
    only for an expert whose blocks cannot take it (neither timm ViT nor SAM-family blocks).
    `prompt_dropout=None` takes the method's authors' value (`medpmoe.prompts.default_prompt_dropout`: VPT-deep 0.1,
    VPT-shallow 0.0, ...); a number given here is used as is.

    Segmentation: `aux_layers` adds SETR-PUP's auxiliary heads (training only; their logits land in
    `model.aux_logits` and `medpmoe.training.WithAuxLoss(..., aux_head_weight=0.4)` adds their loss): True =
    SETR's 4 blocks scaled to each expert's depth (`medpmoe.heads.setr_aux_blocks`: ViT-B 4, 7, 9, 11; ViT-L 9,
    14, 19, 23; experts too shallow for 4 distinct blocks keep their last ones, one count for all), a list of
    fractions in (0, 1) of each expert's depth, or a list of block indices; `aux_head_kwargs` (channels: the
    main head's, default 256; norm; variant: 'mmseg' two conv stages, default, or 'setr' the SETR authors' one).
    `pool_prompts=True` (classification): mean-pooling (MAE) experts pool
    prompt and patch tokens before their final norm, as VPT's and GaPT's MAE code.
    """
    return build_from_config(ModelConfig(**locals()))


#: What the factory passes to each component itself (so they are not user options).
METHOD_ARGS = ("num_tokens", "num_layers", "expert_dim", "shared_dim", "patch_size", "dropout", "grid_size",
               "block_range")
DISPATCHER_ARGS = ("num_experts", "num_layers", "shared_dim", "expert_dims")
HEAD_ARGS = ("in_channels", "in_features", "num_classes", "count")


def build_from_config(config: ModelConfig) -> PMoEModel:
    """The model a `ModelConfig` describes; `model.config` is the config with every option resolved (method name
    canonical, prompt dropout and each component's options with their values), as prompt checkpoints save it."""
    c = dataclasses.replace(config, method=canonical_method_name(config.method, warn=True))
    built = [e if isinstance(e, Expert) else build_recorded_expert(e) for e in c.experts]
    if not built:
        raise ValueError("build_model needs at least one expert")
    method, num_tokens, moe = c.method, c.num_tokens, c.moe
    if method in BASELINES:
        if method == "full_finetune":
            for e in built:
                e.trainable = True
                e.requires_grad_(True)
        method, num_tokens, moe = "vpt", 0, False
    if method not in METHODS:
        raise KeyError(f"unknown prompt method {c.method!r}; known: {sorted(METHODS) + list(BASELINES)}")
    prompt_dropout = default_prompt_dropout(method) if c.prompt_dropout is None else c.prompt_dropout
    method_kwargs = resolve_options(METHODS[method], c.method_kwargs, f"method_kwargs of {method!r}", METHOD_ARGS)
    shared = c.shared_dim or built[0].embed_dim
    blocks = resolve_all_prompt_blocks(c.prompt_layers, [e.depth for e in built])
    n_layers = len(blocks[0])
    notices: list[str] = []
    methods = []
    for e, b in zip(built, blocks):
        kwargs = dict(method_kwargs)
        reason = _temperature_unsupported(e, b) if kwargs.get("learn_temperature") else None
        if reason:  # GaPT's temperature stays on for every expert whose blocks support it
            kwargs["learn_temperature"] = False
            notices.append(f"expert {e.name!r}: GaPT attention temperature off ({reason})")
            warnings.warn(notices[-1], UserWarning, stacklevel=2)
        methods.append(build_method(
            method,
            num_tokens=num_tokens,
            num_layers=n_layers,
            expert_dim=e.embed_dim,
            shared_dim=shared,
            patch_size=e.patch_size,
            dropout=prompt_dropout,
            **({"grid_size": e.grid_size} if method_needs_grid(method) else {}),
            **({"block_range": (b[0], e.depth)} if _needs_block_range(method) and b else {}),
            **kwargs,
        ))
    disp, dispatcher_kwargs = None, None
    if moe and len(built) > 1 and not all(m.deep for m in methods):
        hint = DEEP_FOR_PMOE.get(method, "a deep method")
        raise ValueError(f"method={c.method!r} makes prompts at the first prompt layer only, so pMoE has nothing to "
                         f"mix afterwards: use {hint}, or moe=False")
    if moe and len(built) > 1:
        if c.dispatcher.lower() not in DISPATCHERS:
            raise KeyError(f"unknown dispatcher {c.dispatcher!r}; known: {sorted(DISPATCHERS)}")
        dispatcher_kwargs = resolve_options(DISPATCHERS[c.dispatcher.lower()], c.dispatcher_kwargs,
                                            f"dispatcher_kwargs of {c.dispatcher!r}", DISPATCHER_ARGS)
        disp = build_dispatcher(c.dispatcher, num_experts=len(built), num_layers=n_layers, shared_dim=shared,
                                expert_dims=[e.embed_dim for e in built], **dispatcher_kwargs)
    head: nn.Module
    aux_heads, aux_blocks, aux_kw = None, None, None
    if c.task == "segmentation":
        head_kwargs = resolve_options(SETRPUPHead, c.head_kwargs, "head_kwargs", HEAD_ARGS)
        head = SETRPUPHead(shared, c.num_classes, **head_kwargs)
        if c.aux_layers not in (None, False):
            aux_blocks = [resolve_aux_blocks(c.aux_layers, e.depth) for e in built]
            n_aux = min(len(b) for b in aux_blocks)  # a shallow (< 4 blocks) test expert has fewer: keep the last
            if c.aux_layers is True:
                aux_blocks = [b[len(b) - n_aux:] for b in aux_blocks]
            aux_kw = resolve_options(setr_aux_heads, {"channels": head_kwargs["channels"], **(c.aux_head_kwargs or {})},
                                     "aux_head_kwargs", HEAD_ARGS)
            aux_heads = setr_aux_heads(shared, c.num_classes, count=max(len(b) for b in aux_blocks), **aux_kw)
    else:
        if c.aux_layers not in (None, False):
            raise ValueError("aux_layers (SETR auxiliary heads) needs task='segmentation'")
        head_kwargs = resolve_options(LinearHead, c.head_kwargs, "head_kwargs", HEAD_ARGS)
        head = LinearHead(shared, c.num_classes, **head_kwargs)
    model = PMoEModel(
        built, methods, blocks, head, task=c.task, dispatcher=disp, shared_dim=shared,
        aux_heads=aux_heads, aux_blocks=aux_blocks, pool_prompts=c.pool_prompts,
    )
    model.notices = notices
    model.config = dataclasses.replace(c, prompt_dropout=prompt_dropout, method_kwargs=method_kwargs,
                                       dispatcher_kwargs=dispatcher_kwargs, head_kwargs=head_kwargs,
                                       aux_head_kwargs=aux_kw)
    model.config.experts = [
        e if isinstance(e, Expert) else {**e, "checkpoint_sha256": getattr(b, "checkpoint_sha256", None)}
        for e, b in zip(c.experts, built)
    ]
    return model


def build_recorded_expert(entry: Mapping) -> Expert:
    """`build_expert(**entry)`; an entry a model config recorded also carries the file's sha256, which must match."""
    entry = dict(entry)
    recorded = entry.pop("checkpoint_sha256", None)
    if entry.pop("prebuilt", False):
        raise ValueError(f"expert {entry['name']!r} was given to build_model as a built module: pass it again")
    expert = build_expert(**entry)
    found = getattr(expert, "checkpoint_sha256", None)
    if recorded and found and recorded != found:
        raise ExpertCheckpointError(f"checkpoint {entry.get('checkpoint')!r} for expert {entry['name']!r}: sha256 "
                                    f"{found[:12]}... differs from {recorded[:12]}..., the file the model was trained "
                                    "with (another release of the weights, or another file)")
    return expert


def resolve_aux_blocks(spec: AuxLayerSpec, depth: int) -> list[int]:
    """Blocks feeding the SETR auxiliary heads: True = SETR's rule, fractions of the depth, or block indices."""
    if spec is True:
        return setr_aux_blocks(depth, SETR_AUX_FRACTIONS)
    spec = list(spec)
    if spec and all(isinstance(s, float) for s in spec):
        if not all(0.0 < s < 1.0 for s in spec):
            raise ValueError(f"aux_layers fractions must lie in (0, 1), got {spec}")
        return setr_aux_blocks(depth, spec)
    blocks = [int(s) for s in spec]
    if not blocks or blocks != sorted(set(blocks)) or not all(0 <= b < depth for b in blocks):
        raise ValueError(f"aux_layers {spec}: need distinct increasing block indices < {depth}")
    return blocks


def _temperature_unsupported(expert: Expert, blocks: Sequence[int]) -> str | None:
    """Why an attention temperature cannot run on the expert's blocks from its first prompt block (None: it can)."""
    for blk in list(expert.blocks)[blocks[0] if blocks else expert.depth:]:
        reason = temperature_unsupported_reason(blk)
        if reason:
            return reason
    return None


def _needs_block_range(method: str) -> bool:
    """True when the method registered as `method` takes `block_range=(first prompt block, depth)` (GaPT)."""
    factory = METHODS.get(method.lower())
    return bool(getattr(getattr(factory, "func", factory), "needs_block_range", False))
