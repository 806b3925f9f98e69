"""Catch config mistakes before anything is built: unknown keys, wrong types, unknown choices, missing files.

`check_config()` is the first step of every bundle's `initialize`; it reads the running config (after `--key value`
overrides) and raises `ConfigError` naming the key, with the closest known
keys for a misspelling.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Mapping
from pathlib import Path

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.properties import InferProperties, MetaProperties, TrainProperties
from monai.bundle.reference_resolver import ReferenceResolver
from monai.bundle.utils import ID_SEP_KEY

from medpmoe.bundle.config_keys import check_expert_keys, check_nested, check_options
from medpmoe.bundle.errors import ConfigError, install_excepthook

#: Keys nothing references that are still part of a workflow: entry points, imports, MONAI's property ids, the
#: generated files' note and configs/paper's description of the paper's recipe.
STRUCTURAL = {"_meta_", "_generated_", "paper_recipe", "imports", "initialize", "run", "finalize", "training",
              "evaluating", "inference"} | {
    p["id"] for props in (TrainProperties, InferProperties, MetaProperties) for p in props.values()
    if ID_SEP_KEY not in p["id"]
}
AT_LEAST = {"num_epochs": 1, "batch_size": 1, "image_size": 1, "val_interval": 1, "early_stop_patience": 1,
            "demo_images": 2, "demo_size": 8, "num_tokens": 0, "warmup_epochs": 0, "num_workers": 0, "fold": 0,
            "learning_rate": 0, "weight_decay": 0, "aux_loss_weight": 0, "grad_clip": 0}
BETWEEN = {"val_fraction": (0.0, 1.0), "cache_rate": (0.0, 1.0)}
FILES = ("datalist", "folds_file", "eval_datalist")  # 'checkpoint' is checked where it is loaded, in run
NULLABLE = {"grad_clip", "demo_kind"}  # null switches the feature off (demo_kind: no demo data)


def _self_on_stack(kind: type, frame):
    """The first `self` of type `kind` from `frame` outwards on the call stack, or None."""
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, kind):
            return owner
        frame = frame.f_back
    return None


def _running_parser() -> ConfigParser | None:
    """The ConfigParser evaluating the current expression (MONAI hands expressions no reference to it)."""
    return _self_on_stack(ConfigParser, sys._getframe(1))


def running_workflow():
    """The MONAI ConfigWorkflow whose config is being evaluated (found on the call stack), or None."""
    return _self_on_stack(ConfigWorkflow, sys._getframe(1))


def bundle_root() -> str:
    """Config key 'bundle_root': the folder of the running workflow's first config file (the bundle's folder, as
    given on the command line, so from any working directory); '.' outside a workflow."""
    workflow = running_workflow()
    return str(workflow.config_root_path) if workflow is not None else "."


def check_config() -> None:
    """Check the running bundle config (call it as the first `initialize` step); raise ConfigError naming the key.

    Also makes a failed run end with medpmoe's error rather than MONAI's wrapping RuntimeError.
    """
    install_excepthook()
    parser = _running_parser()
    if parser is not None:
        workflow = running_workflow()
        check_parser(parser, workflow.config_root_path if workflow is not None else None)


def _strings(value):
    """Every string inside a config value (dicts and lists walked)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def used_keys(config: dict) -> set[str]:
    """Top-level keys that some `@` reference (plain or inside a `$` expression) points into."""
    used = set()
    for text in _strings({k: v for k, v in config.items() if k != "_meta_"}):
        used |= {ref.split(ID_SEP_KEY)[0] for ref in ReferenceResolver.match_refs_pattern(text)}
    return used


def bundle_defaults(bundle_root: str | Path) -> dict[str, list]:
    """Each top-level key's values in the bundle's config files (train.json first), recipe macros resolved."""
    root = Path(bundle_root)
    files = sorted(root.glob("*.json"), key=lambda f: (f.name != "train.json", f.name))
    defaults: dict[str, list] = {}
    for f in files:
        if f.name in ("metadata.json", "bundle.json"):
            continue
        parser = ConfigParser()
        parser.read_config(str(f))
        parser.resolve_macro_and_relative_ids()
        for k, v in parser.get().items():
            if k != "_meta_":
                defaults.setdefault(k, []).append(v)
    return defaults


def _closest(key: str, known, bundle_root) -> str:
    near = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
    if near:
        return f"did you mean {' or '.join(repr(k) for k in near)}?"
    return f"the keys are listed in {Path(bundle_root or '.') / 'train.json'}"


def _is_code(value) -> bool:
    return isinstance(value, str) and value[:1] in ("$", "@", "%")


def _kind(value) -> str | None:
    if isinstance(value, bool):
        return "True or False"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    return {str: "a string", list: "a list", dict: "a dict"}.get(type(value))


def _same_kind(value, default) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def check_parser(parser: ConfigParser, bundle_dir: str | Path | None = None) -> None:
    """Check a parsed bundle config: every top-level key is the bundle's (train.json) or used, values have their
    default's type and range, `method` / `dispatcher` / `task` / `demo_kind` are known, `experts` entries are
    buildable and the named files exist. `bundle_dir`: the folder of the bundle's config files, which give the
    defaults (a model-zoo bundle's `configs/`, whose files' keys are all known when it has no train.json)."""
    config = parser.get()
    root = bundle_dir if bundle_dir is not None and Path(bundle_dir).is_dir() else None
    defaults = bundle_defaults(root) if root else {}
    train = Path(root) / "train.json" if root else None
    train_keys = set(ConfigParser.load_config_file(train)) if train and train.is_file() else set(defaults)
    known = used_keys(config) | train_keys | STRUCTURAL
    for key, value in config.items():  # an overlay's own key is fine unused (e.g. with tracking off), an override not
        if key not in known and value not in defaults.get(key, []):
            raise ConfigError(f"config key {key!r} is unknown to this workflow; {_closest(key, known, root)}")
    for key, value in config.items():
        default = defaults.get(key, [None])[0]
        if _is_code(value) or _is_code(default) or default is None or (value is None and key in NULLABLE):
            continue
        if key == "slices" and isinstance(value, int) and not isinstance(value, bool):
            continue  # inference: 'middle', 'all' or a slice index
        if not _same_kind(value, default):
            raise ConfigError(f"config key {key!r} must be {_kind(default)} like its default {default!r}, "
                              f"got {value!r} ({type(value).__name__})")
    _check_values(parser, config)
    check_options(config)
    check_nested(parser, defaults)


def _check_values(parser: ConfigParser, config: dict) -> None:
    for key, low in AT_LEAST.items():
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
            raise ConfigError(f"config key {key!r} must be at least {low}, got {value!r}")
    for key, (low, high) in BETWEEN.items():
        value = config.get(key)
        if isinstance(value, (int, float)) and not low <= value <= high:
            raise ConfigError(f"config key {key!r} must lie in [{low}, {high}], got {value!r}")
    _check_choices(config)
    if isinstance(config.get("dataset_dir"), str) and not _is_code(config["dataset_dir"]):
        raise ConfigError("config key 'dataset_dir' is the folder of the datalist in use, not a setting: point "
                          f"'datalist' at the datalist file instead (e.g. {config['dataset_dir']}/datalist.json)")
    if isinstance(config.get("experts"), list):
        _check_experts(config["experts"], parser)
    for key in FILES:
        if key in config and config[key] is not None:
            path = parser.get_parsed_content(key) if _is_code(config[key]) else config[key]
            if not isinstance(path, (str, Path)) or not Path(path).expanduser().is_file():
                raise ConfigError(f"config key {key!r}: no file at {path}")
    if config.get("folds_file") and isinstance(config.get("fold"), int):
        k = json.loads(Path(config["folds_file"]).read_text()).get("k")
        if isinstance(k, int) and not 0 <= config["fold"] < k:
            raise ConfigError(f"config key 'fold': {config['fold']} is outside 0..{k - 1} ({config['folds_file']} "
                              f"has {k} folds)")


def _check_choices(config: dict) -> None:
    from medpmoe.bundle.data import CLASS_BALANCE, DEMOS, ITEM_SETS
    from medpmoe.dispatch.mlp import DISPATCHERS
    from medpmoe.models.factory import BASELINES
    from medpmoe.prompts import METHODS

    import medpmoe.dispatch  # noqa: F401  (registers moe_mlp)

    choices = {"method": sorted(METHODS) + list(BASELINES), "dispatcher": sorted(DISPATCHERS),
               "task": ["classification", "segmentation"], "demo_kind": list(DEMOS),
               "class_balance": list(CLASS_BALANCE), "eval_split": list(ITEM_SETS),
               "slices": ["middle", "all", "or a slice index"]}
    from medpmoe.prompts.registry import DEPRECATED

    for key, allowed in choices.items():
        value = config.get(key)
        if key == "method" and isinstance(value, str) and value.lower() in DEPRECATED:
            new, why = DEPRECATED[value.lower()]
            raise ConfigError(f"config key 'method': {value!r} is now called {new!r} ({why}): use --method {new}")
        if isinstance(value, str) and not _is_code(value) and value not in allowed:
            raise ConfigError(f"config key {key!r}: unknown {key} {value!r} (known: {', '.join(allowed)})")
    from medpmoe.models.factory import DEEP_FOR_PMOE

    method, experts = config.get("method"), config.get("experts")
    several = not isinstance(experts, list) or len(experts) > 1  # from code: as the default, several
    if method in DEEP_FOR_PMOE and config.get("moe") is True and several:
        raise ConfigError(f"config key 'method': {method!r} puts prompts at the first prompt layer only, so pMoE "
                          f"(moe=True) has nothing to mix afterwards: use {DEEP_FOR_PMOE[method]}, or --moe False")


def _check_experts(experts: list, parser: ConfigParser) -> None:
    from medpmoe.experts.registry import expert_spec

    if not experts:
        raise ConfigError("config key 'experts' is empty: give at least one expert")
    for i, entry in enumerate(experts):
        where = f"experts[{i}]"
        if _is_code(entry):
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"config key {where!r} must be a dict with a 'name' (e.g. {{'name': 'dinov2_vitb14', "
                              f"'checkpoint': '/weights/dinov2_vitb14_pretrain.pth'}}), got {entry!r}")
        name, checkpoint = entry["name"], entry.get("checkpoint")
        if _is_code(checkpoint):  # e.g. "$@weights_dir + '/lvmmed_vit.pth'" in the expert presets
            checkpoint = parser.get_parsed_content(f"experts{ID_SEP_KEY}{i}{ID_SEP_KEY}checkpoint")
        if checkpoint is not None and not Path(str(checkpoint)).expanduser().is_file():  # first: an own expert's
            raise ConfigError(f"config key '{where}.checkpoint': no file at {checkpoint}")  # name needs its file
        if not name.startswith("tiny"):
            try:
                expert_spec(name, checkpoint)
            except KeyError as err:
                raise ConfigError(f"config key '{where}.name': {err.args[0]}") from None
            if checkpoint is None and not entry.get("random_init"):
                raise ConfigError(f"config key {where!r}: expert {name!r} needs a 'checkpoint' file "
                                  "(see docs/experts.md for where each one comes from)")
        check_expert_keys(entry, where)
