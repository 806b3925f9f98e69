"""Each expert's input preparation: the default (square bilinear resize) and its authors' (preprocessing="authors")."""

import pytest
import torch
from torch.nn import functional as F

from medpmoe.experts import build_expert
from medpmoe.experts.base import Preprocessing
from medpmoe.experts.registry import EXPERTS, IMAGENET_MEAN_STD, UNIT_MEAN_STD
from tests.conftest import REPO_ROOT
from tests.expert_files import TINY_SAM, TINY_VIT

SAM_TINY = dict(TINY_SAM, patch_size=16)


def _norm(x, mean_std=IMAGENET_MEAN_STD):
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std)
    return (x - mean) / std


def test_default_is_a_square_bilinear_resize_and_mean_std():
    e = build_expert("mocov3_vitb16", random_init=True, img_size=32, arch_overrides=TINY_VIT)
    assert e.preprocessing == Preprocessing()
    x = torch.rand(2, 3, 48, 40)
    want = _norm(F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False))
    torch.testing.assert_close(e.preprocess(x), want)


def test_sam_authors_longest_side_then_normalise_then_pad():
    e = build_expert("sam_vitb16", random_init=True, img_size=64, preprocessing="authors", arch_overrides=SAM_TINY)
    assert e.preprocessing.resize == "longest_side" and e.grid_size == (4, 4)
    x = torch.rand(1, 3, 40, 80)  # 1:2 -> 32 x 64, then zero rows 32..63
    out = e.preprocess(x)
    want = _norm(F.interpolate(x, size=(32, 64), mode="bilinear", align_corners=False, antialias=True))
    assert out.shape == (1, 3, 64, 64)
    torch.testing.assert_close(out[..., :32, :], want)
    assert torch.equal(out[..., 32:, :], torch.zeros(1, 3, 32, 64))
    assert e(x).shape == (1, 16, 16)  # the neck on the full 4x4 grid
    assert build_expert("sam_vitb16", random_init=True, preprocessing="authors",
                        arch_overrides=dict(SAM_TINY, window_size=8)).img_size == 1024  # SAM's own size


def test_medsam_authors_min_max_per_image_without_mean_std():
    e = build_expert("medsam_vitb16", random_init=True, img_size=64, preprocessing="authors", arch_overrides=SAM_TINY)
    assert e.preprocessing.minmax and torch.equal(e.std.flatten(), torch.tensor(UNIT_MEAN_STD[1]))
    x = torch.rand(2, 3, 64, 64)
    out = e.preprocess(x)
    assert torch.allclose(out.amin(dim=(1, 2, 3)), torch.zeros(2))
    assert torch.allclose(out.amax(dim=(1, 2, 3)), torch.ones(2))
    torch.testing.assert_close(e.preprocess(0.3 * x + 0.2), out)  # a dimmer image gets the same input
    default = build_expert("medsam_vitb16", random_init=True, img_size=64, arch_overrides=SAM_TINY)
    assert not torch.allclose(default.preprocess(0.3 * x + 0.2), out)


def test_authors_sizes_and_sources_per_expert():
    raddino = build_expert("raddino_vitb14", random_init=True, preprocessing="authors", arch_overrides=TINY_VIT)
    assert (raddino.img_size, raddino.grid_size, raddino.preprocessing.interpolation) == (518, (37, 37), "bicubic")
    assert build_expert("raddino_vitb14", random_init=True, arch_overrides=TINY_VIT).img_size == 224  # the default
    doc = (REPO_ROOT / "docs" / "experts.md").read_text()
    for name, spec in EXPERTS.items():
        assert spec.authors.source and spec.authors.size in (224, 518, 1024), name
        assert f"`{name}`" in doc.split("## Input preparation")[1].split("\n## ")[0], name


def test_custom_and_bad_preprocessing_values():
    e = build_expert("tiny", preprocessing={"interpolation": "bicubic", "antialias": True}, img_size=32)
    assert e.preprocessing == Preprocessing(interpolation="bicubic", antialias=True)
    with pytest.raises(ValueError, match="expert 'mae_vitb16': preprocessing must be 'default', 'authors'"):
        build_expert("mae_vitb16", random_init=True, preprocessing="paper", arch_overrides=TINY_VIT)
    with pytest.raises(ValueError, match="resize must be one of"):
        build_expert("tiny", preprocessing={"resize": "crop"})
    with pytest.raises(ValueError, match="tiny test experts have no authors"):
        build_expert("tiny", preprocessing="authors")
