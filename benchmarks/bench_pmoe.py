"""Benchmark the pMoE training step (forward, backward, AdamW) and inference against the eager bf16 model a user
would write, lever by lever, in one run; write everything as JSON (see benchmarks/README.md).

    python benchmarks/bench_pmoe.py --json benchmarks/results/h100.json     # GPU: K = 1, 3 ViT-B/16, ~6 min
    python benchmarks/bench_pmoe.py --device cpu --tiny --json /tmp/b.json  # CPU smoke run (tiny ViTs)

The model part imports only torch, timm and medpmoe's model modules; the loader part (the bundle's own loader)
needs MONAI and is skipped without it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing medpmoe
    sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from medpmoe.experts import FrozenViTExpert  # noqa: E402
from medpmoe.files import atomic_write_text  # noqa: E402
from medpmoe.models import build_model  # noqa: E402
from medpmoe.models.fast import accelerate  # noqa: E402
from medpmoe.models.fp8 import unsupported_reason as fp8_unsupported  # noqa: E402

TINY = dict(img_size=64, embed_dim=64, depth=2, num_heads=4)
#: dense bf16 tensor-core peaks (TFLOP/s) from the vendors' datasheets, by device-name fragment (first match)
PEAKS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
         ("A100", 312.0), ("L40S", 362.0))


# --- the eager reference, as a user would write it -----------------------------------------------------------
def make_vit(tiny: bool, seed: int) -> nn.Module:
    """A randomly initialised `vit_base_patch16_224` (or its tiny variant), no classifier."""
    torch.manual_seed(seed)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **(TINY if tiny else {}))


class Reference(nn.Module):
    """The same maths written plainly: K frozen timm ViTs, a Python loop over blocks, prompts concatenated at
    every layer, the dispatcher as Linear layers applied expert by expert (what a user would write)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.vits = nn.ModuleList(copy.deepcopy(e.vit) for e in model.experts)
        self.prompts = nn.ParameterList(copy.deepcopy(m.prompts) for m in model.methods)  # (L, Np, D) each
        d = model.dispatcher
        self.E, self.A, self.Z = (copy.deepcopy(getattr(d, n)) if d is not None else None for n in "EAZ")
        self.head = copy.deepcopy(model.head.fc)
        self.drop = nn.Dropout(model.methods[0].prompt_dropout.p)
        self.register_buffer("mean", model.experts[0].mean.clone())
        self.register_buffer("std", model.experts[0].std.clone())
        self.vits.requires_grad_(False)

    def train(self, mode: bool = True) -> Reference:
        """Frozen ViTs stay in eval mode."""
        super().train(mode)
        self.vits.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> logits."""
        x = (images - self.mean) / self.std
        xs = [v.norm_pre(v._pos_embed(v.patch_embed(x))) for v in self.vits]
        K, L, n = len(self.vits), self.prompts[0].shape[0], self.prompts[0].shape[1]
        for layer in range(L):
            p = [self.prompts[k][layer].expand(x.shape[0], -1, -1) for k in range(K)]
            if self.E is not None:  # pMoE dispatcher: softmax_K(E(P_k) + A(Z_P,k) + mean Z(Z_k)), then mix
                mixed = []
                for k in range(K):
                    logit = self.E[layer](p[k]) + self.Z[layer](xs[k][:, 1 + n * (layer > 0) :].mean(1))[:, None]
                    if layer > 0:
                        logit = logit + self.A[layer](xs[k][:, 1 : 1 + n])
                    w = torch.softmax(logit.float(), dim=-1).to(p[k].dtype)
                    mixed.append(sum(w[..., j : j + 1] * p[j] for j in range(K)))
                p = mixed
            for k in range(K):
                rest = xs[k][:, 1 + n * (layer > 0) :]
                xs[k] = self.vits[k].blocks[layer](torch.cat([xs[k][:, :1], self.drop(p[k]).to(rest.dtype), rest], 1))
        feats = [v.norm(xs[k])[:, 0] for k, v in enumerate(self.vits)]
        return self.head(torch.stack(feats).mean(0))


def build_pair(k: int, args) -> tuple[nn.Module, Reference]:
    """medpmoe's model (VPT-deep + MLP dispatcher, the default pMoE) and a reference with the same weights."""
    experts = [FrozenViTExpert(make_vit(args.tiny, seed=i), name=f"e{i}") for i in range(k)]
    depth = experts[0].depth
    model = build_model(experts, num_classes=args.classes, method="vpt", moe=True, num_tokens=args.tokens,
                        prompt_layers=min(args.prompt_layers, depth), dispatcher="mlp")
    return model, Reference(model)


# --- variants: (name, lever index, kind, settings) -------------------------------------------------------------
def variants(k: int, args, stage: str) -> list[tuple[str, int, str, dict]]:
    """What is timed for K experts at one stage, each row one lever (its index orders the lever table).

    Stages run in this order so that a run cut short by the time budget keeps the most important rows: "main"
    (the references, the eager levers and the last compile mode, the best), "extra" (the other compile modes,
    K > 1 only), "fp8" (FP8 expert weights on top of the best setting, K > 1 only)."""
    modes = [m for m in args.compile_modes if m != "none"]
    fast: dict = dict(amp="bf16", batched_experts=False)
    rows = [("reference fp32 (eager, TF32 off)", -1, "ref", {"amp": None}),
            ("reference bf16 autocast (eager)", 0, "ref", {"amp": torch.bfloat16}),
            ("medpmoe plain loop, bf16", 1, "model", dict(fast))]
    if k > 1:
        fast = dict(amp="bf16", in_place_prompts=False, fused_dispatcher=False)
        rows.append(("+ batched experts", 2, "model", dict(fast)))
        fast["in_place_prompts"] = True
        rows.append(("+ in-place prompt slots", 3, "model", dict(fast)))
        fast["fused_dispatcher"] = True
        rows.append(("+ fused dispatcher", 4, "model", dict(fast)))
    names = {"default": "+ torch.compile (default mode)", "max-autotune-no-cudagraphs": "+ torch.compile (max-autotune)",
             "reduce-overhead": "+ torch.compile with CUDA graphs (reduce-overhead)",
             "max-autotune": "+ torch.compile with CUDA graphs (max-autotune)"}
    compiled = [(names.get(m, f"+ compile {m}"), 5 + i, "model", dict(fast, compile=m, fullgraph=True))
                for i, m in enumerate(modes)]
    if stage == "main":
        return (rows[1:] if args.no_fp32 else rows) + compiled[-1:]
    if stage == "extra":
        return compiled[:-1] if k > 1 else []
    if k == 1:
        return []
    best = dict(compiled[-1][3]) if compiled else dict(fast)
    return [("+ FP8 expert weights", 5 + len(modes), "model", dict(best, fp8=True))]


# --- timing -------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for queued GPU work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device):
    """Wall clock, except single-threaded CPU runs: process CPU time, which other processes' load skews less."""
    return time.process_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def bench(fn, device, warmup: int, iters: int, repeats: int) -> tuple[float, float | None, float]:
    """Median seconds per call over `repeats` blocks of `iters` calls, peak GPU memory (MiB; None on CPU) and the
    spread of the blocks ((max - min) / median, in %)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tick, times = clock(device), []
    for _ in range(repeats):
        t0 = tick()
        for _ in range(iters):
            fn()
        sync(device)
        times.append((tick() - t0) / iters)
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    med = statistics.median(times)
    return med, mem, 100 * (max(times) - min(times)) / med if med > 0 else 0.0


def steps(model: nn.Module, images, labels, amp: torch.dtype | None, cudagraphs: bool):
    """(train_step, infer_step): CE loss, backward, AdamW (the paper's lr / weight decay); inference, no grad."""
    dev = images.device.type
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-5, **({"fused": True} if dev == "cuda" else {}))
    mark = torch.compiler.cudagraph_mark_step_begin if cudagraphs else (lambda: None)

    def train():
        mark()
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=amp, enabled=amp is not None):
            logits = model(images)
        F.cross_entropy(logits.float(), labels).backward()
        opt.step()

    def infer():
        mark()
        model.eval()
        with torch.inference_mode(), torch.autocast(dev, dtype=amp, enabled=amp is not None):
            return model(images)

    return train, infer


def count_flops(fn) -> int:
    """Model FLOPs of one call (matmuls, attention, convolutions), counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_tflops(device: torch.device) -> float | None:
    """Measured bf16 TFLOP/s of an 8192^3 matmul on random data (a ceiling for this device), CUDA only."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * 8192**3 * 10 / (time.perf_counter() - t0) / 1e12


# --- the run ------------------------------------------------------------------------------------------------
class Run:
    """Collects rows and writes the JSON after every row (a run cut short keeps what it measured)."""

    def __init__(self, args, device: torch.device) -> None:
        self.args, self.device, self.t0 = args, device, time.perf_counter()
        self.bases: dict = {}  # K -> {(mode, lever): images/s}, for the ratios
        self.compile_cost, self.compiled_once = (90.0 if device.type == "cuda" else 0.0), False
        self.doc = dict(schema=1, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        command=" ".join([Path(sys.executable).name, *sys.argv]), **environment(device),
                        config={}, flops={}, rows=[], accuracy={}, loader=[], skipped=[], errors=[])

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.t0

    def save(self) -> None:
        """Write the JSON (atomically) if a path was given."""
        self.doc["elapsed_s"] = round(self.elapsed(), 1)
        if self.args.json:
            atomic_write_text(self.args.json, json.dumps(self.doc, indent=1))

    def log(self, msg: str) -> None:
        """Progress line with the elapsed time."""
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)


def environment(device: torch.device) -> dict:
    """Device, versions and git commit, recorded with every result."""
    git = {}
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()  # noqa: E731
        git = {"commit": run("rev-parse", "HEAD") or None, "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        git = {"commit": None, "dirty": None}
    dev = {"type": device.type, "name": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        dev = {"type": "cuda", "name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
               "memory_gib": round(p.total_memory / 2**30, 1)}
    return {"device": dev, "git": git, "versions": {
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "timm": timm.__version__, "python": platform.python_version()}}


def time_variant(run: Run, k: int, name: str, lever: int, kind: str, settings: dict, model, ref, data, base) -> None:
    """Build one variant on the device, time training and inference, append two rows."""
    args, device = run.args, run.device
    images, labels = data
    if settings.get("fp8") and fp8_unsupported(device):
        run.doc["skipped"].append(f"K={k} {name}: {fp8_unsupported(device)}")
        return
    torch._dynamo.reset()
    net = copy.deepcopy(ref if kind == "ref" else model).to(device)
    amp = settings.get("amp") if kind == "ref" else None
    if kind == "model":
        accelerate(net, **settings)
    cudagraphs = settings.get("compile") in ("reduce-overhead", "max-autotune")
    train, infer = steps(net, images, labels, amp, cudagraphs and device.type == "cuda")
    for mode, fn in (("train", train), ("infer", infer)):
        t0 = run.elapsed()
        dt, mem, spread = bench(fn, device, args.warmup, args.iters, args.repeats)
        ips = args.batch / dt
        flops = run.doc["flops"][str(k)][mode]
        tflops = flops / dt / 1e12
        base.setdefault((mode, lever), ips)
        peak = run.doc["config"]["peak_tflops"]
        row = dict(K=k, mode=mode, variant=name, lever=lever, images_per_s=round(ips, 2), spread_pct=round(spread, 1),
                   step_ms=round(dt * 1e3, 3),
                   peak_mib=None if mem is None else round(mem), tflops=float(f"{tflops:.4g}"),
                   pct_peak=None if not peak else round(100 * tflops / peak, 2),
                   x_ref_bf16=round(ips / base[(mode, 0)], 3) if (mode, 0) in base else None,
                   x_ref_fp32=round(ips / base[(mode, -1)], 3) if (mode, -1) in base else None,
                   seconds=round(run.elapsed() - t0, 1))
        run.doc["rows"].append(row)
        run.log(fmt(row))
        run.save()
    if settings.get("fp8"):  # accuracy change on a fixed batch, against the same model without FP8
        plain = accelerate(copy.deepcopy(model).to(device), amp="bf16")
        with torch.inference_mode():
            a, b = plain.eval()(images).float(), infer().float()
        run.doc["accuracy"][f"K={k} fp8 vs bf16 logits, relative L2"] = round(((b - a).norm() / a.norm()).item(), 5)
        del plain
    del net, train, infer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_k(run: Run, k: int, stage: str = "main") -> None:
    """The variants of one stage for K experts, skipping compiled ones the time budget cannot fit."""
    args, device = run.args, run.device
    todo = variants(k, args, stage)
    if not todo:
        return
    g = torch.Generator().manual_seed(0)
    size = 64 if args.tiny else 224
    images = torch.rand(args.batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    model, ref = build_pair(k, args)
    if str(k) not in run.doc["flops"]:
        with torch.no_grad():  # same maths: the reference and medpmoe's plain loop agree in fp32 (eval: no dropout)
            diff = (ref.eval().to(device)(images) - model.eval().to(device)(images)).abs().max().item()
        ref_train, _ = steps(copy.deepcopy(ref), images, labels, torch.bfloat16, False)
        run.doc["flops"][str(k)] = {"train": count_flops(ref_train), "infer": count_flops(lambda: ref.eval()(images))}
        run.doc["accuracy"][f"K={k} max |reference - medpmoe| logits, fp32"] = diff
        run.log(f"K={k}: max |reference - medpmoe plain| logits in fp32 = {diff:.2e}; GFLOP per image: "
                f"train {run.doc['flops'][str(k)]['train'] / args.batch / 1e9:.3g}, "
                f"infer {run.doc['flops'][str(k)]['infer'] / args.batch / 1e9:.3g}")
    model, ref = model.cpu(), ref.cpu()  # masters off the GPU: peak memory is one variant's alone
    base = run.bases.setdefault(k, {})
    for name, lever, kind, settings in todo:
        heavy = bool(settings.get("compile") or settings.get("fp8"))
        if heavy and run.elapsed() + run.compile_cost > args.budget_s:
            run.doc["skipped"].append(f"K={k} {name}: would end past the time budget ({args.budget_s:.0f} s)")
            run.log(f"skipped K={k} {name}: time budget")
            continue
        t0 = run.elapsed()
        attempts = [(name, settings)]
        if settings.get("fullgraph"):  # a graph break fails fullgraph: measure once more, allowing breaks
            attempts.append((f"{name} (with graph breaks)", dict(settings, fullgraph=False)))
        for label, options in attempts:
            try:
                time_variant(run, k, label, lever, kind, options, model, ref, (images, labels), base)
                break
            except Exception as exc:  # one failing variant (OOM, compile error) must not lose the others
                run.doc["errors"].append(f"K={k} {label}: {type(exc).__name__}: {str(exc)[:300]}")
                run.log(f"ERROR K={k} {label}: {type(exc).__name__}: {str(exc)[:300]}")
                traceback.print_exc()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if "out of memory" in str(exc) or run.elapsed() + run.compile_cost > args.budget_s:
                    break
        if heavy:
            run.compile_cost = max(run.compile_cost if run.compiled_once else 0.0, run.elapsed() - t0)
            run.compiled_once = True
        run.save()


def loader_bench(run: Run) -> None:
    """The bundles' own training loader alone (`benchmarks/bundle_loader.py`: kvasir_seg's `train#dataloader`, on
    `--loader-data` or the bundle's demo data), as a GPU trainer gets it; skipped without MONAI."""
    args = run.args
    if args.loader == "none":
        return
    try:
        from benchmarks.bundle_loader import measure

        row = measure("kvasir_seg", args.loader_data, 64 if args.tiny else 224, 32, repeats=args.repeats,
                      gpu_trainer=run.device.type == "cuda")
    except ImportError as exc:
        run.doc["skipped"].append(f"bundle loader: {exc}")
        return
    row["path"] = f"{row['bundle']} train#dataloader ({row['mode']}, {row['data']})"
    if "images_per_s_on_gpu" in row:  # what training gets: loader + transfer + GPU augmentation
        row["images_per_s"] = row["images_per_s_on_gpu"]
    run.doc["loader"].append(row)
    run.log(f"loader {row['path']}: {row['images_per_s']:.0f} images/s")
    run.save()


def fmt(r: dict) -> str:
    """One markdown table row."""
    def f(v, spec):
        return "-" if v is None else format(v, spec)
    return (f"| {r['K']} | {r['mode']} | {r['variant']} | {r['images_per_s']:.1f} | {f(r['x_ref_bf16'], '.2f')} | "
            f"{f(r['x_ref_fp32'], '.2f')} | {f(r['peak_mib'], '.0f')} | {r['tflops']:.3g} | {f(r['pct_peak'], '.1f')} |")


def main(argv=None) -> dict:
    """Command-line entry point; returns the result document."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny ViTs (depth 2, width 64, 64 px), batch 8 unless given")
    p.add_argument("--experts", type=int, nargs="+", default=[3, 1], help="values of K (3 first: the targets)")
    p.add_argument("--batch", type=int, default=None, help="default 64 (8 with --tiny)")
    p.add_argument("--tokens", type=int, default=10, help="Np prompt tokens per expert per layer")
    p.add_argument("--prompt-layers", type=int, default=12, help="prompt layers (capped at the depth)")
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; compile happens here)")
    p.add_argument("--iters", type=int, default=None, help="calls per timed block (default 10; 3 with --tiny)")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported")
    p.add_argument("--compile-modes", nargs="+", default=None,
                   help="torch.compile modes timed as levers, or none (default on CUDA: default reduce-overhead)")
    p.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=None,
                   help="also time FP8 expert weights (default: on where supported, CUDA only)")
    p.add_argument("--no-fp32", action="store_true", help="skip the fp32 reference column")
    p.add_argument("--loader", default="bundle", choices=["bundle", "none"],
                   help="data-path benchmark: the kvasir_seg bundle's own train#dataloader (needs MONAI)")
    p.add_argument("--loader-data", default=None, help="Kvasir-layout folder for the loader (default: demo data)")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="compiled/FP8 variants that would end past this many seconds are skipped (and recorded)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for the %% column")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", default=None, help="write the results here (default benchmarks/results/<device>.json on CUDA)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (8 if args.tiny else 64)
    args.warmup = 3 if args.warmup is None else args.warmup
    args.iters = args.iters or (3 if args.tiny else 10)
    args.compile_modes = args.compile_modes or (["default", "reduce-overhead"] if cuda else ["none"])
    args.fp8 = (cuda and fp8_unsupported(device) is None) if args.fp8 is None else args.fp8
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # an honest fp32 reference column
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    run = Run(args, device)
    name = run.doc["device"]["name"]
    if args.json is None and cuda:
        args.json = str(ROOT / "benchmarks" / "results" / (name.replace(" ", "-").lower() + ".json"))
    peak, source = args.peak_tflops, "--peak-tflops"
    if peak is None and cuda:
        peak, source = next(((v, f"datasheet dense bf16 for '{n}'") for n, v in PEAKS if n in name), (None, "unknown device"))
    run.doc["config"] = dict(experts=args.experts, batch=args.batch, image_size=64 if args.tiny else 224,
                             tokens=args.tokens, prompt_layers=min(args.prompt_layers, TINY["depth"] if args.tiny else 12),
                             tiny=args.tiny, warmup=args.warmup,
                             iters=args.iters, repeats=args.repeats, compile_modes=args.compile_modes, fp8=args.fp8,
                             peak_tflops=peak, peak_source=source, matmul_tflops_measured=matmul_tflops(device),
                             clock="process CPU time" if clock(device) is time.process_time else "wall clock")
    run.log(f"device {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); timm {timm.__version__}; "
            f"batch {args.batch}; Np {args.tokens}; peak {peak} TFLOP/s ({source}); "
            f"measured bf16 matmul {run.doc['config']['matmul_tflops_measured']}")
    for stage in ("main", "extra") + (("fp8",) if args.fp8 else ()):  # FP8 last: optional, changes the numbers
        for k in args.experts:
            run_k(run, k, stage)
    loader_bench(run)
    run.save()
    print_summary(run.doc)
    return run.doc


def print_summary(doc: dict) -> None:
    """The short table, printed last."""
    print(f"\n{doc['device']['name']} | torch {doc['versions']['torch']} | CUDA {doc['versions']['cuda']} | "
          f"commit {str(doc['git'].get('commit'))[:10]} | {doc['elapsed_s']} s")
    print("| K | mode | variant | images/s | x ref bf16 | x ref fp32 | peak MiB | TFLOP/s | % bf16 peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in doc["rows"]:
        print(fmt(r))
    for r in doc["loader"]:
        print(f"loader {r['path']}: {r['images_per_s']:.0f} images/s")
    for k, v in doc["accuracy"].items():
        print(f"{k}: {v:.3g}")
    for s in doc["skipped"] + doc["errors"]:
        print("NOTE:", s)


if __name__ == "__main__":
    main()
