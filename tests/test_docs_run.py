"""Every command shown in README.md, docs/*.md and bundles/*/docs/README.md runs here, as written, from a copy of
the repository's layout (bundles/, configs/, schemas/ linked into a temporary folder, so `outputs/...` lands there):

- on demo data: `/data/...` paths are stand-ins made from the synthetic sets (a Kvasir-SEG folder, ISIC files, a
  MedMNIST .npz, folders of frames, datalists);
- with tiny settings appended (`--demo_images 12 --image_size 32 ... --train#trainer#max_epochs 1`, no MLflow model
  logging, cross-validation capped at 2 folds, and tiny experts
  unless the command names expert weights); each bundle trains once, and its evaluate / inference / export / torchrun
  commands reuse that run (a training command of the same settings reports the finished run);
- a command that needs expert weights (`--weights_dir`, `configs/paper`, `configs/experts`, checkpoint paths) gets an
  empty weights folder and must fail exactly at the first missing weight file;
- `torchrun --nproc_per_node=N -m ...` runs its module in-process as torchrun's one worker (RANK 0 of 1, gloo).

The commands are parametrized from the docs (`tests/test_docs_commands.documented_commands`), so a new documented
command runs without a change here; the few that cannot run in a test are in SKIP with the reason.
"""

from __future__ import annotations

import json
import re
import runpy
import shutil
import socket
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.test_docs_commands import COMMANDS

#: (regular expression on the command line, why it does not run here)
SKIP = [
    (r"^make demo$", "runs `python -m monai.bundle run training --config_file bundles/kvasir_seg/train.json`, which "
                     "bundles/kvasir_seg/docs/README.md shows and this test runs"),
    (r"^make test$", "the test suite itself"),
    (r"^export ", "sets an environment variable for the commands after it"),
    (r"-m pytest .*-m gpu", "needs a CUDA device (GPU tests skip here)"),
    (r"benchmarks/bench_pmoe\.py", "a benchmark that writes benchmarks/results/ (make benchmark runs the CPU one)"),
    (r"benchmarks/report\.py", "rewrites docs/performance.md from a benchmark's results"),
    (r"benchmarks/bundle_loader\.py", "the loader benchmark on the Kvasir dev set (tests/test_core_benchmark.py times it "
                                      "on demo data)"),
    (r"^make gpu-check", "for a GPU machine (tests/test_gpu_check.py runs its CPU dry run); -prep downloads wheels"),
    (r"^mlflow (ui|models serve)", "starts a server that runs until it is stopped"),
    (r"^curl ", "talks to the `mlflow models serve` server above"),
    (r"--nnodes=2", "needs two machines; the single-node torchrun commands run"),
    (r"bundles/brain_seg|build brain_seg", "docs/bundles.md's new bundle: tests/test_bundle_recipe.py makes and trains "
                                           "it in a copy of the repository"),
    # other branches' commands (not on this branch when this list was written; drop an entry to run its command):
    (r"medpmoe\.bundle\.zoo|\$ZOO", "the model-zoo export and the exported bundle: tests/test_bundle_zoo.py runs them "
                                    "on a trained demo run"),
    (r"\bE/(expert_|cv_|pneumonia_png)|kvasir_seg_dev D/datalist\.json", "docs/pretraining.md's experiment: "
                                                                       "CPU-minutes on ../shared/data, run by hand"),
    (r"benchmarks/inference_memory\.py", "minutes of inference on 600 frames (tests/test_inference_streaming.py "
                                         "checks the same bound on fewer frames)"),
    (r"^make gpu-check", "prepares or runs the GPU machine's checks"),
]
TINY = {"demo_images": 12, "demo_size": 32, "image_size": 32, "batch_size": 4, "num_epochs": 1}
TINY_EXPERTS = [
    {"name": "tiny_a", "patch_size": 8, "img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2, "seed": 0},
    {"name": "tiny_b", "patch_size": 16, "img_size": 32, "embed_dim": 24, "depth": 1, "num_heads": 2, "seed": 1},
]
EPOCH_LIMIT = ["--train#trainer#max_epochs", "1", "--train#report#log_model", "False"]  # no MLflow model: seconds
#: expert pretraining (CLI and bundle) at a tiny size; fresh_start: the docs' commands share output folders
PRETRAIN_TINY = {"epochs": 1, "image_size": 32, "patch_size": 8, "batch_size": 4, "holdout": 2, "fresh_start": True,
                 "arch_kwargs": "{'embed_dim': 32, 'depth': 1, 'num_heads': 2, 'dynamic_img_size': True}"}
K_FOLDS = 2  # cross-validation commands run 2 of their folds' trainings (the fold logic is tests/test_crossval.py's)


def _skip_reason(line: str) -> str | None:
    return next((why for pattern, why in SKIP if re.search(pattern, line)), None)


def _drop_optional(argv: list[str]) -> list[str]:
    """Drop `[--seed 0]`-style optional parts and `...` the docs show."""
    out, depth = [], 0
    for a in argv:
        if a.startswith("[") and not a.startswith("['") and not a.startswith('["') and not a.startswith("[{"):
            depth += 1
        if depth == 0 and a not in ("...", "...]"):
            out.append(a)
        if depth and a.endswith("]"):
            depth -= 1
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with the repository's bundles/, configs/ and schemas/ and stand-ins for the docs' /data paths."""
    from medpmoe.bundle.demo_cls import make_synthetic_lesions
    from medpmoe.demo import make_synthetic_polyps

    ws = tmp_path_factory.mktemp("docs_run")
    for name in ("bundles", "configs", "schemas"):
        (ws / name).symlink_to(REPO_ROOT / name)
    data = ws / "data"
    polyps = make_synthetic_polyps(ws / "demo" / "polyps", num_images=12, size=32).parent
    shutil.copytree(polyps, data / "Kvasir-SEG", ignore=shutil.ignore_patterns("*.json"))
    lesions = make_synthetic_lesions(ws / "demo" / "lesions", num_images=12, size=32).parent
    isic = data / "ham10000_dev"
    isic.mkdir(parents=True)
    for i, img in enumerate(sorted((lesions / "images").iterdir())):
        shutil.copy(img, isic / f"ISIC_{i:07d}.png")
        shutil.copy(lesions / "masks" / img.name, isic / f"ISIC_{i:07d}_segmentation.png")
    for folder in ("images", "new_frames", "dermoscopy_folder", "unlabeled_frames", "endoscopy_frames", "site_a",
                   "slides"):
        shutil.copytree(polyps / "images", data / folder)
    (data / "kvasir").mkdir()
    _demo_datalist(polyps, data / "kvasir" / "datalist.json")
    (data / "site_b").mkdir()
    _demo_datalist(polyps, data / "site_b" / "datalist.json")
    _demo_datalist(lesions, data / "isic_seg.json")
    _medmnist_npz(data / "pneumoniamnist.npz")
    from medpmoe.data import get_task
    from medpmoe.data.converters import medmnist_npz

    medmnist_npz(data / "pneumoniamnist.npz", data / "pneumonia.json", classes=list(get_task("pneumoniamnist").classes))
    (ws / "weights").mkdir()
    return ws


def _demo_datalist(folder: Path, out: Path, name: str = "datalist.json") -> None:
    """The datalist `folder/name` with absolute paths, written to `out`."""
    doc = json.loads((folder / name).read_text())
    for item in [it for key in ("training", "validation", "test") for it in doc.get(key, [])]:
        item.update({k: str((folder / v).resolve()) for k, v in item.items() if k in ("image", "label")})
    out.write_text(json.dumps(doc))


def _medmnist_npz(path: Path) -> None:
    """A MedMNIST-layout .npz of 28x28 grey images: two classes told apart by brightness."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 16), ("val", 8), ("test", 8)):
        labels = np.arange(n) % 2
        arrays[f"{split}_images"] = (rng.integers(0, 100, (n, 28, 28)) + 120 * labels[:, None, None]).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    np.savez(path, **arrays)


def _bundle_of(argv: list[str]) -> str | None:
    joined = " ".join(argv)
    found = re.search(r"bundles/(\w+)/", joined) or re.search(r"outputs/(\w+)/checkpoints", joined)
    return found.group(1) if found else None


def _needs_weights(argv: list[str]) -> bool:
    joined = " ".join(argv)
    return "--weights_dir" in argv or "configs/paper/" in joined or "configs/experts/" in joined or (
        "--experts" in argv and "checkpoint" in joined)


def _with_tiny_settings(argv: list[str], ws: Path) -> list[str]:
    """Tiny data, image size, batch and epochs (keys the command does not set), an epoch limit, and tiny experts
    unless the command names expert weights."""
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    extra = []
    settings = dict(TINY)
    if _bundle_of(argv) in _segmentation_bundles():
        settings["head_channels"] = 8
    if not _needs_weights(argv):
        settings["experts"] = TINY_EXPERTS
    for key, value in settings.items():
        if key not in given:
            extra += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    return argv + extra + EPOCH_LIMIT


def _segmentation_bundles() -> set[str]:
    return {p.parent.name for p in (REPO_ROOT / "bundles").glob("*/bundle.json")
            if json.loads(p.read_text())["task"] == "segmentation"}


def _prepare(argv: list[str], ws: Path) -> list[str]:
    """The command as it runs here: stand-in paths, python = this interpreter, tiny settings for bundle runs."""
    argv = _drop_optional(argv)
    out = []
    for a in argv:
        a = re.sub(r"(?<![\w.])/data/weights", str(ws / "weights"), a)
        a = re.sub(r"(?<![\w.])/weights", str(ws / "weights"), a)
        a = re.sub(r"(?<![\w.:])/data/", str(ws / "data") + "/", a)
        out.append(a)
    if out[0].startswith("python"):
        out[0] = sys.executable
    if out[0] == "torchrun":
        out = ["torchrun", *[("--nproc_per_node=1" if a.startswith("--nproc_per_node") else a) for a in out[1:]]]
    module = out[out.index("-m") + 1] if "-m" in out else None
    if module in ("medpmoe.crossval", "medpmoe.cv") and "--k" in out:  # each fold is one more training
        out[out.index("--k") + 1] = str(min(int(out[out.index("--k") + 1]), K_FOLDS))
    if module == "medpmoe.pretrain" or "bundles/pretrain_expert/train.json" in out:
        given = {a[2:] for a in out if a.startswith("--")}
        out += [x for k, v in PRETRAIN_TINY.items() if k not in given or k == "epochs" for x in (f"--{k}", str(v))]
    elif module in ("monai.bundle",) and "run" in out or module in ("medpmoe.crossval", "medpmoe.cv"):
        out = _with_tiny_settings(out, ws)
    if "--datalist" in out and not _needs_weights(out):  # a datalist the docs made earlier in prose: a stand-in
        path = ws / out[out.index("--datalist") + 1]
        if not path.is_file():
            task = "segmentation" if _bundle_of(out) in _segmentation_bundles() else "classification"
            path.parent.mkdir(parents=True, exist_ok=True)
            src = ws / "data" / ("kvasir/datalist.json" if task == "segmentation" else "pneumonia.json")
            _demo_datalist(src.parent, path, src.name)
    return out


def _run_in_process(argv: list[str], monkeypatch) -> None:
    """`python -m MODULE args` / `python script args` / torchrun's one worker, in this interpreter."""
    if argv[0] == "torchrun":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
            monkeypatch.setenv(k, v)
        argv = [sys.executable, *argv[argv.index("-m"):]]
    args = argv[1:]
    monkeypatch.setattr(sys, "argv", [args[1] if args[0] == "-m" else args[0], *args[2 if args[0] == "-m" else 1:]])
    try:
        if args[0] == "-m":
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(Path(args[0])), run_name="__main__")
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    finally:
        from medpmoe.training import release_output_dir

        for out in Path("outputs").glob("*"):  # in-process runs hold their output folder until released
            release_output_dir(out)


def _error_text(err: BaseException, captured: str) -> str:
    from medpmoe.bundle.errors import summary_note

    summary_note(err)
    notes = getattr(err, "__notes__", None)
    return (notes[-1] if notes else f"{type(err).__name__}: {err}") + "\n" + captured


def _ensure_trained(bundle: str, ws: Path, monkeypatch) -> None:
    """The bundle's documented training, once (evaluate, inference and export commands read its checkpoint)."""
    if (ws / "outputs" / bundle / "checkpoints" / "best.pt").is_file():
        return
    argv = _prepare(["python", "-m", "monai.bundle", "run", "training", "--config_file",
                     f"bundles/{bundle}/train.json"], ws)
    _run_in_process(argv, monkeypatch)


PARAMS = [(where, argv) for where, argv in COMMANDS]


def test_every_documented_command_is_run_or_skipped_for_a_stated_reason():
    skipped = [" ".join(argv) for _, argv in COMMANDS if _skip_reason(" ".join(argv))]
    assert len(skipped) < len(COMMANDS) / 2, skipped  # the skip list stays the exception
    assert any("paper/kvasir_seg.json" in " ".join(a) for _, a in COMMANDS)  # the README's paper command runs


@pytest.mark.slow
@pytest.mark.parametrize(("where", "argv"), PARAMS, ids=[w for w, _ in PARAMS])
def test_documented_command_runs(where, argv, workspace, monkeypatch, capsys):
    line = " ".join(argv)
    reason = _skip_reason(line)
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    run = _prepare(argv, workspace)
    bundle = _bundle_of(run)
    if bundle and ("evaluating" in run or "inference" in run or "medpmoe.export" in run or run[0] == "torchrun"):
        _ensure_trained(bundle, workspace, monkeypatch)
    runnable = (run[0] == "torchrun" and "-m" in run) or (
        run[0] == sys.executable and (run[1:2] == ["-m"] or run[1].endswith(".py")))
    if not runnable:
        pytest.fail(f"{where}: no way to run {line!r} here: add it to SKIP with the reason, or teach this test")
    try:
        _run_in_process(run, monkeypatch)
    except BaseException as err:  # noqa: BLE001 (SystemExit of a refused command included)
        text = _error_text(err, capsys.readouterr().err)
        if _needs_weights(run):
            missing = re.search(r"no file at (\S+)", text)
            assert missing and missing.group(1).startswith(str(workspace / "weights")), (where, text[-2000:])
            return
        raise AssertionError(f"{where}: {line}\n{text[-3000:]}") from err
    assert not _needs_weights(run), f"{where}: ran although its expert weights are missing"
