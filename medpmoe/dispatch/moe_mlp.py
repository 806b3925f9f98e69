"""pMoE's MoE-MLP dispatcher (Appendix B): several dispatching MLPs chosen sparsely by a router."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medpmoe.dispatch.mlp import Dispatcher, MLPDispatcher, accumulated_prompt_maps

#: Dispatching-MLP counts of the paper's Appendix B ablation; its 6 row coincides with the headline rows.
PAPER_NUM_DISPATCHERS = (3, 6, 9)


class MoEMLPDispatcher(Dispatcher):
    """M dispatching MLPs, each an `MLPDispatcher` producing a decision row, mixed by a sparse top-k router.

    pMoE's Appendix B describes this dispatcher in prose only (several dispatching MLPs as experts, each giving a
    decision row; M = 3, 6 or 9 in its ablation, 6 by default here as its 6 row coincides with the headline rows).
    The router, its top-k selection and the load-balancing loss below are OUR design (Switch/GShard practice),
    not the paper's. Equations:

    For expert k's n-th prompt at layer l, dispatching MLP m gives the decision row
    `D_m[n] = softmax_K(E_m(P_k) + A_m(Z_{P,k}) + mean_patches(Z_m(Z_k)))[n]`; the router reads the same inputs,
    `r[n] = softmax_M(E_r(P_k) + A_r(Z_{P,k}) + mean_patches(Z_r(Z_k)))[n]`, keeps its `top_k` largest entries
    and renormalises them to gates `g[n]` (zero elsewhere; the normaliser is held constant in the backward pass,
    so with top_k=1 the gate is exactly 1 yet the router still gets Switch's gradient), and the dispatch weights are
    `D_k[n] = sum_m g_m[n] D_m[n]` (still a distribution over source experts). Every (image, expert, prompt)
    row is a routed token; the Switch/GShard load-balancing loss `M * sum_m f_m * p_m` (f_m: fraction of tokens
    whose top-1 choice is m, p_m: mean router probability of m; 1 when balanced) is averaged over prompt layers
    into `self.aux_loss` on each forward; the trainer adds `aux_weight * model.aux_loss`. One dispatching MLP with
    top_k=1 is exactly `MLPDispatcher`. All M MLPs are evaluated densely (they are tiny) and gated afterwards.
    """

    def __init__(
        self,
        num_experts: int,
        num_layers: int,
        shared_dim: int,
        expert_dims: Sequence[int],
        num_dispatchers: int = 6,
        top_k: int = 2,
    ) -> None:
        super().__init__(num_experts, num_layers, shared_dim, expert_dims)
        if num_dispatchers < 1 or not 1 <= top_k <= num_dispatchers:
            raise ValueError(f"MoE-MLP dispatcher: need 1 <= top_k <= num_dispatchers, got {top_k}, {num_dispatchers}")
        self.num_dispatchers, self.top_k = num_dispatchers, top_k
        shared = [shared_dim] * num_experts  # inputs reach the sub-dispatchers already in the shared width
        self.dispatchers = nn.ModuleList(
            MLPDispatcher(num_experts, num_layers, shared_dim, shared) for _ in range(num_dispatchers)
        )
        self.router_E = nn.ModuleList(nn.Linear(shared_dim, num_dispatchers) for _ in range(num_layers))
        self.router_A = accumulated_prompt_maps(num_layers, shared_dim, num_dispatchers)  # none at layer 0
        self.router_Z = nn.ModuleList(nn.Linear(shared_dim, num_dispatchers) for _ in range(num_layers))
        self._aux_terms: list[torch.Tensor] = []

    def router_logits(self, layer: int, epts: torch.Tensor, prompts_out, patches) -> torch.Tensor:
        """Router logits (B, K, Np, M) from shared-width inputs, shaped like the dispatchers' logits."""
        out = self.router_E[layer](epts)
        extra = []
        for p_out, z in zip(prompts_out, patches):
            term = self.router_Z[layer](z.mean(dim=1))[:, None, :]
            if layer > 0 and p_out is not None and p_out.shape[1] > 0:
                term = term + self.router_A[layer](p_out)
            extra.append(term.expand(-1, out.shape[2], -1))
        return out + torch.stack(extra, dim=1)

    def load_balancing_loss(self, probs: torch.Tensor) -> torch.Tensor:
        """Switch-style `M * sum_m f_m * p_m` over all routed rows of `probs` (..., M)."""
        flat = probs.reshape(-1, self.num_dispatchers)
        if flat.shape[0] == 0:
            return probs.new_zeros(())
        f = torch.bincount(flat.argmax(dim=-1), minlength=self.num_dispatchers).to(flat.dtype) / flat.shape[0]
        return self.num_dispatchers * (f * flat.mean(dim=0)).sum()

    def forward(self, layer, epts, prompts_out, patches):
        """Mix EPTs across experts with the routed mixture of decision rows; see `Dispatcher` for shapes."""
        stacked = torch.stack(list(epts), dim=1)  # (B, K, Np, D_s)
        p_out = [None if p is None else self.to_shared[k](p) for k, p in enumerate(prompts_out)]
        z = [self.to_shared[k](x.mean(dim=1, keepdim=True)) for k, x in enumerate(patches)]  # linear: mean first
        rows = torch.stack(
            [torch.softmax(d.logits(layer, stacked, p_out, z).float(), dim=-1) for d in self.dispatchers], dim=-2
        )  # (B, K, Np, M, K)
        probs = torch.softmax(self.router_logits(layer, stacked, p_out, z).float(), dim=-1)  # (B, K, Np, M)
        top, idx = probs.topk(self.top_k, dim=-1)
        # renormalised top-k values; the normaliser is a constant for the backward pass (Switch-style gradient)
        gates = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(dim=-1, keepdim=True).detach())
        weights = (gates.unsqueeze(-1) * rows).sum(dim=-2).to(stacked.dtype)
        if self.training:  # a training loss: inference (and an exported program) skips it
            if layer == 0:
                self._aux_terms = []
            self._aux_terms.append(self.load_balancing_loss(probs))
            self.aux_loss = torch.stack(self._aux_terms).mean()
        else:
            self.aux_loss = None
        if self.record:
            self.last_weights[layer] = weights.detach()
        return list(self.mix(weights, stacked).unbind(dim=1)), weights
