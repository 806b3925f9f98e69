"""benchmarks/bench_pmoe.py runs end to end (CPU, tiny ViTs), writes its JSON, and report.py renders it."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    doc = _load("bench_pmoe").main(["--device", "cpu", "--tiny", "--experts", "2", "--batch", "2", "--warmup", "0",
                                    "--iters", "1", "--repeats", "1", "--loader", "none", "--json", str(out)])
    return doc, out


def test_benchmark_writes_every_lever_with_device_versions_and_commit(result, capsys):
    doc, out = result
    saved = json.loads(out.read_text())
    assert saved["rows"] == doc["rows"] and saved["versions"]["torch"] and "commit" in saved["git"]
    rows = {(r["K"], r["mode"], r["variant"]): r for r in saved["rows"]}
    for mode in ("train", "infer"):
        for v in ("reference fp32 (eager, TF32 off)", "reference bf16 autocast (eager)", "medpmoe plain loop, bf16",
                  "+ batched experts", "+ in-place prompt slots", "+ fused dispatcher"):
            r = rows[(2, mode, v)]
            assert r["images_per_s"] > 0 and r["tflops"] > 0 and r["x_ref_fp32"] > 0
        assert rows[(2, mode, "reference bf16 autocast (eager)")]["x_ref_bf16"] == 1.0
    assert saved["flops"]["2"]["train"] > 1.5 * saved["flops"]["2"]["infer"]  # forward + activation backward
    assert saved["accuracy"]["K=2 max |reference - medpmoe| logits, fp32"] < 1e-5  # the reference is the same maths
    assert all(r["spread_pct"] >= 0 for r in saved["rows"]) and not saved["errors"]


def test_report_renders_the_tables_into_the_markers(result, tmp_path):
    _, out = result
    report = _load("report")
    doc_md = tmp_path / "perf.md"
    doc_md.write_text(f"# Performance\n\nbefore\n{report.BEGIN}\nold table\n{report.END}\nafter\n")
    report.main([str(out), "--update", str(doc_md)])
    text = doc_md.read_text()
    assert "old table" not in text and text.startswith("# Performance\n\nbefore\n") and text.endswith("after\n")
    assert "| 2 | train | + in-place prompt slots |" in text and "gain over the row above" in text
    assert "not assessed" in text  # acceptance is judged on GPU rows only


def test_model_modules_and_benchmark_import_no_monai():
    """The GPU benchmark image has torch and timm only: `medpmoe.models` and the benchmark's model part must not
    pull in MONAI, MLflow or ignite."""
    code = ("import importlib.util, sys, medpmoe.models, medpmoe.models.fast; "
            "s = importlib.util.spec_from_file_location('b', 'benchmarks/bench_pmoe.py'); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print([x for x in ('monai', 'mlflow', 'ignite') if x in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bundle_loader_benchmark_times_the_bundles_own_loader():
    measure = _load("bundle_loader").measure
    rows = {gpu: measure("kvasir_seg", None, image_size=32, batch=8, repeats=2, gpu_trainer=gpu) for gpu in (True, False)}
    assert rows[True]["mode"] == "gpu trainer" and rows[False]["mode"] == "cpu trainer"
    for r in rows.values():
        assert r["items"] == 40 and r["cache"]["cache"] == "memory" and r["images_per_s"] > 0 and r["spread_pct"] >= 0
    assert rows[True]["images_per_s"] > rows[False]["images_per_s"]  # uint8 handed over vs augmented on the CPU
