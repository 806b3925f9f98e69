"""MoE-MLP dispatcher: one MLP == MLPDispatcher exactly, sparse top-k routing, load-balancing loss, gradients."""

import copy

import pytest
import torch

from medpmoe.dispatch import PAPER_NUM_DISPATCHERS, MLPDispatcher, MoEMLPDispatcher, build_dispatcher
from medpmoe.experts import tiny_vit_expert
from medpmoe.models import build_model

K, L, NP, D = 3, 2, 4, 16


def _inputs(layer, b=2, n=9):
    g = torch.Generator().manual_seed(layer)
    epts = [torch.randn(b, NP, D, generator=g) for _ in range(K)]
    outs = [None if layer == 0 else torch.randn(b, NP, D, generator=g) for _ in range(K)]
    patches = [torch.randn(b, n, D, generator=g) for _ in range(K)]
    return epts, outs, patches


def _moe(m=4, top_k=2):
    return MoEMLPDispatcher(K, L, D, [D] * K, num_dispatchers=m, top_k=top_k)


@pytest.mark.parametrize("layer", [0, 1])
def test_one_dispatcher_top1_equals_mlp_dispatcher_exactly(layer):
    mlp, moe = MLPDispatcher(K, L, D, [D] * K), _moe(m=1, top_k=1)
    moe.dispatchers[0].load_state_dict(mlp.state_dict())
    (a, wa), (b, wb) = mlp(layer, *_inputs(layer)), moe(layer, *_inputs(layer))
    assert torch.equal(wa, wb) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_one_dispatcher_model_equals_mlp_model_exactly(images):
    kw = dict(method="vpt_deep", num_tokens=3)
    ref = build_model([tiny_vit_expert(seed=s) for s in range(2)], **kw).eval()
    moe = build_model(
        [tiny_vit_expert(seed=s) for s in range(2)], dispatcher="moe_mlp",
        dispatcher_kwargs={"num_dispatchers": 1, "top_k": 1}, **kw,
    ).eval()
    moe.load_state_dict(ref.state_dict(), strict=False)
    moe.dispatcher.dispatchers[0].load_state_dict(ref.dispatcher.state_dict())
    assert torch.equal(moe(images), ref(images))
    assert moe.aux_loss is None  # the load-balancing term is a training loss: not computed at inference
    moe.train()(images)
    assert moe.aux_loss is not None and moe.aux_loss.shape == ()


@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_top_k_mixture_of_decision_rows(top_k):
    moe = _moe(m=4, top_k=top_k)
    epts, outs, patches = _inputs(1)
    _, w = moe(1, epts, outs, patches)
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(w.shape[:-1]))
    stacked = torch.stack(epts, dim=1)
    rows = torch.stack([torch.softmax(d.logits(1, stacked, outs, patches), -1) for d in moe.dispatchers], -2)
    probs = torch.softmax(moe.router_logits(1, stacked, outs, patches), dim=-1)
    top, idx = probs.topk(top_k, dim=-1)
    chosen = torch.gather(rows, -2, idx[..., None].expand(*idx.shape, K))  # (B, K, Np, top_k, K)
    ref = (top[..., None] / top.sum(-1, keepdim=True)[..., None] * chosen).sum(dim=-2)
    torch.testing.assert_close(w, ref)


def test_load_balancing_loss_value_and_gradient():
    moe = _moe(m=4, top_k=2)
    with torch.no_grad():
        for lin in [*moe.router_E, *moe.router_A[1:], *moe.router_Z]:
            lin.weight.zero_()
            lin.bias.zero_()
    moe(0, *_inputs(0))
    assert float(moe.aux_loss.detach()) == pytest.approx(1.0)  # uniform router: M * (1 * 1/M)
    moe = _moe(m=4, top_k=2)
    moe(0, *_inputs(0))
    moe(1, *_inputs(1))
    probs = torch.softmax(moe.router_logits(1, torch.stack(_inputs(1)[0], 1), *_inputs(1)[1:]), -1).reshape(-1, 4)
    f = torch.bincount(probs.argmax(-1), minlength=4).float() / probs.shape[0]
    assert len(moe._aux_terms) == 2
    torch.testing.assert_close(moe._aux_terms[1], 4 * (f * probs.mean(0)).sum())
    moe.aux_loss.backward()
    assert moe.router_E[0].weight.grad.abs().sum() > 0


def test_training_step_through_model(images):
    model = build_model(
        [tiny_vit_expert(seed=s) for s in range(2)], method="vpt_deep", num_tokens=3, dispatcher="moe_mlp",
        dispatcher_kwargs={"num_dispatchers": 3, "top_k": 1},
    )
    frozen = copy.deepcopy(model.experts.state_dict())
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1])) + 0.01 * model.aux_loss
    loss.backward()
    assert all(p.grad is None for p in model.experts.parameters())
    assert model.dispatcher.router_E[0].weight.grad.abs().sum() > 0
    opt.step()
    assert all(torch.equal(v, frozen[n]) for n, v in model.experts.state_dict().items())


def test_default_is_six_dispatching_mlps():
    """pMoE Appendix B's headline setting: 6 dispatching MLPs (its ablation row for 6 equals the headline rows)."""
    disp = build_dispatcher("moe_mlp", num_experts=2, num_layers=1, shared_dim=8, expert_dims=[8, 8])
    assert disp.num_dispatchers == len(disp.dispatchers) == 6 and disp.top_k == 2
    model = build_model([tiny_vit_expert(seed=s) for s in range(2)], method="vpt_deep", num_tokens=3,
                        dispatcher="moe_mlp")
    assert len(model.dispatcher.dispatchers) == 6 and model.dispatcher.router_E[0].out_features == 6


@pytest.mark.parametrize("m", PAPER_NUM_DISPATCHERS)
def test_paper_ablation_counts_are_selectable(m, images):
    assert PAPER_NUM_DISPATCHERS == (3, 6, 9)
    model = build_model([tiny_vit_expert(seed=s) for s in range(2)], method="vpt_deep", num_tokens=3,
                        dispatcher="moe_mlp", dispatcher_kwargs={"num_dispatchers": m}).eval()
    assert len(model.dispatcher.dispatchers) == m and model.dispatcher.router_Z[1].out_features == m
    model.dispatcher.record = True
    assert model(images).shape == (2, 2)
    torch.testing.assert_close(model.dispatcher.last_weights[1].sum(-1), torch.ones(2, 2, 3))


def test_bad_config_fails_loudly():
    with pytest.raises(ValueError, match="top_k"):
        build_dispatcher(
            "moe_mlp", num_experts=2, num_layers=1, shared_dim=8, expert_dims=[8, 8], num_dispatchers=2, top_k=3
        )
