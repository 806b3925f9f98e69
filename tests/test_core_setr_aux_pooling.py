"""SETR-PUP auxiliary heads (training-time loss) and VPT/GaPT's MAE pooling over prompt and patch tokens."""

import pytest
import torch

from medpmoe.experts import tiny_vit_expert
from medpmoe.heads import SETRPUPHead, setr_aux_blocks
from medpmoe.models import build_model
from medpmoe.training import WithAuxLoss
from tests.helpers import assert_differs

NP = 3


def _seg(k=2, aux_layers=(0, 1), **kw):
    torch.manual_seed(0)
    experts = [tiny_vit_expert(name=f"e{i}", seed=i) for i in range(k)]
    return build_model(experts, task="segmentation", num_classes=2, num_tokens=NP, prompt_dropout=0.0,
                       head_kwargs={"channels": 8}, aux_layers=list(aux_layers) if aux_layers else None, **kw)


def test_setr_aux_blocks_follow_the_authors_layers():
    assert setr_aux_blocks(24) == [9, 14, 19, 23]  # SETR-PUP on ViT-L (SETR's and mmseg's base config)
    assert setr_aux_blocks(12) == [4, 7, 9, 11]  # ViT-B: the SETR authors' DeiT-B config, in_index 4, 7, 9, 11
    assert setr_aux_blocks(4) == [1, 2, 3]
    assert setr_aux_blocks(2) == [0, 1]  # shallow demo experts: repeats dropped
    with pytest.raises(ValueError, match="block indices per expert"):  # different head counts per expert
        build_model([tiny_vit_expert(), tiny_vit_expert(depth=12)], task="segmentation", aux_layers=[0.3, 0.6, 0.9],
                    prompt_layers=[0.0, 0.5])
    assert build_model([tiny_vit_expert(depth=12)], task="segmentation", aux_layers=True).aux_blocks == [[4, 7, 9, 11]]
    mixed = build_model([tiny_vit_expert(depth=2), tiny_vit_expert(depth=12)], task="segmentation", aux_layers=True)
    assert mixed.aux_blocks == [[0, 1], [9, 11]] and len(mixed.aux_heads) == 2  # one count: each keeps its last


def test_aux_head_variants_mmseg_two_conv_stages_setr_one():
    mmseg = build_model([tiny_vit_expert()], task="segmentation", aux_layers=[0], head_kwargs={"channels": 8})
    setr = build_model([tiny_vit_expert()], task="segmentation", aux_layers=[0], head_kwargs={"channels": 8},
                       aux_head_kwargs={"variant": "setr"})
    assert len(mmseg.aux_heads[0].stages) == 2 and len(setr.aux_heads[0].stages) == 1
    assert setr.config.aux_head_kwargs["variant"] == "setr" and mmseg.config.aux_head_kwargs["variant"] == "mmseg"
    assert setr.train()(torch.rand(2, 3, 64, 64)).shape == setr.aux_logits[0].shape == (2, 2, 64, 64)
    with pytest.raises(ValueError, match="variant"):
        build_model([tiny_vit_expert()], task="segmentation", aux_layers=[0], aux_head_kwargs={"variant": "x"})


def test_aux_logits_in_training_only_and_main_output_unchanged(images):
    with_aux, without = _seg().eval(), _seg(aux_layers=None).eval()
    assert len(with_aux.aux_heads) == 2 and without.aux_heads is None
    without.load_state_dict({n: v for n, v in with_aux.state_dict().items() if not n.startswith("aux_")})
    assert torch.equal(with_aux(images), without(images)) and with_aux.aux_logits is None  # inference: no aux
    with_aux.train()
    out = with_aux(images)
    assert [a.shape for a in with_aux.aux_logits] == [out.shape] * 2  # full-resolution logits per aux head
    with_aux.eval()(images)
    assert with_aux.aux_logits is None


def test_aux_head_reads_the_prompted_tokens_leaving_its_block(images):
    """K = 1, VPT-deep, aux head on block 0: LayerNorm -> 2 x (conv, BN, ReLU, x4) -> 1x1 on block 0's patch
    tokens (prompts removed), written out by hand."""
    model = _seg(k=1, aux_layers=[0]).train()
    e, P = model.experts[0], model.methods[0].prompts
    x = e.embed(images)
    x = e.blocks[0](torch.cat([x[:, :1], P[0].expand(2, -1, -1), x[:, 1:]], dim=1))
    grid = x[:, 1 + NP :].transpose(1, 2).reshape(2, 64, 4, 4)
    model(images)
    ref = model.aux_heads[0](grid, out_size=(64, 64))  # BN in train mode: same batch statistics
    torch.testing.assert_close(model.aux_logits[0], ref, rtol=1e-5, atol=1e-5)


def test_aux_loss_weighted_in_training_and_absent_in_eval(images):
    model = _seg().train()
    target = (images[:, :1] > 0.5).long()
    ce = lambda p, t: torch.nn.functional.cross_entropy(p, t[:, 0])  # noqa: E731
    wrapped = WithAuxLoss(ce, model, aux_head_weight=0.4)
    pred = model(images)
    expected = ce(pred, target) + 0.4 * sum(ce(a, target) for a in model.aux_logits)
    loss = wrapped(pred, target)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in model.aux_heads.parameters())
    model.eval()
    pred = model(images)
    assert torch.equal(wrapped(pred, target), ce(pred, target))


def test_setr_head_layernorm_eps_and_optional_input_norm():
    assert SETRPUPHead(64, 2).input_norm.eps == 1e-6
    assert isinstance(SETRPUPHead(64, 2, input_norm=False).input_norm, torch.nn.Identity)
    with pytest.raises(ValueError, match="segmentation"):
        build_model([tiny_vit_expert()], task="classification", aux_layers=True)


def test_mae_pooling_averages_prompt_and_patch_tokens_before_the_final_norm(images):
    """pool_prompts=True, VPT-deep on a mean-pooling (MAE-style) expert, written out as VPT's MAE code:
    x[:, 1:].mean(1) over prompts and patches, then the norm; default pooling differs."""
    torch.manual_seed(0)
    e = tiny_vit_expert(pooling="mean")
    model = build_model([e], method="vpt_deep", num_tokens=NP, num_classes=3, pool_prompts=True).eval()
    P = model.methods[0].prompts
    x = e.embed(images)
    for i, blk in enumerate(e.blocks):
        x = blk(torch.cat([x[:, :1], P[i].expand(2, -1, -1), x[:, 1 + (NP if i else 0) :]], dim=1))
    ref = model.head(e.vit.norm(x[:, 1:].mean(dim=1)))
    torch.testing.assert_close(model(images), ref, rtol=1e-5, atol=1e-6)
    model.pool_prompts = False  # today's default: mean of post-norm patch tokens
    torch.testing.assert_close(model(images), model.head(e.vit.norm(x)[:, 1 + NP :].mean(dim=1)), rtol=1e-5, atol=1e-6)
    assert_differs(model(images), ref)
    cls = build_model([tiny_vit_expert()], num_tokens=NP, num_classes=3, moe=False, pool_prompts=True).eval()
    cls_default = build_model([tiny_vit_expert()], num_tokens=NP, num_classes=3, moe=False).eval()
    cls_default.load_state_dict(cls.state_dict())
    assert torch.equal(cls(images), cls_default(images))  # CLS experts are unaffected
