"""SAM-family experts: exact reductions to timm's SAM encoder, the prompting equation, training, three-expert pMoE."""

import math

import torch
from timm.models.vision_transformer_sam import Block as TimmSamBlock
from torch.nn import functional as F

from medpmoe.experts import IMAGENET_MEAN_STD, SamExpert, build_expert, tiny_sam_expert
from medpmoe.experts.registry import UNIT_MEAN_STD
from medpmoe.models import build_model
from tests.expert_files import (TINY_SAM, TINY_VIT, tiny_sam, tiny_vit, write_dinov2_hub, write_lvmmed,
                                write_mocov3, write_sam_whole)
from tests.helpers import assert_differs, step_and_check_only_trainable_parts_learn


def _sam_expert(tmp_path, name="sam_vitb16", native=64, img_size=48, **kw):
    """A tiny SAM written as a whole SAM state dict at `native` px, served at `img_size` px; and its source."""
    src = tiny_sam(native)
    path = write_sam_whole(tmp_path / "sam_vit_b_01ec64.pth", src)
    return build_expert(name, checkpoint=path, img_size=img_size, arch_overrides=TINY_SAM, **kw), src


def test_np0_reproduces_timm_sam_forward_neck_included(tmp_path):
    e, src = _sam_expert(tmp_path, img_size=64)
    assert isinstance(e, SamExpert)
    assert (e.num_prefix_tokens, e.grid_size, e.out_dim, e.pooling) == (0, (8, 8), 16, "mean")
    assert [b.window_size for b in e.blocks] == [4, 0]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ours = e(x)  # embed -> prompted blocks on (B, N, D) sequences -> neck
        theirs = src.forward_features(e.preprocess(x))  # timm's own SAM forward, (B, 16, 8, 8)
    assert ours.shape == (2, 64, 16)
    assert torch.equal(ours, theirs.flatten(2).transpose(1, 2))
    assert torch.allclose(e.mean.flatten(), torch.tensor(IMAGENET_MEAN_STD[0]))


def test_smaller_input_resamples_tables_as_timm_does_at_run_time(tmp_path):
    """A 64 px file served at 48 px (grid 6, two 4x4 windows per side with padding) equals timm's SAM run on the
    48 px image, which resamples the position embedding and the global rel-pos tables on the fly."""
    e, src = _sam_expert(tmp_path, img_size=48)
    vit = e.vit
    assert vit.pos_embed.shape == (1, 6, 6, 32) and src.pos_embed.shape == (1, 8, 8, 32)
    assert vit.blocks[1].attn.rel_pos_h.shape == (11, 16)  # global block: 2*6-1 (file: 2*8-1)
    assert torch.equal(vit.blocks[0].attn.rel_pos_h, src.blocks[0].attn.rel_pos_h)  # window tables: 2*4-1, kept
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        ours, theirs = e(x), src.forward_features(e.preprocess(x))
    assert torch.equal(ours, theirs.flatten(2).transpose(1, 2))


def test_block_features_option_is_the_last_block_output(tmp_path):
    e, src = _sam_expert(tmp_path, img_size=64, features="blocks")
    assert e.out_dim == e.embed_dim == 32
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        last = src.forward_intermediates(e.preprocess(x), indices=[1], intermediates_only=True)[0]
        assert torch.equal(e(x), last.flatten(2).transpose(1, 2))


def _naive_prompted_block(blk, x, n_p, grid):
    """The equation of docs/methods.md, one window, one head, one token pair at a time."""
    (h, w), (B, _, C) = grid, x.shape
    attn, heads = blk.attn, blk.attn.num_heads
    ws = blk.window_size or h
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    y = blk.norm1(x)
    prompts, cells = y[:, :n_p], F.pad(y[:, n_p:].reshape(B, h, w, C), (0, 0, 0, wp - w, 0, hp - h))
    grid_out, prompt_out = torch.zeros(B, h, w, C), torch.zeros(B, n_p, C)
    n_windows = (hp // ws) * (wp // ws)
    for b in range(B):
        for r0 in range(0, hp, ws):
            for c0 in range(0, wp, ws):
                pos = [None] * n_p + [(r, c) for r in range(ws) for c in range(ws)]
                seq = torch.cat([prompts[b], cells[b, r0:r0 + ws, c0:c0 + ws].reshape(-1, C)])
                q, k, v = attn.qkv(seq).reshape(len(pos), 3, heads, -1).permute(1, 2, 0, 3)
                outs = []
                for hd in range(heads):
                    logits = (q[hd] * attn.scale) @ k[hd].T
                    for i, pi in enumerate(pos):
                        for j, pj in enumerate(pos):
                            if pi is not None and pj is not None:  # relative position terms between grid tokens only
                                logits[i, j] += q[hd, i] @ attn.rel_pos_h[pi[0] - pj[0] + ws - 1]
                                logits[i, j] += q[hd, i] @ attn.rel_pos_w[pi[1] - pj[1] + ws - 1]
                    outs.append(logits.softmax(-1) @ v[hd])
                o = attn.proj(torch.cat(outs, dim=-1))
                prompt_out[b] += o[:n_p] / n_windows  # prompts: mean over the image's windows
                win = o[n_p:].reshape(ws, ws, C)
                rh, rw = min(ws, h - r0), min(ws, w - c0)
                if rh > 0 and rw > 0:
                    grid_out[b, r0:r0 + rh, c0:c0 + rw] = win[:rh, :rw]
    z = x + torch.cat([prompt_out, grid_out.reshape(B, h * w, C)], dim=1)
    return z + blk.mlp(blk.norm2(z))


def test_prompted_windowed_and_global_blocks_follow_the_equation():
    e = tiny_sam_expert(img_size=48)  # grid 6, window 4: four padded windows; block 1 global
    x = torch.randn(2, 3 + 36, 32)
    with torch.no_grad():
        for blk in e.blocks:
            assert torch.allclose(blk(x), _naive_prompted_block(blk, x, 3, (6, 6)), atol=1e-5, rtol=0)


def test_prompts_reach_every_window_and_images_stay_independent():
    e = tiny_sam_expert(img_size=48)
    blk = e.blocks[0]
    x = torch.randn(2, 3 + 36, 32)
    x2 = x.clone()
    x2[:, :3] += torch.randn(2, 3, 32)  # other prompts (noise: LayerNorm removes a constant shift)
    x3 = x.clone()
    x3[1] += torch.randn(3 + 36, 32)  # another second image
    with torch.no_grad():
        a, b, c = blk(x), blk(x2), blk(x3)
    changed = (a[:, 3:] - b[:, 3:]).abs().amax(-1).reshape(2, 6, 6) > 1e-6
    for r0, c0 in [(0, 0), (0, 4), (4, 0), (4, 4)]:  # every window's tokens see the prompts
        assert changed[:, r0:r0 + 4, c0:c0 + 4].all()
    assert torch.equal(a[0], c[0])  # per-image mean over windows: image 0 never sees image 1


def test_np0_model_is_the_encoder_and_only_prompts_learn(tmp_path):
    e, _ = _sam_expert(tmp_path, img_size=48)
    images = torch.rand(2, 3, 40, 40)
    linear = build_model([e], method="linear_probe", num_classes=2)
    with torch.no_grad():
        assert torch.equal(linear.forward_experts(images)[0], e(images))
    model = build_model([e], num_classes=2, num_tokens=3, prompt_dropout=0.0)
    with torch.no_grad():
        assert_differs(model.forward_experts(images)[0], e(images))
    step_and_check_only_trainable_parts_learn(model, images)


def test_segmentation_with_a_sam_expert_trains():
    e = tiny_sam_expert(img_size=48)
    model = build_model([e], task="segmentation", num_classes=2, num_tokens=2, head_kwargs={"channels": 8})
    out = model(torch.rand(2, 3, 48, 48))
    assert out.shape == (2, 2, 48, 48)
    out.mean().backward()
    assert model.methods[0].prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in e.parameters())


def test_three_expert_pmoe_dinov2_mocov3_sam_trains_a_step(tmp_path):
    """DINOv2-style /14, MoCo-v3-style /16 and an LVM-Med-style SAM encoder, each from a file in its official
    layout, one 2x2 grid at their input sizes, in one pMoE model: a step trains prompts, dispatcher and head."""
    dino = write_dinov2_hub(tmp_path / "dinov2_vitb14_pretrain.pth", tiny_vit("vit_small_patch14_dinov2", 28))
    moco = write_mocov3(tmp_path / "vit-b-300ep.pth.tar", tiny_vit("vit_base_patch16_224", 32, seed=1))
    lvm = write_lvmmed(tmp_path / "lvmmed_vit.pth", tiny_sam(64, seed=2, use_abs_pos=False))
    experts = [
        dict(name="dinov2_vitb14", checkpoint=str(dino), img_size=28, arch_overrides=TINY_VIT),
        dict(name="mocov3_vitb16", checkpoint=str(moco), img_size=32, arch_overrides=TINY_VIT),
        dict(name="lvmmed_vitb16", checkpoint=str(lvm), img_size=16, arch_overrides=TINY_SAM),
    ]
    model = build_model(experts, num_classes=2, num_tokens=2, shared_dim=32)
    e14, e16, sam = model.experts
    assert (e14.patch_size, e16.patch_size, sam.patch_size) == (14, 16, 8)
    assert e14.grid_size == e16.grid_size == sam.grid_size == (2, 2)
    assert (e14.num_prefix_tokens, sam.num_prefix_tokens, sam.out_dim) == (1, 0, 16)
    assert model.dispatcher is not None and isinstance(model.output_align[2], torch.nn.Linear)
    step_and_check_only_trainable_parts_learn(model, torch.rand(2, 3, 32, 32))


def test_sam_blocks_are_timm_sam_blocks_and_not_batched():
    from medpmoe.models import build_model
    from medpmoe.models.executor import unsupported_reason

    a, b = tiny_sam_expert(seed=0), tiny_sam_expert(seed=1)
    assert all(isinstance(blk, TimmSamBlock) for blk in a.blocks)
    reason = unsupported_reason(build_model([a, b], num_tokens=2))  # the executor batches plain timm Blocks only
    assert reason is not None and "only timm Block" in reason


def test_medsam_normalisation_is_identity_and_lvmmed_has_no_position_embedding(tmp_path):
    e, _ = _sam_expert(tmp_path, name="medsam_vitb16", img_size=64)
    assert torch.equal(e.mean.flatten(), torch.tensor(UNIT_MEAN_STD[0]))
    assert torch.equal(e.std.flatten(), torch.tensor(UNIT_MEAN_STD[1]))
    lvm = build_expert("lvmmed_vitb16", random_init=True, img_size=32, arch_overrides=TINY_SAM)
    assert lvm.vit.pos_embed is None and lvm.pooling == "mean"


def test_gapt_temperature_divides_the_whole_sam_logits_relative_terms_included():
    """softmax((q k^T * scale + rel_bias(q)) / t) written out by hand equals `prompted_attention(..., t)`; t = 1 is
    the untempered block bit for bit."""
    from timm.models import vision_transformer_sam as tsam

    from medpmoe.experts.sam import prompted_attention

    e = tiny_sam_expert(img_size=32, patch_size=8, window_size=0, global_attn_indexes=(0, 1))
    attn = e.vit.blocks[0].attn
    grid, none = torch.randn(2, 4, 4, 32), torch.zeros(2, 0, 32)
    t = torch.tensor(0.37)
    _, out = prompted_attention(attn, grid, none, t)
    x = grid.reshape(2, 16, 32)
    qkv = attn.qkv(x).view(2, 16, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, 2 * attn.num_heads, 16, -1)
    bias = tsam.get_decomposed_rel_pos_bias(q, attn.rel_pos_h, attn.rel_pos_w, (4, 4), (4, 4))
    a = (((q * attn.scale) @ k.transpose(-2, -1) + bias) / t).softmax(-1) @ v
    ref = attn.proj(a.view(2, attn.num_heads, 16, -1).transpose(1, 2).reshape(2, 16, -1)).view(2, 4, 4, -1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    tokens = torch.randn(2, 3 + 16, 32)
    assert torch.equal(e.vit.blocks[1](tokens, torch.tensor(1.0)), e.vit.blocks[1](tokens))
