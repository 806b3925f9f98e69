"""`medpmoe.load_model` + `medpmoe.predict`: the checkpoint's settings are used (and contradictions refused), and an
image of another kind than the training images is refused, or predicted with a warning when asked."""

from __future__ import annotations

import csv
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import medpmoe
from medpmoe.data import DataError, InputKindError
from medpmoe.inference import predict, run_inference
from tests.helpers import polyp_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, the synthetic polyp images it was trained on)."""
    root = tmp_path_factory.mktemp("polyps")
    ckpt = polyp_checkpoint(root / "best.pt", root / "data")
    return ckpt, sorted((root / "data" / "images").glob("*.png"))[:3]


def _ct() -> str:
    pydicom = pytest.importorskip("pydicom")
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    if not path:
        pytest.skip("pydicom's CT_small.dcm is not installed")
    return path


def test_predict_uses_the_checkpoints_settings_and_refuses_contradictions(trained):
    ckpt, images = trained
    model = medpmoe.load_model(ckpt)
    assert medpmoe.predict is predict  # one inference function, under both names
    preds = medpmoe.predict(model, [str(p) for p in images])
    explicit = predict(model, images, "segmentation", 32, ["background", "polyp"], False)  # the old call still works
    for p, q, image in zip(preds, explicit, images):
        assert torch.equal(p.mask, q.mask) and torch.equal(p.probabilities, q.probabilities)
        assert p.mask.shape[1:] == Image.open(image).size[::-1]
    assert 0 < float(torch.stack([p.mask.float().mean() for p in preds]).mean()) < 1  # neither empty nor full
    for kwargs, match in [({"image_size": 48}, "image_size=48 contradicts .*best.pt, trained with image_size=32"),
                          ({"task": "classification"}, "task='classification' contradicts"),
                          ({"class_names": ["background", "lesion"]}, "class_names=.* contradicts")]:
        with pytest.raises(ValueError, match=match):
            medpmoe.predict(model, images, **kwargs)
    described = medpmoe.models.describe_model(model)
    assert described.startswith("best.pt: segmentation, classes ['background', 'polyp']; images resized to 32x32; "
                                "trained on 2-D colour pictures (PNG/JPEG/TIFF)")


def test_an_image_of_another_kind_is_refused_or_predicted_with_a_warning(trained, tmp_path, capsys):
    from nibabel.testing import data_path

    ckpt, images = trained
    model = medpmoe.load_model(ckpt)
    ct = _ct()
    grey = tmp_path / "grey.png"
    Image.fromarray(np.asarray(Image.open(images[0]).convert("L"))).save(grey)
    volume = os.path.join(data_path, "anatomical.nii")
    cases = [(ct, "a 2-D grey CT image (DICOM), but the model was trained on 2-D colour pictures (PNG/JPEG/TIFF)"),
             (str(grey), "a 2-D grey picture (PNG/JPEG/TIFF), but"),
             (volume, "a 3-D grey NIfTI volume, but"),
             (np.asarray(Image.open(grey)), "a 2-D grey array, but")]
    for source, message in cases:
        with pytest.raises(InputKindError, match=f"{re.escape(message)}.*check_inputs=False"):
            medpmoe.predict(model, [source])
    rgb = np.asarray(Image.open(images[0]))  # an in-memory colour frame fits (no file type to compare)
    assert medpmoe.predict(model, [rgb])[0].mask.shape == (1, *rgb.shape[:2])
    skipped = medpmoe.predict(model, [ct, str(images[0])], on_error="skip")
    assert skipped[0].refused and skipped[0].mask is None and "CT image" in skipped[0].error
    assert not skipped[1].refused and skipped[1].error is None
    capsys.readouterr()
    anyway = medpmoe.predict(model, [ct], check_inputs=False)[0]
    assert anyway.mask.shape == (1, 128, 128)
    assert "inference: warning: " in capsys.readouterr().out  # never silent


def test_run_inference_writes_what_fits_and_lists_what_was_refused(trained, tmp_path, capsys):
    ckpt, images = trained
    model = medpmoe.load_model(ckpt)
    (tmp_path / "in").mkdir()
    shutil.copy(images[0], tmp_path / "in" / images[0].name)
    shutil.copy(_ct(), tmp_path / "in" / "ct.dcm")
    run_inference(model, str(tmp_path / "in"), str(tmp_path / "out"))
    printed = capsys.readouterr().out
    assert printed.startswith("inference: model best.pt: segmentation, classes ['background', 'polyp']")
    assert (tmp_path / "out" / f"{images[0].stem}_seg.png").is_file()
    assert not (tmp_path / "out" / "ct_seg.png").exists()
    rows = list(csv.reader((tmp_path / "out" / "skipped.csv").open()))
    assert rows[1][0].endswith("ct.dcm") and "trained on 2-D colour pictures" in rows[1][1]
    assert "skipped 1 refused or unreadable input(s)" in printed
    (tmp_path / "in" / images[0].name).unlink()
    shutil.copy(_ct(), tmp_path / "in" / "ct2.dcm")
    with pytest.raises(DataError, match="2 refused or unreadable inputs in .*, nothing predicted: .*ct.dcm: a 2-D"):
        run_inference(model, str(tmp_path / "in"), str(tmp_path / "out"))


def test_amp_reaches_the_model(trained):
    """`amp=True` (and a trainer's autocast) runs the model in bf16: the model no longer switches the caller's
    autocast off when it has no amp setting of its own."""
    ckpt, images = trained
    model = medpmoe.load_model(ckpt)
    fp32, bf16 = medpmoe.predict(model, images[:1])[0], medpmoe.predict(model, images[:1], amp=True)[0]
    assert 0 < float((fp32.probabilities - bf16.probabilities).abs().max()) < 0.05


def test_in_memory_images_are_scaled_as_their_files(trained, tmp_path):
    """A uint8 array as PIL gives it is divided by 255 like the file it came from (not stretched by its own min/max,
    which a dark frame would show), and a float (C, H, W) tensor already in [0, 1] is taken as it is."""
    ckpt, images = trained
    model = medpmoe.load_model(ckpt)
    dark = (np.asarray(Image.open(images[0]).convert("RGB")) * 0.4).astype(np.uint8)  # values well inside 0..255
    assert dark.max() < 128
    Image.fromarray(dark).save(tmp_path / "dark.png")
    from_file = predict(model, [str(tmp_path / "dark.png")])[0]
    as_float = torch.from_numpy(dark).permute(2, 0, 1).float() / 255
    for array in (dark, as_float):
        pred = predict(model, [array])[0]
        assert torch.allclose(pred.probabilities, from_file.probabilities, atol=1e-5)
        assert torch.equal(pred.mask, from_file.mask)
    stretched = predict(model, [dark], intensity="minmax")[0]  # what 'auto' did before: visibly other probabilities
    assert (stretched.probabilities - from_file.probabilities).abs().max() > 1e-2


def test_no_output_replaces_another(trained, tmp_path):
    """`a.png` beside `a.jpg` (one frame saved twice, then one of them flipped) get one mask each, at their own
    orientation; in-memory images get plain file names; probabilities are written without MONAI's double-affine
    warning."""
    import warnings

    from medpmoe.inference import save_predictions

    ckpt, images = trained
    model = medpmoe.load_model(ckpt)
    frame = np.asarray(Image.open(images[0]).convert("RGB"))
    (tmp_path / "in").mkdir()
    Image.fromarray(frame).save(tmp_path / "in" / "a.png")
    Image.fromarray(np.ascontiguousarray(frame[::-1])).save(tmp_path / "in" / "a.jpg", quality=100)
    run_inference(model, str(tmp_path / "in"), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "a_seg.png").exists()
    written = {}
    for ext in ("png", "jpg"):
        written[ext] = np.asarray(Image.open(tmp_path / "out" / f"a_{ext}_seg.png"))
        alone = predict(model, [str(tmp_path / "in" / f"a.{ext}")])[0].mask[0].numpy()
        assert np.array_equal(written[ext], alone * 255)  # each file holds its own input's mask
    assert (written["png"] != written["jpg"]).mean() > 0.01  # two predictions, not one written twice
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = save_predictions(predict(model, [frame, frame]), tmp_path / "arrays", save_probabilities=True)
    assert sorted(p.name for p in written) == ["array_0_prob.nii.gz", "array_0_seg.nii.gz", "array_0_seg.png",
                                               "array_1_prob.nii.gz", "array_1_seg.nii.gz", "array_1_seg.png"]
