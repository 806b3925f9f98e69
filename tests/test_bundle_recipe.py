"""One recipe under configs/, thin bundles over it, MONAI's tools on them, and config mistakes caught early."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from monai.bundle import ConfigParser, ConfigWorkflow

from medpmoe.bundle import ConfigError, LossProgressBar, run_bundle
from medpmoe.bundle.config_check import _strings
from medpmoe.bundle.errors import summary_note
from medpmoe.demo import demo_dir
from tests.conftest import REPO_ROOT
from tests.helpers import bundle_command, bundle_env
from tests.test_bundle_common import BUNDLES, TINY

GENERATED = ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json")


def test_generated_bundle_files_are_up_to_date():
    """bundles/*/{train,evaluate,inference,multi_gpu_train}.json are what `python -m medpmoe.bundle.build` writes
    from configs/ and each bundle.json (edit those, then run it)."""
    from medpmoe.bundle.build import write_bundles

    stale = write_bundles(root=REPO_ROOT, check=True)
    assert not stale, f"out of date: {[str(p) for p in stale]}: run `python -m medpmoe.bundle.build`"


def test_the_build_runs_from_any_folder_and_names_a_misspelled_bundle_key(tmp_path, monkeypatch, capsys):
    import shutil

    from medpmoe.bundle.build import main

    monkeypatch.chdir(tmp_path)  # not a repository: the build finds this medpmoe's configs/ and bundles/
    assert main(["--check"]) == 0
    root = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "configs", root / "configs")
    (root / "bundles" / "x").mkdir(parents=True)
    cases = [({"task": "segmentaton"}, "key 'task': no task file"),
             ({"task": "segmentation", "train": {"clas_names": ["a", "b"]}}, "key 'clas_names': the config has no "
                                                                           "'clas_names'; did you mean 'class_names'?"),
             ({"task": "segmentation", "train": {"validate#dataloadr#num_workers": 1}}, "did you mean 'dataloader'?"),
             ({"task": "segmentation"}, "recipe key 'output_dir' is 'set by bundles/<name>/bundle.json'"),
             ({"task": "segmentation", "trian": {}}, "key 'trian' is not a bundle.json key; did you mean 'train'?")]
    for spec, expected in cases:
        (root / "bundles" / "x" / "bundle.json").write_text(json.dumps(spec))
        assert main(["--root", str(root)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ConfigError: ") and expected in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("bundle", BUNDLES)
def test_a_bundle_states_what_differs_and_its_files_are_self_contained_monai_configs(bundle):
    root = REPO_ROOT / "bundles" / bundle
    spec = json.loads((root / "bundle.json").read_text())
    assert len((root / "bundle.json").read_text().splitlines()) <= 20 and "_target_" not in json.dumps(spec)
    for name in GENERATED:
        config = json.loads((root / name).read_text())
        first = next(iter(config))
        assert first == "_generated_" and "python -m medpmoe.bundle.build" in config[first]
        assert f"bundles/{bundle}/bundle.json" in config[first]
        macros = [s for s in _strings(config) if s.startswith("%")]
        assert not macros, f"{root / name}: {macros} depend on the working directory"
        assert not [s for s in _strings(config) if s.startswith("set by ")]  # every recipe slot is filled
        long = [s for s in _strings(config) if s.startswith("$") and len(s) > 200]
        assert not long, f"{root / name}: $ expressions over 200 characters: {long}"


def test_the_recipe_spells_out_its_components(monkeypatch):
    """What a MONAI model-zoo user looks for, as `_target_` entries: transforms (a deterministic list cached once,
    a random-augmentation list run per epoch), datasets, loaders, network, optimizer, trainer, evaluator, inferer,
    handlers, metrics."""
    config = ConfigParser.load_config_file(REPO_ROOT / "bundles" / "kvasir_seg" / "train.json")
    parser = ConfigParser(config)
    assert parser["train#trainer#_target_"] == "SupervisedTrainer"
    assert parser["train#trainer#max_epochs"] == "@num_epochs"
    assert parser["validate#evaluator#_target_"] == "SupervisedEvaluator"
    assert parser["network_def#_target_"] == "medpmoe.models.build_model"
    assert parser["optimizer#optimizer#_target_"] == "torch.optim.AdamW"
    assert parser["train#preprocessing"] == "@validate#preprocessing"  # one deterministic chain
    assert parser["validate#dataset#transform"] == "@validate#preprocessing"  # MONAI's property layout
    names = [t["_target_"].rsplit(".", 1)[-1] for t in parser["validate#preprocessing#transforms"]]
    assert names[1:3] == ["LoadMedicalImaged", "ToPlane2Dd"] and names[-2:] == ["Resized", "CastToTyped"]
    assert parser["train#augmentation#_target_"] == "medpmoe.data.BatchAugment"  # random part: per batch, on device
    assert parser["train#dataset#_target_"] == "medpmoe.data.cached_dataset"
    assert parser["train#dataset#transform"] == "@train#preprocessing"  # cached once, compact
    assert parser["train#trainer#prepare_batch"] == "$@train#batches.prepare"
    assert parser["validate#key_metric#mean_iou#include_background"] is True  # named val_mean_iou in training
    assert parser["validate#additional_metrics#fg_iou#include_background"] is False
    recipe = ConfigParser.load_config_file(REPO_ROOT / "configs" / "train.json")
    assert parser["learning_rate"] == recipe["learning_rate"]
    assert all(isinstance(h, dict) and "_target_" in h for h in parser["train#handlers"])


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_the_config_transform_lists_equal_the_python_chains(task, tmp_path, monkeypatch):
    """`validate#preprocessing` and `train#preprocessing + train#augmentation` give exactly what
    `medpmoe.data.segmentation_transforms` / `classification_transforms` give (the Python callers' chains)."""
    import monai
    import torch
    from monai.utils import set_determinism

    from monai.data import CacheDataset

    from medpmoe.data import classification_transforms, load_datalist, segmentation_transforms

    bundle = {"segmentation": "kvasir_seg", "classification": "medvtab_cls"}[task]
    wf = ConfigWorkflow(config_file=str(REPO_ROOT / "bundles" / bundle / "train.json"), workflow_type=None,
                        **{**TINY, "output_dir": str(tmp_path)})
    parser = wf.parser
    parser["vertical_flip"] = True
    items = load_datalist(parser.get_parsed_content("datalist_file"))[:3]
    n, size = len(parser.get_parsed_content("class_names")), TINY["image_size"]
    if task == "segmentation":
        val, train = (segmentation_transforms(size, t, n) for t in (False, True))
    else:
        val, train = (classification_transforms(size, t, n, vertical_flip=True) for t in (False, True))
    val_cfg = parser.get_parsed_content("validate#preprocessing")
    assert parser.get_parsed_content("train#dataset#transform") is val_cfg  # one deterministic chain, cached
    assert parser.get_parsed_content("train#dataset").cache_info["cache"] == "memory"
    assert parser.get_parsed_content("train#augmentation").vertical_flip is True
    for item in items:
        a, b = val(dict(item)), val_cfg(dict(item))
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in ("image", "label"))


def _doc_blocks_after(marker: str) -> tuple[dict, list[str]]:
    """The JSON block and the shell commands that follow `marker` in docs/bundles.md."""
    text = (REPO_ROOT / "docs" / "bundles.md").read_text()
    text = text[text.index(marker):]
    spec = json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))
    commands = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    return spec, commands


@pytest.mark.slow
def test_a_fourth_bundle_made_as_the_docs_say_builds_and_trains(tmp_path):
    """docs/bundles.md's steps, in a copy of the recipe: write bundle.json, build, copy two files, train one epoch."""
    import shlex
    import shutil
    import sys

    from medpmoe.bundle.build import bundle_dirs, write_bundles

    root = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "configs", root / "configs")
    shutil.copytree(REPO_ROOT / "bundles", root / "bundles")
    spec, commands = _doc_blocks_after("**Adding a fourth bundle**")
    (root / "bundles" / "brain_seg").mkdir()
    (root / "bundles" / "brain_seg" / "bundle.json").write_text(json.dumps(spec, indent=4))
    tiny = [f"--{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in {**TINY, "head_channels": 8}.items()]
    for line in commands:
        argv = shlex.split(line)
        if argv[0] == "python":
            argv[0] = sys.executable
        if "monai.bundle" in argv:
            argv += tiny + ["--output_dir", str(tmp_path / "out")]
        proc = subprocess.run(argv, cwd=root, env=bundle_env(), capture_output=True, text=True)
        assert proc.returncode == 0, (line, proc.stderr[-3000:])
    assert "brain_seg" in [d.name for d in bundle_dirs(root)] and not write_bundles(root=root, check=True)
    assert json.loads((root / "bundles" / "brain_seg" / "train.json").read_text())["class_names"][1] == "tumour"
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["epochs"] == 1 and 0.0 <= results["val_mean_iou"] <= 1.0


@pytest.mark.parametrize("bundle", BUNDLES)
def test_check_properties_for_train_and_infer_workflows(bundle, tmp_path, monkeypatch):
    """What MONAI FL / MONAI Label do: initialize, then check the train and infer properties (none missing)."""
    monkeypatch.chdir(REPO_ROOT)
    root = REPO_ROOT / "bundles" / bundle
    kw = {**TINY, "output_dir": str(tmp_path), "demo_root": str(tmp_path.parent / f"{bundle}_demo")}
    for extra, kind in [(None, "train"), ("evaluate.json", "infer"), ("inference.json", "infer")]:
        files = [str(root / "train.json")] + ([str(root / extra)] if extra else [])
        wf = ConfigWorkflow(config_file=files, workflow_type=kind, **kw)
        wf.initialize()
        assert wf.check_properties() == [], (files, kind)
    demo = demo_dir(kw["demo_root"], wf.parser["demo_kind"], TINY["demo_images"], TINY["demo_size"])
    assert wf.network_def is not None and wf.dataset_dir == str(demo)


def test_progress_bar_with_eta_is_attached_to_the_trainer(tmp_path, monkeypatch):
    from ignite.engine import Events

    monkeypatch.chdir(REPO_ROOT)
    wf = ConfigWorkflow(config_file=str(REPO_ROOT / "bundles" / "medvtab_cls" / "train.json"), workflow_type=None,
                        **TINY, output_dir=str(tmp_path))
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    bars = [h for h in wf.parser.get_parsed_content("train#handlers") if isinstance(h, LossProgressBar)]
    assert len(bars) == 1 and trainer.has_event_handler(bars[0]._close, Events.EPOCH_COMPLETED)
    stats = [h for h in trainer._event_handlers[Events.ITERATION_COMPLETED] if "StatsHandler" in repr(h[0])]
    assert not stats  # per-iteration log lines are off: the bar shows progress
    assert wf.parser.get_parsed_content("train#dataset").progress is True  # caching shows its progress too


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def test_cli_refuses_a_misspelled_key_and_a_float_epoch_count_first(tmp_path):
    """The real CLI: both mistakes fail in initialize, before any data or model is made, and the last line the user
    sees is medpmoe's message naming the key."""
    runs = {}
    for name, overrides in [("typo", {"learnng_rate": 0.5}), ("float", {"num_epochs": 2.5})]:
        args = bundle_command("bundles/kvasir_seg/train.json", tmp_path / name, overrides)
        runs[name] = subprocess.Popen(args, cwd=REPO_ROOT, env=bundle_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
    out = {name: proc.communicate(timeout=300) + (proc.returncode,) for name, proc in runs.items()}
    _, err, rc = out["typo"]
    assert rc != 0 and _last_line(err) == ("ConfigError: config key 'learnng_rate' is unknown to this workflow; "
                                           "did you mean 'learning_rate'?")
    kept = re.search(r"the full traceback is in (\S+);", err)  # the message alone on the console, nothing lost:
    assert kept and "Failed to evaluate" in Path(kept.group(1)).read_text()  # MONAI's wrapping is in the file
    assert "Traceback" not in err and len(err.strip().splitlines()) < 12
    _, err, rc = out["float"]
    assert rc != 0 and _last_line(err) == ("ConfigError: config key 'num_epochs' must be an integer like its default "
                                           "8, got 2.5 (float)")
    assert not any((tmp_path / name / "synthetic_data").exists() for name in runs)  # nothing was built


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"method": "no_such_method"}, "config key 'method': unknown method 'no_such_method' (known: gapt,"),
        ({"moe": "false"}, "config key 'moe' must be True or False like its default True, got 'false' (str)"),
        ({"experts": [{"name": "dinov2_vitb14"}]}, "config key 'experts[0]': expert 'dinov2_vitb14' needs a "
                                                   "'checkpoint' file"),
        ({"experts": [{"name": "no_such_vit"}]}, "config key 'experts[0].name': unknown expert 'no_such_vit'"),
        ({"head_channels": 8}, "config key 'head_channels' is unknown to this workflow"),  # segmentation only
        ({"fold": 1, "folds_file": "/no/such/folds.json"}, "config key 'folds_file': no file at /no/such/folds.json"),
        ({"dataset_dir": "/data/skin"}, "config key 'dataset_dir' is the folder of the datalist in use, not a setting"),
        ({"batch_size": 0}, "config key 'batch_size' must be at least 1, got 0"),
        ({"checkpoint": "best.pt"}, "config key 'checkpoint' is unknown to this workflow"),  # evaluate/inference only
        ({"method": "gapt"}, "config key 'method': 'gapt' puts prompts at the first prompt layer only, so pMoE"),
        ({"class_balance": "balanced"}, "config key 'class_balance': unknown class_balance 'balanced' (known: none, "
                                        "loss, sampler)"),
        # nested ids, component arguments, expert entries, method and dispatcher options: the key and the closest
        ({"validate#dataloader#num_worker": 0}, "config key 'validate#dataloader#num_worker': DataLoader takes no "
                                                "argument 'num_worker'; did you mean 'num_workers'?"),
        ({"train#dataloader#num_worker": 0}, "config key 'train#dataloader#num_worker': train_loader takes no argument "
                                             "'num_worker'; did you mean 'num_workers'?"),
        ({"validate#dataloadr": 0}, "config key 'validate#dataloadr' is unknown to this workflow; did you "
                                                "mean 'dataloader'?"),
        ({"experts": [{"name": "tiny_a", "patch_sz": 8}]}, "config key 'experts[0].patch_sz': expert 'tiny_a' takes "
                                                           "no key 'patch_sz'; did you mean 'patch_size'?"),
        ({"method": "gapt_deep", "method_kwargs": {"gate_int": 1.0}},
         "config key 'method_kwargs#gate_int': the method 'gapt_deep' has no option 'gate_int'; did you mean "
         "'gate_init'?"),
        ({"dispatcher": "moe_mlp", "dispatcher_kwargs": {"topk": 1}}, "config key 'dispatcher_kwargs#topk': the "
                                                                      "dispatcher 'moe_mlp' has no option 'topk'; did "
                                                                      "you mean 'top_k'?"),
        ({"demo_kind": None}, "config key 'datalist' is needed: this bundle has no demo data"),
    ],
)
def test_config_mistakes_end_with_medpmoe_error_naming_the_key(overrides, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(RuntimeError) as info:  # MONAI wraps it; the note carries ours
        run_bundle(str(REPO_ROOT / "bundles" / "medvtab_cls" / "train.json"), tracking=False,
                   **{**TINY, **overrides, "output_dir": str(tmp_path)})
    assert info.value.__notes__[-1].startswith("ConfigError: " + expected)
    assert not (tmp_path / "synthetic_data").exists() and not (tmp_path / "run.json").exists()


def test_a_nested_id_under_a_misspelled_parent_names_the_closest_key_in_python(tmp_path):
    """MONAI's command line refuses `--train#trainr#max_epochs 1` itself (KeyError 'query key: trainr', before any
    medpmoe code runs); run_bundle, notebooks and cross-validation name the closest key instead."""
    with pytest.raises(ConfigError) as info:
        run_bundle(str(REPO_ROOT / "bundles" / "kvasir_seg" / "train.json"), tracking=False,
                   **{"train#trainr#max_epochs": 1, "output_dir": str(tmp_path)})
    assert str(info.value) == ("config key 'train#trainr#max_epochs': the config has no 'train#trainr'; did you mean "
                               "'trainer'?")


def test_missing_checkpoint_names_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    root = REPO_ROOT / "bundles" / "kvasir_seg"
    with pytest.raises(RuntimeError) as info:
        run_bundle([str(root / "train.json"), str(root / "evaluate.json")], tracking=False, **TINY,
                   output_dir=str(tmp_path), checkpoint=str(tmp_path / "none.pt"))
    assert info.value.__notes__[-1] == (f"ConfigError: config key 'checkpoint': no file at {tmp_path / 'none.pt'} "
                                        "(train first, or pass --checkpoint)")


def test_summary_note_names_the_innermost_medpmoe_error_once():
    try:
        try:
            raise ConfigError("config key 'x': bad")
        except ConfigError as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression") from inner
    except RuntimeError as outer:
        summary_note(summary_note(outer))
        assert outer.__notes__ == ["ConfigError: config key 'x': bad"]
    plain = RuntimeError("not ours")
    assert not hasattr(summary_note(plain), "__notes__")


def test_cross_validation_package_keeps_the_old_names():
    import runpy
    import sys

    import medpmoe.crossval
    import medpmoe.cv

    assert medpmoe.cv.make_folds is medpmoe.crossval.folds.make_folds is medpmoe.crossval.make_folds
    for module in ("medpmoe.crossval", "medpmoe.cv"):
        argv, sys.argv = sys.argv, [module, "--help"]
        try:
            with pytest.raises(SystemExit) as info:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
        finally:
            sys.argv = argv
        assert info.value.code == 0


@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_net_in_out_on_the_recipe_network(bundle, monkeypatch):
    """`python -m monai.bundle verify_net_in_out network_def ...`: the shapes in metadata.json match the network."""
    from monai.bundle import verify_net_in_out

    monkeypatch.chdir(REPO_ROOT)
    root = REPO_ROOT / "bundles" / bundle
    verify_net_in_out(net_id="network_def", meta_file=str(root / "metadata.json"),
                      config_file=str(root / "train.json"))


def _documented_runs() -> list[tuple[str, str, list[str]]]:
    """(where, run id, config files) of every `monai.bundle run <id> --config_file ...` in the README and docs."""
    import ast
    import re

    docs = [REPO_ROOT / "README.md", REPO_ROOT / "Makefile", *sorted((REPO_ROOT / "docs").glob("*.md")),
            *sorted((REPO_ROOT / "bundles").glob("*/docs/README.md"))]
    found = []
    for doc in docs:
        text = doc.read_text().replace("\\\n", " ").replace("$B/", "bundles/medvtab_cls/")
        for run_id, arg in re.findall(r"monai\.bundle run (\w+)\s+--config_file\s+(\"\[[^\]]*\]\"|[^\s`]+)", text):
            files = ast.literal_eval(arg.strip('"')) if arg.startswith('"') else [arg]
            # docs/bundles.md's example of a fourth bundle, and of an exported model-zoo bundle (test_bundle_zoo.py)
            if not any("brain_seg" in f or f.startswith("$ZOO/") for f in files):
                found.append((doc.name, run_id, files))
    return found


def test_every_documented_bundle_command_names_existing_files_and_entry_point(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    runs = _documented_runs()
    assert len(runs) >= 20 and {r for _, r, _ in runs} == {"training", "evaluating", "inference"}
    for where, run_id, files in runs:
        parser = ConfigParser()
        parser.read_config(files)
        parser.resolve_macro_and_relative_ids()
        assert run_id in parser and "initialize" in parser, (where, run_id, files)


def test_the_process_group_is_joined_before_any_data_or_output_folder_step():
    """Under torchrun `@device` joins the process group; rank 0 can only go first (demo data, run.json, the output
    folder's lock) once the group exists, so `@device` is resolved before those initialize steps."""
    steps = ConfigParser.load_config_file(REPO_ROOT / "configs" / "train.json")["initialize"]
    first_data_step = min(i for i, step in enumerate(steps) if "check_data" in step or "run_start" in step)
    assert steps.index("$@device") < first_data_step
