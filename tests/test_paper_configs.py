"""configs/paper/*.json: the pMoE paper's training settings, as an extra --config_file on any bundle, resolve to the
paper's values and build the paper's three-expert model (shapes only: nothing downloaded, nothing trained)."""

import json
import shlex
from unittest import mock

import pytest
import torch
from monai.bundle import ConfigParser

import medpmoe.crossval
from medpmoe.experts.registry import expert_spec
from medpmoe.models import build_model
from tests.conftest import REPO_ROOT

PAPER = sorted((REPO_ROOT / "configs" / "paper").glob("*.json"))
BUNDLES = sorted(p for p in (REPO_ROOT / "bundles").glob("*/train.json") if p.parent.name != "pretrain_expert")
SEGMENTATION = {"kvasir_seg", "isic_seg"}
EXPERTS = ["dinov2_vitb14", "mocov3_vitb16", "lvmmed_vitb16"]


def _merged(bundle, paper, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(bundle), str(paper)])  # what `--config_file "['bundle', 'paper']"` does
    for k, v in overrides.items():
        parser[k] = v
    return parser


def _adamw_paths(node, path=""):
    """Config paths of every AdamW component (found by its target, whatever the recipe calls it)."""
    if isinstance(node, dict):
        if str(node.get("_target_", "")).endswith("AdamW"):
            yield path
        for k, v in node.items():
            yield from _adamw_paths(v, f"{path}#{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _adamw_paths(v, f"{path}#{i}")


def test_one_paper_config_per_bundle():
    assert {p.stem for p in PAPER} == {b.parent.name for b in BUNDLES} == SEGMENTATION | {"medvtab_cls"}


@pytest.mark.parametrize("paper", PAPER, ids=lambda p: p.stem)
@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.parent.name)
def test_paper_config_merged_with_any_bundle_resolves_to_the_papers_values(bundle, paper):
    parser = _merged(bundle, paper)
    get = parser.get_parsed_content
    assert (get("learning_rate"), get("weight_decay"), get("batch_size"), get("num_epochs")) == (1e-4, 1e-5, 32, 30)
    assert get("image_size") == 224 and get("early_stop_patience") >= get("num_epochs")  # all 30 epochs run
    assert (get("method"), get("moe"), get("prompt_layers")) == ("vpt", True, None)
    adamw = list(_adamw_paths(parser.get()))
    assert adamw and all((get(f"{p}#lr"), get(f"{p}#weight_decay")) == (1e-4, 1e-5) for p in adamw)
    experts = get("experts")
    assert [e["name"] for e in experts] == EXPERTS and all(e["img_size"] == 224 for e in experts)
    assert all(e["checkpoint"].startswith(get("weights_dir") + "/") for e in experts)
    assert all(expert_spec(e["name"]) for e in experts)  # registered names: no typo can reach a run
    if paper.stem in SEGMENTATION:
        assert get("head_channels") == 256 and get("paper_recipe#cross_validation_folds") == 5
        assert "--k 5" in get("paper_recipe#cross_validation")
    if get("task") == "segmentation":
        assert get("network_def", instantiate=False).resolve_args()["head_kwargs"]["channels"] == get("head_channels")


def test_weights_dir_is_the_one_key_to_set():
    parser = _merged(BUNDLES[0], PAPER[0], weights_dir="/data/weights")
    files = [e["checkpoint"] for e in parser.get_parsed_content("experts")]
    assert files == ["/data/weights/dinov2_vitb14_pretrain.pth", "/data/weights/vit-b-300ep.pth.tar",
                     "/data/weights/lvmmed_vit.pth"]
    raw = json.loads(PAPER[0].read_text())
    assert all("@weights_dir" in e["checkpoint"] for e in raw["experts"])


@pytest.mark.parametrize("task", ["kvasir_seg", "medvtab_cls"])
def test_paper_model_builds_with_the_three_vit_b_experts(task):
    """The bundle's network_def with the paper config, experts at random init on the meta device (shapes only)."""
    parser = _merged(REPO_ROOT / "bundles" / task / "train.json", REPO_ROOT / "configs" / "paper" / f"{task}.json")
    args = parser.get_parsed_content("network_def", instantiate=False).resolve_args()
    args["experts"] = [{**e, "checkpoint": None, "random_init": True} for e in args["experts"]]
    args["num_classes"] = 2
    with torch.device("meta"):
        model = build_model(**args)
    assert [e.name for e in model.experts] == EXPERTS and [e.embed_dim for e in model.experts] == [768] * 3
    assert model.dispatcher is not None and model.num_prompt_layers == 12
    assert [m.num_tokens for m in model.methods] == [parser.get_parsed_content("num_tokens")] * 3


@pytest.mark.parametrize("task", sorted(SEGMENTATION))
def test_documented_cross_validation_command_takes_both_config_files(task):
    """The paper's 5-fold CV as the config records it: `python -m medpmoe.cv` gets the bundle and the paper config."""
    paper = REPO_ROOT / "configs" / "paper" / f"{task}.json"
    command = shlex.split(json.loads(paper.read_text())["paper_recipe"]["cross_validation"])
    assert command[:3] == ["python", "-m", "medpmoe.cv"]
    with mock.patch.object(medpmoe.crossval.runner, "run_cross_validation", return_value={}) as run:
        medpmoe.crossval.main(command[3:])
    config_file, _, _, k, _, overrides = run.call_args.args
    assert config_file == [f"bundles/{task}/train.json", f"configs/paper/{task}.json"] and k == 5
    assert overrides == {"weights_dir": "WEIGHTS_DIR"}
