"""Any mix of expert kinds under pMoE, with default options: every method trains; every counted parameter learns.

The mixture: a plain ViT, a SAM-style encoder, a DINOv2 with registers and a CLIP-style ViT (tiny, depths 2 and 4,
widths 32 and 48, patch sizes 8, 14 and 16).
"""

import copy

import pytest
import torch

from medpmoe.experts import build_expert, tiny_sam_expert, tiny_vit_expert
from medpmoe.models import build_model
from medpmoe.params import parameter_report
from medpmoe.prompts import METHODS

SHALLOW = ("vpt_shallow", "gapt")  # prompts at the first layer only: pMoE has nothing to mix (refused, with a hint)
METHOD_NAMES = sorted(METHODS)


def mixture():
    """Plain ViT (depth 2), SAM-style (depth 4), DINOv2 with 4 registers (depth 4), CLIP-style (depth 2, width 48)."""
    return [
        tiny_vit_expert(name="vit", embed_dim=32, depth=2, num_heads=2, img_size=32, seed=0),
        tiny_sam_expert(name="sam", depth=4, img_size=32, patch_size=8, window_size=2, global_attn_indexes=(3,),
                        seed=1),
        build_expert("dinov2_vits14_reg", random_init=True, img_size=28,
                     arch_overrides={"embed_dim": 32, "depth": 4, "num_heads": 2}),
        build_expert("clip_vitb16", random_init=True, img_size=32,
                     arch_overrides={"embed_dim": 48, "depth": 2, "num_heads": 2}),
    ]


def _step(model, images, target):
    """One AdamW step on the trainable parameters; returns the loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(images), target)
    loss = loss + (model.dispatcher.aux_loss if getattr(model.dispatcher, "aux_loss", None) is not None else 0.0)
    loss.backward()
    opt.step()
    return loss


def test_mixture_has_every_kind_and_two_depths():
    experts = mixture()
    assert [e.depth for e in experts] == [2, 4, 4, 2] and experts[2].num_prefix_tokens == 5
    assert type(experts[1]).__name__ == "SamExpert" and experts[3].embed_dim == 48


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_trains_one_pmoe_step_on_the_mixture_with_defaults(method):
    torch.manual_seed(0)
    moe = method not in SHALLOW
    if not moe:
        with pytest.raises(ValueError, match="pMoE has nothing to mix"):
            build_model(mixture(), method=method, num_tokens=2)
    model = build_model(mixture(), method=method, num_tokens=2, moe=moe)
    assert model.notices == []  # nothing switched off: GaPT's temperature runs on the SAM expert too
    assert [len(b) for b in model.prompt_blocks] == [2, 2, 2, 2]
    assert model.prompt_blocks == [[0, 1], [0, 2], [0, 2], [0, 1]]  # every block of the shallow, spread on the deep
    assert (model.dispatcher is not None) == moe
    frozen = {k: v.clone() for k, v in model.experts.state_dict().items()}
    images, target = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    loss = _step(model, images, target)
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name  # gradients on trainable parts only
        assert not (name.startswith("experts.") and p.requires_grad), name
    assert all(torch.equal(frozen[k], v) for k, v in model.experts.state_dict().items())  # bit-identical
    if method.startswith("gapt"):
        assert all(m.temperature is not None and m.temperature.grad.abs().sum() > 0 for m in model.methods)


CASES = [(m, d) for m in METHOD_NAMES + ["linear_probe", "full_finetune"]
         for d in (["mlp", "moe_mlp", "uniform"] if m not in SHALLOW + ("linear_probe", "full_finetune") else [None])]


@pytest.mark.parametrize(("method", "dispatcher"), CASES)
def test_every_counted_parameter_gets_a_gradient(method, dispatcher):
    """The parameter table counts `requires_grad` parameters; each must receive a non-zero gradient in one step.
    Trainable tensors are perturbed first: zero-initialised ones (VAPT's generator, GaPT's closed gates) get zero
    gradients at init by design, not because nothing reaches them. The MoE-MLP dispatcher routes every dispatching
    MLP here (top_k = M): with sparse top-k a sub-dispatcher no row selects in a step gets no gradient in that step
    by design (the router, trained with the load-balancing loss, decides)."""
    torch.manual_seed(0)
    experts = [tiny_vit_expert(name="a", embed_dim=32, depth=2, num_heads=2, img_size=32, seed=0),
               tiny_sam_expert(name="b", depth=4, img_size=32, patch_size=8, window_size=2, global_attn_indexes=(3,),
                               seed=1)]
    model = build_model(experts, method=method, num_tokens=4, moe=dispatcher is not None,
                        dispatcher=dispatcher or "mlp",
                        dispatcher_kwargs={"top_k": 6} if dispatcher == "moe_mlp" else None)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model.train()
    out = model(torch.rand(4, 3, 32, 32))
    loss = torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 0, 1]))
    if getattr(model.dispatcher, "aux_loss", None) is not None:
        loss = loss + model.dispatcher.aux_loss
    loss.backward()
    counted = {n: p for n, p in model.named_parameters() if p.requires_grad and p.numel()}
    assert sum(p.numel() for p in counted.values()) == parameter_report(model)["trainable"]
    dead = [n for n, p in counted.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"counted parameters without a gradient: {dead}"


def test_segmentation_mixture_with_aux_heads_trains_with_defaults():
    model = build_model(mixture(), task="segmentation", method="gapt_deep", num_tokens=2, aux_layers=True,
                        head_kwargs={"channels": 8})
    assert [len(b) for b in model.aux_blocks] == [2, 2, 2, 2]  # one head count for depths 2 and 4
    frozen = copy.deepcopy(model.experts.state_dict())
    model.train()
    images = torch.rand(2, 3, 32, 32)
    out = model(images)
    loss = torch.nn.functional.cross_entropy(out, (images[:, 0] > 0.5).long())
    loss = loss + sum(torch.nn.functional.cross_entropy(a, (images[:, 0] > 0.5).long()) for a in model.aux_logits)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.experts.parameters())
    assert all(torch.equal(frozen[k], v) for k, v in model.experts.state_dict().items())


def test_prompt_layers_still_override_and_the_report_states_each_experts_blocks():
    model = build_model(mixture(), method="vpt_deep", num_tokens=2, prompt_layers=1)
    assert model.prompt_blocks == [[0], [0], [0], [0]]
    model = build_model(mixture(), method="vpt_deep", num_tokens=2, prompt_layers=[0.0, 0.5])
    assert model.prompt_blocks == [[0, 1], [0, 2], [0, 2], [0, 1]]
    small = {"embed_dim": 32, "num_heads": 2, "img_size": 32}
    report = parameter_report(build_model([tiny_vit_expert(depth=2, **small), tiny_vit_expert(depth=12, **small)],
                                          num_tokens=2))
    assert [e["prompt_blocks"] for e in report["experts"]] == [[0, 1], [0, 6]]
    assert report["experts"][1]["depth"] == 12 and report["experts"][0]["preprocessing"]["resize"] == "square"
    wide = build_model([tiny_vit_expert(depth=12, **small), tiny_vit_expert(depth=24, **small)], num_tokens=1)
    assert wide.prompt_blocks == [list(range(12)), list(range(0, 24, 2))]  # ViT-B beside a ViT-L


def test_fast_executor_reports_what_it_does_not_batch():
    """Spread prompt blocks (experts of different depths) and SAM-family blocks keep the plain per-expert loop,
    with the reason stated; same-depth plain ViTs with GaPT's temperature are batched."""
    from medpmoe.models.fast import accelerate

    spread = accelerate(build_model([tiny_vit_expert(depth=2), tiny_vit_expert(depth=4, seed=1)], num_tokens=2))
    assert spread.executor is None and "prompt different blocks" in spread.executor_reason
    sam = accelerate(build_model([tiny_vit_expert(depth=2, img_size=32),
                                  tiny_sam_expert(depth=2, img_size=32, patch_size=16, window_size=0)],
                                 method="gapt_deep", num_tokens=2))
    assert sam.executor is None and "tiny_sam" in sam.executor_reason
    same = accelerate(build_model([tiny_vit_expert(), tiny_vit_expert(seed=1)], method="gapt_deep", num_tokens=2))
    assert same.executor is not None and same.executor_reason is None
