"""multi_gpu_train.json under torchrun with 2 gloo processes (CPU): kvasir_seg (SETR auxiliary heads) and
medvtab_cls. Ranks see different items, end with identical prompt weights, and rank 0 alone writes checkpoints and
MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

SAME = [{"name": f"tiny_{i}", "patch_size": 8, "img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2, "seed": i}
        for i in range(2)]
TINY = {"demo_images": 20, "demo_size": 32, "image_size": 32, "batch_size": 4, "num_epochs": 1}


def _overlay(tmp_path) -> str:
    """An extra config that records, on every rank, what the rank trained on and wrote (tests/ddp_probe.py)."""
    path = tmp_path / "probe.json"
    path.write_text(json.dumps({
        "probe_install": {"_target_": "tests.ddp_probe.install"},
        "probe_dump": {"_target_": "tests.ddp_probe.dump", "folder": "@output_dir", "model": "@network_def",
                       "sampler": "@train#sampler"},
        "run": ["@probe_install", "$@train#trainer.run()", "@probe_dump"],
    }))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["kvasir_seg", "medvtab_cls"])
def test_torchrun_two_gloo_ranks(bundle, tmp_path):
    cfg = str([f"bundles/{bundle}/train.json", f"bundles/{bundle}/multi_gpu_train.json", _overlay(tmp_path)])
    out = tmp_path / "out"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
            "run", "training", "--config_file", cfg, "--output_dir", str(out), "--experts", json.dumps(SAME),
            "--train#report#log_model", "False"]  # the MLflow run and its params, without the pyfunc model: faster
    for k, v in {**TINY, **({"head_channels": 8} if bundle == "kvasir_seg" else {})}.items():
        args += [f"--{k}", str(v)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 1 and results["execution"] == "batched executor (float32 expert weights)"
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    seen = [set(r["indices"]) for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 8 and not seen[0] & seen[1]  # each rank its half of the 16 training items
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys() and any(k.startswith("methods.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert ranks[0]["writes"] and not ranks[1]["writes"]  # rank 0 alone writes checkpoints
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], a[k]) for k in a)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and runs[0].data.params["execution"].startswith("batched executor")
