"""Peak memory of streaming inference (issue 25): `medpmoe.inference.run_inference` on N generated frames (default
600x500, N = 50 and 600), each N in a fresh process; the peak RSS must not grow with N (within 20%).

    python benchmarks/inference_memory.py            # -> benchmarks/results/inference_memory.json

Each child process loads a tiny segmentation model from its prompt checkpoint, then runs inference; it reports its
RSS just before inference and its peak RSS (VmHWM, the kernel's high-water mark of the whole process, imports
included; `tests/test_inference_streaming.py` runs both counts in one process, resetting the mark in between).
`growth_mib` is the peak minus the RSS before inference: what inference itself held at most.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = [{"name": "tiny_a", "patch_size": 8, "img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2, "seed": 0}]

CHILD = """
import json, os, sys
import medpmoe
from medpmoe.inference import run_inference

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))  # MiB

def reset_peak():  # the kernel's high-water mark restarts from the current RSS (Linux >= 4.0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

ckpt, batch_size, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
model = medpmoe.load_model(ckpt)
for src, out in zip(runs[::2], runs[1::2]):
    reset = reset_peak()
    before = status("VmRSS:")
    run_inference(model, src, out, batch_size=batch_size, progress=False)
    print("MEMORY " + json.dumps({"rss_before_mib": round(before, 1), "peak_rss_mib": round(status("VmHWM:"), 1),
                                  "peak_reset": reset}), flush=True)
"""


def make_checkpoint(path: Path, image_size: int = 32) -> Path:
    """A tiny segmentation model's prompt checkpoint (untrained prompts: memory does not depend on the weights)."""
    import torch

    from medpmoe.models import build_model
    from medpmoe.training import save_prompt_checkpoint

    torch.manual_seed(0)
    model = build_model(EXPERTS, task="segmentation", num_classes=2, num_tokens=2, head_kwargs={"channels": 8})
    return save_prompt_checkpoint(path, model.eval(), task="segmentation", image_size=image_size,
                                  class_names=["background", "polyp"], multi_label=False)


def make_frames(folder: Path, n: int, width: int = 600, height: int = 500) -> Path:
    """n colour JPEG frames (a bright ellipse on a gradient, moving from frame to frame)."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(40, 120, width, dtype=np.float32)[None, :, None].repeat(height, 0).repeat(3, 2)
    for i in range(n):
        img = Image.fromarray((ramp + rng.normal(0, 4, ramp.shape)).clip(0, 255).astype(np.uint8))
        x, y = rng.integers(0, width // 2), rng.integers(0, height // 2)
        ImageDraw.Draw(img).ellipse((x, y, x + width // 3, y + height // 3), fill=(220, 160, 140))
        img.save(folder / f"frame_{i:05d}.jpg", quality=90)
    return folder


def measure(counts: list[int], workdir: Path, width: int = 600, height: int = 500, batch_size: int = 8,
            same_process: bool = False) -> list[dict]:
    """Run inference on n generated frames for each n in `counts`, each in a fresh process (or, `same_process`,
    one after the other in one process after a 2-frame warm-up, the peak reset before each); per n the RSS before
    inference, the peak RSS during it and the time."""
    workdir = Path(workdir)
    ckpt = workdir / "best.pt"
    if not ckpt.is_file():
        make_checkpoint(ckpt)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = [(n, make_frames(workdir / f"frames_{n}", n, width, height), workdir / f"out_{n}") for n in counts]
    if same_process:
        runs.insert(0, (2, make_frames(workdir / "frames_warmup", 2, width, height), workdir / "out_warmup"))
    groups = [runs] if same_process else [[r] for r in runs]
    rows = []
    for group in groups:
        start = time.perf_counter()
        args = [str(x) for _, src, out in group for x in (src, out)]
        proc = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(batch_size), *args], capture_output=True,
                              text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"inference failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        lines = [json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("MEMORY ")]
        for (n, _, out), mem in zip(group, lines):
            row = {"inputs": n, "width": width, "height": height, "batch_size": batch_size, **mem,
                   "process_seconds": round(time.perf_counter() - start, 1),
                   "masks_written": len(list(out.glob("*_seg.png")))}
            row["growth_mib"] = round(row["peak_rss_mib"] - row["rss_before_mib"], 1)
            rows.append(row)
    return rows[1:] if same_process else rows


def main(argv=None) -> int:
    """Measure for each --inputs count and write the JSON; exit 1 when the largest count's peak RSS exceeds the
    smallest's by more than --tolerance."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, nargs="+", default=[50, 600])
    ap.add_argument("--width", type=int, default=600)
    ap.add_argument("--height", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tolerance", type=float, default=0.2)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "inference_memory.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(sorted(args.inputs), Path(tmp), args.width, args.height, args.batch_size)
    ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    report = {"what": "peak RSS of run_inference (streaming) on N generated frames, one process per N",
              "rows": rows, "peak_ratio_largest_to_smallest": round(ratio, 3), "tolerance": args.tolerance,
              "ok": ratio <= 1 + args.tolerance, "python": sys.version.split()[0],
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    for r in rows:
        print(f"{r['inputs']:5d} frames {r['width']}x{r['height']}: peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"(before inference {r['rss_before_mib']:.0f}, growth {r['growth_mib']:.0f}) in {r['process_seconds']} s")
    print(f"peak ratio {ratio:.3f} (limit {1 + args.tolerance:.2f}) -> {args.json}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
