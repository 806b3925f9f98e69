"""`make gpu-check`'s CPU dry run: every step runs (tiny), without MLflow (the GPU image has none), into one JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_step(tmp_path):
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None  # as on the GPU image\n")
    out = tmp_path / "check.json"
    args = f"--dry-run --prep {tmp_path / 'prep'} --json {out}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), str(REPO_ROOT)]), "MLFLOW_TRACKING_URI": ""}
    proc = subprocess.run(["make", "-s", "gpu-check", f"GPU_PY={sys.executable}", f"GPU_CHECK_ARGS={args}"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    doc = json.loads(out.read_text())
    assert doc["dry_run"] and doc["device"].startswith("CPU") and doc["versions"]["torch"] and doc["commit"]
    steps = doc["steps"]
    assert all(steps[s]["ok"] for s in ("gpu_tests", "benchmark", "loader", "bundle_epochs")), \
        {k: v.get("error") for k, v in steps.items()}
    assert "skipped" in steps["gpu_tests"]["summary"]  # no CUDA here: the GPU tests skip
    assert {(r["K"], r["mode"]) for r in steps["benchmark"]["rows"]} == {(2, "train"), (2, "infer")}
    assert steps["loader"]["row"]["mode"] == "gpu trainer" and steps["loader"]["row"]["images_per_s"] > 0
    for bundle in ("kvasir_seg", "isic_seg", "medvtab_cls"):
        epoch = steps["bundle_epochs"][bundle]
        assert epoch["execution"] == "batched executor (float32 expert weights)" and epoch["images_per_s"] > 0
    assert doc["verdicts"]["loader_x_step"] > 0
