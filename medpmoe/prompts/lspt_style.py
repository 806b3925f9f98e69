"""LSPT-style prompts: our reading of LSPT (Mo et al., 2024), an LSTM memory over layers + spatial prompt coding."""

from __future__ import annotations

import torch
from torch import nn

from medpmoe.prompts.base import PromptLayerContext, PromptMethod, xavier_prompt_bound


class LSPTStyle(PromptMethod):
    """LSPT-style prompts for one expert: fresh prompts P^l plus the output of a long-term memory shared by layers.

    This is OUR READING of LSPT (arXiv 2402.17406): its method section (Sec. 3, the equations) could not be read
    here. What its abstract and the ICLR 2024 reviews state, and this follows: a single LSTM shared over blocks
    carries prompt information from earlier blocks ("long-term prompt coding"), and the output prompts get "the
    average embedding of patch tokens" added ("class-aware spatial prompt coding"). Which tensors are the LSTM's
    input, hidden and cell state, and the LSTM's width, are our choices. At prompt layer l, with Z_P^l the
    previous block's prompt outputs and Z^l its N patch tokens:

        spatial (class-aware) prompt coding:  S^l = Z_P^l + (1/N) sum_n Z^l[n]     (S^0 = 0: no outputs yet)
        long-term prompt coding:              (H^l, C^l) = LSTMCell(P^l, (S^l, C^{l-1})),   C^{-1} = 0
        EPTs:                                 X_P^l = P^l + H^l

    The LSTM cell (D_s -> D_s, applied token by token, shared over layers) reads the fresh learnable prompt as its
    input and the spatially coded prompt outputs as its hidden state; its cell state C carries prompt information
    from every earlier layer. We keep P^l as a residual beside H^l; with the LSTM's output gate closed (H = 0)
    this is exactly VPT-deep. `spatial=False` drops the patch-mean term. The cell state lives on the module for
    the current forward. EPTs at every prompt layer, so it always composes with pMoE.
    """

    def __init__(self, *args, spatial: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deep = True
        self.spatial = spatial
        v = xavier_prompt_bound(self.patch_size, self.shared_dim)
        self.prompts = nn.Parameter(torch.empty(self.num_layers, self.num_tokens, self.shared_dim).uniform_(-v, v))
        self.memory = nn.LSTMCell(self.shared_dim, self.shared_dim)
        d_s, d_k = self.shared_dim, self.expert_dim
        # S^l exists from the second prompt layer on: with one prompt layer nothing is mapped
        self.to_shared = nn.Identity() if d_s == d_k or self.num_layers < 2 else nn.Linear(d_k, d_s, bias=False)
        self._cell: torch.Tensor | None = None

    def spatial_prompts(self, ctx: PromptLayerContext) -> torch.Tensor | None:
        """S^l = Z_P^l + mean of the patch tokens, in the shared width (None at the first prompt layer)."""
        if ctx.prompts_out is None:
            return None
        s = ctx.prompts_out
        if self.spatial:
            s = s + ctx.patches.mean(dim=1, keepdim=True)
        return self.to_shared(s)

    def expert_prompt_tokens(self, ctx: PromptLayerContext) -> torch.Tensor:
        """X_P^l = P^l + H^l, advancing the long-term memory by one layer."""
        b, n, d = ctx.batch_size, self.num_tokens, self.shared_dim
        p = self.prompts[ctx.layer].expand(b, -1, -1)
        if n == 0:
            return p
        if ctx.layer == 0:
            self._cell = None
        s = self.spatial_prompts(ctx)
        zeros = p.new_zeros(b * n, d)
        h0 = s.reshape(b * n, d) if s is not None else zeros
        c0 = self._cell if self._cell is not None else zeros
        h, c = self.memory(p.reshape(b * n, d), (h0, c0))
        self._cell = c
        return p + h.view(b, n, d)
