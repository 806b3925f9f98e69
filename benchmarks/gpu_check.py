"""`make gpu-check`: everything a GPU machine should confirm, in one command, into one JSON under benchmarks/results/.

    make gpu-check-prep             # here (with network): wheels + dev images into .gpu-check/ (ignored, ~35 MiB)
    make gpu-check                  # on the GPU machine (Python 3.12, torch + timm, no internet); < 8 min on an H200
    make gpu-check GPU_CHECK_ARGS=--dry-run   # the same steps, tiny, on the CPU (tests/test_gpu_check.py)

Steps (each recorded, a failing one does not stop the others): 1. the GPU tests (`pytest -m gpu`); 2. the model
benchmark (`bench_pmoe.py`: K = 3 and 1 ViT-B/16, 224 px, batch 64, train and infer, against the eager bf16
reference, peak memory); 3. the bundles' own loader alone (kvasir_seg's `train#dataloader` on the Kvasir dev set,
finished and augmented on the GPU) against the training step; 4. one short epoch of each bundle on the GPU with
ViT-B-sized random experts on the real dev images (MLflow off). MONAI and its pure-Python companions are installed
from `.gpu-check/wheels` into a temporary folder when they are missing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREP = ROOT / ".gpu-check"
SITE = Path(tempfile.gettempdir()) / "medpmoe-gpu-check-site"
#: pure-Python wheels the GPU image lacks (versions as pinned in pyproject.toml); `make gpu-check-prep` fetches them
WHEELS = ("monai==1.6.1", "pytorch-ignite==0.5.5", "nibabel==5.4.2", "pydicom==3.0.2")  # as the Makefile's
DATA = ("kvasir_seg_dev", "ham10000_dev", "pneumoniamnist_dev")
VIT_B = {"patch_size": 16, "img_size": 224, "embed_dim": 768, "depth": 12, "num_heads": 12}


def ensure_packages(prep: Path = PREP) -> None:
    """Install the carried wheels into a temporary site folder when MONAI is missing, and put it on the path (also
    for child processes)."""
    if importlib.util.find_spec("monai") is not None:
        return
    wheels = sorted((prep / "wheels").glob("*.whl"))
    if not wheels:
        raise SystemExit(f"MONAI is not installed and {prep / 'wheels'} holds no wheels: run `make gpu-check-prep` "
                         "on a machine with network access, then carry .gpu-check along")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(SITE), *map(str, wheels)], check=True)
    sys.path.insert(0, str(SITE))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT), os.environ.get("PYTHONPATH", "")])


class Check:
    """The result document, rewritten after every step (a run cut short keeps what it measured)."""

    def __init__(self, out: Path, dry: bool) -> None:
        import torch

        self.out, self.dry, self.t0 = out, dry, time.perf_counter()
        cuda = torch.cuda.is_available() and not dry
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        self.doc = {"device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()}, dry run)",
                    "dry_run": dry, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                 "cuda": torch.version.cuda}, "commit": commit or None, "steps": {}}

    def step(self, name: str, fn) -> None:
        """Run one step, recording its result (or its error) and its seconds."""
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result = fn()
            entry = {"ok": True, **(result or {})}
        except Exception as exc:  # record and go on: the other steps still say something
            entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            print(entry["traceback"], flush=True)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        self.doc["steps"][name] = entry
        self.save()

    def save(self) -> None:
        """Write the document (atomically)."""
        from medpmoe.files import atomic_write_text

        self.doc["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out, json.dumps(self.doc, indent=1))


def gpu_tests(dry: bool) -> dict:
    """pytest on the tests marked gpu (they skip on a dry run's CPU)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    tail = (proc.stdout + proc.stderr)[-3000:]
    last = [line for line in tail.splitlines() if line.strip()][-1:] or [""]
    if proc.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest exit {proc.returncode}: {last[0]}\n{tail}")
    return {"summary": last[0], "returncode": proc.returncode}


def model_benchmark(out: Path, dry: bool) -> dict:
    """bench_pmoe.py: K = 3 and 1, train and infer, against the eager bf16 reference (tiny ViTs on the CPU when dry)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_pmoe

    args = ["--json", str(out)]
    args += (["--device", "cpu", "--tiny", "--experts", "2", "--batch", "2", "--warmup", "0", "--iters", "1",
              "--repeats", "1", "--loader", "none"] if dry else
             ["--experts", "3", "1", "--batch", "64", "--repeats", "3", "--iters", "10", "--no-fp32", "--no-fp8",
              "--compile-modes", "default", "--budget-s", "150", "--loader", "none"])
    doc = bench_pmoe.main(args)
    rows = [{k: r[k] for k in ("K", "mode", "variant", "images_per_s", "spread_pct", "peak_mib", "x_ref_bf16")}
            for r in doc["rows"]]
    return {"rows": rows, "file": str(out), "notes": doc["skipped"] + doc["errors"]}


def loader(data: Path | None, dry: bool) -> dict:
    """The kvasir_seg bundle's own loader, finished and augmented on the GPU (the CPU when dry)."""
    from benchmarks.bundle_loader import measure

    row = measure("kvasir_seg", str(data) if data else None, 32 if dry else 224, 8 if dry else 32,
                  repeats=1 if dry else 3, gpu_trainer=True)
    return {"row": row}


def _datalists(prep: Path, folder: Path) -> dict[str, str]:
    """Datalists for the three bundles from the carried dev images."""
    from medpmoe.data.converters import isic_seg, kvasir_seg, medmnist_npz

    out = {"kvasir_seg": folder / "kvasir.json", "isic_seg": folder / "isic.json", "medvtab_cls": folder / "pneu.json"}
    kvasir_seg(prep / "kvasir_seg_dev", out["kvasir_seg"])
    isic_seg(prep / "ham10000_dev", out["isic_seg"])
    medmnist_npz(prep / "pneumoniamnist_dev" / "pneumoniamnist_trainval.npz", out["medvtab_cls"],
                 classes=["normal", "pneumonia"])
    return {k: str(v) for k, v in out.items()}


def bundle_epochs(prep: Path | None, dry: bool, max_items: int | None) -> dict:
    """One epoch of each bundle: ViT-B-sized random experts (two, one architecture: the batched executor, bf16
    weights), the real dev images at 224 px, batch 64; images/s of the epoch (training loop only)."""
    from medpmoe.bundle import run_bundle

    size = 32 if dry else 224
    experts = [{"name": f"tiny_vitb_{i}", **({**VIT_B, "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                                          "num_heads": 2} if dry else VIT_B), "seed": i} for i in range(2)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        lists = _datalists(prep, Path(tmp)) if prep is not None else {}
        for bundle in ("kvasir_seg", "isic_seg", "medvtab_cls"):
            over = {"image_size": size, "batch_size": 8 if dry else 64, "num_epochs": 1, "experts": experts,
                    "output_dir": str(Path(tmp) / bundle), "val_interval": 1}
            if dry and bundle != "medvtab_cls":
                over["head_channels"] = 8  # the SETR head dominates a tiny CPU step
            if bundle in lists:
                over["datalist"] = lists[bundle]
            else:
                over.update(demo_images=12, demo_size=size, demo_root=str(Path(tmp) / "demo" / bundle))
            if max_items:
                over["train#dataset#data"] = (f"$medpmoe.bundle.split_items(@datalist_file, 'train', @val_fraction, "
                                              f"@seed, @folds_file, @fold, @task)[:{max_items}]")
            t0 = time.perf_counter()
            wf = run_bundle(str(ROOT / "bundles" / bundle / "train.json"), tracking=False, **over)
            total = time.perf_counter() - t0
            trainer = wf.parser.get_parsed_content("train#trainer")
            items = len(trainer.data_loader.dataset)
            epoch = trainer.state.times.get("EPOCH_COMPLETED") or total
            res = json.loads((Path(tmp) / bundle / "results.json").read_text())
            results[bundle] = {"execution": res.get("execution"), "items": items, "epoch_s": round(epoch, 2),
                               "images_per_s": round(items / epoch, 1), "total_s": round(total, 1),
                               "cache": getattr(trainer.data_loader.dataset, "cache_info", None),
                               "metrics": {k: v for k, v in res.items() if isinstance(v, float)}}
    return results


def main(argv=None) -> dict:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every step, tiny, on the CPU (no GPU needed)")
    p.add_argument("--prep", default=str(PREP), help="what gpu-check-prep made (wheels/, data/)")
    p.add_argument("--json", default=None, help="default benchmarks/results/gpu-check-<device>.json")
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "benchmark", "loader", "bundles"])
    p.add_argument("--max-items", type=int, default=None, help="training items per bundle epoch (default all)")
    args = p.parse_args(argv)
    prep = Path(args.prep)
    ensure_packages(prep)
    sys.path.insert(0, str(ROOT))
    data = prep / "data"
    have_data = all((data / d).is_dir() for d in DATA)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a dry run stays on the CPU even on a GPU machine
    import torch

    check = Check(Path("/dev/null"), args.dry_run)
    name = check.doc["device"].replace(" ", "-").replace("(", "").replace(")", "").replace(",", "").lower()
    out = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / f"gpu-check-{name}.json"
    check.out = out
    check.doc["data"] = str(data) if have_data else "demo data (no .gpu-check/data)"
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA device (or --dry-run)")
    if "tests" not in args.skip:
        check.step("gpu_tests", lambda: gpu_tests(args.dry_run))
    if "benchmark" not in args.skip:
        check.step("benchmark", lambda: model_benchmark(out.with_name(out.stem + "-bench.json"), args.dry_run))
    if "loader" not in args.skip:
        check.step("loader", lambda: loader(data / "kvasir_seg_dev" if have_data else None, args.dry_run))
    if "bundles" not in args.skip:
        check.step("bundle_epochs", lambda: bundle_epochs(data if have_data else None, args.dry_run, args.max_items))
    _verdicts(check.doc)
    check.save()
    print(json.dumps({k: {"ok": v.get("ok"), "seconds": v.get("seconds")} for k, v in check.doc["steps"].items()}))
    print(f"results: {out} ({check.doc['elapsed_s']} s)")
    return check.doc


def _verdicts(doc: dict) -> None:
    """The loader against the training step (issue 20: at least 2x), and each bundle epoch against the step."""
    steps = doc["steps"]
    bench = steps.get("benchmark", {}).get("rows") or []
    k3 = [r["images_per_s"] for r in bench if r["mode"] == "train" and r["K"] == max(x["K"] for x in bench)
          and not r["variant"].startswith("reference")] if bench else []
    step_ips = max(k3) if k3 else None
    row = steps.get("loader", {}).get("row") or {}
    feed = row.get("images_per_s_on_gpu", row.get("images_per_s"))
    doc["verdicts"] = {"training_step_images_per_s": step_ips, "loader_images_per_s": feed,
                       "loader_x_step": round(feed / step_ips, 2) if feed and step_ips else None}


if __name__ == "__main__":
    main()
