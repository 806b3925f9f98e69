"""Official checkpoint layouts mapped onto timm's keys, one function per layout.

Each layout function takes the raw loaded object and the target timm model and returns a state dict in the
model's keys. timm's own `checkpoint_filter_fn`s do the real conversions where they exist (DINOv2 hub keys,
OpenAI / open_clip CLIP towers, open_clip timm trunks, SAM's `image_encoder.*`) and resample position embeddings
to the model's grid; the functions here strip wrappers, prefixes and training-only heads, and map the layouts
timm does not know (Hugging Face DINOv2, LVM-Med's bare SAM encoder). `medpmoe.experts.checkpoints` then checks
the result strictly. What each layout was checked against: docs/experts.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch
from timm.models import vision_transformer_sam as tsam
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from medpmoe.experts.sam import fit_sam_geometry

StateDict = dict[str, torch.Tensor]

#: top-level parts of a whole SAM state dict (segment-anything `Sam`)
SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


def first_keys(keys: Iterable[str], n: int = 5) -> str:
    """The first `n` of `keys` (sorted), with the total when there are more."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def unwrap(obj: Mapping, wrappers: tuple[str, ...] = ("model", "state_dict", "module", "teacher")) -> StateDict:
    """Descend into the usual training wrappers ({'model': ...}, {'state_dict': ...}) until tensors appear."""
    while not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[w] for w in wrappers if isinstance(obj.get(w), Mapping)), None)
        if inner is None:
            break
        obj = inner
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def strip(sd: Mapping, prefix: str) -> StateDict:
    """Keep keys starting with `prefix`, without it (all keys when none has it)."""
    if not any(k.startswith(prefix) for k in sd):
        return dict(sd)
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def drop(sd: Mapping, prefixes: tuple[str, ...]) -> StateDict:
    """All keys except those starting with one of `prefixes`."""
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


# --- plain ViTs (timm VisionTransformer) -------------------------------------------------------------------------
def timm_layout(obj: Mapping, model: nn.Module) -> StateDict:
    """timm-native files (also UNI's `pytorch_model.bin`) and other layouts timm's `checkpoint_filter_fn` knows."""
    sd = strip(strip(unwrap(obj), "module."), "backbone.")
    return drop(checkpoint_filter_fn(sd, model), ("head.",))


def dinov2_layout(obj: Mapping, model: nn.Module) -> StateDict:
    """DINOv2 torch-hub file (`blocks.0.ls1.gamma`, `mask_token`, `register_tokens`); dinov2 `teacher` wrappers."""
    sd = strip(unwrap(obj), "backbone.")
    return drop(checkpoint_filter_fn(sd, model), ("head.", "dino_head.", "ibot_head."))


def mocov3_layout(obj: Mapping, model: nn.Module) -> StateDict:
    """MoCo v3 `{'state_dict': {'module.base_encoder.*'}}`: keep the base encoder, drop head/predictor/momentum."""
    sd = unwrap(obj)
    sd = drop(sd, ("module.momentum_encoder.", "module.predictor.", "momentum_encoder.", "predictor."))
    sd = strip(strip(strip(sd, "module."), "base_encoder."), "encoder.")
    return drop(checkpoint_filter_fn(drop(sd, ("head.",)), model), ("head.",))


def mae_layout(obj: Mapping, model: nn.Module) -> StateDict:
    """MAE `{'model': {...}}`: encoder keys are timm's; drop `decoder_*` and `mask_token`."""
    sd = drop(unwrap(obj), ("decoder_", "mask_token", "head."))
    return checkpoint_filter_fn(sd, model)


def retfound_layout(obj: Mapping, model: nn.Module) -> StateDict:
    """RETFound MAE (`{'model': {...}}`, ViT-L/16, keys optionally under `backbone.`, MAE decoder included): the
    encoder, as RETFound's `main_finetune.py` takes it."""
    return mae_layout(strip(unwrap(obj), "backbone."), model)


def clip_layout(obj: Mapping, model: nn.Module) -> StateDict:
    """OpenAI / open_clip CLIP (`visual.conv1.weight`, `visual.transformer.resblocks.*`): the visual tower only,
    text tower and the `visual.proj` projection dropped (timm's `_convert_openai_clip`); else timm-native."""
    sd = unwrap(obj)
    if not any(k.startswith(("visual.", "module.visual.")) for k in sd):
        return timm_layout(sd, model)  # timm's own CLIP files (e.g. vit_base_patch16_clip_224.openai)
    return drop(checkpoint_filter_fn(sd, model), ("head.",))


def open_clip_timm_layout(obj: Mapping, model: nn.Module) -> StateDict:
    """open_clip model with a timm vision tower (BiomedCLIP's `open_clip_pytorch_model.bin`): `visual.trunk.*` is a
    timm ViT; the projection `visual.head.*`, the text tower `text.*` and `logit_scale` are dropped."""
    sd = strip(unwrap(obj), "module.")
    trunk = {k[len("visual.trunk.") :]: v for k, v in sd.items() if k.startswith("visual.trunk.")}
    if not trunk:
        raise KeyError(f"no visual.trunk.* keys (an open_clip timm vision tower); the file has {first_keys(sd)}")
    return drop(checkpoint_filter_fn(trunk, model), ("head.",))


def hf_dinov2_layout(obj: Mapping, model: nn.Module) -> StateDict:
    """Hugging Face `transformers` Dinov2Model (RAD-DINO's `model.safetensors`): `embeddings.*`,
    `encoder.layer.N.attention.attention.{query,key,value}` (fused into timm's `attn.qkv`),
    `attention.output.dense`, `layer_scale{1,2}.lambda1`, `layernorm`; `mask_token` dropped. transformers 5's
    in-memory names (`attention.{q,k,v,o}_proj`; its `save_pretrained` writes the names above) are read too. A file
    in the DINOv2 code's own layout (`blocks.0.ls1.gamma`) goes through `dinov2_layout`."""
    sd = strip(unwrap(obj), "dinov2.")
    if not any(k.startswith(("embeddings.", "encoder.layer.")) for k in sd):
        if any(k.startswith(SAM_PARTS) for k in sd):
            raise KeyError(f"SAM keys ({first_keys(k for k in sd if k.startswith(SAM_PARTS))}): a SAM / MedSAM "
                           "file, not a DINOv2 model")
        return dinov2_layout(sd, model)
    sd = drop(sd, ("embeddings.mask_token", "classifier.", "pooler."))
    renames = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
               "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
               "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
               "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    layer_renames = (("attention.output.dense.", "attn.proj."), ("attention.o_proj.", "attn.proj."),
                     ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"))
    qkv_names = {"query": "query", "key": "key", "value": "value", "q": "query", "k": "key", "v": "value"}
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", k)
        if m is None:
            out[renames.get(k, k)] = v  # unknown keys stay as they are: the strict check names them
            continue
        i, rest = m.groups()
        a = re.fullmatch(r"attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)", rest)
        if a is not None:
            qkv.setdefault((i, a.group(3)), {})[qkv_names[a.group(1) or a.group(2)]] = v
            continue
        for old, new in layer_renames:
            rest = rest.replace(old, new)
        out[f"blocks.{i}.{rest}"] = v
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            raise KeyError(f"encoder.layer.{i}.attention.attention.*.{kind}: needs query, key and value, "
                           f"the file has {sorted(parts)}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return drop(checkpoint_filter_fn(out, model), ("head.",))


# --- SAM image encoders (timm VisionTransformerSAM) --------------------------------------------------------------
def _sam_encoder(sd: Mapping, model: nn.Module) -> StateDict:
    """`image_encoder.*` keys through timm's SAM filter (prefix removed, `mlp.lin1/2` -> `mlp.fc1/2`, the rest
    of SAM dropped), then position tables resampled to the model's input size."""
    return fit_sam_geometry(tsam.checkpoint_filter_fn(dict(sd), model), model)


def _bare_encoder(sd: Mapping, model: nn.Module) -> StateDict:
    """A bare image-encoder state dict (keys without `image_encoder.`) through the same path; a dict that is no
    SAM encoder at all is returned unchanged for the strict check to name its keys."""
    if "patch_embed.proj.weight" not in sd:
        return dict(sd)
    return _sam_encoder({f"image_encoder.{k}": v for k, v in sd.items()}, model)


def sam_layout(obj: Mapping, model: nn.Module) -> StateDict:
    """A whole SAM state dict (`sam_vit_b_01ec64.pth`, MedSAM's `medsam_vit_b.pth`): its `image_encoder.*`;
    `prompt_encoder.*` and `mask_decoder.*` are dropped. A bare image-encoder state dict is taken as well."""
    sd = strip(unwrap(obj), "module.")
    if not any(k.startswith("image_encoder.") for k in sd):
        others = [k for k in sd if k.startswith(SAM_PARTS)]
        if others:
            raise KeyError(f"no image encoder (image_encoder.*) in this file, only {first_keys(others)}: a mask "
                           "decoder / prompt encoder file holds no encoder weights")
        return _bare_encoder(sd, model)
    return _sam_encoder(sd, model)


def lvmmed_layout(obj: Mapping, model: nn.Module) -> StateDict:
    """LVM-Med's released ViT-B (`lvmmed_vit.pth`, earlier `vit_b_largescale_dim256.pth`): a bare SAM
    `ImageEncoderViT` state dict with no `pos_embed` (LVM-Med builds it with `use_abs_pos=False` and loads it
    strictly, `segment_anything/our_vit.py`)."""
    sd = strip(unwrap(obj), "module.")
    whole = [k for k in sd if k.startswith(SAM_PARTS)]
    if whole:
        raise KeyError(f"a whole SAM state dict ({first_keys(whole)}): SAM / MedSAM weights, not LVM-Med's bare "
                       "encoder file (no image_encoder. prefix, no pos_embed); use sam_vitb16 or medsam_vitb16")
    return _bare_encoder(sd, model)


LAYOUTS: dict[str, Callable[[Mapping, nn.Module], StateDict]] = {
    "timm": timm_layout,
    "dinov2": dinov2_layout,
    "mocov3": mocov3_layout,
    "mae": mae_layout,
    "retfound": retfound_layout,
    "clip": clip_layout,
    "open_clip_timm": open_clip_timm_layout,
    "hf_dinov2": hf_dinov2_layout,
    "sam": sam_layout,
    "lvmmed": lvmmed_layout,
}
