"""Write each bundle's MONAI configs from the one recipe in `configs/` and the bundle's own `bundle.json`.

`python -m medpmoe.bundle.build` (all bundles) or `... build kvasir_seg` writes `bundles/NAME/train.json`,
`evaluate.json`, `inference.json` and `multi_gpu_train.json`: self-contained MONAI configs (no macros into other
files), so they run from any working directory. `--check` only reports files that are out of date (a test runs it).

How a file is made, with MONAI's own merge rules (`ConfigParser.load_config_files`: a later file's `"a#b#c"` key
sets that nested id, a plain key replaces the value):

- train.json = `configs/train.json` + `configs/<task>.json` + the `"train"` section of `bundle.json`;
- evaluate.json / inference.json / multi_gpu_train.json = `configs/<name>.json` + the bundle's `"evaluate"` /
  `"inference"` / `"multi_gpu_train"` section (overlays, merged on top of train.json when run, as in MONAI's
  model zoo).

`bundle.json` holds `"task"` (the name of a task file in `configs/`) and those sections; every key it sets must
exist in the recipe (a misspelled key stops the build, naming the closest one). A recipe value reading
`"set by ..."` is a slot the task file or the bundle must fill; a slot left empty stops the build.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

from monai.bundle import ConfigParser
from monai.bundle.reference_resolver import ReferenceResolver
from monai.bundle.utils import merge_kv

from medpmoe.bundle.errors import ConfigError

#: generated file -> the section of bundle.json that goes on top of `configs/<file>`
WORKFLOWS = {"train.json": "train", "evaluate.json": "evaluate", "inference.json": "inference",
             "multi_gpu_train.json": "multi_gpu_train"}
BUNDLE_KEYS = ("task", *WORKFLOWS.values())
GENERATED_KEY = "_generated_"
SLOT = "set by "
SEP = "#"  # how ids are written in configs and messages (MONAI also reads "::")


def repo_root() -> Path:
    """The repository holding `configs/` and `bundles/`: the working directory when it holds both (a copy of the
    repository), else the folder above the medpmoe package."""
    here = Path.cwd()
    if (here / "configs" / "train.json").is_file() and (here / "bundles").is_dir():
        return here
    return Path(__file__).resolve().parents[2]


def bundle_dirs(root: Path | None = None) -> list[Path]:
    """Every bundle folder: `bundles/*/bundle.json`."""
    root = Path(root or repo_root())
    return sorted(p.parent for p in (root / "bundles").glob("*/bundle.json"))


def _closest(key: str, known) -> str:
    near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(sorted(known))}"


def read_bundle(bundle_dir: Path) -> dict:
    """The bundle's `bundle.json`, its top-level keys checked."""
    path = Path(bundle_dir) / "bundle.json"
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot read it ({err})") from None
    for key in spec:
        if key not in BUNDLE_KEYS:
            raise ConfigError(f"{path}: key {key!r} is not a bundle.json key{_closest(key, BUNDLE_KEYS)}")
    if not isinstance(spec.get("task"), str):
        raise ConfigError(f"{path}: key 'task' must name a task file in configs/ (e.g. \"segmentation\")")
    return spec


def apply_overrides(parser: ConfigParser, overrides: dict, where: str = "", new_keys: bool = False) -> None:
    """Set each `id: value` of `overrides` (MONAI ids, '#' for nesting) as MONAI does; an id whose parent (or, unless
    `new_keys`, whose top-level key) the config lacks stops with a ConfigError naming the closest key."""
    for key, value in overrides.items():
        parts = ReferenceResolver.split_id(key.lstrip("+"))
        for depth in range(1, len(parts) + 1):
            sub = SEP.join(parts[:depth])
            if sub in parser:
                continue
            parent = parser[SEP.join(parts[: depth - 1])] if depth > 1 else parser.get()
            if depth == len(parts) and isinstance(parent, dict) and (depth > 1 or new_keys):
                break  # a new entry in an existing dict (e.g. another argument of a component)
            known = parent.keys() if isinstance(parent, dict) else [str(i) for i in range(len(parent or []))]
            raise ConfigError(f"{where}key {key!r}: the config has no {sub!r}{_closest(parts[depth - 1], known)}")
        merge_kv(parser, key, value)


def _slots(node, path: str = ""):
    """Ids whose value is still a recipe slot ("set by ...")."""
    if isinstance(node, str) and node.startswith(SLOT):
        yield path
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _slots(v, f"{path}{SEP}{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _slots(v, f"{path}{SEP}{i}")


def build_bundle(bundle_dir: Path, root: Path | None = None) -> dict[str, dict]:
    """{file name: config} of the bundle's generated files."""
    root = Path(root or repo_root())
    bundle_dir = Path(bundle_dir)
    spec = read_bundle(bundle_dir)
    configs = root / "configs"
    task_file = configs / f"{spec['task']}.json"
    if not task_file.is_file():
        tasks = [p.stem for p in configs.glob("*.json") if p.name not in WORKFLOWS]
        raise ConfigError(f"{bundle_dir / 'bundle.json'}: key 'task': no task file {task_file}"
                          f"{_closest(spec['task'], tasks)}")
    out = {}
    for name, section in WORKFLOWS.items():
        sources = [configs / name] + ([task_file] if name == "train.json" else [])
        parser = ConfigParser(ConfigParser.load_config_files([str(s) for s in sources]))
        apply_overrides(parser, spec.get(section) or {}, f"{bundle_dir / 'bundle.json'} section {section!r}: ")
        config = parser.get()
        if name == "train.json":
            left = list(_slots(config))
            if left:
                raise ConfigError(f"{bundle_dir / 'bundle.json'}: recipe key {left[0]!r} is "
                                  f"{config_get(config, left[0])!r}: set it in the task file or the 'train' section")
        edit = [p.relative_to(root).as_posix() for p in [*sources, bundle_dir / "bundle.json"]]
        note = (f"Generated by `python -m medpmoe.bundle.build` from {', '.join(edit)}: edit those and run it again; "
                "changes made here are overwritten.")
        out[name] = {GENERATED_KEY: note, **{k: v for k, v in config.items() if k != GENERATED_KEY}}
    return out


def config_get(config: dict, path: str):
    """The value at a MONAI id in a plain config dict."""
    node = config
    for part in ReferenceResolver.split_id(path):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _depth(node) -> int:
    if isinstance(node, dict):
        return 1 + max((_depth(v) for v in node.values()), default=0)
    if isinstance(node, list):
        return 1 + max((_depth(v) for v in node), default=0)
    return 0


def dumps(node, indent: int = 0, width: int = 120) -> str:
    """JSON with 4-space indents; a list or dict that fits on its line (and nests at most two deep) stays on it."""
    flat = json.dumps(node, ensure_ascii=False)
    if not isinstance(node, (dict, list)) or (_depth(node) <= 2 and indent + len(flat) <= width) or not node:
        return flat
    pad = " " * (indent + 4)
    if isinstance(node, list):
        items = [pad + dumps(v, indent + 4, width) for v in node]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    items = [f"{pad}{json.dumps(k)}: {dumps(v, indent + 4, width)}" for k, v in node.items()]
    return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"


def write_bundles(names: list[str] | None = None, root: Path | None = None, check: bool = False) -> list[Path]:
    """Write (or with `check`, only compare) the generated files; returns those that changed (or would)."""
    from medpmoe.files import atomic_write_text

    root = Path(root or repo_root())
    dirs = bundle_dirs(root)
    if names:
        by_name = {d.name: d for d in dirs}
        for n in names:
            if n not in by_name:
                raise ConfigError(f"no bundle {n!r} (no {root / 'bundles' / n / 'bundle.json'}){_closest(n, by_name)}")
        dirs = [by_name[n] for n in names]
    changed = []
    for d in dirs:
        for name, config in build_bundle(d, root).items():
            text = dumps(config) + "\n"
            path = d / name
            if not path.is_file() or path.read_text() != text:
                changed.append(path)
                if not check:
                    atomic_write_text(path, text)
    return changed


def main(argv: list[str] | None = None) -> int:
    """Command line: write every bundle's files (or the named ones); `--check` lists stale files and exits 1."""
    ap = argparse.ArgumentParser(prog="python -m medpmoe.bundle.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="*", help="bundle names (folders of bundles/); default: every bundle")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when a generated file is out of date")
    ap.add_argument("--root", default=None, help="repository root holding configs/ and bundles/ (default: the working "
                    "directory when it holds them, else the repository of this medpmoe)")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve() if args.root else repo_root()
    try:
        changed = write_bundles(args.bundles, root, check=args.check)
    except ConfigError as err:
        print(f"ConfigError: {err}", file=sys.stderr)
        return 2
    for path in changed:
        print(f"{'out of date' if args.check else 'wrote'}: {path}")
    if args.check and changed:
        print("run `python -m medpmoe.bundle.build` to regenerate them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
