"""`pretrain(...)`: self-supervised pretraining of a timm ViT on unlabeled images, run like the bundles (checked and
cached data, bf16 on a GPU, DDP under torchrun, progress bar, resume after a kill, run identity, MLflow), ending in an
expert file in timm's layout with its record (`medpmoe.pretrain.record`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from medpmoe.files import atomic_torch_save, atomic_write_text

CHECKPOINT_FORMAT = "medpmoe-pretrain-checkpoint/1"
BASE_LR = {"mae": 1.5e-4, "dino": 5e-4}  # per 256 images, scaled by the batch (MAE's and DINO's rule)


class _State:
    """Epoch bookkeeping kept in the checkpoint: loss history and the running sums of the current epoch."""

    def __init__(self) -> None:
        self.history: list[dict] = []
        self.total, self.count = 0.0, 0


def _split(n: int, holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-back indices): `holdout` images (at most a fifth) drawn by `seed`."""
    k = max(0, min(int(holdout), n // 5))
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[k:].tolist()), sorted(order[:k].tolist())


def _device(device: str | None):
    import ignite.distributed as idist

    if idist.get_world_size() > 1:
        return idist.device()
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _distributed() -> bool:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from medpmoe.bundle.distributed import init_distributed

        init_distributed()
        return True
    return False


def _optimizer(model, lr: float, weight_decay: float, steps: int, warmup: int):
    from monai.optimizers import WarmupCosineSchedule

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "token" in name or "pos_embed" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay,
                                                                              "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    sched = WarmupCosineSchedule(opt, warmup_steps=min(warmup, max(0, steps - 1)), t_total=max(1, steps))
    return opt, sched


def _to(batch, device):
    x = batch["image"]
    if isinstance(x, (list, tuple)):
        return [torch.as_tensor(v).to(device, non_blocking=True) for v in x]
    return torch.as_tensor(x).to(device, non_blocking=True)


def pretrain(
    images,
    output_dir: str = "outputs/pretrain_expert",
    method: str = "mae",
    arch: str = "vit_small_patch16_224",
    arch_kwargs: dict | None = None,
    image_size: int = 224,
    patch_size: int | None = None,
    epochs: int = 100,
    batch_size: int = 64,
    learning_rate: float | None = None,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1,
    seed: int = 0,
    mask_ratio: float = 0.75,
    decoder_dim: int = 128,
    decoder_depth: int = 2,
    decoder_heads: int = 4,
    norm_pix_loss: bool = False,
    dino_output_dim: int = 2048,
    dino_local_views: int = 0,
    holdout: int = 8,
    cache: bool = True,
    num_workers: int = 0,
    amp: bool = True,
    device: str | None = None,
    plane: str = "middle",
    intensity: str = "auto",
    window=None,
    grad_clip: float | None = 3.0,
    fresh_start: bool = False,
    resume_changed: bool = False,
    tracking: bool = True,
    experiment_name: str = "pretrain_expert",
    run_name: str | None = None,
) -> dict:
    """Pretrain `arch` (a timm vit_* name; `arch_kwargs` such as embed_dim/depth/num_heads, `patch_size`) at
    `image_size` on `images` (a folder, a datalist, or a list of them) with `method` ('mae' or 'dino'); write
    `output_dir/expert.pt` (timm layout) and `output_dir/expert.json` (its record). Returns results.json's content.

    `learning_rate` defaults to the method's base rate x (batch size x processes) / 256; `holdout` images are kept
    out of training for the held-back loss and the figure. A killed run re-run with the same settings resumes from
    `output_dir/checkpoints/last.pt`; other settings stop with the differing keys (`fresh_start`, `resume_changed`
    as in the training bundles)."""
    import ignite.distributed as idist
    from ignite.engine import Engine, Events

    from medpmoe.bundle.distributed import rank_zero_first
    from medpmoe.pretrain import data as D
    from medpmoe.pretrain.methods import METHODS, build_method, create_vit
    from medpmoe.training import EpochSeed, start_run
    from medpmoe.training.guards import NonFiniteLossError

    if method not in METHODS:
        raise ValueError(f"config key 'method' must be one of {METHODS}, got {method!r}")
    distributed = _distributed()
    world, rank = idist.get_world_size(), idist.get_rank()
    dev = _device(device)
    out = Path(output_dir).expanduser()
    ckpt_dir = out / "checkpoints"
    arch_kwargs = dict(arch_kwargs or {})
    if patch_size is not None:
        arch_kwargs["patch_size"] = int(patch_size)
    if method == "dino" and dino_local_views:
        arch_kwargs.setdefault("dynamic_img_size", True)  # local views are smaller than the global ones

    paths = D.gather_images(images)
    paths = rank_zero_first(D.check_images, paths, str(images))
    data_hash = D.data_sha256(paths)
    train_idx, hold_idx = _split(len(paths), holdout, seed)
    lr = float(learning_rate) if learning_rate is not None else BASE_LR[method] * batch_size * world / 256
    method_kwargs = ({"mask_ratio": mask_ratio, "decoder_dim": decoder_dim, "decoder_depth": decoder_depth,
                      "decoder_heads": decoder_heads, "norm_pix_loss": norm_pix_loss} if method == "mae" else
                     {"output_dim": dino_output_dim, "local_views": dino_local_views})
    identity = json.loads(json.dumps({
        "data": {"images": len(paths), "data_sha256": data_hash, "holdout": len(hold_idx), "plane": plane,
                 "intensity": intensity, "window": window},
        "model": {"arch": arch, "arch_kwargs": arch_kwargs, "image_size": image_size, "method": method,
                  **method_kwargs},
        "training": {"epochs": epochs, "batch_size": batch_size, "processes": world, "learning_rate": lr,
                     "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "seed": seed,
                     "grad_clip": grad_clip}}, default=str))
    status = rank_zero_first(start_run, str(out), identity, fresh_start, resume_changed, str(ckpt_dir))
    if status.finished:
        print(f"{out} holds this pretraining, finished: {out / 'expert.pt'} (--fresh_start True to redo it)",
              flush=True)
        return json.loads((out / "results.json").read_text())

    read = {"plane": plane, "intensity": intensity, "window": window}
    base = D.cached_dataset([paths[i] for i in train_idx], image_size, cache, num_workers, **read)
    mean, std = D.mean_std(base)
    held = (torch.stack([torch.as_tensor(D.cached_dataset([paths[i]], image_size, False, **read)[0]["image"])
                         for i in hold_idx]) if hold_idx else None)
    torch.manual_seed(seed)
    vit = create_vit(arch, image_size, arch_kwargs)
    kwargs = {k: v for k, v in method_kwargs.items() if k != "local_views"}
    model = build_method(method, vit, mean, std, **kwargs).to(dev)
    augment = D.random_transforms(method, image_size, mean, std, local_views=dino_local_views,
                                  local_size=_local_size(image_size, vit))
    loader = D.make_loader(base, augment, batch_size, seed, num_workers, pin_memory=dev.type == "cuda")
    steps = epochs * len(loader)
    optimizer, scheduler = _optimizer(model, lr, weight_decay, steps, int(round(warmup_epochs * len(loader))))
    net = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    use_amp = bool(amp) and dev.type == "cuda"
    state = _State()

    def step(engine, batch):
        model.train()
        x = _to(batch, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = net(x)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"pretraining loss is {float(loss)} at epoch {engine.state.epoch}: lower "
                                     f"--learning_rate (now {lr:g}) and start over with --fresh_start True")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
        optimizer.step()
        scheduler.step()
        model.after_step(engine.state.iteration / max(1, steps))
        value = float(loss.detach())
        state.total += value
        state.count += 1
        return {"loss": value}

    engine = Engine(step)
    engine.data_loader = loader  # EpochSeed re-seeds its dataset's random transforms
    files = {"expert": out / "expert.pt", "figure": out / "reconstructions.png", "loss_figure": out / "loss.png",
             "checkpoint": ckpt_dir / "last.pt"}

    @engine.on(Events.STARTED)
    def resume(engine):
        path = files["checkpoint"]
        if not path.is_file():
            return
        saved = torch.load(path, map_location=dev, weights_only=True)
        if saved.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a medpmoe pretraining checkpoint")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state.history = list(saved["history"])
        engine.state.epoch, engine.state.iteration = saved["epoch"], saved["iteration"]
        print(f"resumed from {path} after epoch {saved['epoch']}", flush=True)

    @engine.on(Events.EPOCH_STARTED)
    def new_epoch(engine):
        loader.sampler.set_epoch(engine.state.epoch)
        state.total, state.count = 0.0, 0

    EpochSeed(seed).attach(engine)

    @engine.on(Events.EPOCH_COMPLETED)
    def end_epoch(engine):
        sums = torch.tensor([state.total, float(state.count)], dtype=torch.float64)
        if world > 1:
            sums = idist.all_reduce(sums.to(dev)).cpu()
        entry = {"epoch": engine.state.epoch, "loss": float(sums[0] / sums[1].clamp_min(1))}
        if method == "mae" and held is not None:
            from medpmoe.pretrain.figures import mae_outputs

            model.eval()
            entry["holdout_loss"] = mae_outputs(model, held.to(dev), seed)["loss"]
        state.history.append(entry)
        engine.state.metrics.update({k: v for k, v in entry.items() if k != "epoch"})
        if rank == 0:
            atomic_torch_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "epoch": engine.state.epoch, "iteration": engine.state.iteration,
                               "history": state.history}, files["checkpoint"])

    results: dict = {}

    @engine.on(Events.COMPLETED)
    def export(engine):
        if rank != 0:
            return
        results.update(_export(model, files, arch, arch_kwargs, image_size, mean, std, method, epochs,
                               len(train_idx), data_hash, state.history, held,
                               [Path(paths[i]).name for i in hold_idx], seed, dev))
        atomic_write_text(out / "results.json", json.dumps(results, indent=1))

    if rank == 0:
        from medpmoe.bundle.progress import LossProgressBar

        LossProgressBar().attach(engine, output_transform=lambda o: {"loss": o["loss"]})
    if tracking and rank == 0:
        _attach_mlflow(engine, out, experiment_name, run_name, identity, files)
    if rank == 0:
        print(f"pretraining {arch} ({sum(p.numel() for p in vit.parameters()) / 1e6:.2f} M parameters) with {method} "
              f"on {len(train_idx)} images ({len(hold_idx)} held back) at {image_size} px on {dev} x {world}, "
              f"lr {lr:g}, {epochs} epochs of {len(loader)} steps", flush=True)
    try:
        engine.run(loader, max_epochs=epochs)
    finally:
        if distributed:
            from medpmoe.bundle.distributed import shutdown_distributed

            shutdown_distributed()
    if rank != 0:
        return {}
    return results or json.loads((out / "results.json").read_text())


def _local_size(image_size: int, vit) -> int:
    p = int(vit.patch_embed.patch_size[0])
    return max(p, (image_size // 2) // p * p)


def _export(model, files, arch, arch_kwargs, image_size, mean, std, method, epochs, images, data_hash, history,
            held, held_names, seed, dev) -> dict:
    """Write the expert, its record and the figures; return what results.json holds."""
    from medpmoe.pretrain.figures import loss_figure, mae_outputs, reconstruction_figure
    from medpmoe.pretrain.record import write_expert
    from medpmoe.tracking.plots import save_png

    model.eval()
    record = write_expert(files["expert"], model.encoder, arch=arch, arch_kwargs=arch_kwargs, img_size=image_size,
                          mean=mean, std=std, method=method, epochs=epochs, images=images, data_sha256=data_hash,
                          final_loss=history[-1]["loss"] if history else None)
    save_png(loss_figure(history), files["loss_figure"])
    out = {"expert": str(files["expert"]), "record": str(record), "history": history,
           "loss_figure": str(files["loss_figure"])}
    if method == "mae" and held is not None:
        save_png(reconstruction_figure(mae_outputs(model, held[:8].to(dev), seed), held_names[:8]), files["figure"])
        out["figure"] = str(files["figure"])
    return out


def _attach_mlflow(engine, out: Path, experiment_name: str, run_name: str | None, identity: dict, files) -> None:
    """MLflow run recorded in `out/mlflow_run.json` (continued on resume): loss per epoch, parameters, and at the end
    the figures and the expert record."""
    from monai.utils import flatten_dict

    from medpmoe.bundle.reporting import tracking_uri
    from medpmoe.tracking import RunMLFlowHandler

    def report(client, run_id):
        for key in ("figure", "loss_figure"):
            if files[key].is_file():
                client.log_artifact(run_id, str(files[key]), "figures")
        client.log_artifact(run_id, str(files["expert"].with_suffix(".json")), "expert")

    params = {k: v for k, v in flatten_dict(identity).items() if not isinstance(v, (dict, list))}
    RunMLFlowHandler(tracking_uri=tracking_uri(out), experiment_name=experiment_name, run_name=run_name,
                     run_file=out / "mlflow_run.json", iteration_log=False, epoch_log=True,
                     experiment_param=params, report=report, close_on_complete=True).attach(engine)
