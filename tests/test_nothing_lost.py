"""Results are never lost to reporting: a file name that is not valid UTF-8 goes through the converter, validation,
training and evaluation (shown as `\\xe9` escapes), and a figure that fails is a warning, never a failed run."""

from __future__ import annotations

import json
import os

import pytest

from medpmoe.bundle import run_bundle
from medpmoe.data import convert, validate
from medpmoe.demo import make_synthetic_polyps
from medpmoe.files import shown
from tests.conftest import REPO_ROOT
from tests.test_bundle_common import TINY

KVASIR = str(REPO_ROOT / "bundles" / "kvasir_seg" / "train.json")
EVALUATE = [KVASIR, str(REPO_ROOT / "bundles" / "kvasir_seg" / "evaluate.json")]
ODD = os.fsdecode(b"caf\xe9_1.png")  # the bytes an older Windows or scanner export writes: not valid UTF-8


def test_shown_spells_undecodable_bytes_as_escapes():
    assert shown(ODD) == "caf\\xe9_1.png" and shown("na\u00efve.png") == "na\u00efve.png"
    assert shown("caf\ud800") == "caf\\ud800"  # a lone surrogate that is no escaped byte
    shown(ODD).encode("utf-8")  # any stream, font or database takes it


@pytest.fixture
def odd_names(tmp_path):
    """A Kvasir-layout folder of 12 synthetic pairs, every other one renamed to a name that is not UTF-8."""
    root = make_synthetic_polyps(tmp_path / "kvasir", num_images=12, size=32).parent
    (root / "datalist.json").unlink()
    for i, image in enumerate(sorted((root / "images").iterdir())):
        if i % 2 == 0:
            odd = os.fsdecode(b"caf\xe9_%d.png" % i)
            image.rename(root / "images" / odd)
            (root / "masks" / image.name).rename(root / "masks" / odd)
    return root


def test_odd_file_names_pass_every_step_and_results_are_written(odd_names, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDPMOE_CACHE_DIR", str(tmp_path / "cache"))
    datalist = str(tmp_path / "k.json")
    assert convert.main(["kvasir", str(odd_names), datalist]) == 0
    assert "12 items kept, 0 problems" in capsys.readouterr().out
    assert validate.main([datalist]) == 0 and validate.main([datalist, "--fast"]) == 0
    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / "out"
    kw = {**TINY, "output_dir": str(out), "datalist": datalist}
    run_bundle(KVASIR, **kw)
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 1 and 0 <= results["val_mean_iou"] <= 1
    overlays = list((out / "mlruns").rglob("segmentation_overlays.png"))
    assert len(overlays) == 1, "the overlay figure titled with the odd names was drawn"
    split = json.loads((out / "split.json").read_text())
    assert any(os.fsencode(p).endswith(b".png") and b"\xe9" in os.fsencode(p) for p in split["train"] + split["val"])

    # a figure that fails is a warning: the evaluation still writes its metrics
    def broken(*args, **kwargs):
        raise RuntimeError("no font for this title")

    monkeypatch.setattr("medpmoe.tracking.artifacts.overlay_figure", broken)
    capsys.readouterr()
    run_bundle(EVALUATE, **kw)
    metrics = json.loads((out / "eval_metrics.json").read_text())
    assert metrics["val_mean_iou"] == pytest.approx(results["best_val_mean_iou"])
    printed = "".join(capsys.readouterr())
    assert "figure plots/segmentation_overlays.png skipped: RuntimeError: no font for this title" in printed


def test_a_failing_end_of_run_report_keeps_the_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / "out"

    def broken(*args, **kwargs):
        raise RuntimeError("matplotlib cannot draw this")

    monkeypatch.setattr("medpmoe.tracking.artifacts.overlay_figure", broken)
    monkeypatch.setattr("medpmoe.tracking.pyfunc.log_prompt_model", broken)
    run_bundle(KVASIR, **{**TINY, "output_dir": str(out), "demo_root": str(tmp_path / "data")})
    assert json.loads((out / "results.json").read_text())["epochs"] == 1
    printed = "".join(capsys.readouterr())
    assert "MLflow model skipped: RuntimeError" in printed and "segmentation_overlays.png skipped" in printed
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("kvasir_seg").experiment_id])
    assert run.info.status == "FINISHED" and "best_val_mean_iou" in run.data.metrics  # logged before the figures


def test_traceback_files_go_to_one_bounded_place(tmp_path, monkeypatch, capsys):
    import sys

    from medpmoe.bundle.errors import KEPT_TRACEBACKS, _excepthook, save_traceback
    from medpmoe.data import DataError

    monkeypatch.setenv("MEDPMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDPMOE_TRACEBACK", raising=False)
    paths = [save_traceback(f"traceback {i}") for i in range(KEPT_TRACEBACKS + 3)]
    kept = sorted((tmp_path / "cache" / "errors").iterdir())
    assert len(kept) == KEPT_TRACEBACKS and set(kept) == set(paths[3:])  # the oldest are deleted
    try:
        raise DataError(f"{ODD}: not a picture file")
    except DataError:
        _excepthook(*sys.exc_info())
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "DataError: caf\\xe9_1.png: not a picture file"
    assert f"the full traceback is in {tmp_path / 'cache' / 'errors'}" in err[-2]
    assert len(list((tmp_path / "cache" / "errors").iterdir())) == KEPT_TRACEBACKS
