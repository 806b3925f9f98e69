"""PMoEModel: K frozen ViT experts prompted layer by layer in lockstep, outputs averaged into one head."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn import functional as F

from medpmoe.dispatch import Dispatcher
from medpmoe.experts import Expert
from medpmoe.models.blocks import run_block, temperature_unsupported_reason
from medpmoe.prompts import PromptLayerContext, PromptMethod

#: Per-expert raw tokens after the last block (B, prefix + Np + N, D) and each expert's Np; what an executor returns.
ExpertStates = tuple[list[torch.Tensor], list[int]]


class PMoEModel(nn.Module):
    """Prompted experts with optional pMoE dispatch.

    For each prompt layer i (the same count L' for every expert, at per-expert block indices), every expert k
    runs its frozen blocks up to its i-th prompt block, its method makes EPTs `P_k^i`, the dispatcher (when
    given) mixes same-index EPTs across experts into integrated prompts `Phat_k^i`, and the method inserts them
    right after the prefix tokens. Then the remaining blocks run, the final norm is applied and prompt tokens
    are dropped. Each expert's tokens are mapped to the shared width and averaged: pooled tokens for
    classification, patch grids (resampled to the first expert's grid) for segmentation.

    With one expert and no dispatcher this is the single-expert method itself (VPT, GaPT, ...); with
    `num_tokens=0` it is linear probing; with trainable experts it is full fine-tuning.

    `_run_experts` below is the algorithm, written plainly. `self.executor` (set by
    `medpmoe.models.fast.accelerate`) may run the same computation faster (batched experts, in-place prompt
    slots); it returns the same `ExpertStates`, and tests check that both agree.

    Optional: `aux_heads` (SETR auxiliary heads, segmentation) read the patch tokens leaving `aux_blocks[k]` of
    each expert during training and leave their logits in `self.aux_logits` for the loss (none at inference);
    `pool_prompts=True` pools mean-pooling (MAE) experts over prompt and patch tokens before their final norm.
    """

    def __init__(
        self,
        experts: Sequence[Expert],
        methods: Sequence[PromptMethod],
        prompt_blocks: Sequence[Sequence[int]],
        head: nn.Module,
        task: str = "classification",
        dispatcher: Dispatcher | None = None,
        shared_dim: int | None = None,
        aux_heads: nn.ModuleList | None = None,
        aux_blocks: Sequence[Sequence[int]] | None = None,
        pool_prompts: bool = False,
    ) -> None:
        super().__init__()
        if task not in ("classification", "segmentation"):
            raise ValueError(f"task must be 'classification' or 'segmentation', got {task!r}")
        if not (len(experts) == len(methods) == len(prompt_blocks)):
            raise ValueError("experts, methods and prompt_blocks must have one entry per expert")
        counts = {len(b) for b in prompt_blocks}
        if len(counts) != 1:
            raise ValueError(f"every expert needs the same number of prompt layers, got {sorted(counts)}")
        for e, blocks in zip(experts, prompt_blocks):
            if list(blocks) != sorted(set(blocks)) or (blocks and not 0 <= blocks[0] <= blocks[-1] < e.depth):
                raise ValueError(f"expert {e.name!r}: prompt blocks {list(blocks)} must be increasing in [0, {e.depth})")
        if dispatcher is not None and not all(m.deep for m in methods):
            raise ValueError("pMoE needs EPTs at every prompt layer: use a deep prompt method with a dispatcher")
        for e, m in zip(experts, methods):
            if getattr(m, "temperature", None) is not None:
                for b, blk in enumerate(e.blocks):
                    reason = temperature_unsupported_reason(blk) if m.attention_temperature(b) is not None else None
                    if reason:
                        raise ValueError(f"expert {e.name!r}: {reason}; build the method with learn_temperature=False")
        aux_blocks = [list(b) for b in aux_blocks] if aux_heads is not None else [[] for _ in experts]
        if aux_heads is not None:
            if task != "segmentation" or len(aux_blocks) != len(experts):
                raise ValueError("auxiliary heads need task='segmentation' and one aux-block list per expert")
            if any(len(b) != len(aux_heads) or not all(0 <= i < e.depth for i in b) for e, b in zip(experts, aux_blocks)):
                raise ValueError(f"aux blocks {aux_blocks} must give {len(aux_heads)} block indices per expert "
                                 "(experts of different depths: pass aux_layers as fractions or block indices)")
        self.task = task
        self.experts = nn.ModuleList(experts)
        self.methods = nn.ModuleList(methods)
        self.prompt_blocks = [list(b) for b in prompt_blocks]
        self.dispatcher = dispatcher
        self.shared_dim = shared_dim or experts[0].embed_dim
        self.output_align = nn.ModuleList(
            nn.Identity() if e.out_dim == self.shared_dim else nn.Linear(e.out_dim, self.shared_dim)
            for e in experts
        )
        self.head = head
        self.aux_heads = aux_heads
        self.aux_blocks = aux_blocks
        self.aux_align = None
        if aux_heads is not None:  # intermediate tokens are in each expert's internal width
            self.aux_align = nn.ModuleList(
                nn.Identity() if e.embed_dim == self.shared_dim else nn.Linear(e.embed_dim, self.shared_dim)
                for e in experts
            )
        self.aux_logits: list[torch.Tensor] | None = None
        self.pool_prompts = pool_prompts
        self.notices: list[str] = []  #: one line per option the factory adapted for an expert (run summary)
        # Execution settings (`medpmoe.models.fast.accelerate`); none of them changes the maths.
        self.amp_dtype: torch.dtype | None = None
        self.executor: nn.Module | None = None  # e.g. executor.BatchedExecutor
        self.executor_reason: str | None = "not accelerated"  # why there is no executor (None when there is one)
        self.channels_last = False
        self.prefix_cache = None  # fast.PrefixCache: frozen tokens before the first prompt block, by sample id

    @property
    def num_experts(self) -> int:
        """K, the number of experts."""
        return len(self.experts)

    @property
    def num_prompt_layers(self) -> int:
        """L', the number of prompt layers."""
        return len(self.prompt_blocks[0])

    # --- the prompted forward (the paper's algorithm) -----------------------------------------------------
    def _run_blocks(self, k: int, x: torch.Tensor, start: int, stop: int, n_prompts: int, taps=None) -> torch.Tensor:
        """Expert k's blocks [start, stop) (with its method's attention temperature, if any); records the patch
        tokens leaving its auxiliary blocks into `taps[k]` when `taps` is given."""
        e, m = self.experts[k], self.methods[k]
        for b in range(start, stop):
            x = run_block(e.blocks[b], x, m.attention_temperature(b))
            if taps is not None and b in self.aux_blocks[k]:
                taps[k].append(x[:, e.num_prefix_tokens + n_prompts :])
        return x

    def _frozen_prefix(self, k: int, images: torch.Tensor, sample_ids, taps=None) -> torch.Tensor:
        """Expert k's tokens entering its first prompt block. Nothing trainable precedes that block, so a frozen
        expert computes them without an autograd graph (and may serve them from the prefix cache)."""
        e, first = self.experts[k], (self.prompt_blocks[k] or [self.experts[k].depth])[0]
        if e.trainable or images.requires_grad:
            return self._run_blocks(k, e.embed(images), 0, first, 0, taps)
        tapped = taps is not None and any(b < first for b in self.aux_blocks[k])
        cache = self.prefix_cache if sample_ids is not None and not tapped else None
        x = cache.get(sample_ids, k) if cache is not None else None
        if x is None:
            with torch.no_grad():
                x = self._run_blocks(k, e.embed(images), 0, first, 0, taps)
            if cache is not None:
                cache.put(sample_ids, k, x)
        return x

    def _context(self, k: int, layer: int, x: torch.Tensor, n_prompts: int, prev_in) -> PromptLayerContext:
        """What expert k's method sees at prompt layer `layer`, from its tokens x entering the prompt block."""
        e = self.experts[k]
        p0, p1 = e.num_prefix_tokens, e.num_prefix_tokens + n_prompts
        return PromptLayerContext(
            layer=layer,
            block=self.prompt_blocks[k][layer],
            patches=x[:, p1:],
            grid=e.grid_size,
            prompts_out=x[:, p0:p1] if n_prompts else None,
            prompts_in=prev_in,
        )

    def _run_experts(self, images: torch.Tensor, sample_ids=None, taps=None) -> ExpertStates:
        """Every expert's tokens after its last block, prompts still in place, and its number of prompt tokens."""
        K = self.num_experts
        xs = [self._frozen_prefix(k, images, sample_ids, taps) for k in range(K)]
        pos = [b[0] if b else e.depth for b, e in zip(self.prompt_blocks, self.experts)]
        n_prompts, prev_in = [0] * K, [None] * K
        for i in range(self.num_prompt_layers):
            # 1. each expert runs its frozen blocks up to its i-th prompt block
            for k in range(K):
                b = self.prompt_blocks[k][i]
                xs[k], pos[k] = self._run_blocks(k, xs[k], pos[k], b, n_prompts[k], taps), b
            ctxs = [self._context(k, i, xs[k], n_prompts[k], prev_in[k]) for k in range(K)]
            # 2. each method makes its expert prompt tokens P_k^i
            epts = [m.expert_prompt_tokens(c) for m, c in zip(self.methods, ctxs)]
            # 3. pMoE: Phat_k^i[n] = sum_j D_k^i[n, j] P_j^i[n]
            if self.dispatcher is not None:
                epts, _ = self.dispatcher(i, epts, [c.prompts_out for c in ctxs], [c.patches for c in ctxs])
            # 4. the method inserts its tokens right after the prefix, replacing the previous prompt tokens
            news = [m.insert(c, p).to(x.dtype) for m, c, p, x in zip(self.methods, ctxs, epts, xs)]
            for k, e in enumerate(self.experts):
                xs[k] = torch.cat([xs[k][:, : e.num_prefix_tokens], news[k], ctxs[k].patches], dim=1)
            n_prompts, prev_in = [n.shape[1] for n in news], news
        xs = [self._run_blocks(k, xs[k], pos[k], e.depth, n_prompts[k], taps) for k, e in enumerate(self.experts)]
        return xs, n_prompts

    def _states(self, images: torch.Tensor, sample_ids=None, taps=None) -> ExpertStates:
        """`_run_experts` through the executor when one is set (same maths, faster), else the plain loop."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.executor is not None:
            return self.executor(self, images, sample_ids, taps)
        return self._run_experts(images, sample_ids, taps)

    def _without_prompts(self, k: int, x: torch.Tensor, n_prompts: int) -> torch.Tensor:
        """Expert k's tokens with its prompt tokens removed (prefix + patches)."""
        p0 = self.experts[k].num_prefix_tokens
        return torch.cat([x[:, :p0], x[:, p0 + n_prompts :]], dim=1) if n_prompts else x

    def forward_experts(self, images: torch.Tensor, sample_ids=None) -> list[torch.Tensor]:
        """Each expert's output tokens (B, prefix + N_k, out_dim_k): prompt tokens removed, then `expert.norm`.

        `sample_ids` (one hashable per image) are used only by the optional prefix cache."""
        with self._autocast(images):
            xs, n_prompts = self._states(images, sample_ids)
            return [e.norm(self._without_prompts(k, x, n)) for k, (e, x, n) in enumerate(zip(self.experts, xs, n_prompts))]

    # --- combination and heads ----------------------------------------------------------------------------
    def _autocast(self, images: torch.Tensor):
        """Autocast context for the model's own amp setting; unset, the caller's autocast (a trainer's or
        `predict`'s bf16) stays in force (`torch.autocast(enabled=False)` would switch it off)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(images.device.type, dtype=self.amp_dtype)

    def _pooled(self, k: int, x: torch.Tensor, n_prompts: int) -> torch.Tensor:
        """Expert k's pooled feature (B, out_dim): its own pooling of its final tokens, or, with `pool_prompts`
        for a mean-pooling expert, the mean over prompt and patch tokens before its final norm (VPT's and
        GaPT's MAE pooling)."""
        e = self.experts[k]
        if self.pool_prompts and e.pooling == "mean":
            return e.norm(x[:, e.num_prefix_tokens :].mean(dim=1, keepdim=True))[:, 0]
        return e.pool(e.norm(self._without_prompts(k, x, n_prompts)))

    def _grid_mean(self, patches: Sequence[torch.Tensor], align: nn.ModuleList) -> torch.Tensor:
        """Average experts' patch tokens (B, N_k, D_k) as a (B, D_s, h, w) grid on the first expert's grid."""
        target = self.experts[0].grid_size
        grids = []
        for e, a, p in zip(self.experts, align, patches):
            p = a(p)
            g = p.transpose(1, 2).reshape(p.shape[0], p.shape[2], *e.grid_size)
            if e.grid_size != target:
                g = F.interpolate(g, size=target, mode="bilinear", align_corners=False)
            grids.append(g)
        return torch.stack(grids).mean(dim=0)

    def combine(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Average experts' output tokens in the shared width: (B, D_s) pooled features or a (B, D_s, h, w) grid."""
        if self.task == "classification":
            return torch.stack([a(e.pool(t)) for e, a, t in zip(self.experts, self.output_align, tokens)]).mean(0)
        return self._grid_mean([t[:, e.num_prefix_tokens :] for e, t in zip(self.experts, tokens)], self.output_align)

    def forward(self, images: torch.Tensor, sample_ids=None) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) -> logits (B, C) or (B, C, H, W) (fp32 even under the model's amp)."""
        with self._autocast(images):
            taps = [[] for _ in self.experts] if self.aux_heads is not None and self.training else None
            xs, n_prompts = self._states(images, sample_ids, taps)
            if self.task == "classification":
                feats = [a(self._pooled(k, x, n)) for k, (a, x, n) in enumerate(zip(self.output_align, xs, n_prompts))]
                out = self.head(torch.stack(feats).mean(dim=0))
            else:
                tokens = [e.norm(self._without_prompts(k, x, n)) for k, (e, x, n) in enumerate(zip(self.experts, xs, n_prompts))]
                out_size = tuple(images.shape[-2:])
                out = self.head(self.combine(tokens), out_size=out_size)
                self.aux_logits = None if taps is None else [
                    head(self._grid_mean([t[j] for t in taps], self.aux_align), out_size=out_size).float()
                    for j, head in enumerate(self.aux_heads)
                ]
        return out.float()

    # --- trainable state ----------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what trains (prompts, dispatcher, alignment, head, trainable experts) plus their buffers."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        state = self.state_dict()
        frozen_prefixes = tuple(f"experts.{k}." for k, e in enumerate(self.experts) if not e.trainable)
        return {n: t for n, t in state.items() if n in names or not n.startswith(frozen_prefixes)}

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """Auxiliary loss of the last forward (e.g. the MoE dispatcher's load-balancing term), or None."""
        return getattr(self.dispatcher, "aux_loss", None) if self.dispatcher is not None else None
