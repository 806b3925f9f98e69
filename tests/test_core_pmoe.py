"""pMoE against methods.md: dispatcher equation, K=1 reduction to VPT-deep, heterogeneous experts."""

import copy

import torch

from medpmoe.dispatch import MLPDispatcher, UniformDispatcher
from medpmoe.experts import tiny_vit_expert
from medpmoe.models import PMoEModel, build_model
from tests.helpers import assert_differs


def _pmoe(k=2, num_tokens=4, task="classification", **kw):
    experts = [tiny_vit_expert(name=f"e{i}", seed=i) for i in range(k)]
    return build_model(experts, task=task, num_classes=3, num_tokens=num_tokens, moe=True, **kw).eval()


def test_k1_pmoe_equals_vpt_deep_even_with_an_explicit_dispatcher(images):
    vpt = build_model([tiny_vit_expert()], method="vpt_deep", num_tokens=4, moe=False, num_classes=3).eval()
    pmoe = PMoEModel(
        list(vpt.experts),
        list(vpt.methods),
        vpt.prompt_blocks,
        vpt.head,
        dispatcher=MLPDispatcher(1, 2, 64, [64]),
    ).eval()
    assert torch.equal(pmoe(images), vpt(images))


def test_dispatcher_matches_the_equation():
    torch.manual_seed(0)
    K, Np, D, N, B = 3, 4, 8, 5, 2
    disp = MLPDispatcher(K, 2, D, [D] * K)
    P = [torch.randn(B, Np, D) for _ in range(K)]
    Zp = [torch.randn(B, Np, D) for _ in range(K)]
    Z = [torch.randn(B, N, D) for _ in range(K)]
    mixed, w = disp(1, P, Zp, Z)
    E, A, Zm = disp.E[1], disp.A[1], disp.Z[1]
    for k in range(K):
        d = torch.softmax(E(P[k]) + A(Zp[k]) + Zm(Z[k]).mean(dim=1, keepdim=True), dim=-1)  # (B, Np, K)
        torch.testing.assert_close(w[:, k], d)
        ref = sum(d[..., j : j + 1] * P[j] for j in range(K))  # Phat_k[n] = sum_j D_k[n, j] P_j[n]
        torch.testing.assert_close(mixed[k], ref)
    assert torch.allclose(w.sum(-1), torch.ones(B, K, Np))


def test_first_prompt_layer_has_no_accumulated_prompt_term(images):
    model = _pmoe()
    out = model(images)
    assert not list(model.dispatcher.A[0].parameters())  # a placeholder: nothing built that never gets a gradient
    assert not any(k.startswith("dispatcher.A.0.") for k in model.state_dict())
    torch.manual_seed(1)  # random perturbations: a shift shared by all K logits would leave the softmax unchanged
    with torch.no_grad():
        model.dispatcher.A[1].weight.add_(5.0 * torch.randn_like(model.dispatcher.A[1].weight))
    assert_differs(model(images), out)


def test_uniform_dispatch_of_identical_epts_is_identity(images):
    model = _pmoe(dispatcher="uniform")
    assert isinstance(model.dispatcher, UniformDispatcher)
    with torch.no_grad():
        for m in model.methods[1:]:
            m.prompts.copy_(model.methods[0].prompts)
    mixed, w = model.dispatcher(0, [m.prompts[0][None] for m in model.methods], [None, None], [torch.zeros(1, 3, 64)] * 2)
    assert torch.allclose(w, torch.full_like(w, 0.5))
    torch.testing.assert_close(mixed[0], model.methods[0].prompts[0][None])


def test_outputs_are_the_mean_of_expert_outputs(images):
    model = _pmoe()
    tokens = model.forward_experts(images)
    pooled = torch.stack([t[:, 0] for t in tokens]).mean(0)
    torch.testing.assert_close(model(images), model.head(pooled))


def test_dispatcher_parameter_count_and_gradients(images):
    model = _pmoe(k=3)
    n_disp = sum(p.numel() for p in model.dispatcher.parameters())
    assert n_disp == (2 * 3 - 1) * (64 * 3 + 3)  # (L' x {E, A, Z} - the first layer's A) x (D*K + K)
    frozen = copy.deepcopy(model.experts.state_dict())
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1])).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert all(not n.startswith("experts.") for n in grads)
    assert {"dispatcher.E.0.weight", "dispatcher.Z.1.weight", "methods.2.prompts", "head.fc.weight"} <= grads
    opt.step()
    assert all(torch.equal(frozen[k], v) for k, v in model.experts.state_dict().items())


def test_heterogeneous_widths_and_patch_sizes_segment(images):
    experts = [
        tiny_vit_expert(name="p16w64", patch_size=16, img_size=64, embed_dim=64),
        tiny_vit_expert(name="p8w32", patch_size=8, img_size=32, embed_dim=32, num_heads=2, reg_tokens=1),
        tiny_vit_expert(name="p14w48", patch_size=14, img_size=56, embed_dim=48, num_heads=4, depth=4),
    ]
    model = build_model(
        experts, task="segmentation", num_classes=2, num_tokens=3, prompt_layers=[0.0, 0.5], head_kwargs={"channels": 8}
    )
    assert model.prompt_blocks == [[0, 1], [0, 1], [0, 2]]
    assert model.methods[1].align.weight.shape == (32, 64)  # shared width 64 -> expert width 32
    out = model(images)
    assert out.shape == (2, 2, 64, 64)
    out.sum().backward()
    assert model.dispatcher.to_shared[1].weight.grad is not None
