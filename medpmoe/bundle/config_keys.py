"""Misspelled keys below the top level: nested ids (`--train#dataloader#num_worker`), component arguments, expert
entries (`patch_sz`) and method / dispatcher / head options; each stops with one line naming the key and the closest
valid one."""

from __future__ import annotations

import difflib
import inspect
from pydoc import ErrorDuringImport, locate

from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator

from medpmoe.bundle.errors import ConfigError

#: keys MONAI reads itself in a `_target_` entry
SPECIAL = {"_target_", "_disabled_", "_requires_", "_desc_", "_mode_"}
#: an expert entry's keys that `build_recorded_expert` reads itself
EXPERT_EXTRA = {"checkpoint_sha256"}


def closest(key: str, valid) -> str:
    """'; did you mean 'x'?' for the closest valid name, else the list of valid names."""
    valid = sorted(str(v) for v in valid)
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if near:
        return f"; did you mean {near[0]!r}?"
    shown = ", ".join(valid[:12]) + (", ..." if len(valid) > 12 else "")
    return f" (valid: {shown})" if valid else " (it takes none)"


def named_parameters(fn) -> set[str]:
    """`fn`'s parameter names, without `self`, `*args` and `**kwargs`."""
    return {p.name for p in inspect.signature(fn).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"}


def takes_any_keyword(fn) -> bool:
    """True when `fn` has a `**kwargs` parameter."""
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def accepted_arguments(target) -> set[str] | None:
    """Keyword names `target` takes (a class: every `__init__` up its MRO, which `**kwargs` forward to); None
    when it takes any."""
    if isinstance(target, type):
        inits = [k.__init__ for k in target.__mro__ if "__init__" in vars(k) and k is not object]
        names = set()
        for fn in inits:
            try:
                params = inspect.signature(fn).parameters.values()
            except (TypeError, ValueError):
                return None
            names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"}
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                return names or None  # this __init__ takes named arguments only: the chain stops here
        return None  # the last __init__ takes **kwargs of its own (e.g. ignite's ProgressBar: tqdm's arguments)
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind != p.VAR_POSITIONAL}


def _resolve_target(name: str, locator: ComponentLocator):
    if not isinstance(name, str) or name.startswith(("$", "@", "%")):
        return None
    module = locator.get_component_module_name(name)
    if isinstance(module, list):
        module = module[0]
    try:
        return locate(f"{module}.{name}" if module else name)
    except ErrorDuringImport:  # an optional package is missing (e.g. MLflow on a GPU image): nothing to check
        return None


def _referenced(config: dict) -> set[str]:
    from medpmoe.bundle.config_check import _strings
    from monai.bundle.reference_resolver import ReferenceResolver

    refs = set()
    for text in _strings(config):
        refs |= {r.replace("::", "#") for r in ReferenceResolver.match_refs_pattern(text)}
    return refs


def check_nested(parser: ConfigParser, defaults: dict[str, list]) -> None:
    """Every `_target_` entry's keys are arguments its callable takes; a plain dict the recipe has (e.g. `train`,
    `validate`) holds no key that the recipe lacks and nothing references. `defaults`: each top-level key's
    values in the bundle's files."""
    config = parser.get()
    refs = _referenced(config)
    locator = getattr(parser, "locator", None) or ComponentLocator()
    for key, value in config.items():
        if key in ("experts", "_meta_"):  # experts: check_experts
            continue
        _walk(value, key, defaults.get(key, []), refs, locator)


def _walk(node, path: str, defaults: list, refs: set[str], locator) -> None:
    if isinstance(node, list):
        for i, item in enumerate(node):
            _walk(item, f"{path}#{i}", [d[i] for d in defaults if isinstance(d, list) and i < len(d)], refs, locator)
        return
    if not isinstance(node, dict):
        return
    if "_target_" in node:
        target = _resolve_target(node["_target_"], locator)
        valid = accepted_arguments(target) if target is not None else None
        if valid is not None:
            for key in node:
                if key not in SPECIAL and key not in valid:
                    name = node["_target_"].rsplit(".", 1)[-1]
                    raise ConfigError(f"config key '{path}#{key}': {name} takes no argument {key!r}"
                                      f"{closest(key, valid)}")
    elif defaults and not path.endswith("kwargs"):  # a plain dict of the recipe (option dicts are checked elsewhere)
        known = {k for d in defaults if isinstance(d, dict) for k in d}
        for key in node:
            if key not in known and f"{path}#{key}" not in refs:
                raise ConfigError(f"config key '{path}#{key}' is unknown to this workflow{closest(key, known)}")
    for key, value in node.items():
        if key in SPECIAL:
            continue
        sub = [d[key] for d in defaults if isinstance(d, dict) and key in d]
        _walk(value, f"{path}#{key}", sub, refs, locator)


def expert_keys(name: str) -> set[str] | None:
    """Keys an `experts` entry named `name` may hold: `build_expert`'s arguments plus the architecture's own (the
    tiny test experts', or the timm class's); None when unknown (an unregistered name: reported elsewhere)."""
    from medpmoe.experts.registry import build_expert, expert_spec

    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    keys = named_parameters(build_expert) | EXPERT_EXTRA
    if name.startswith("tiny_sam"):
        from medpmoe.experts.sam import tiny_sam_expert as arch
        timm_class = VisionTransformerSAM
    elif name.startswith("tiny"):
        from medpmoe.experts.frozen_vit import tiny_vit_expert as arch
        timm_class = VisionTransformer
    else:
        try:
            spec = expert_spec(name)
        except KeyError:
            return None
        arch = timm_class = VisionTransformerSAM if spec.family == "sam" else VisionTransformer
    more = accepted_arguments(arch) if isinstance(arch, type) else named_parameters(arch)
    if not isinstance(arch, type) and takes_any_keyword(arch):  # the rest goes to the timm class
        more = more | (accepted_arguments(timm_class) or set())
    return None if more is None else keys | more


def check_expert_keys(entry: dict, where: str) -> None:
    """An `experts` entry's keys are ones its expert takes (`patch_sz` -> did you mean 'patch_size'?)."""
    valid = expert_keys(entry["name"])
    if valid is None:
        return
    for key in entry:
        if key not in valid:
            raise ConfigError(f"config key '{where}.{key}': expert {entry['name']!r} takes no key {key!r}"
                              f"{closest(key, valid)}")


def check_options(config: dict) -> None:
    """`method_kwargs` / `dispatcher_kwargs` hold only options of the chosen method / dispatcher."""
    from medpmoe.dispatch import DISPATCHERS
    from medpmoe.models.config import options_class
    from medpmoe.models.factory import DISPATCHER_ARGS, METHOD_ARGS
    from medpmoe.prompts import METHODS, canonical_method_name

    method = config.get("method")
    if isinstance(method, str) and not method.startswith(("$", "@")):
        try:
            method = canonical_method_name(method)
        except (KeyError, ValueError):
            method = None
    dispatcher = config.get("dispatcher")
    components = {
        "method_kwargs": (METHODS.get(method) if isinstance(method, str) else None, METHOD_ARGS, f"method {method!r}"),
        "dispatcher_kwargs": (DISPATCHERS.get(str(dispatcher).lower()), DISPATCHER_ARGS, f"dispatcher {dispatcher!r}"),
    }
    for key, (component, exclude, what) in components.items():
        given = config.get(key)
        if not isinstance(given, dict) or component is None:
            continue
        import dataclasses

        valid = [f.name for f in dataclasses.fields(options_class(component, exclude))]
        for option in given:
            if option not in valid:
                raise ConfigError(f"config key '{key}#{option}': the {what} has no option {option!r}"
                                  f"{closest(option, valid)}")
