"""One recipe under configs/, thin bundles over it, MONAI's tools on them, and config mistakes caught early."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from monai.bundle import ConfigParser, ConfigWorkflow

from medpmoe.bundle import ConfigError, LossProgressBar, run_bundle
from medpmoe.bundle.errors import summary_note
from medpmoe.demo import demo_dir
from tests.conftest import REPO_ROOT
from tests.helpers import bundle_command, bundle_env
from tests.test_bundle_common import BUNDLES, TINY

RECIPE = ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json")  # same names in configs/
TASK_FILE = {"kvasir_seg": "segmentation.json", "isic_seg": "segmentation.json", "medvtab_cls": "classification.json"}


def _recipe(name: str) -> dict:
    return json.loads((REPO_ROOT / "configs" / name).read_text())


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_files_are_thin_and_take_every_shared_setting_from_configs(bundle):
    root = REPO_ROOT / "bundles" / bundle
    lines = len((root / "train.json").read_text().splitlines())
    assert lines <= 66, f"{root / 'train.json'} has {lines} lines: issue 12 keeps bundle files at about 60"
    for name in RECIPE:
        own = json.loads((root / name).read_text())
        assert "_target_" not in (root / name).read_text()  # every component lives in configs/
        for key, default in _recipe(name).items():
            macro = f"%configs/{name}#{key}"
            assert key in own, f"{root / name} lacks recipe key {key!r}: add \"{key}\": \"{macro}\""
            assert own[key] == macro or own[key] != default, f"{root / name}: {key!r} copies the recipe's value"
    own = json.loads((root / "train.json").read_text())
    for key in _recipe(TASK_FILE[bundle]):
        assert key in own, f"{root / 'train.json'} lacks task key {key!r}"


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
    ],
)
def test_config_mistakes_end_with_medpmoe_error_naming_the_key(overrides, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(RuntimeError) as info:  # MONAI wraps it; the note carries ours
        run_bundle(str(REPO_ROOT / "bundles" / "medvtab_cls" / "train.json"), tracking=False,
                   **{**TINY, **overrides, "output_dir": str(tmp_path)})
    assert info.value.__notes__[-1].startswith("ConfigError: " + expected)
    assert not (tmp_path / "synthetic_data").exists() and not (tmp_path / "run.json").exists()


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


def test_recipe_macros_resolve_like_the_old_self_contained_files(monkeypatch):
    """The parsed kvasir_seg config holds the recipe's components (what MONAI's tools and notebooks read)."""
    monkeypatch.chdir(REPO_ROOT)
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / "kvasir_seg" / "train.json"))
    parser.resolve_macro_and_relative_ids()
    assert parser["train#trainer#_target_"] == "SupervisedTrainer"
    assert parser["train#trainer#max_epochs"] == "@num_epochs"
    assert parser["task_parts#key_metric"]["val_mean_iou"]["include_background"] is True
    assert parser["task_parts#additional_metrics"]["val_fg_iou"]["include_background"] is False
    assert parser["learning_rate"] == _recipe("train.json")["learning_rate"] and parser["head_channels"] == 64


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
