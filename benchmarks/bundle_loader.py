"""The bundles' own training loader alone, in images/s: `train#dataloader` built from a bundle's train.json.

    nice python benchmarks/bundle_loader.py --data ../shared/data/kvasir_seg_dev   # the acceptance run (2 modes)
    python benchmarks/bundle_loader.py --bundle medvtab_cls --image-size 64        # the bundle's demo data

Two modes, timed after the first epoch (which fills the cache) over `--repeats` whole epochs:
- `gpu trainer`: what the loader hands a trainer on CUDA (`train#batches#device` = cuda): compact uint8 batches;
  on a CUDA machine each batch is also moved to the GPU and finished there (float, augmentation:
  `BatchFeeder.prepare`), with the GPU synchronised, and that rate is reported too.
- `cpu trainer`: a trainer on the CPU: the loader thread finishes every batch (float, `BatchAugment`) on the CPU.
Timing: process CPU time (all of this process's threads) with `--threads 1` (the default; on a shared machine
other processes' load skews it least), wall time beside it; median and spread of the repeats.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

ACCEPT = {"gpu trainer": 2000.0, "cpu trainer": 400.0}  # images/s on the 2-core dev machine, issue 20


def _datalist(data: str, folder: Path) -> str:
    """A datalist for a Kvasir-layout folder (images/, masks/), written under `folder`."""
    from medpmoe.data.converters import kvasir_seg

    out = folder / "datalist.json"
    kvasir_seg(data, out)
    return str(out)


def _parser(bundle: str, workdir: Path, data: str | None, image_size: int, batch: int, device: str, cache: str):
    """The bundle's train.json with the loader's settings overridden (every training item: no validation split)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / bundle / "train.json"))
    overrides = {"output_dir": str(workdir / "out"), "image_size": image_size, "batch_size": batch,
                 "demo_root": str(workdir / "demo"), "demo_images": 40, "demo_size": image_size, "cache": cache,
                 "train#batches#device": f"$torch.device('{device}')",
                 "train#dataset#data": "$medpmoe.bundle.split_items(@datalist_file, 'all', task=@task)",
                 "train#dataset#progress": False}
    if data:
        overrides["datalist"] = _datalist(data, workdir)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _epoch(loader, finish=None, device=None) -> int:
    n = 0
    for batch in loader:
        if finish is not None:
            x, _ = finish(batch, device, True)
            n += x.shape[0]
        else:
            n += batch["image"].shape[0]
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return n


def measure(bundle: str = "kvasir_seg", data: str | None = None, image_size: int = 224, batch: int = 32,
            repeats: int = 5, gpu_trainer: bool = False, cache: str = "auto") -> dict:
    """Images/s of the bundle's `train#dataloader` (median and spread over `repeats` epochs after the first)."""
    with tempfile.TemporaryDirectory() as tmp:
        parser = _parser(bundle, Path(tmp), data, image_size, batch, "cuda" if gpu_trainer else "cpu", cache)
        t0 = time.perf_counter()
        loader = parser.get_parsed_content("train#dataloader")
        feeder = parser.get_parsed_content("train#batches")
        cache_s = time.perf_counter() - t0
        info = dict(getattr(loader.dataset, "cache_info", {}))
        items = _epoch(loader)  # epoch 1 (fills a disk cache; the memory cache filled while building)
        cpu, wall, finished = [], [], []
        for _ in range(repeats):
            c0, w0 = time.process_time(), time.perf_counter()
            _epoch(loader)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        if gpu_trainer and torch.cuda.is_available():  # the whole feed: loader + transfer + GPU finish/augment
            dev = torch.device("cuda")
            _epoch(loader, feeder.prepare, dev)
            for _ in range(repeats):
                w0 = time.perf_counter()
                _epoch(loader, feeder.prepare, dev)
                finished.append(time.perf_counter() - w0)
    med = statistics.median(cpu)
    row = {"bundle": bundle, "mode": "gpu trainer" if gpu_trainer else "cpu trainer",
           "data": data or f"{bundle} demo data", "items": items, "image_size": image_size, "batch": batch,
           "images_per_s": round(items / med, 1), "spread_pct": round(100 * (max(cpu) - min(cpu)) / med, 1),
           "images_per_s_wall": round(items / statistics.median(wall), 1), "repeats": repeats,
           "cache": info, "cache_build_s": round(cache_s, 2), "clock": "process CPU time",
           "threads": torch.get_num_threads(), "loader_workers": loader.num_workers}
    if finished:
        row["images_per_s_on_gpu"] = round(items / statistics.median(finished), 1)
    return row


def main(argv=None) -> dict:
    """Command-line entry point: both modes, one JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="kvasir_seg")
    p.add_argument("--data", default=None, help="a Kvasir-layout folder (images/, masks/); default: the demo data")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timed epochs after the first")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: process CPU time is honest)")
    p.add_argument("--modes", nargs="+", default=["gpu", "cpu"], choices=["gpu", "cpu"])
    p.add_argument("--json", default=None, help="default benchmarks/results/loader-<host kind>.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(args.bundle, args.data, args.image_size, args.batch, args.repeats, mode == "gpu")
            for mode in args.modes]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    doc = {"what": "the bundle's own train#dataloader, epochs after the first", "device": device,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "command": " ".join(sys.argv), "rows": rows,
           "acceptance": {r["mode"]: {"target_images_per_s": ACCEPT[r["mode"]], "met": r["images_per_s"] >= ACCEPT[r["mode"]]}
                          for r in rows if args.data and args.image_size == 224 and args.batch == 32}}
    out = Path(args.json or ROOT / "benchmarks" / "results" / f"loader-{'cuda' if torch.cuda.is_available() else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    from medpmoe.files import atomic_write_text

    atomic_write_text(out, json.dumps(doc, indent=1))
    for r in rows:
        extra = f", {r['images_per_s_on_gpu']} images/s finished on the GPU" if "images_per_s_on_gpu" in r else ""
        print(f"{r['bundle']} loader, {r['mode']}: {r['images_per_s']} images/s (CPU time; spread {r['spread_pct']}%, "
              f"wall {r['images_per_s_wall']}){extra}; cache {r['cache'].get('cache')}")
    print(f"results: {out}")
    return doc


if __name__ == "__main__":
    main()
