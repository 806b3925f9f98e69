"""Share a trained run as a self-contained MONAI bundle in the model-zoo layout: `python -m medpmoe.bundle.zoo`.

`export_bundle(run_dir, bundle_file, out)` reads the run's bundle configs with MONAI's ConfigParser (the training
config merged with each overlay, recipe macros resolved), sets what the run was trained with (the checkpoint's task,
image size, classes and model; `run.json`'s training settings), writes the model the checkpoint records as an
explicit `network_def`, keeps only the keys each workflow reaches, and writes

    <out>/configs/inference.json, evaluate.json   self-contained: no macros, every path under @bundle_root
    <out>/configs/metadata.json, logging.conf     MONAI's metadata (shapes, versions, metrics, experts by sha256)
    <out>/models/model.pt                         the prompt checkpoint (+ models/experts/ with copy_experts)
    <out>/docs/README.md, LICENSE

then checks it as the model zoo does (`verify_metadata`, `verify_net_in_out`, `check_properties`). The bundle runs
with `python -m monai.bundle run inference --config_file <out>/configs/inference.json` from any directory.
"""

from __future__ import annotations

import argparse
import difflib
import json
import shutil
import sys
import tempfile
from collections.abc import Mapping
from contextlib import chdir
from pathlib import Path

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.properties import InferProperties
from monai.bundle.reference_resolver import ReferenceResolver
from monai.bundle.utils import ID_SEP_KEY

from medpmoe.bundle.config_check import _strings
from medpmoe.bundle.errors import ConfigError, install_excepthook
from medpmoe.files import atomic_write_text, file_sha256

#: workflow -> (overlay file beside the bundle's train.json, entry point)
WORKFLOWS = {"inference": ("inference.json", "inference"), "evaluate": ("evaluate.json", "evaluating")}
MODEL_FILE = "models/model.pt"
EXPERT_DIR = "models/experts"
CHECK = "$medpmoe.bundle.check_config()"
ZOO_CHECK = "$medpmoe.bundle.zoo.check_config()"
#: model settings the checkpoint records that are also top-level bundle keys
MODEL_KEYS = ("method", "moe", "num_tokens", "prompt_layers", "dispatcher")


class ZooExportError(ConfigError):
    """The run or bundle cannot be exported (names the file or option and the problem)."""


def bundle_root() -> str:
    """The exported bundle's folder: the parent of the `configs/` folder whose config MONAI's ConfigWorkflow runs
    (`python -m monai.bundle run`, `check_properties`), so the bundle runs from any directory; else the working
    directory (plain ConfigParser use, `verify_net_in_out`: pass `--bundle_root`)."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ConfigWorkflow):
            root = Path(owner.config_root_path)
            return str((root.parent if root.name == "configs" else root).resolve())
        frame = frame.f_back
    return "."


def check_config() -> None:
    """The exported bundle's first `initialize` step: every expert with a weights file has one (`expert_files`),
    then medpmoe's config check against the bundle's own `configs/` (unknown keys, types, choices, files)."""
    from medpmoe.bundle.config_check import _running_parser, check_parser

    install_excepthook()
    parser = _running_parser()
    if parser is None:
        return
    files = parser.get_parsed_content("expert_files") or {}
    if not isinstance(files, Mapping):
        raise ConfigError(f"config key 'expert_files' must be a dict {{expert name: weights file}}, got {files!r}")
    configs = Path(parser.get_parsed_content("bundle_root")) / "configs"
    meta = json.loads((configs / "metadata.json").read_text()) if (configs / "metadata.json").is_file() else {}
    for record in meta.get("medpmoe", {}).get("experts", []):
        path = files.get(record["name"])
        if record.get("sha256") and not path:
            raise ConfigError(f"config key 'expert_files': expert {record['name']!r} needs its weights file "
                              f"{record.get('file')} (sha256 {record['sha256']}): pass --expert_files "
                              f"\"{{'{record['name']}': '/path/to/{record.get('file') or 'weights'}'}}\"")
        if path and not Path(path).expanduser().is_file():
            raise ConfigError(f"config key 'expert_files': no file at {path} for expert {record['name']!r}")
    check_parser(parser, bundle_dir=configs)


def _refs(value) -> set[str]:
    return {ref for text in _strings(value) for ref in ReferenceResolver.match_refs_pattern(text)}


def _node(config, ref: str):
    """The config item at id `ref` ('a::b::0'), or KeyError."""
    node = config
    for part in ref.split(ID_SEP_KEY):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def reachable(config: Mapping, roots) -> set[str]:
    """The ids ('a::b') that `roots` reference, directly or through other items (each item kept whole)."""
    keep, todo = set(), [r.replace("#", ID_SEP_KEY) for r in roots]
    while todo:
        ref = todo.pop()
        if ref in keep:
            continue
        try:
            node = _node(config, ref)
        except (KeyError, IndexError, ValueError, TypeError):
            continue
        keep.add(ref)
        todo += [r for r in _refs(node) if r not in keep]
    return keep


def prune(config: Mapping, keep: set[str], prefix: str = "") -> dict:
    """`config` with only the items in `keep` (whole) and the dicts that lead to them (lists are kept whole)."""
    out = {}
    for key, value in config.items():
        ref = f"{prefix}{key}"
        if ref in keep:
            out[key] = value
        elif isinstance(value, Mapping) and any(k.startswith(ref + ID_SEP_KEY) for k in keep):
            out[key] = prune(value, keep, ref + ID_SEP_KEY)
    return out


def read_bundle(files: list[Path]) -> dict:
    """The merged configs (later files replace top-level keys) with `%file#key` macros resolved; macros are
    resolved from the working directory, else from the first folder above the bundle where they resolve."""
    tried = [Path.cwd(), *files[0].resolve().parents]
    for where in tried:
        parser = ConfigParser()
        parser.read_config([str(f.resolve()) for f in files])
        try:
            with chdir(where):
                parser.resolve_macro_and_relative_ids()
            return parser.get()
        except (FileNotFoundError, ValueError, KeyError):
            continue
    raise ZooExportError(f"{files[0]}: its '%file#key' macros resolve neither from the working directory nor from "
                         "a folder above it: run the export from the repository root")


def _expert_parts(recorded: list[dict], copied: Mapping[str, str]) -> tuple[list, dict, list]:
    """(expert entries for `experts`, the `expert_files` default, the metadata record of each expert)."""
    entries, files, records = [], {}, []
    for e in recorded:
        name, sha = e["name"], e.get("checkpoint_sha256")
        entry = {k: v for k, v in e.items() if k != "checkpoint"}
        if sha or e.get("checkpoint"):
            entry["checkpoint"] = f"$@expert_files.get('{name}')"
            files[name] = f"$@bundle_root + '/{copied[name]}'" if name in copied else None
            records.append({"name": name, "file": Path(e["checkpoint"]).name if e.get("checkpoint") else None,
                            "sha256": sha, **({"bundled": copied[name]} if name in copied else {})})
        else:  # tiny or random-initialised: the architecture and seed rebuild it exactly
            records.append({"name": name, "file": None, "sha256": None, "seed": e.get("seed"),
                            "architecture": {k: v for k, v in e.items() if k not in ("name", "seed",
                                                                                     "checkpoint_sha256")}})
        entries.append(entry)
    return entries, files, records


def trained_settings(payload: dict, run_dir: Path) -> dict:
    """Top-level bundle keys -> what the run was trained with: `run.json`'s training settings, then the
    checkpoint's task, image size, classes, key metric and model settings."""
    settings = {}
    run = run_dir / "run.json"
    if run.is_file():
        settings.update(json.loads(run.read_text()).get("training", {}))
    meta, model = payload.get("metadata", {}), payload["model_config"]
    for key, source in (("task", "task"), ("image_size", "image_size"), ("class_names", "class_names"),
                        ("multi_label", "multi_label"), ("key_metric_name", "metric_name")):
        if meta.get(source) is not None:
            settings[key] = meta[source]
    settings.update({k: model[k] for k in MODEL_KEYS if k in model})
    return settings


def _network_def(model_config: Mapping) -> dict:
    """The checkpoint's model as a `_target_` entry: `medpmoe.models.build_model` with every recorded argument."""
    args = {k: v for k, v in model_config.items() if k not in ("config_version", "experts")}
    return {"_target_": "medpmoe.models.build_model", "experts": "@experts", **args}


def workflow_config(merged: dict, entry: str, settings: Mapping, overrides: Mapping, network_def: dict,
                    experts: list, expert_files: dict) -> dict:
    """One exported workflow: trained settings and overrides applied, the checkpoint's model, paths under
    @bundle_root, the zoo config check, and only the keys the workflow reaches."""
    cfg = {k: v for k, v in merged.items() if k != "_meta_"}
    for key, value in {**settings, **overrides}.items():
        if key in cfg:
            cfg[key] = value
    cfg.update(bundle_root="$medpmoe.bundle.zoo.bundle_root()", output_dir="$@bundle_root + '/eval'",
               checkpoint=f"$@bundle_root + '/{MODEL_FILE}'", experts=experts, expert_files=expert_files,
               network_def=network_def)
    cfg.update({k: v for k, v in overrides.items() if k in ("output_dir",)})
    cfg["imports"] = [*cfg.get("imports", []), "$import medpmoe.bundle.zoo"]
    init = [ZOO_CHECK if step == CHECK else step for step in cfg.get("initialize", [])]
    cfg["initialize"] = init if ZOO_CHECK in init else [ZOO_CHECK, *init]
    roots = ["imports", "initialize", "run", "finalize", entry, "expert_files",
             *(p["id"] for p in InferProperties.values())]
    out = prune(cfg, reachable(cfg, roots))
    macros = sorted(k for k, v in out.items() for s in _strings(v) if s.startswith("%"))
    if macros:
        raise ZooExportError(f"keys {macros} still hold '%file#key' macros after resolving: cannot make them "
                             "self-contained")
    return out


def _expert_sources(recorded: list[dict], expert_files: Mapping) -> dict[str, Path]:
    """Each file expert's weights file (`expert_files`, else the recorded path), its sha256 checked against the
    checkpoint's record: what `copy_experts` copies into <out>/models/experts."""
    sources = {}
    for e in recorded:
        if not (e.get("checkpoint_sha256") or e.get("checkpoint")):
            continue
        src = expert_files.get(e["name"]) or e.get("checkpoint")
        if not src or not Path(src).expanduser().is_file():
            raise ZooExportError(f"--copy_experts: expert {e['name']!r} file {src} not found; pass --expert_files "
                                 f"{e['name']}=/path/to/file")
        sha = file_sha256(Path(src).expanduser())
        if e.get("checkpoint_sha256") and sha != e["checkpoint_sha256"]:
            raise ZooExportError(f"--expert_files: {src} has sha256 {sha[:12]}..., expert {e['name']!r} was trained "
                                 f"with {e['checkpoint_sha256'][:12]}...")
        sources[e["name"]] = Path(src).expanduser()
    return sources


def read_workflows(bundle_file: Path, task: str | None, overrides: Mapping) -> dict[str, tuple[dict, str]]:
    """{workflow: (the bundle's training config merged with its overlay, entry point)}; the bundle must be of the
    checkpoint's task and every override a key of its configs."""
    found, known = {}, set()
    for name, (overlay, entry) in WORKFLOWS.items():
        overlay_file = bundle_file.parent / overlay
        if not overlay_file.is_file():
            if name == "inference":
                raise ZooExportError(f"--bundle_file: no {overlay} beside {bundle_file}")
            continue
        merged = read_bundle([bundle_file, overlay_file])
        if merged.get("task") not in (None, task) and not str(merged.get("task")).startswith("$"):
            raise ZooExportError(f"--bundle_file: {bundle_file} is a {merged['task']} bundle but the checkpoint was "
                                 f"trained for {task}")
        found[name], known = (merged, entry), known | set(merged)
    for key in sorted(set(overrides) - known):
        near = difflib.get_close_matches(key, sorted(known), n=1)
        raise ZooExportError(f"--{key}: not a key of {bundle_file}'s configs" + (f"; did you mean --{near[0]}?"
                                                                                 if near else ""))
    return found


def export_bundle(run_dir: str | Path, bundle_file: str | Path, out: str | Path, checkpoint: str | Path | None = None,
                  expert_files: Mapping[str, str] | None = None, copy_experts: bool = False,
                  overrides: Mapping | None = None, check: bool = True) -> Path:
    """Write the trained run `run_dir` (its `checkpoints/best.pt`, or `checkpoint`) of the bundle whose training
    config is `bundle_file` as a model-zoo bundle folder `out` (see the module docstring); `overrides` set top-level
    keys of the exported configs (e.g. the run's `demo_images`), `expert_files` (name -> path) name expert files
    that moved since training, `copy_experts` copies them into the bundle. Returns `out`."""
    from medpmoe.bundle.zoo_docs import bundle_readme, zoo_metadata
    from medpmoe.training.checkpoint import read_prompt_checkpoint

    run_dir, bundle_file, out = Path(run_dir), Path(bundle_file), Path(out)
    ckpt = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / "best.pt"
    if not ckpt.is_file():
        raise ZooExportError(f"--checkpoint: no file at {ckpt} (train first, or pass --checkpoint)")
    if not bundle_file.is_file():
        raise ZooExportError(f"--bundle_file: no file at {bundle_file}")
    if out.exists() and any(out.iterdir()):
        raise ZooExportError(f"--out: {out} exists and is not empty: choose a new folder")
    payload = read_prompt_checkpoint(ckpt)
    if not payload.get("model_config"):
        raise ZooExportError(f"{ckpt}: records no model_config (written by an older medpmoe): retrain to export it")
    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
    recorded = payload["model_config"]["experts"]
    expert_files, overrides = dict(expert_files or {}), dict(overrides or {})
    sources = _expert_sources(recorded, expert_files) if copy_experts else {}
    copied = {name: f"{EXPERT_DIR}/{src.name}" for name, src in sources.items()}
    experts, files_default, records = _expert_parts(recorded, copied)
    settings = {**trained_settings(payload, run_dir), "experts": experts}
    workflows = read_workflows(bundle_file, settings.get("task"), overrides)
    base_meta = bundle_file.parent / "metadata.json"
    base = json.loads(base_meta.read_text()) if base_meta.is_file() else {}
    metadata = zoo_metadata(base, payload, results, records, file_sha256(ckpt), settings)
    network = _network_def(payload["model_config"])
    for name, (merged, entry) in workflows.items():
        cfg = workflow_config(merged, entry, settings, overrides, network, experts, files_default)
        atomic_write_text(out / "configs" / f"{name}.json", json.dumps(cfg, indent=4) + "\n")
    (out / "models").mkdir(exist_ok=True)
    shutil.copyfile(ckpt, out / MODEL_FILE)
    for name, src in sources.items():
        (out / EXPERT_DIR).mkdir(exist_ok=True)
        shutil.copyfile(src, out / copied[name])
    atomic_write_text(out / "configs" / "metadata.json", json.dumps(metadata, indent=4) + "\n")
    if (bundle_file.parent / "logging.conf").is_file():
        shutil.copyfile(bundle_file.parent / "logging.conf", out / "configs" / "logging.conf")
    licence = Path(__file__).resolve().parents[2] / "LICENSE"
    if licence.is_file():
        shutil.copyfile(licence, out / "LICENSE")
    atomic_write_text(out / "docs" / "README.md", bundle_readme(metadata, results, list(workflows), out, run_dir))
    if check:
        check_bundle(out, expert_files={r["name"]: v for r in records if (v := expert_files.get(r["name"]))})
    return out


def schema_file() -> Path | None:
    """MONAI's metadata schema shipped with medpmoe (`schemas/meta_schema.json`, checked offline), if present."""
    path = Path(__file__).resolve().parents[2] / "schemas" / "meta_schema.json"
    return path if path.is_file() else None


def check_bundle(root: str | Path, expert_files: Mapping[str, str] | None = None) -> list[str]:
    """MONAI's three checks of a model-zoo bundle: `verify_metadata` (offline, medpmoe's schema file),
    `verify_net_in_out` on `network_def` (needs the expert files), `check_properties` of every workflow as an
    inference workflow after `initialize` (what MONAI FL and MONAI Label do), MLflow handlers left out. Raises on
    a failure; returns what was checked."""
    from monai.bundle import verify_metadata, verify_net_in_out

    from medpmoe.bundle.workflow import drop_tracking

    root = Path(root).resolve()
    meta, done = str(root / "configs" / "metadata.json"), []
    schema = schema_file()
    if schema is not None:
        verify_metadata(meta_file=meta, filepath=str(schema))
        done.append("verify_metadata")
    files = {"expert_files": dict(expert_files)} if expert_files else {}
    needed = [r for r in json.loads(Path(meta).read_text())["medpmoe"]["experts"] if r.get("sha256")]
    if all(r["name"] in (expert_files or {}) or r.get("bundled") for r in needed):
        verify_net_in_out(net_id="network_def", meta_file=meta, config_file=str(root / "configs" / "inference.json"),
                          bundle_root=str(root), **files)
        done.append("verify_net_in_out")
    with tempfile.TemporaryDirectory() as tmp:  # initialize may draw the demo set: not into the bundle
        for config in sorted((root / "configs").glob("*.json")):
            if config.name == "metadata.json":
                continue
            wf = ConfigWorkflow(config_file=str(config), meta_file=meta, workflow_type="infer", logging_file=False,
                                output_dir=tmp, **files)
            drop_tracking(wf)  # no MLflow store for a check
            wf.initialize()
            missing = wf.check_properties()
            if missing:
                raise ZooExportError(f"{config}: MONAI's check_properties finds {missing} missing")
            done.append(f"check_properties({config.name})")
    return done


def _overrides(pairs: list[str]) -> dict:
    """`--key value` pairs after the export's own options, parsed as MONAI's command line parses them."""
    from fire.parser import DefaultParseValue

    if len(pairs) % 2 or any(not k.startswith("--") for k in pairs[::2]):
        raise SystemExit(f"expected --key value pairs after the options, got {pairs}")
    return {k[2:]: DefaultParseValue(v) for k, v in zip(pairs[::2], pairs[1::2])}


def main(argv: list[str] | None = None) -> int:
    """`python -m medpmoe.bundle.zoo`: a trained run -> a model-zoo bundle folder, checked."""
    from medpmoe.bundle.errors import exit_on_user_error

    parser = argparse.ArgumentParser(prog="python -m medpmoe.bundle.zoo", description=__doc__.split("\n\n")[0],
                                     epilog="Further --key value pairs set keys of the exported configs (e.g. the "
                                            "run's --demo_images 12 --demo_size 32).")
    parser.add_argument("--run_dir", required=True, help="the training's output folder (checkpoints/best.pt, "
                                                         "results.json, run.json)")
    parser.add_argument("--bundle_file", required=True, help="the bundle's training config the run used, e.g. "
                                                             "bundles/kvasir_seg/train.json")
    parser.add_argument("--out", required=True, help="the bundle folder to write (new or empty)")
    parser.add_argument("--checkpoint", help="the prompt checkpoint to share (default <run_dir>/checkpoints/best.pt)")
    parser.add_argument("--expert_files", nargs="+", default=[], metavar="NAME=PATH",
                        help="expert weight files that moved since training")
    parser.add_argument("--copy_experts", action="store_true", help="copy the expert weight files into models/")
    parser.add_argument("--no_check", action="store_true", help="skip MONAI's checks of the written bundle")
    args, rest = parser.parse_known_args(argv)
    files = dict(v.partition("=")[::2] for v in args.expert_files)
    if any("=" not in v for v in args.expert_files):
        raise SystemExit("--expert_files: give NAME=PATH pairs")
    try:
        out = export_bundle(args.run_dir, args.bundle_file, args.out, args.checkpoint, files, args.copy_experts,
                            _overrides(rest), check=not args.no_check)
    except Exception as err:
        exit_on_user_error(err)
        raise
    print(f"model-zoo bundle: {out} (python -m monai.bundle run inference --config_file "
          f"{out / 'configs' / 'inference.json'}; see {out / 'docs' / 'README.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
