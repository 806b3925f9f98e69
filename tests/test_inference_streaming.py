"""Streaming inference: memory does not grow with the number of inputs, a killed run's re-run writes only what is
missing, classification rows are appended as they are made, the bundle's inference objects are the real ones
(over the one validation chain) and its command exits non-zero, saying so last, when inputs were skipped."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medpmoe
from medpmoe.inference import run_inference
from tests.helpers import bundle_env, polyp_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from inference_memory import make_frames, measure  # noqa: E402


@pytest.fixture(scope="module")
def polyps(tmp_path_factory):
    """(checkpoint, a folder of 16 colour frames: 8 synthetic polyps and 8 generated frames of another size)."""
    root = tmp_path_factory.mktemp("streaming")
    ckpt = polyp_checkpoint(root / "best.pt", root / "data")
    frames = root / "frames"
    make_frames(frames, 8, 72, 56)
    for p in sorted((root / "data" / "images").glob("*.png")):
        shutil.copy(p, frames / p.name)
    return ckpt, frames


def _written(out: Path) -> list[str]:
    return (out / "written.csv").read_text().splitlines()[1:]


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_inputs(tmp_path):
    """The benchmark's measurement, smaller: 4 and 24 frames of 600x500 in one process (peak reset in between).
    Holding every prediction, as inference did, adds ~6 MB a frame here: 24 frames would exceed 4 by > 100 MB."""
    small, large = measure([4, 24], tmp_path, 600, 500, batch_size=4, same_process=True)
    assert (small["masks_written"], large["masks_written"]) == (4, 24)
    assert large["peak_rss_mib"] <= 1.2 * small["peak_rss_mib"], (small, large)
    if small["peak_reset"]:  # allocator noise is tens of MB here; holding the 20 extra frames would add > 100
        assert large["growth_mib"] <= small["growth_mib"] + 60, (small, large)


SLOW_RUN = textwrap.dedent("""
    import sys, time
    import medpmoe
    from medpmoe.inference import run_inference
    model = medpmoe.load_model(sys.argv[1])
    forward = model.forward
    def slow(x):
        time.sleep(0.4)
        return forward(x)
    model.forward = slow
    run_inference(model, sys.argv[2], sys.argv[3], batch_size=1, progress=False)
""")


@pytest.mark.slow
def test_a_killed_run_is_finished_by_a_rerun_that_writes_only_what_is_missing(polyps, tmp_path, capsys):
    ckpt, frames = polyps
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(ckpt), str(frames), str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not ((out / "written.csv").is_file() and len(_written(out)) >= 3):
        assert child.poll() is None, child.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the inference subprocess wrote nothing"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    before = _written(out)
    assert 3 <= len(before) < 16  # killed half-way: each batch was written as it was made
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*_seg.*")}
    assert len(stamps) >= 2 * len(before)

    model = medpmoe.load_model(ckpt)
    capsys.readouterr()
    written = run_inference(model, str(frames), str(out), progress=False)
    printed = capsys.readouterr().out
    assert f"{len(before)} of 16 inputs already written for this model" in printed
    assert "inference: 16 of 16 inputs" in printed
    done = {Path(s).stem for s in before}
    assert sorted(p.name for p in written) == sorted(f"{Path(s).stem}_seg{ext}" for s in os.listdir(frames)
                                                     if Path(s).stem not in done for ext in (".nii.gz", ".png"))
    for p, stamp in stamps.items():
        if p.name.split("_seg")[0] in done:
            assert p.stat().st_mtime_ns == stamp, f"{p.name} was written again"
    assert sorted(_written(out)) == sorted(str(p) for p in frames.iterdir())  # each input once
    preds = medpmoe.predict(model, sorted(frames.iterdir()), verbose=False)
    for p in preds:  # what the two runs wrote is what the Python API predicts
        png = np.asarray(Image.open(out / f"{Path(p.source).stem}_seg.png"))
        assert np.array_equal(png, p.mask[0].numpy() * 255), p.source

    assert run_inference(model, str(frames), str(out), progress=False) == []  # nothing left to write
    run_inference(model, str(frames), str(out), progress=False, save_probabilities=True)  # other settings
    assert "predicting every input again" in capsys.readouterr().out
    assert len(list(out.glob("*_prob.nii.gz"))) == 16


def test_classification_rows_are_appended_and_a_rerun_adds_only_the_missing_ones(polyps, tmp_path):
    from medpmoe.models import build_model

    _, frames = polyps
    torch.manual_seed(0)
    experts = [{"name": "tiny_c", "patch_size": 8, "img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2,
                "seed": 0}]
    model = build_model(experts, task="classification", num_classes=3, num_tokens=2)
    kw = dict(task="classification", image_size=32, class_names=["a", "b", "c"], batch_size=4, progress=False)
    out = tmp_path / "cls"
    assert run_inference(model, str(frames), str(out), **kw) == [out / "probabilities.csv"]
    first = list(csv.DictReader((out / "probabilities.csv").open()))
    assert len(first) == 16 and set(first[0]) == {"image", "a", "b", "c", "prediction"}
    # as if killed after the last batch's rows were appended but before written.csv recorded them
    lines = (out / "written.csv").read_text().splitlines()
    (out / "written.csv").write_text("\n".join(lines[:11]) + "\n")
    run_inference(model, str(frames), str(out), **kw)
    again = list(csv.DictReader((out / "probabilities.csv").open()))
    assert sorted(r["image"] for r in again) == sorted(r["image"] for r in first)  # no row twice
    by_image = {r["image"]: r for r in first}
    for r in again:
        assert r == by_image[r["image"]]

    odd = tmp_path / "odd"  # a file name that is not valid UTF-8, as older exports write: recorded as its bytes
    odd.mkdir()
    shutil.copy(next(frames.glob("*.png")), os.fsdecode(os.fsencode(odd) + b"/caf\xe9_1.png"))
    odd_out = tmp_path / "odd_out"
    assert run_inference(model, str(odd), str(odd_out), **kw) == [odd_out / "probabilities.csv"]
    assert run_inference(model, str(odd), str(odd_out), **kw) == []  # written already


@pytest.mark.slow
def test_bundle_inference_objects_and_exit_code_when_inputs_are_skipped(polyps, tmp_path, monkeypatch):
    """check_properties sees the real inference objects, whose chain is the validation chain; the documented
    command writes what it can, lists the rest in skipped.csv and ends non-zero with that as its last line."""
    from monai.bundle import ConfigWorkflow

    from medpmoe.inference import InferenceDataset, PlaneInferer

    ckpt, frames = polyps
    bundle = REPO_ROOT / "bundles" / "kvasir_seg"
    files = [str(bundle / "train.json"), str(bundle / "inference.json")]
    monkeypatch.chdir(REPO_ROOT)
    wf = ConfigWorkflow(config_file=files, workflow_type="infer", output_dir=str(tmp_path / "wf"), image_size=32,
                        checkpoint=str(ckpt), input=str(frames), demo_root=str(tmp_path / "demo"))
    wf.initialize()
    assert wf.check_properties() == []
    assert isinstance(wf.dataset, InferenceDataset) and isinstance(wf.inferer, PlaneInferer)
    assert wf.evaluator.data_loader.dataset is wf.dataset and wf.evaluator.inferer is wf.inferer
    one = {"image": str(next(frames.glob("*.png")))}
    val, inf = wf.parser.get_parsed_content("validate#preprocessing"), wf.dataset.transform
    assert [type(t) for t in val.transforms] == [type(t) for t in inf.transforms]  # one chain
    assert torch.equal(val(dict(one))["image"].as_tensor(), inf(dict(one))["image"].as_tensor())

    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in sorted(frames.glob("*.png"))[:2]:
        shutil.copy(p, inputs / p.name)
    (inputs / "broken.png").write_bytes(b"")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", f"['{files[0]}','{files[1]}']",
           "--output_dir", str(tmp_path / "cli"), "--checkpoint", str(ckpt), "--input", str(inputs)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=bundle_env(), capture_output=True, text=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "InputsSkipped" in last and "1 of 3 inputs skipped" in last and "skipped.csv" in last, proc.stderr[-3000:]
    out = tmp_path / "cli" / "inference"
    assert len(list(out.glob("*_seg.png"))) == 2
    rows = list(csv.reader((out / "skipped.csv").open()))
    assert rows[1][0].endswith("broken.png") and "empty file" in rows[1][1]
