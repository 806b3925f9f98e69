"""Across bundles: metadata against the shipped schema, gradient clipping, early stopping, multi-GPU config,
kvasir_seg evaluate/inference."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata

from medpmoe.bundle import run_bundle
from medpmoe.training import with_grad_clip
from tests.conftest import REPO_ROOT

BUNDLES = sorted(p.parent.name for p in (REPO_ROOT / "bundles").glob("*/bundle.json"))  # every bundle, new ones too
SCHEMA = REPO_ROOT / "schemas" / "meta_schema.json"
EXPERTS = [
    {"name": "tiny_a", "patch_size": 8, "img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2, "seed": 0},
    {"name": "tiny_b", "patch_size": 16, "img_size": 32, "embed_dim": 24, "depth": 1, "num_heads": 2, "seed": 1},
]
TINY = {"demo_images": 12, "demo_size": 32, "image_size": 32, "batch_size": 4, "num_epochs": 1, "experts": EXPERTS}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_is_valid_against_the_shipped_schema(bundle):
    verify_metadata(meta_file=str(REPO_ROOT / "bundles" / bundle / "metadata.json"), filepath=str(SCHEMA))


def test_schema_rejects_metadata_without_required_fields(tmp_path):
    meta = json.loads((REPO_ROOT / "bundles" / "kvasir_seg" / "metadata.json").read_text())
    del meta["network_data_format"]
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "m.json"), filepath=str(SCHEMA))


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_config_parses_with_its_entry_point(bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the generated files are self-contained: any working directory
    root = REPO_ROOT / "bundles" / bundle
    for extra, entry in [(None, "training"), ("evaluate.json", "evaluating"), ("inference.json", "inference"),
                         ("multi_gpu_train.json", "training")]:
        files = [str(root / "train.json")] + ([str(root / extra)] if extra else [])
        parser = ConfigParser()
        parser.read_config(files)
        assert entry in parser and "initialize" in parser and "finalize" in parser
        assert parser.get_parsed_content("bundle_root") == "."  # outside a workflow; inside: the bundle's folder
    parser = ConfigParser()
    parser.read_config([str(root / "train.json"), str(root / "multi_gpu_train.json")])
    assert parser["network"]["_target_"].endswith("DistributedDataParallel")
    assert parser["network"]["static_graph"] is True  # unused parameters and the SETR aux heads (see below)
    assert "ddp_ignore_executor(medpmoe.models.use_fast_path(" in parser["network"]["module"]
    assert parser["device"] == "$medpmoe.bundle.init_distributed()"
    loader = parser["train"]["dataloader"]
    assert loader["sampler"] == "@train#sampler"  # medpmoe.data.train_loader shuffles when there is no sampler
    assert "medpmoe.bundle.distributed_sampler(@train#dataset, shuffle=True" in parser["train"]["sampler"]
    assert parser["validate"]["dataloader"]["sampler"] == "@validate#sampler"
    assert "shuffle=False, even_divisible=False" in parser["validate"]["sampler"]
    assert (root / "docs" / "README.md").is_file()


def test_distributed_sampler_shards_only_when_distributed(monkeypatch):
    import ignite.distributed as idist
    from monai.data import DistributedSampler

    from medpmoe.bundle import distributed_sampler

    assert distributed_sampler(list(range(10)), shuffle=True) is None  # one process: the loader shuffles itself
    monkeypatch.setattr(idist, "get_world_size", lambda: 2)
    monkeypatch.setattr(idist, "get_rank", lambda: 1)
    train = distributed_sampler(list(range(9)), shuffle=True, seed=3)
    assert isinstance(train, DistributedSampler) and train.rank == 1 and len(train) == 5  # padded to 10
    val = distributed_sampler(list(range(9)), shuffle=False, even_divisible=False)
    assert list(val) == [1, 3, 5, 7]  # validation: no item repeated to pad the shards


def test_every_trainable_parameter_gets_a_gradient():
    """The dispatchers build no map for the first prompt layer (it could get no gradient), so every trainable part
    gets one, with or without a dispatcher; multi_gpu_train.json's static graph is for the SETR aux heads."""
    from medpmoe.models import build_model

    images = torch.rand(2, 3, 32, 32)
    for method, moe in [("vpt", True), ("vpt", False), ("lspt_style", True), ("vpt_shallow", False), ("linear_probe", True)]:
        torch.manual_seed(0)
        net = build_model(EXPERTS, task="classification", num_classes=2, method=method, moe=moe, num_tokens=2)
        net(images).sum().backward()
        unused = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, (method, moe, unused)


def test_grad_clip_clips_between_backward_and_step():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(4))
    opt = with_grad_clip(torch.optim.SGD([w], lr=1.0), max_norm=0.5)
    (100.0 * torch.ones(4) * w).sum().backward()  # gradient norm 200
    opt.step()
    assert torch.linalg.vector_norm(w.detach()) == pytest.approx(0.5, rel=1e-5)
    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert with_grad_clip(plain, None) is plain and not plain._optimizer_step_pre_hooks


@pytest.mark.slow
def test_early_stopping_ends_training_when_the_metric_stalls(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    cfg = str(REPO_ROOT / "bundles" / "medvtab_cls" / "train.json")
    wf = run_bundle(cfg, tracking=False, output_dir=str(tmp_path), **{**TINY, "num_epochs": 6},
                    early_stop_patience=1, learning_rate=0.0)  # lr 0: the metric never improves
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["epochs"] == 2, results
    assert wf.parser.get_parsed_content("optimizer").medpmoe_grad_clip == 1.0


@pytest.mark.slow
def test_kvasir_evaluate_and_inference(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    root = REPO_ROOT / "bundles" / "kvasir_seg"
    train = str(root / "train.json")
    run_bundle(train, tracking=False, output_dir=str(tmp_path), head_channels=8, **TINY)
    meta = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["metadata"]
    assert meta["inputs"] == [{"source": "picture", "colour": True, "volume": False}]  # what inference checks against
    assert meta["image_size"] == 32 and meta["metric_name"] == "val_mean_iou"
    run_bundle([train, str(root / "evaluate.json")], tracking=False, output_dir=str(tmp_path), head_channels=8, **TINY)
    assert 0.0 <= json.loads((tmp_path / "eval_metrics.json").read_text())["val_mean_iou"] <= 1.0
    run_bundle([train, str(root / "inference.json")], tracking=False, output_dir=str(tmp_path), head_channels=8, **TINY)
    assert len(list((tmp_path / "inference").glob("*_seg.png"))) == 12
    assert len(list((tmp_path / "inference").glob("*_seg.nii.gz"))) == 12


@pytest.mark.slow
def test_seeded_runs_give_identical_prompts(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    cfg = str(REPO_ROOT / "bundles" / "medvtab_cls" / "train.json")
    states = []
    for run in ("a", "b"):
        run_bundle(cfg, tracking=False, output_dir=str(tmp_path / run), demo_root=str(tmp_path / "data"), **TINY)
        states.append(torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)["state_dict"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
