"""CUDA only (marked `gpu`, skipped elsewhere; `make gpu-check` runs them): each bundle's train/evaluate/infer on
the GPU through the batched executor with bf16 expert weights, bf16 autocast, the compiled path, export on CUDA,
GPU-side batch augmentation."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.gpu

SAME = [{"name": f"tiny_{i}", "patch_size": 8, "img_size": 32, "embed_dim": 64, "depth": 2, "num_heads": 4, "seed": i}
        for i in range(2)]
TINY = {"demo_images": 12, "demo_size": 32, "image_size": 32, "batch_size": 4, "num_epochs": 1, "experts": SAME}


def _model(task="classification"):
    from medpmoe.models import build_model

    return build_model(SAME, task=task, num_classes=2, method="vpt", moe=True, num_tokens=4).cuda()


@pytest.mark.parametrize("bundle", ["kvasir_seg", "isic_seg", "medvtab_cls"])
def test_bundle_trains_evaluates_and_infers_on_cuda(bundle, tmp_path, monkeypatch):
    from medpmoe.bundle import run_bundle

    monkeypatch.chdir(REPO_ROOT)
    root = REPO_ROOT / "bundles" / bundle
    extra = {"head_channels": 8} if bundle != "medvtab_cls" else {}
    wf = run_bundle(str(root / "train.json"), tracking=False, output_dir=str(tmp_path), **TINY, **extra)
    assert wf.parser.get_parsed_content("device").type == "cuda"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["execution"] == "batched executor (bfloat16 expert weights)"
    key = wf.parser.get_parsed_content("key_metric_name")
    assert 0.0 <= results[key] <= 1.0
    run_bundle([str(root / "train.json"), str(root / "evaluate.json")], tracking=False, output_dir=str(tmp_path),
               **TINY, **extra)
    metrics = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert metrics[key] == pytest.approx(results[f"best_{key}"], abs=1e-4)
    run_bundle([str(root / "train.json"), str(root / "inference.json")], tracking=False, output_dir=str(tmp_path),
               **TINY, **extra)
    assert any((tmp_path / "inference").iterdir())


def test_bf16_executor_matches_the_plain_loop_under_autocast():
    from medpmoe.models import execution_path, use_fast_path

    torch.manual_seed(0)
    plain, fast = _model(), _model()
    fast.load_state_dict(plain.state_dict())
    use_fast_path(fast, amp=True)
    assert execution_path(fast) == "batched executor (bfloat16 expert weights)"
    x = torch.rand(8, 3, 32, 32, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = plain.eval()(x), fast.eval()(x)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-2)
    with torch.no_grad():
        ref = plain(x)
    torch.testing.assert_close(a, ref, rtol=5e-2, atol=5e-2)  # bf16 autocast stays near fp32


def test_compiled_path_matches_eager_on_cuda():
    from medpmoe.models.fast import accelerate

    torch.manual_seed(0)
    eager, compiled = _model("segmentation"), _model("segmentation")
    compiled.load_state_dict(eager.state_dict())
    accelerate(eager, amp="bf16")
    accelerate(compiled, amp="bf16", compile=True)
    x = torch.rand(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), eager.eval()(x), rtol=5e-2, atol=5e-2)
    compiled.train()
    compiled(x).float().mean().backward()  # the compiled training step runs backward too
    assert any(p.grad is not None for p in compiled.parameters() if p.requires_grad)


def test_export_on_cuda(tmp_path):
    from medpmoe.export import export_model

    model = _model().eval()
    result = export_model(model, tmp_path / "m.pt2", image_size=32)
    assert result.path.is_file()
    loaded = torch.export.load(str(result.path)).module()
    x = torch.rand(3, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-3, atol=1e-3)


def test_batch_augmentation_on_the_gpu_matches_the_cpu():
    from medpmoe.data import BatchAugment, BatchFeeder

    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (16, 3, 48, 48), generator=g, dtype=torch.uint8),
             "label": torch.randint(0, 2, (16, 1, 48, 48), generator=g, dtype=torch.uint8)}
    cpu = BatchAugment(vertical_flip=True, seed=3)(batch)
    gpu = BatchAugment(vertical_flip=True, seed=3)({k: v.cuda() for k, v in batch.items()})
    assert gpu["image"].is_cuda and gpu["image"].dtype == torch.float32
    torch.testing.assert_close(gpu["image"].cpu(), cpu["image"], rtol=1e-4, atol=1e-4)
    assert (gpu["label"].cpu() != cpu["label"]).float().mean() < 1e-3  # nearest: rare ties may round differently
    feeder = BatchFeeder(BatchAugment(seed=0), device="cuda")
    x, y = feeder.prepare(feeder.collate([{k: v[i] for k, v in batch.items()} for i in range(4)]),
                          torch.device("cuda"), True)
    assert x.is_cuda and x.dtype == torch.float32 and y.is_cuda and y.dtype == torch.int64
