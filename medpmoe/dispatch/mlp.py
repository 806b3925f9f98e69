"""pMoE's dispatcher (Mo, Luo, Li, ICLR 2025): per prompt layer, E, A, Z linear maps D -> K and a softmax."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Dispatcher(nn.Module):
    """Base class: turn K experts' EPTs at one prompt layer into K sets of integrated prompt tokens.

    `forward(layer, epts, prompts_out, patches)` takes, per expert k, its EPTs (B, Np, D_s), its previous
    block's prompt outputs (B, Np, D_k) or None, and its patch tokens (B, N, D_k). It returns the integrated
    prompts, one (B, Np, D_s) per expert, and the dispatch weights (B, K, Np, K) where
    `weights[b, k, n, j]` is how much expert k's n-th prompt takes from expert j's n-th EPT.
    """

    #: auxiliary loss (e.g. load balancing) from the last forward; the trainer adds it when present.
    aux_loss: torch.Tensor | None = None

    def __init__(self, num_experts: int, num_layers: int, shared_dim: int, expert_dims: Sequence[int]) -> None:
        super().__init__()
        if len(expert_dims) != num_experts:
            raise ValueError(f"expert_dims has {len(expert_dims)} entries for {num_experts} experts")
        self.num_experts = num_experts
        self.num_layers = num_layers
        self.shared_dim = shared_dim
        # Expert states of width D_k != D_s reach the shared maps through a per-expert linear map.
        self.to_shared = nn.ModuleList(
            nn.Identity() if d == shared_dim else nn.Linear(d, shared_dim, bias=False) for d in expert_dims
        )
        self.record = False
        self.last_weights: list[torch.Tensor | None] = [None] * num_layers

    @staticmethod
    def mix(weights: torch.Tensor, epts: torch.Tensor) -> torch.Tensor:
        """Integrated prompts `Phat[b, k, n] = sum_j weights[b, k, n, j] * epts[b, j, n]` -> (B, K, Np, D_s)."""
        return torch.einsum("bknj,bjnd->bknd", weights, epts)

    def logits(
        self, layer: int, epts: torch.Tensor, prompts_out: Sequence[torch.Tensor | None], patches: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Dispatch logits (B, K, Np, K) before the softmax over source experts."""
        raise NotImplementedError

    def forward(
        self,
        layer: int,
        epts: Sequence[torch.Tensor],
        prompts_out: Sequence[torch.Tensor | None],
        patches: Sequence[torch.Tensor],
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Mix EPTs across experts; see the class docstring for shapes."""
        stacked = torch.stack(list(epts), dim=1)  # (B, K, Np, D_s)
        weights = torch.softmax(self.logits(layer, stacked, prompts_out, patches).float(), dim=-1).to(stacked.dtype)
        if self.record:
            self.last_weights[layer] = weights.detach()
        return list(self.mix(weights, stacked).unbind(dim=1)), weights


def first_layer_placeholder() -> nn.Module:
    """What stands at index 0 of an accumulated-prompt list (`A`, `router_A`): no parameters, never called (the
    first prompt layer has no previous prompt outputs)."""
    return nn.Identity()


def accumulated_prompt_maps(num_layers: int, in_dim: int, out_dim: int) -> nn.ModuleList:
    """One linear map per prompt layer for the accumulated-prompt term, a placeholder at the first layer."""
    return nn.ModuleList(first_layer_placeholder() if i == 0 else nn.Linear(in_dim, out_dim) for i in range(num_layers))


class MLPDispatcher(Dispatcher):
    """`D_k^l = softmax_K(E(P_k^l) + A(Z_{P,k}^l) + mean_patches(Z(Z_k^l)))`, shared by all experts.

    One (E, A, Z) triple of linear maps D_s -> K per prompt layer. The accumulated-prompt term A is dropped
    where there are no previous prompt outputs, the first prompt layer: `A[0]` is a parameter-free placeholder
    (`first_layer_placeholder`; indices stay layer numbers), so no parameter that can never receive a gradient is
    built, counted or saved. Because Z is linear, mean_patches(Z(Z_k)) is computed as Z(mean_patches(Z_k)).
    """

    def __init__(self, num_experts: int, num_layers: int, shared_dim: int, expert_dims: Sequence[int]) -> None:
        super().__init__(num_experts, num_layers, shared_dim, expert_dims)
        self.E = nn.ModuleList(nn.Linear(shared_dim, num_experts) for _ in range(num_layers))
        self.A = accumulated_prompt_maps(num_layers, shared_dim, num_experts)
        self.Z = nn.ModuleList(nn.Linear(shared_dim, num_experts) for _ in range(num_layers))

    def logits(self, layer, epts, prompts_out, patches):
        """E(P_k) + A(Z_{P,k}) + Z(mean Z_k) for every expert k, stacked to (B, K, Np, K)."""
        out = self.E[layer](epts)  # (B, K, Np, K)
        extra = []
        for k, (p_out, z) in enumerate(zip(prompts_out, patches)):
            term = self.Z[layer](self.to_shared[k](z.mean(dim=1)))[:, None, :]  # (B, 1, K)
            if layer > 0 and p_out is not None and p_out.shape[1] > 0:
                term = term + self.A[layer](self.to_shared[k](p_out))  # (B, Np, K)
            extra.append(term.expand(-1, out.shape[2], -1))
        return out + torch.stack(extra, dim=1)


class UniformDispatcher(Dispatcher):
    """Fixed equal weights 1/K (no parameters): the reference point for tests and ablations."""

    def logits(self, layer, epts, prompts_out, patches):
        """All-zero logits, so the softmax is uniform."""
        b, k, n, _ = epts.shape
        return epts.new_zeros(b, k, n, k)


#: name -> dispatcher class; "moe_mlp" (MoEMLPDispatcher) is added by medpmoe.dispatch on import.
DISPATCHERS = {"mlp": MLPDispatcher, "uniform": UniformDispatcher}


def build_dispatcher(name: str, **kwargs) -> Dispatcher:
    """Build the dispatcher registered as `name` ('mlp', 'uniform', 'moe_mlp', ...)."""
    key = name.lower()
    if key not in DISPATCHERS:
        raise KeyError(f"unknown dispatcher {name!r}; known: {sorted(DISPATCHERS)}")
    return DISPATCHERS[key](**kwargs)
