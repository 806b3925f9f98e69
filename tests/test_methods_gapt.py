"""GaPT against its equation: closed/open gates reduce to VPT exactly, hand-written reference, gradients, counts."""

import pytest
import torch

from medpmoe.experts import tiny_vit_expert
from medpmoe.models import build_model
from tests.helpers import step_and_check_only_trainable_parts_learn

NP = 3


def _model(method, k=1, **kw):
    return build_model([tiny_vit_expert(seed=s) for s in range(k)], method=method, num_tokens=NP, **kw).eval()


def _set_gates(model, value):
    with torch.no_grad():
        for m in model.methods:
            m.gate_logits.fill_(value)


def _copy_prompts(src, dst):
    with torch.no_grad():
        for ms, md in zip(src.methods, dst.methods):
            md.prompts.copy_(ms.prompts.expand_as(md.prompts))
        dst.head.load_state_dict(src.head.state_dict())


def _check_trains_only_method_and_head(model, images):
    step_and_check_only_trainable_parts_learn(model, images, nonzero=False)
    assert all(m.prompts.grad.abs().sum() > 0 and m.gate_logits.grad.abs().sum() > 0 for m in model.methods)


@pytest.mark.parametrize("method,k", [("gapt", 1), ("gapt_deep", 1), ("gapt_deep", 2)])
def test_shapes_and_gate_init(images, method, k):
    model = _model(method, k)
    assert model(images).shape == (2, 2)
    g = torch.sigmoid(model.methods[0].gate_logits)
    assert g.shape == (1,) and float(g.detach().max()) < 1e-4  # starts barely changing the prompts


def test_deep_gates_closed_equal_vpt_deep(images):
    gapt, vpt = _model("gapt_deep"), _model("vpt_deep")
    _set_gates(gapt, float("-inf"))
    _copy_prompts(gapt, vpt)
    assert torch.equal(gapt(images), vpt(images))


@pytest.mark.parametrize("method", ["gapt", "gapt_deep"])
def test_gates_open_equal_vpt_shallow(images, method):
    gapt, vpt = _model(method), _model("vpt_shallow")
    _set_gates(gapt, float("inf"))
    with torch.no_grad():
        vpt.methods[0].prompts.copy_(gapt.methods[0].prompts[:1])
        vpt.head.load_state_dict(gapt.head.state_dict())
    assert torch.equal(gapt(images), vpt(images))


def test_shallow_gates_closed_reinsert_p_like_vpt_deep(images):
    gapt, vpt = _model("gapt"), _model("vpt_deep")
    _set_gates(gapt, float("-inf"))
    _copy_prompts(gapt, vpt)
    assert torch.equal(gapt(images), vpt(images))


def test_shallow_matches_hand_written_gated_forward(images):
    """The authors' loop: prompt_in -> block -> g * prompt_out + (1 - g) * prompt_in, last block ungated."""
    model = _model("gapt")
    _set_gates(model, 0.3)
    e, P = model.experts[0], model.methods[0].prompts[0]
    g = torch.sigmoid(torch.tensor(0.3))
    x = e.embed(images)
    x = torch.cat([x[:, :1], P.expand(2, -1, -1), x[:, 1:]], dim=1)
    for i, blk in enumerate(e.blocks):
        p_in = x[:, 1 : 1 + NP]
        x = blk(x)
        if i < e.depth - 1:
            x = torch.cat([x[:, :1], g * x[:, 1 : 1 + NP] + (1 - g) * p_in, x[:, 1 + NP :]], dim=1)
    ref = model.head(e.norm(x)[:, 0])
    torch.testing.assert_close(model(images), ref, rtol=0, atol=1e-6)


def test_gradients_reach_only_method_and_head(images):
    _check_trains_only_method_and_head(_model("gapt"), images)


def test_under_pmoe_gradients_reach_dispatcher(images):
    model = _model("gapt_deep", k=2)
    _check_trains_only_method_and_head(model, images)
    assert all(lin.weight.grad.abs().sum() > 0 for lin in model.dispatcher.E)


def test_shallow_gapt_refused_by_pmoe():
    with pytest.raises(ValueError, match="deep"):
        _model("gapt", k=2)


def test_parameter_counts_by_formula():
    L, D = 2, 64  # tiny expert: depth 2 (prompt layers), width 64
    count = lambda m: sum(p.numel() for p in m.methods[0].parameters())  # noqa: E731
    assert count(_model("gapt")) == NP * D + (L - 1) + L  # prompts, gates, one temperature per block
    assert count(_model("gapt_deep")) == L * NP * D + (L - 1) + L
    assert count(_model("gapt", method_kwargs={"learn_temperature": False})) == NP * D + (L - 1)
    with pytest.raises(ValueError, match="logits"):
        _model("gapt", method_kwargs={"gate_init": [1.0, 2.0, 3.0]})


# --- attention temperature (the authors' MODEL.PROMPT.TEMP_LEARN) ---------------------------------------------
def _temperatures(model, value):
    with torch.no_grad():
        for m in model.methods:
            m.temperature.copy_(torch.as_tensor(value).expand_as(m.temperature))


@pytest.mark.parametrize("method,k", [("gapt", 1), ("gapt_deep", 2)])
def test_temperature_one_is_exactly_the_untempered_model(images, method, k):
    tempered = _model(method, k)
    plain = _model(method, k, method_kwargs={"learn_temperature": False})
    state = {n: v for n, v in tempered.state_dict().items() if not n.endswith(".temperature")}
    plain.load_state_dict(state)
    _set_gates(tempered, 0.5), _set_gates(plain, 0.5)  # gates open a little, so prompts flow between blocks
    assert all(m.temperature.shape == (2,) and bool((m.temperature == 1).all()) for m in tempered.methods)
    assert torch.equal(tempered(images), plain(images))
    _temperatures(tempered, [0.5, 2.0])
    assert (tempered(images) - plain(images)).abs().max() > 1e-3


def test_temperature_divides_the_attention_logits_of_every_token(images):
    """One block by hand: softmax(q k^T / sqrt(d) / t) over CLS, prompt and patch tokens."""
    from medpmoe.models.blocks import run_block

    blk = tiny_vit_expert().blocks[0]
    x, t = torch.randn(2, 1 + NP + 16, 64), torch.tensor(0.37)
    a = blk.attn
    q, k, v = a.qkv(blk.norm1(x)).reshape(2, -1, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) * a.head_dim**-0.5 / t, dim=-1)
    h = x + a.proj((attn @ v).transpose(1, 2).reshape(2, -1, 64))
    ref = h + blk.mlp(blk.norm2(h))
    torch.testing.assert_close(run_block(blk, x, t), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(run_block(blk, x, torch.tensor(1.0)), blk(x))


def test_gradients_reach_temperatures_and_no_expert_weight(images):
    model = _model("gapt_deep", k=2)
    _temperatures(model, [0.8, 1.3])
    _check_trains_only_method_and_head(model, images)
    assert all(m.temperature.grad is not None and m.temperature.grad.abs().min() > 0 for m in model.methods)


def test_temperatures_are_projected_onto_the_authors_range(images):
    model = _model("gapt")
    _temperatures(model, [50.0, 1e-4])
    model.eval()(images)
    assert model.methods[0].temperature.tolist() == pytest.approx([50.0, 1e-4])  # eval: clamped in use, stored value kept
    assert model.methods[0].attention_temperature(0).item() == 10.0
    model.train()(images)  # training forward: projected in place first (the authors' reinit_temp)
    assert model.methods[0].temperature.tolist() == pytest.approx([10.0, 0.01])


def test_temperature_kept_per_expert_off_only_where_the_blocks_cannot_take_it(images):
    """An expert with unknown block types gets GaPT without temperature (one warning naming it); the other
    experts, a SAM-style one included, keep theirs and train it."""
    from timm.models.vision_transformer import Block

    from medpmoe.experts import tiny_sam_expert
    from medpmoe.models.pmoe import PMoEModel

    class OtherBlock(Block):
        pass

    e = tiny_vit_expert(name="odd")
    e.vit.blocks[1].__class__ = OtherBlock
    sam = tiny_sam_expert(img_size=64, patch_size=16, window_size=2)
    with pytest.warns(UserWarning, match="expert 'odd': GaPT attention temperature off"):
        model = build_model([e, tiny_vit_expert(name="plain"), sam], method="gapt_deep", num_tokens=NP)
    assert [m.temperature is None for m in model.methods] == [True, False, False]
    assert model.notices == [n for n in model.notices if "'odd'" in n] and len(model.notices) == 1
    model.train()(images).sum().backward()
    assert model.methods[1].temperature.grad.abs().min() > 0 and model.methods[2].temperature.grad.abs().min() > 0
    with pytest.raises(ValueError, match="learn_temperature=False"):  # built by hand: refused, not adapted
        PMoEModel([e], [build_model([tiny_vit_expert()], method="gapt", num_tokens=NP).methods[0]], [[0, 1]],
                  torch.nn.Identity())
