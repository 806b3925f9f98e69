"""Decompression bombs, symbolic link loops, NaN voxels, images smaller than a patch and unreadable names are bad
files in every checker (converter, `validate`, `validate --fast`, the bundle start check): each listed by name with
its problem, in one line, and the converter drops nothing without listing it."""

from __future__ import annotations

import json
import os
import struct
import zlib

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medpmoe.bundle import check_data, run_bundle
from medpmoe.bundle.data import largest_patch_size
from medpmoe.data import DataError, convert, validate, write_datalist
from medpmoe.demo import make_synthetic_polyps
from tests.conftest import REPO_ROOT
from tests.test_bundle_common import TINY

# the problem each kind of bad file is listed with
PROBLEMS = {"bomb.png": "decompression bomb: the header claims 400 megapixels",
            "loop.png": "symbolic link loop", "loop_b.png": "symbolic link loop",
            "small.png": "image is 4x4 pixels, below the 8-pixel minimum side"}


def _png_header_bomb(path, w=20000, h=20000) -> None:
    """A valid PNG whose header claims w x h pixels (a few hundred bytes on disk)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture
def bad_kvasir(tmp_path, monkeypatch):
    """A Kvasir-layout folder: 8 good synthetic pairs, a decompression bomb, a symbolic link loop (two links) and a
    4x4 image, each with a mask of the same name."""
    monkeypatch.setenv("MEDPMOE_CACHE_DIR", str(tmp_path / "cache"))
    root = make_synthetic_polyps(tmp_path / "kvasir", num_images=8, size=32).parent
    (root / "datalist.json").unlink()
    images, masks = root / "images", root / "masks"
    good_mask = next(masks.iterdir())
    _png_header_bomb(images / "bomb.png")
    os.symlink("loop_b.png", images / "loop.png")
    os.symlink("loop.png", images / "loop_b.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(images / "small.png")
    Image.fromarray((np.eye(4) * 255).astype(np.uint8)).save(masks / "small.png")
    for name in ("bomb.png", "loop.png", "loop_b.png"):
        (masks / name).write_bytes(good_mask.read_bytes())
    return root


def _nan_volume(path) -> None:
    vol = np.random.default_rng(0).random((24, 24, 3)).astype(np.float32)
    vol[3, 4, 1] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))


def _assert_lists(message: str, problems: dict) -> None:
    assert "\n" not in message.strip()
    for name, problem in problems.items():
        assert f"{name}: {problem}" in message, (name, message)


def test_converter_lists_every_bad_file_and_drops_none_unlisted(bad_kvasir, tmp_path, capsys):
    out = tmp_path / "k.json"
    assert convert.main(["kvasir", str(bad_kvasir), str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: 4 problems: ")
    _assert_lists(last, PROBLEMS)
    assert convert.main(["kvasir", str(bad_kvasir), str(out), "--on-error", "skip"]) == 0
    printed = capsys.readouterr().out
    kept = json.loads(out.read_text())["training"]
    assert len(kept) == 8 and "8 items kept, 4 problems" in printed
    assert len(kept) + len(PROBLEMS) == len(os.listdir(bad_kvasir / "images"))  # every file kept or listed


@pytest.fixture
def bad_datalist(bad_kvasir, tmp_path):
    """A hand-written datalist naming the good pairs, every bad kind above, a NaN volume and two unreadable names
    (a lone surrogate no file system name can hold, a NUL character)."""
    images, masks = bad_kvasir / "images", bad_kvasir / "masks"
    items = [{"image": str(p), "label": str(masks / p.name)} for p in sorted(images.iterdir())]
    _nan_volume(tmp_path / "nan.nii.gz")
    mask = np.zeros((24, 24, 3), np.uint8)
    mask[5:15, 5:15] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / "nan_mask.nii.gz"))
    items += [{"image": str(tmp_path / "nan.nii.gz"), "label": str(tmp_path / "nan_mask.nii.gz")},
              {"image": str(images / "odd\ud800.png"), "label": str(masks / "x.png")},
              {"image": str(images / "nul\0.png"), "label": str(masks / "x.png")}]
    return write_datalist(tmp_path / "bad.json", items, ["background", "polyp"], "segmentation")


EVERY = {**PROBLEMS, "nan.nii.gz": "1 voxels are NaN or infinite",
         "odd\\ud800.png": "unreadable file name", "nul\0.png": "unreadable file name (it holds a NUL character)"}


def test_validate_full_and_fast_list_every_bad_file(bad_datalist, capsys):
    assert validate.main([str(bad_datalist), "--fast"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: 7 bad files in ")
    _assert_lists(last, EVERY)
    assert validate.main([str(bad_datalist)]) == 2
    printed = capsys.readouterr().out
    assert "8 items kept, 7 problems" in printed
    full = {**EVERY, "nan.nii.gz": "image contains NaN or infinite values"}
    for name, problem in full.items():
        assert f"{name}: {problem}" in printed, (name, printed)


def test_bundle_start_check_lists_them_with_the_experts_patch_size(bad_datalist, tmp_path, monkeypatch):
    with pytest.raises(DataError) as err:
        check_data(str(bad_datalist), "segmentation", ["background", "polyp"])
    _assert_lists(str(err.value), EVERY)
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(Exception) as err:
        run_bundle(str(REPO_ROOT / "bundles" / "kvasir_seg" / "train.json"), tracking=False,
                   **{**TINY, "output_dir": str(tmp_path / "out"), "datalist": str(bad_datalist)})
    last = err.value.__notes__[-1]
    assert last.startswith("DataError: 7 bad files in ")
    _assert_lists(last, {**EVERY, "small.png": "image is 4x4 pixels, below the 16-pixel minimum side (the largest "
                                               "expert patch size)"})
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_largest_patch_size_of_expert_entries():
    assert largest_patch_size(TINY["experts"]) == 16
    assert largest_patch_size([{"name": "dinov2_vitb14"}, "tiny"]) == 14
    assert largest_patch_size([]) is None


def test_nan_volume_of_the_shared_kind_is_caught_by_the_fast_check(tmp_path, monkeypatch):
    """A NIfTI that holds NaNs passes no checker, and a clean one passes the fast check."""
    monkeypatch.setenv("MEDPMOE_CACHE_DIR", str(tmp_path / "cache"))
    _nan_volume(tmp_path / "nan.nii.gz")
    good = np.random.default_rng(1).random((24, 24, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(good, np.eye(4)), str(tmp_path / "good.nii.gz"))
    items = [{"image": str(tmp_path / n), "label": 0} for n in ("good.nii.gz", "nan.nii.gz")]
    datalist = write_datalist(tmp_path / "v.json", items, ["a", "b"], "classification")
    with pytest.raises(DataError, match=r"nan\.nii\.gz: 1 voxels are NaN or infinite"):
        check_data(str(datalist), "classification", ["a", "b"])
    write_datalist(datalist, items[:1], ["a", "b"], "classification")
    assert check_data(str(datalist), "classification", ["a", "b"]) == 1
