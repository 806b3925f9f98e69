"""CLI: python -m medpmoe.pretrain.timing [--arch A] [--arch_kwargs D] [--image_size S] [--patch_size P]
[--method mae|dino] [--batch_size B] [--steps N] — the FLOPs of one pretraining step and the CPU time it takes on one
core, per 10,000 images, with GPU estimates from the FLOPs."""

from __future__ import annotations

import time

import torch

#: dense bf16 peak TFLOP/s of common GPUs, and the share of it a ViT training step typically reaches (MFU)
GPU_PEAK_TFLOPS = {"A100": 312.0, "H100/H200 (SXM)": 989.0, "L40S": 362.0}
MFU = 0.35


def step_flops(model, batch) -> int:
    """FLOPs of one forward + backward of `model(batch)` (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(batch).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def measure(arch: str = "vit_small_patch16_224", arch_kwargs: dict | None = None, image_size: int = 224,
            patch_size: int | None = None, method: str = "mae", batch_size: int = 16, steps: int = 3) -> dict:
    """CPU seconds per 10,000 images on one core (process time of `steps` optimizer steps after a warm-up one) and
    GPU estimates per 10,000 images from the step's FLOPs at `MFU` of each GPU's bf16 peak."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(arch, arch_kwargs, image_size, patch_size, method, batch_size, steps)
    finally:
        torch.set_num_threads(threads)


def _measure(arch, arch_kwargs, image_size, patch_size, method, batch_size, steps) -> dict:
    from medpmoe.pretrain.methods import build_method, create_vit

    torch.manual_seed(0)
    kwargs = dict(arch_kwargs or {})
    if patch_size:
        kwargs["patch_size"] = patch_size
    vit = create_vit(arch, image_size, kwargs)
    model = build_method(method, vit, [0.5] * 3, [0.25] * 3, **({"output_dim": 2048} if method == "dino" else {}))
    x = torch.rand(batch_size, 3, image_size, image_size)
    batch = [x, x.flip(-1)] if method == "dino" else x
    flops = step_flops(model, batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        model(batch).backward()
        opt.step()

    step()
    t0 = time.process_time()
    for _ in range(steps):
        step()
    cpu = (time.process_time() - t0) / (steps * batch_size) * 10_000
    per_10k = flops / batch_size * 10_000
    out = {"arch": arch, "image_size": image_size, "method": method,
           "params_M": sum(p.numel() for p in vit.parameters()) / 1e6, "GFLOPs_per_image": flops / batch_size / 1e9, "cpu_core_s_per_10k": cpu}
    out.update({f"{gpu}_s_per_10k": per_10k / (peak * 1e12 * MFU) for gpu, peak in GPU_PEAK_TFLOPS.items()})
    return out


if __name__ == "__main__":
    from medpmoe.pretrain.__main__ import parser

    result = measure(**vars(parser(measure, "python -m medpmoe.pretrain.timing").parse_args()))
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
