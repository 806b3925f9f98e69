"""Each official checkpoint layout, written from a tiny model of its family, loads back bit-identically."""

import hashlib

import pytest
import timm
import torch
from safetensors.torch import save_file

from medpmoe.experts import CLIP_MEAN_STD, IMAGENET_MEAN_STD, FrozenViTExpert, SamExpert, build_expert
from medpmoe.experts.registry import EXPERTS, RAD_DINO_MEAN_STD, UNIT_MEAN_STD
from tests.expert_files import (TINY_SAM, TINY_VIT, hf_dinov2_keys, tiny_sam, tiny_vit, write_hf_dinov2,
                                write_lvmmed, write_open_clip_timm, write_retfound, write_sam_whole, write_timm)

TINY = dict(embed_dim=48, depth=2, num_heads=4)


def _source(arch, img_size, seed=0, **over):
    """A tiny randomly initialised timm model of the family, every weight random (so swapped keys show)."""
    torch.manual_seed(seed)
    m = timm.create_model(arch, pretrained=False, img_size=img_size, num_classes=0, **dict(TINY, **over)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def _same(expert, src, img_size, exact=True):
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        a, b = expert.vit.forward_features(x), src.forward_features(x)
    assert a.shape == b.shape
    assert torch.equal(a, b) if exact else torch.allclose(a, b, atol=1e-6, rtol=0)


def _sd(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_dinov2_hub_layout(tmp_path):
    src = _source("vit_small_patch14_dinov2", 28)
    sd = _sd(src)
    assert "blocks.0.ls1.gamma" in sd
    sd["mask_token"] = torch.zeros(1, 48)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    e = build_expert("dinov2_vits14", checkpoint=path, img_size=28, arch_overrides=TINY)
    _same(e, src, 28)
    assert torch.allclose(e.mean.flatten(), torch.tensor(IMAGENET_MEAN_STD[0]))
    assert e.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (e.patch_size, e.grid_size, e.pooling) == (14, (2, 2), "cls")


def test_dinov2_registers_hub_layout(tmp_path):
    src = _source("vit_small_patch14_reg4_dinov2", 28)
    sd = _sd(src)
    c = torch.randn(1, 1, 48)  # the hub file gives the CLS token a position embedding; timm folds it in
    hub = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    hub.update(register_tokens=sd["reg_token"], cls_token=sd["cls_token"] - c,
               pos_embed=torch.cat([c, sd["pos_embed"]], 1), mask_token=torch.zeros(1, 48))
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(hub, path)
    e = build_expert("dinov2_vits14_reg", checkpoint=path, img_size=28, arch_overrides=TINY)
    assert e.num_prefix_tokens == 5
    _same(e, src, 28, exact=False)


def test_dinov2_position_table_kept_at_the_files_grid_and_interpolated_at_run_time(tmp_path):
    from medpmoe.experts.positions import interpolate_patch_positions

    src = _source("vit_small_patch14_dinov2", 56)  # file at a 4x4 grid, expert at 2x2
    sd = _sd(src)
    sd["mask_token"] = torch.zeros(1, 48)
    torch.save(sd, tmp_path / "d.pth")
    e = build_expert("dinov2_vits14", checkpoint=tmp_path / "d.pth", img_size=28, arch_overrides=TINY)
    assert torch.equal(e.vit.pos_embed, sd["pos_embed"])  # as trained, CLS row included
    assert torch.equal(e.vit.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    images = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        tokens = e.embed(images)
        patches = e.vit.patch_embed(e.preprocess(images))
    want = interpolate_patch_positions(sd["pos_embed"][:, 1:], (2, 2), "dinov2")
    torch.testing.assert_close(tokens[:, 1:], patches + want)
    torch.testing.assert_close(tokens[:, :1], (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(2, -1, -1))


def test_mocov3_layout(tmp_path):
    src = _source("vit_base_patch16_224", 32)
    sd = _sd(src)
    state = {f"module.base_encoder.{k}": v for k, v in sd.items()}
    state.update({f"module.momentum_encoder.{k}": v + 1 for k, v in sd.items()})
    state.update({"module.base_encoder.head.0.weight": torch.randn(96, 48),
                  "module.base_encoder.head.1.running_mean": torch.zeros(96),
                  "module.predictor.0.weight": torch.randn(96, 96)})
    path = tmp_path / "vit-b-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}}, path)
    e = build_expert("mocov3_vitb16", checkpoint=path, img_size=32, arch_overrides=TINY)
    _same(e, src, 32)
    assert e.pooling == "cls"


def test_mae_layout_drops_decoder_and_uses_mean_pooling(tmp_path):
    src = _source("vit_base_patch16_224", 32)
    sd = _sd(src)
    sd.update({"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, 48),
               "decoder_pos_embed": torch.zeros(1, 5, 32), "decoder_blocks.0.norm1.weight": torch.ones(32),
               "decoder_norm.weight": torch.ones(32), "decoder_pred.weight": torch.randn(768, 32)})
    path = tmp_path / "mae_visualize_vit_base.pth"
    torch.save({"model": sd}, path)
    e = build_expert("mae_vitb16", checkpoint=path, img_size=32, arch_overrides=TINY)
    _same(e, src, 32)
    assert e.pooling == "mean"
    assert build_expert("mae_vitb16", checkpoint=path, img_size=32, arch_overrides=TINY, pooling="cls").pooling == "cls"


def _to_openai_clip(sd):
    """timm CLIP tower keys -> OpenAI CLIP `visual.*` keys (the inverse of timm's `_convert_openai_clip`)."""
    out = {}
    for k, v in sd.items():
        if k == "cls_token":
            k, v = "class_embedding", v[0, 0]
        elif k == "pos_embed":
            k, v = "positional_embedding", v[0]
        for a, b in [("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"), ("blocks.", "transformer.resblocks."),
                     ("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv.", "attn.in_proj_"),
                     ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
            k = k.replace(a, b)
        k = "ln_post." + k[len("norm."):] if k.startswith("norm.") else k
        out["visual." + k] = v
    out["visual.proj"] = torch.randn(48, 32)
    out.update({"transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32), "logit_scale": torch.ones(()),
                "token_embedding.weight": torch.randn(10, 32), "ln_final.weight": torch.ones(32)})
    return out


def test_openai_clip_layout_with_quickgelu(tmp_path):
    src = _source("vit_base_patch16_clip_quickgelu_224", 32)
    clip = _to_openai_clip(_sd(src))
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in clip and "visual.ln_post.weight" in clip
    path = tmp_path / "clip_vitb16_openai.pt"
    torch.save(clip, path)
    e = build_expert("clip_vitb16", checkpoint=path, img_size=32, arch_overrides=TINY)
    _same(e, src, 32)
    assert torch.allclose(e.std.flatten(), torch.tensor(CLIP_MEAN_STD[1]))
    assert e.vit.norm_pre.__class__.__name__ != "Identity"


def test_timm_name_with_safetensors(tmp_path):
    src = _source("vit_small_patch16_224", 32)
    path = tmp_path / "model.safetensors"
    save_file(_sd(src), str(path))
    e = build_expert("vit_small_patch16_224", checkpoint=path, img_size=32, arch_overrides=TINY)
    _same(e, src, 32)
    assert torch.allclose(e.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))  # timm's config for this name


def test_docs_list_every_registered_name():
    from tests.conftest import REPO_ROOT

    rows = [line for line in (REPO_ROOT / "docs" / "experts.md").read_text().splitlines() if line.startswith("| `")]
    for name, spec in EXPERTS.items():
        row = next((r.split("|") for r in rows if f"`{name}`" in r.split("|")[1]), None)
        assert row is not None, name
        assert row[6].strip().startswith(str(spec.native_size)), (name, row[6])  # the "native res." column
        assert row[8].strip().startswith(spec.pooling.upper() if spec.pooling == "cls" else "mean"), (name, row[8])


@pytest.mark.parametrize("name", sorted(EXPERTS))
def test_every_registered_name_builds_its_architecture(name):
    e = build_expert(name, img_size=32 if "14" not in name else 28, random_init=True,
                     arch_overrides=dict(embed_dim=32, depth=1, num_heads=2))
    sam = EXPERTS[name].family == "sam"
    assert isinstance(e, SamExpert if sam else FrozenViTExpert)
    assert e.patch_size == (14 if "14" in name else 16)
    assert e.num_prefix_tokens == (0 if sam else 5 if name.endswith("_reg") else 1)
    assert e.pooling == EXPERTS[name].pooling
    assert e.checkpoint_sha256 is None
    assert not any(p.requires_grad for p in e.parameters())


def test_tiny_names_still_work():
    e = build_expert("tiny_a", img_size=32)
    assert e.img_size == 32 and e.embed_dim == 64
    s = build_expert("tiny_sam_a", img_size=48, features="blocks")
    assert isinstance(s, SamExpert) and s.out_dim == s.embed_dim == 32
    with pytest.raises(ValueError, match="SAM-family experts only"):
        build_expert("tiny_a", features="neck")


def test_timm_name_without_cls_token_defaults_to_mean_pooling():
    e = build_expert("vit_base_patch16_gap_224", img_size=32, random_init=True, arch_overrides=TINY)
    assert e.pooling == "mean" and e.num_prefix_tokens == 0


def test_real_size_dinov2_reg_hub_grid_37_served_at_224(tmp_path):
    """A real-width (384) ViT-S/14-reg4 hub file at its 518 px training grid (37x37), one block, served at 224 (the
    table interpolated at run time: tests/test_experts_dinov2_positions.py)."""
    src = _source("vit_small_patch14_reg4_dinov2", 518, embed_dim=384, depth=1, num_heads=6)
    sd = _sd(src)
    hub = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    hub.update(register_tokens=sd["reg_token"], cls_token=sd["cls_token"], mask_token=torch.zeros(1, 384),
               pos_embed=torch.cat([torch.zeros(1, 1, 384), sd["pos_embed"]], 1))
    assert hub["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    torch.save(hub, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    e = build_expert("dinov2_vits14_reg", checkpoint=tmp_path / "dinov2_vits14_reg4_pretrain.pth",
                     arch_overrides=dict(depth=1))
    assert (e.img_size, e.grid_size, e.embed_dim, e.num_prefix_tokens) == (224, (16, 16), 384, 5)
    assert torch.equal(e.vit.pos_embed, sd["pos_embed"])  # kept at 37x37 (the CLS row folded into cls_token)
    assert torch.equal(e.vit.reg_token, sd["reg_token"]) and torch.equal(e.vit.cls_token, sd["cls_token"])
    out = e(torch.rand(1, 3, 50, 50))
    assert out.shape == (1, 5 + 256, 384)


# --- SAM-family files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sam_vitb16", "medsam_vitb16"])
def test_whole_sam_state_dict_layout(tmp_path, name):
    src = tiny_sam(64)
    path = write_sam_whole(tmp_path / ("medsam_vit_b.pth" if "med" in name else "sam_vit_b_01ec64.pth"), src)
    raw = torch.load(path, weights_only=True)
    assert "image_encoder.blocks.0.mlp.lin1.weight" in raw and "image_encoder.neck.1.bias" in raw
    assert any(k.startswith("mask_decoder.") for k in raw) and any(k.startswith("prompt_encoder.") for k in raw)
    e = build_expert(name, checkpoint=path, img_size=64, arch_overrides=TINY_SAM)
    _same(e, src, 64)
    want = UNIT_MEAN_STD if "med" in name else IMAGENET_MEAN_STD
    assert torch.equal(e.std.flatten(), torch.tensor(want[1]))
    assert (e.pooling, e.out_dim, e.num_prefix_tokens) == ("mean", 16, 0)


def test_lvmmed_bare_encoder_without_position_embedding(tmp_path):
    src = tiny_sam(64, use_abs_pos=False)
    path = write_lvmmed(tmp_path / "lvmmed_vit.pth", src)
    e = build_expert("lvmmed_vitb16", checkpoint=path, img_size=64, arch_overrides=TINY_SAM)
    _same(e, src, 64)
    assert e.vit.pos_embed is None and e.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# --- medical ViTs -----------------------------------------------------------------------------------------------
def test_raddino_hugging_face_dinov2_layout(tmp_path):
    src = tiny_vit("vit_base_patch14_dinov2", 28)
    keys = hf_dinov2_keys(src)
    assert "encoder.layer.1.attention.attention.query.weight" in keys and "encoder.layer.0.layer_scale2.lambda1" in keys
    path = write_hf_dinov2(tmp_path / "rad-dino" / "model.safetensors", src)
    e = build_expert("raddino_vitb14", checkpoint=path, img_size=28, arch_overrides=TINY_VIT)
    _same(e, src, 28)
    assert torch.equal(e.mean.flatten(), torch.tensor(RAD_DINO_MEAN_STD[0])) and e.pooling == "cls"


def test_raddino_file_in_the_dinov2_code_layout_loads_too(tmp_path):
    src = tiny_vit("vit_base_patch14_dinov2", 28)
    torch.save(dict(_sd(src), mask_token=torch.zeros(1, 32)), tmp_path / "backbone_compatible.pth")
    e = build_expert("raddino_vitb14", checkpoint=tmp_path / "backbone_compatible.pth", img_size=28,
                     arch_overrides=TINY_VIT)
    _same(e, src, 28)


def test_biomedclip_open_clip_timm_trunk_layout(tmp_path):
    src = tiny_vit("vit_base_patch16_224", 32)
    path = write_open_clip_timm(tmp_path / "open_clip_pytorch_model.bin", src)
    e = build_expert("biomedclip_vitb16", checkpoint=path, img_size=32, arch_overrides=TINY_VIT)
    _same(e, src, 32)
    assert torch.equal(e.mean.flatten(), torch.tensor(CLIP_MEAN_STD[0])) and e.pooling == "cls"


def test_retfound_mae_layout_with_training_args(tmp_path):
    src = tiny_vit("vit_large_patch16_224", 32)
    path = write_retfound(tmp_path / "RETFound_mae_natureCFP.pth", src)  # {'model': ..., 'args': Namespace}
    e = build_expert("retfound_vitl16", checkpoint=path, img_size=32, arch_overrides=TINY_VIT)
    _same(e, src, 32)
    assert e.pooling == "mean"


def test_uni_timm_layout_with_layer_scale(tmp_path):
    src = tiny_vit("vit_large_patch16_224", 32, init_values=1e-5)
    path = write_timm(tmp_path / "pytorch_model.bin", src)
    assert "blocks.1.ls2.gamma" in torch.load(path, weights_only=True)
    e = build_expert("uni_vitl16", checkpoint=path, img_size=32, arch_overrides=TINY_VIT)
    _same(e, src, 32)
    assert e.pooling == "cls" and torch.equal(e.vit.blocks[0].ls1.gamma, src.blocks[0].ls1.gamma)
