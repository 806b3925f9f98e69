"""Bundles run the batched executor whenever it applies: same metrics and checkpoint layout as the plain loop."""

from __future__ import annotations

import json

import pytest
import torch

from medpmoe.bundle import run_bundle
from tests.conftest import REPO_ROOT

SAME = [{"name": f"tiny_{i}", "patch_size": 8, "img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2, "seed": i}
        for i in range(2)]  # one architecture: the executor applies
TINY = {"demo_images": 12, "demo_size": 32, "image_size": 32, "batch_size": 4, "num_epochs": 1, "head_channels": 8}


@pytest.mark.slow
def test_bundle_trains_through_the_executor_with_the_plain_loops_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    cfg = str(REPO_ROOT / "bundles" / "kvasir_seg" / "train.json")
    out = {}
    for name, fast in (("fast", True), ("plain", False)):
        run_bundle(cfg, tracking=False, output_dir=str(tmp_path / name), demo_root=str(tmp_path / "data"),
                   experts=SAME, fast_path=fast, **TINY)
        out[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert out["fast"]["execution"] == "batched executor (float32 expert weights)"
    assert out["plain"]["execution"] == "plain loop (config key 'fast_path' is false)"
    for key in ("val_mean_iou", "val_fg_iou", "val_mean_dice"):
        assert out["fast"][key] == pytest.approx(out["plain"][key], rel=1e-5, abs=1e-5), key
    ckpt = {n: torch.load(tmp_path / n / "checkpoints" / "last.pt", weights_only=True) for n in out}
    fast, plain = ckpt["fast"]["state_dict"], ckpt["plain"]["state_dict"]
    assert sorted(fast) == sorted(plain) and not any(k.startswith(("executor.", "experts.")) for k in fast)
    for k in fast:  # prompt-only, same layout; values as the fast-path tests' tolerance allows
        torch.testing.assert_close(fast[k], plain[k], rtol=1e-4, atol=1e-5, msg=k)
    assert ckpt["fast"]["model_config"] == ckpt["plain"]["model_config"]
    evaluate = [cfg, str(REPO_ROOT / "bundles" / "kvasir_seg" / "evaluate.json")]
    wf = run_bundle(evaluate, tracking=False, output_dir=str(tmp_path / "fast"), demo_root=str(tmp_path / "data"),
                    experts=SAME, **TINY)
    from medpmoe.models import execution_path

    assert execution_path(wf.parser.get_parsed_content("network")).startswith("batched executor")
    metrics = json.loads((tmp_path / "fast" / "eval_metrics.json").read_text())
    assert metrics["val_mean_iou"] == pytest.approx(out["plain"]["val_mean_iou"], rel=1e-5, abs=1e-5)


def test_fast_path_key_and_reasons():
    from medpmoe.models import build_model, execution_path, use_fast_path

    def model(experts):
        return build_model(experts, task="classification", num_classes=2, method="vpt", moe=True, num_tokens=2)

    assert execution_path(use_fast_path(model(SAME))) == "batched executor (float32 expert weights)"
    hetero = use_fast_path(model([SAME[0], {**SAME[1], "embed_dim": 24}]))
    assert execution_path(hetero) == "plain loop (expert 'tiny_1' has another block architecture than 'tiny_0')"
    off = use_fast_path(use_fast_path(model(SAME)), enabled=False)
    assert off.executor is None and execution_path(off) == "plain loop (config key 'fast_path' is false)"
    ddp_like = type("W", (), {"module": use_fast_path(model(SAME))})()
    assert execution_path(ddp_like).startswith("batched executor")
