"""Run a bundle in-process (notebooks, tests): the same configs and keys as `python -m monai.bundle run`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from monai.bundle import ConfigWorkflow

from medpmoe.bundle.errors import ConfigError, close_progress_bars, summary_note

_TRACKERS = ("MLFlowHandler", "ArtifactLogger")
_HANDLER_LISTS = ("train#handlers", "val_handlers")


def drop_tracking(workflow: ConfigWorkflow) -> None:
    """Remove the MLflow entries (MONAI's MLFlowHandler, medpmoe's ArtifactLogger) from the handler lists."""
    parser = workflow.parser
    for key in _HANDLER_LISTS:
        handlers = parser.get(key)
        if isinstance(handlers, list):
            parser[key] = [h for h in handlers
                           if not (isinstance(h, dict) and str(h.get("_target_")).endswith(_TRACKERS))]


def load_checkpoint(checkpoint: str | Path, model, **settings) -> dict:
    """Load the prompt checkpoint of config key 'checkpoint' into `model` (the first `run` step of evaluation); a
    missing file is a ConfigError naming the key. `settings` (config key -> value, e.g. image_size=@image_size) must
    equal what the checkpoint was trained with, else a ConfigError names the key and the trained value (evaluating
    at another image size would silently give other numbers). Returns the checkpoint's metadata."""
    from medpmoe.training import load_prompt_checkpoint

    if not Path(checkpoint).expanduser().is_file():
        raise ConfigError(f"config key 'checkpoint': no file at {checkpoint} (train first, or pass --checkpoint)")
    metadata = load_prompt_checkpoint(Path(checkpoint).expanduser(), model)
    for key, value in settings.items():
        trained = metadata.get(key)
        if trained is not None and trained != value:
            raise ConfigError(f"config key {key!r} is {value!r} but {checkpoint} was trained with {trained!r}: pass "
                              f"--{key} {trained!r} (or evaluate the checkpoint trained with {value!r})")
    return metadata


def model_from_checkpoint(checkpoint: str | Path, expert_files=None, device="cpu"):
    """The model of config key 'checkpoint', rebuilt from the checkpoint alone by `medpmoe.load_model` (the
    inference workflow: experts, method, head, image size and classes are the checkpoint's, whatever the config
    says); `expert_files` (config key) replaces moved expert files. A missing file is a ConfigError naming the key."""
    from medpmoe.models import load_model

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ConfigError(f"config key 'checkpoint': no file at {checkpoint} (train first, or pass --checkpoint)")
    return load_model(path, expert_files=expert_files, device=device)


def _workflow(config_files: str | Path | Sequence[str | Path], **overrides) -> ConfigWorkflow:
    """The workflow of `config_files` with `overrides` set as MONAI sets them; a nested id whose parent the config
    lacks (`train#trainr#max_epochs`) is a ConfigError naming the closest key (MONAI: a bare KeyError)."""
    from medpmoe.bundle.build import apply_overrides

    files = [str(config_files)] if isinstance(config_files, (str, Path)) else [str(f) for f in config_files]
    meta = Path(files[0]).parent / "metadata.json"
    wf = ConfigWorkflow(config_file=files, meta_file=str(meta) if meta.is_file() else None, workflow_type=None)
    apply_overrides(wf.parser, overrides, "config ", new_keys=True)
    return wf


def _release(wf: ConfigWorkflow) -> None:
    """Free the output folder that the workflow's `run_start` claimed (see `medpmoe.training.claim_output_dir`)."""
    from medpmoe.training import release_output_dir

    output_dir = wf.parser.get("output_dir")
    if isinstance(output_dir, (str, Path)) and not str(output_dir).startswith(("$", "@", "%")):
        release_output_dir(output_dir)


def output_state(config_files: str | Path | Sequence[str | Path], **overrides):
    """What a training run of these configs would do with its output folder, without training: the config is
    checked (`check_parser`) and the recipe's `run_start` decides (`medpmoe.training.start_run`: `.status` 'new',
    'resume' or 'finished'); a folder holding a run of another configuration raises RunMismatchError naming the
    keys, and `fresh_start=True` moves that run aside, as the run itself would."""
    from medpmoe.bundle.config_check import check_parser

    wf = _workflow(config_files, **overrides)
    check_parser(wf.parser, wf.config_root_path)
    try:
        return wf.parser.get_parsed_content("run_start")
    except Exception as err:
        summary_note(err)
        raise
    finally:
        _release(wf)


def run_bundle(config_files: str | Path | Sequence[str | Path], tracking: bool = True, **overrides) -> ConfigWorkflow:
    """initialize / run / finalize the merged `config_files` with `overrides` (config keys, '#' for nesting).

    `tracking=False` drops the MLflow handlers (quick runs). Returns the finished workflow, whose `parser` gives
    access to every component (e.g. `wf.parser.get_parsed_content('validate#evaluator')`). A failure inside the
    config (which MONAI wraps in RuntimeError) carries medpmoe's own error as its last note.
    """
    wf = _workflow(config_files, **overrides)
    if not tracking:
        drop_tracking(wf)
    try:
        wf.initialize()
        wf.run()
        wf.finalize()
    except Exception as err:
        close_progress_bars()  # an unfinished bar would print later, below the error
        summary_note(err)
        raise
    finally:  # in-process runs (notebooks, cross-validation) free the output folder; a process frees it on exit
        _release(wf)
    return wf
