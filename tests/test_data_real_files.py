"""Real files read and written right: palette masks as a viewer shows them, inference masks at the input's (H, W)
overlaying the ground truth, TIFFs in CVC-ClinicDB's layout, a CT's geometry in its NIfTI mask, 3-D volumes and
unreadable inputs in inference."""

from __future__ import annotations

import csv
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from medpmoe.data import DataError, load_datalist, read_image, segmentation_transforms
from medpmoe.data.converters import cvc_clinicdb
from medpmoe.data.readers import picture_affine
from medpmoe.data.transforms import MaskToIndexd
from medpmoe.inference import predict, run_inference
from medpmoe.models import build_model

TINY = [{"name": "tiny_a", "patch_size": 8, "img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2, "seed": 0}]


def _tiny(task="segmentation", num_classes=2):
    torch.manual_seed(0)
    kw = {"head_kwargs": {"channels": 8}} if task == "segmentation" else {}
    return build_model(experts=TINY, task=task, num_classes=num_classes, num_tokens=2, **kw)


def _index(path) -> np.ndarray:
    return MaskToIndexd("label")({"label": read_image(path)})["label"][0].numpy().astype(bool)


def test_ham_palette_masks_read_as_a_viewer_shows_them(shared_data):
    masks = sorted((shared_data / "ham10000_dev" / "masks").glob("*.png"))
    palette = [p for p in masks if Image.open(p).mode == "P"]
    assert len(masks) == 990 and len(palette) == 47
    for p in palette:
        viewer = np.asarray(Image.open(p).convert("L")) >= 128  # what a viewer shows: the lesion in white
        assert not np.array_equal(np.asarray(Image.open(p)) >= 128, viewer)  # by raw index they would swap
        assert np.array_equal(_index(p), viewer), p.name
    grey = masks[0] if Image.open(masks[0]).mode == "L" else masks[1]  # 'L' masks with anti-aliased edges
    assert np.array_equal(_index(grey), np.asarray(Image.open(grey)) >= 128)


class _Oracle(torch.nn.Module):
    """Logits that reproduce a given (1, S, S) mask whatever the image: isolates the geometry of the writer."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask.float()

    def forward(self, x):
        return (torch.cat([1 - self.mask, self.mask]) * 8 - 4)[None].expand(len(x), -1, -1, -1)


def test_kvasir_non_square_mask_has_image_h_w_and_overlays_ground_truth(shared_data, tmp_path):
    root = shared_data / "kvasir_seg_dev"
    image = next(p for p in sorted((root / "images").glob("*.jpg")) if Image.open(p).width != Image.open(p).height)
    gt = np.asarray(Image.open(root / "masks" / image.name).convert("L")) >= 128  # JPEG mask: threshold 128
    w, h = Image.open(image).size
    small = segmentation_transforms(64, train=False)({"image": str(image), "label": str(root / "masks" / image.name)})
    shutil.copy(image, tmp_path / image.name)
    run_inference(_Oracle(small["label"]), str(tmp_path / image.name), str(tmp_path / "out"), "segmentation", 64,
                  ["background", "polyp"])
    png = Image.open(tmp_path / "out" / f"{image.stem}_seg.png")
    assert png.size == (w, h) and (w, h) != (h, w)  # a viewer shows the image's width and height
    pred = np.asarray(png) == 255
    iou = (pred & gt).sum() / (pred | gt).sum()
    assert iou > 0.9, iou  # the 64 px ground truth, written back at 626x546, overlays the original
    nii = nib.load(tmp_path / "out" / f"{image.stem}_seg.nii.gz")
    assert nii.shape == (h, w) and np.array_equal(np.asarray(nii.dataobj) == 1, pred)
    np.testing.assert_array_equal(nii.affine, picture_affine())  # ITK's picture geometry: overlays in Slicer


def test_ct_nifti_mask_has_the_ct_spacing_and_position(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    if not path:
        pytest.skip("pydicom's CT_small.dcm is not installed")
    ds = pydicom.dcmread(path)
    run_inference(_tiny(), path, str(tmp_path), "segmentation", 32, ["background", "lesion"])
    nii = nib.load(tmp_path / "CT_small_seg.nii.gz")
    assert nii.shape == (ds.Rows, ds.Columns)
    np.testing.assert_allclose(nii.header.get_zooms()[:2], [float(v) for v in ds.PixelSpacing], rtol=1e-6)
    ipp, iop = np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float)
    d_row, d_col = (float(v) for v in ds.PixelSpacing)
    for r, c in [(0, 0), (5, 17), (127, 3)]:  # DICOM: row r, column c at IPP + c*dc*X + r*dr*Y (LPS)
        lps = ipp + c * d_col * iop[:3] + r * d_row * iop[3:]
        np.testing.assert_allclose((nii.affine @ [r, c, 0, 1])[:3], lps * [-1, -1, 1], atol=1e-3)


def test_cvc_clinicdb_tiff_layout(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "Original").mkdir()
    (tmp_path / "Ground Truth").mkdir()
    frames, masks = {}, {}
    for i in (1, 2, 3, 4):
        frame = rng.integers(0, 256, (288, 384, 3), dtype=np.uint8)
        mask = np.zeros((288, 384), np.uint8)
        mask[40 + i * 10: 120 + i * 10, 100: 260] = 255
        if i == 2:  # a greyscale frame with an RGB (grey) mask
            frame = frame[..., 0]
            rgb_grey = np.repeat(mask[..., None], 3, 2)
            tifffile.imwrite(tmp_path / "Ground Truth" / f"{i}.tif", rgb_grey, photometric="rgb")
        else:
            tifffile.imwrite(tmp_path / "Ground Truth" / f"{i}.tif", mask)
        if i == 3:  # LZW-compressed (tifffile needs imagecodecs for it; read through PIL instead)
            Image.fromarray(frame).save(tmp_path / "Original" / f"{i}.tif", compression="tiff_lzw")
        else:
            tifffile.imwrite(tmp_path / "Original" / f"{i}.tif", frame, photometric="rgb" if frame.ndim == 3 else None)
        frames[f"{i}.tif"], masks[f"{i}.tif"] = frame, mask
    report = cvc_clinicdb(tmp_path, tmp_path / "cvc.json")
    assert report.ok and len(report.items) == 4
    for it in load_datalist(tmp_path / "cvc.json"):
        name = os.path.basename(it["image"])
        x = read_image(it["image"])
        ref = frames[name] if frames[name].ndim == 3 else frames[name][..., None]
        assert x.shape == (ref.shape[2], 288, 384) and np.array_equal(x.numpy(), np.moveaxis(ref, -1, 0))
        assert np.array_equal(_index(it["label"]), masks[name] == 255)
        out = segmentation_transforms(32, train=False)(it)
        assert out["image"].shape == (3, 32, 32) and out["label"].sum() > 0
    pred = predict(_tiny(), [str(tmp_path / "Original" / "1.tif")], "segmentation", 32)[0]
    assert pred.mask.shape == (1, 288, 384) and pred.probabilities.shape == (2, 288, 384)


def test_inference_volumes_middle_every_or_one_slice_and_unreadable_files_skipped(tmp_path, capsys):
    """Volumes: the middle slice by default, as the validation chain takes it (deliberately changed from every slice,
    docs/data.md); slices='all' predicts every slice into one volume mask; an index predicts that slice."""
    from nibabel.testing import data_path

    (tmp_path / "in").mkdir()
    vol = shutil.copy(os.path.join(data_path, "anatomical.nii"), tmp_path / "in" / "head.nii")
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    (tmp_path / "in" / "notes.png").write_text("not an image")
    src = nib.load(vol)
    written = run_inference(_tiny(), str(tmp_path / "in"), str(tmp_path / "out"), "segmentation", 32,
                            ["background", "fg"])
    printed = capsys.readouterr().out
    assert "head.nii: 3-D volume (33, 41, 25), predicting slice 12 of 25" in printed
    middle = nib.load(tmp_path / "out" / "head_seg.nii.gz")
    assert middle.shape in ((33, 41), (33, 41, 1))  # the middle slice, placed where it lies in the volume
    np.testing.assert_allclose(middle.affine @ [4, 7, 0, 1], src.affine @ [4, 7, 12, 1])
    assert "empty.png: empty file (0 bytes)" in printed and "notes.png: not a picture file" in printed
    run_inference(_tiny(), str(tmp_path / "in"), str(tmp_path / "all"), "segmentation", 32, ["background", "fg"],
                  slices="all")
    assert "head.nii: 3-D volume (33, 41, 25), predicting all 25 slices" in capsys.readouterr().out
    seg = nib.load(tmp_path / "all" / "head_seg.nii.gz")
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)
    same_slice = np.asarray(middle.dataobj).reshape(33, 41)
    assert np.array_equal(np.asarray(seg.dataobj)[..., 12], same_slice)
    assert not (tmp_path / "out" / "head_seg.png").exists()  # no PNG for a volume
    rows = list(csv.reader((tmp_path / "out" / "skipped.csv").open()))
    assert [r[0].split("/")[-1] for r in rows[1:]] == ["empty.png", "notes.png"]
    assert tmp_path / "out" / "skipped.csv" in written
    one = predict(_tiny(), [str(vol)], "segmentation", 32, slices=3)[0]
    assert one.slices == [3] and one.mask.shape == (1, 33, 41, 1)
    np.testing.assert_allclose(one.mask.affine.numpy() @ [4, 7, 0, 1], src.affine @ [4, 7, 3, 1])  # where slice 3 is
    cls = run_inference(_tiny("classification", 3), str(vol), str(tmp_path / "cls"), "classification", 32,
                        ["a", "b", "c"], slices="middle")
    rows = list(csv.DictReader(cls[0].open()))
    assert len(rows) == 1 and rows[0]["slice"] == "12" and rows[0]["prediction"] in ("a", "b", "c")
    with pytest.raises(DataError, match="3 unreadable inputs in .*bad, nothing predicted: .*a.png: empty file"):
        (tmp_path / "bad").mkdir()
        for n in ("a.png", "b.png", "c.png"):
            (tmp_path / "bad" / n).write_bytes(b"")
        run_inference(_tiny(), str(tmp_path / "bad"), str(tmp_path / "out2"), "segmentation", 32)
