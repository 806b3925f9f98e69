"""DINOv2, DINOv2 with registers and RAD-DINO interpolate their position tables at run time as their authors do.

RAD-DINO: a tiny `transformers.Dinov2Model` (the model card's 518 px table, 37x37) written in its own key layout,
loaded as `raddino_vitb14`, and compared with `transformers`' own forward at 224 and 518 px. DINOv2 (no package
to import): a reference for `interpolate_pos_encoding` written in this file from facebookresearch/dinov2
`dinov2/models/vision_transformer.py` (hub settings interpolate_offset=0.1, interpolate_antialias=False).
"""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from medpmoe.experts import build_expert
from medpmoe.experts.registry import RAD_DINO_MEAN_STD
from tests.expert_files import TINY_VIT, randomize, tiny_vit

transformers = pytest.importorskip("transformers")


def _hf_dinov2(tmp_path, seed=0):
    """A tiny random Dinov2Model at the card's 518 px and its `model.safetensors` (what save_pretrained writes)."""
    torch.manual_seed(seed)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=518,
                                    patch_size=14, layerscale_value=0.5)
    model = randomize(transformers.Dinov2Model(cfg), seed)
    model.save_pretrained(tmp_path / "rad-dino")  # the published layout: encoder.layer.N.attention.attention.query
    path = tmp_path / "rad-dino" / "model.safetensors"
    assert "encoder.layer.1.attention.attention.query.weight" in load_file(str(path))
    return model, path


@pytest.mark.parametrize("size", [224, 518])
def test_raddino_equals_transformers_dinov2model(tmp_path, size):
    hf, path = _hf_dinov2(tmp_path)
    e = build_expert("raddino_vitb14", checkpoint=path, img_size=size, arch_overrides=TINY_VIT)
    assert e.vit.pos_embed.shape == (1, 1 + 37 * 37, 32)  # the table is kept as trained
    images = torch.rand(2, 3, size, size)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in RAD_DINO_MEAN_STD)
    with torch.no_grad():
        ours = e(images)
        theirs = hf(pixel_values=(images - mean) / std).last_hidden_state
    assert ours.shape == theirs.shape == (2, 1 + (size // 14) ** 2, 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_raddino_transformers_in_memory_key_names_load_too(tmp_path):
    hf, _ = _hf_dinov2(tmp_path)
    sd = hf.state_dict()
    assert "encoder.layer.0.attention.q_proj.weight" in sd  # transformers 5's own module names
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "state.safetensors"))
    e = build_expert("raddino_vitb14", checkpoint=tmp_path / "state.safetensors", img_size=224, arch_overrides=TINY_VIT)
    images = torch.rand(1, 3, 224, 224)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in RAD_DINO_MEAN_STD)
    with torch.no_grad():
        torch.testing.assert_close(e(images), hf(pixel_values=(images - mean) / std).last_hidden_state, rtol=0,
                                   atol=1e-5)


def dinov2_interpolate_pos_encoding(pos_embed, npatch, w, h, patch_size, offset=0.1):
    """facebookresearch/dinov2 `interpolate_pos_encoding` (class row first), restated for this test."""
    n = pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    pos = pos_embed.float()
    cls_pos, patch_pos = pos[:, 0], pos[:, 1:]
    dim, m = pos.shape[-1], int(math.sqrt(n))
    w0, h0 = w // patch_size, h // patch_size
    patch_pos = torch.nn.functional.interpolate(
        patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=False,
        scale_factor=(float(w0 + offset) / m, float(h0 + offset) / m))
    assert (w0, h0) == patch_pos.shape[-2:]
    patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((cls_pos.unsqueeze(0), patch_pos), dim=1).to(pos_embed.dtype)


def _dinov2_reference(src, hub, images, mean_std_images):
    """DINOv2's `prepare_tokens_with_masks` (cls, + interpolated table, then registers after cls), src's blocks."""
    b, _, w, h = images.shape
    x = torch.nn.functional.conv2d(mean_std_images, hub["patch_embed.proj.weight"], hub["patch_embed.proj.bias"],
                                   stride=14).flatten(2).transpose(1, 2)
    x = torch.cat([hub["cls_token"].expand(b, -1, -1), x], dim=1)
    x = x + dinov2_interpolate_pos_encoding(hub["pos_embed"], x.shape[1] - 1, w, h, 14)
    if "register_tokens" in hub:
        x = torch.cat([x[:, :1], hub["register_tokens"].expand(b, -1, -1), x[:, 1:]], dim=1)
    for blk in src.blocks:
        x = blk(x)
    return src.norm(x)


@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_hub_file_interpolated_as_the_dinov2_code(tmp_path, registers):
    arch = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    src = tiny_vit(arch, 518)  # the hub files' 37x37 table
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    hub = {k: v for k, v in sd.items() if k not in ("reg_token", "pos_embed")}
    hub["mask_token"] = torch.zeros(1, 32)
    if registers:  # the hub file gives CLS a position row; timm's model folds it into cls_token
        hub["register_tokens"] = sd["reg_token"]
        hub["pos_embed"] = torch.cat([torch.randn(1, 1, 32) * 0.2, sd["pos_embed"]], dim=1)
    else:
        hub["pos_embed"] = sd["pos_embed"]
    name = "dinov2_vits14_reg" if registers else "dinov2_vits14"
    torch.save(hub, tmp_path / "hub.pth")
    e = build_expert(name, checkpoint=tmp_path / "hub.pth", img_size=224, arch_overrides=TINY_VIT)
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        ours = e(images)
        ref = _dinov2_reference(src, hub, images, e.preprocess(images))
        # what a one-off timm resample at load gives instead: measurably different tokens
        timm_table = resample_abs_pos_embed(hub["pos_embed"], (16, 16), (37, 37), num_prefix_tokens=1)
    assert ours.shape == (2, 1 + 4 * registers + 256, 32)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    ours_table = dinov2_interpolate_pos_encoding(hub["pos_embed"], 256, 224, 224, 14)
    assert (ours_table - timm_table).abs().max() > 1e-3


def test_dinov2_at_the_tables_own_grid_adds_it_unchanged(tmp_path):
    src = tiny_vit("vit_small_patch14_dinov2", 28)
    torch.save(dict(src.state_dict(), mask_token=torch.zeros(1, 32)), tmp_path / "d.pth")
    e = build_expert("dinov2_vits14", checkpoint=tmp_path / "d.pth", img_size=28, arch_overrides=TINY_VIT)
    images = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(e(images), src.forward_features(e.preprocess(images)))
