"""Build a frozen expert by name, from an official pre-trained checkpoint file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import timm
from timm.models.vision_transformer import VisionTransformer

from medpmoe.experts.base import CLIP_MEAN_STD, IMAGENET_MEAN_STD, Expert, Preprocessing
from medpmoe.experts.checkpoints import ExpertCheckpointError, load_pretrained
from medpmoe.experts.frozen_vit import FrozenViTExpert, tiny_vit_expert
from medpmoe.experts.sam import SamExpert, create_sam_vit, tiny_sam_expert

RAD_DINO_MEAN_STD = ((0.5307, 0.5307, 0.5307), (0.2583, 0.2583, 0.2583))  # microsoft/rad-dino preprocessor_config
UNIT_MEAN_STD = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # MedSAM feeds [0, 1] images to its encoder unnormalised


@dataclass(frozen=True)
class AuthorsInput:
    """An expert's input preparation as its authors' code does it (`build_expert(..., preprocessing="authors")`)."""

    size: int  #: input size (the longest side for `resize="longest_side"`)
    preprocessing: Preprocessing
    source: str  #: where it is from (docs/experts.md repeats it)


#: resize with the bicubic, antialiased PIL/torchvision resize of the authors' eval transforms
_BICUBIC = Preprocessing(interpolation="bicubic", antialias=True)
_VIT_224 = AuthorsInput(224, _BICUBIC, "eval transform: bicubic resize (+ centre crop) to 224")
_SAM_1024 = AuthorsInput(1024, Preprocessing(resize="longest_side", antialias=True),
                         "segment-anything ResizeLongestSide(1024) then Sam.preprocess: normalise, pad to 1024x1024")


@dataclass(frozen=True)
class ExpertSpec:
    """How to build one named expert: timm architecture, family, checkpoint layout, mean/std, sizes, pooling."""

    arch: str
    layout: str
    mean_std: tuple[Sequence[float], Sequence[float]] = IMAGENET_MEAN_STD
    img_size: int = 224  #: default input size (what the expert resizes images to)
    pooling: str = "cls"
    arch_kwargs: Mapping = field(default_factory=dict)
    family: str = "vit"  #: "vit" (timm VisionTransformer, FrozenViTExpert) or "sam" (VisionTransformerSAM, SamExpert)
    native_size: int = 224  #: the resolution the weights were trained at (docs; position tables are resampled)
    #: run-time position interpolation as the authors' code ("dinov2", "hf"; `medpmoe.experts.positions`), or None:
    #: the table is resampled once at load (timm)
    pos_interpolation: str | None = None
    authors: AuthorsInput = _VIT_224  #: the authors' input preparation (`preprocessing="authors"`)


_SAM_B = "samvit_base_patch16"
_DINOV2 = {"native_size": 518, "pos_interpolation": "dinov2",  # the DINOv2 code's run-time interpolation
           "authors": AuthorsInput(224, _BICUBIC, "dinov2 eval transform: bicubic resize 256, centre crop 224")}
EXPERTS: dict[str, ExpertSpec] = {
    "dinov2_vits14": ExpertSpec("vit_small_patch14_dinov2", "dinov2", **_DINOV2),
    "dinov2_vitb14": ExpertSpec("vit_base_patch14_dinov2", "dinov2", **_DINOV2),
    "dinov2_vits14_reg": ExpertSpec("vit_small_patch14_reg4_dinov2", "dinov2", **_DINOV2),
    "dinov2_vitb14_reg": ExpertSpec("vit_base_patch14_reg4_dinov2", "dinov2", **_DINOV2),
    "mocov3_vitb16": ExpertSpec("vit_base_patch16_224", "mocov3"),
    "mae_vitb16": ExpertSpec("vit_base_patch16_224", "mae", pooling="mean"),
    "clip_vitb16": ExpertSpec("vit_base_patch16_clip_quickgelu_224", "clip", mean_std=CLIP_MEAN_STD),
    "clip_vitb16_gelu": ExpertSpec("vit_base_patch16_clip_224", "clip", mean_std=CLIP_MEAN_STD),
    # SAM-family image encoders (windowed attention, relative positions, conv neck; 1024 px native)
    "lvmmed_vitb16": ExpertSpec(_SAM_B, "lvmmed", pooling="mean", arch_kwargs={"use_abs_pos": False}, family="sam",
                                native_size=1024, authors=_SAM_1024),
    "medsam_vitb16": ExpertSpec(_SAM_B, "sam", mean_std=UNIT_MEAN_STD, pooling="mean", family="sam",
                                native_size=1024, authors=AuthorsInput(
                                    1024, Preprocessing(interpolation="bicubic", antialias=True, minmax=True),
                                    "MedSAM_Inference.py: resize to 1024x1024 (order 3, anti-aliased), per-image "
                                    "min-max to [0, 1], no mean/std")),
    "sam_vitb16": ExpertSpec(_SAM_B, "sam", pooling="mean", family="sam", native_size=1024, authors=_SAM_1024),
    # medical ViTs
    "raddino_vitb14": ExpertSpec("vit_base_patch14_dinov2", "hf_dinov2", mean_std=RAD_DINO_MEAN_STD, native_size=518,
                                 pos_interpolation="hf", authors=AuthorsInput(
                                     518, _BICUBIC, "model card preprocessor_config.json: bicubic resize, centre "
                                     "crop 518")),
    "biomedclip_vitb16": ExpertSpec("vit_base_patch16_224", "open_clip_timm", mean_std=CLIP_MEAN_STD),
    "retfound_vitl16": ExpertSpec("vit_large_patch16_224", "retfound", pooling="mean"),
    "uni_vitl16": ExpertSpec("vit_large_patch16_224", "timm", arch_kwargs={"init_values": 1e-5}),
}


def own_expert_spec(checkpoint: str | Path | None) -> ExpertSpec | None:
    """The spec a pretrained expert's record gives (`python -m medpmoe.pretrain` writes `<file>.json` beside the
    file: architecture, input size, the data's mean/std), or None when the file has no such record."""
    if checkpoint is None or isinstance(checkpoint, (bytes, bytearray)):
        return None
    from medpmoe.pretrain.record import read_record

    rec = read_record(checkpoint)
    if rec is None:
        return None
    return ExpertSpec(rec["arch"], "timm", mean_std=(tuple(rec["mean"]), tuple(rec["std"])),
                      img_size=int(rec["img_size"]), pooling=rec.get("pooling", "cls"),
                      arch_kwargs=dict(rec.get("arch_kwargs") or {}), native_size=int(rec["img_size"]))


def expert_spec(name: str, checkpoint: str | Path | None = None) -> ExpertSpec:
    """The spec for a file with a pretraining record beside it (any `name`), a registered name, or a timm ViT /
    SAM-ViT name (timm layout, mean/std from timm's config)."""
    own = own_expert_spec(checkpoint)
    if own is not None:
        return own
    if name in EXPERTS:
        return EXPERTS[name]
    arch = name.split(".")[0]
    if arch not in timm.list_models(["vit_*", "samvit_*"]):
        raise KeyError(f"unknown expert {name!r}: use one of {sorted(EXPERTS)}, 'tiny*', 'tiny_sam*', or a timm "
                       "vit_* / samvit_* name")
    cfg = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(arch)
    mean_std = (tuple(cfg.mean), tuple(cfg.std)) if cfg is not None and cfg.mean else IMAGENET_MEAN_STD
    if arch.startswith("samvit_"):
        return ExpertSpec(name, "sam", mean_std=mean_std, pooling="mean", family="sam", native_size=1024,
                          authors=_SAM_1024)
    return ExpertSpec(name, "timm", mean_std=mean_std)


def _tiny(name: str, img_size: int | None, pooling: str | None, features: str | None, kwargs: dict) -> Expert:
    if img_size is not None:
        kwargs["img_size"] = img_size
    if pooling is not None:
        kwargs["pooling"] = pooling
    if name.startswith("tiny_sam"):
        if features is not None:
            kwargs["features"] = features
        return tiny_sam_expert(name=name, **kwargs)
    if features is not None:
        raise ValueError(f"expert {name!r}: `features` applies to SAM-family experts only")
    return tiny_vit_expert(name=name, **kwargs)


def build_expert(
    name: str,
    checkpoint: str | Path | None = None,
    img_size: int | None = None,
    pooling: str | None = None,
    mean_std: tuple[Sequence[float], Sequence[float]] | None = None,
    arch_overrides: Mapping | None = None,
    random_init: bool = False,
    features: str | None = None,
    preprocessing: str | Mapping = "default",
    **kwargs,
) -> Expert:
    """Build the expert `name` ('tiny*', 'tiny_sam*', a registered name, or a timm ViT / SAM-ViT name) and load
    `checkpoint` strictly. A checkpoint written by `python -m medpmoe.pretrain` brings its own architecture, size
    and mean/std in the record beside it (`expert.json`), whatever `name` (not 'tiny*') says.

    `img_size` sets the input size the expert resizes images to (position tables are resampled to its grid);
    `arch_overrides` changes the timm architecture (tiny variants in tests); `random_init=True` allows no
    checkpoint; `features` ('neck' or 'blocks') picks a SAM-family expert's output tokens. The file's sha256 is
    kept as `expert.checkpoint_sha256` (None without a file).

    `preprocessing`: `"default"` (square bilinear resize to `img_size`, default 224, the spec's mean/std),
    `"authors"` (the expert's authors' input size and preparation, `ExpertSpec.authors`: e.g. SAM's longest side to
    1024 and padding, MedSAM's per-image min-max, RAD-DINO's 518 px; `img_size` still overrides the size), or a
    dict of `Preprocessing` fields. See docs/experts.md for each expert's two settings and why the default is one.
    """
    if name.startswith("tiny"):
        if preprocessing == "authors":
            raise ValueError(f"expert {name!r}: tiny test experts have no authors' preprocessing")
        if preprocessing != "default":
            kwargs["preprocessing"] = resolve_preprocessing(preprocessing, None, name)
        return _tiny(name, img_size, pooling, features, kwargs)
    spec = expert_spec(name, checkpoint)
    if checkpoint is None and not random_init:
        raise ExpertCheckpointError(f"expert {name!r} needs a checkpoint file (or random_init=True for smoke tests)")
    prep = resolve_preprocessing(preprocessing, spec, name)
    default_size = spec.authors.size if preprocessing == "authors" else spec.img_size
    size = int(img_size or default_size)
    overrides = dict(spec.arch_kwargs, **dict(arch_overrides or {}), **kwargs)
    if spec.family == "sam":
        vit = create_sam_vit(spec.arch, size, **overrides)
    else:
        if features is not None:
            raise ValueError(f"expert {name!r}: `features` applies to SAM-family experts only")
        vit = timm.create_model(spec.arch, pretrained=False, img_size=size, num_classes=0, **overrides)
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"expert {name!r}: timm model {spec.arch!r} is not a plain VisionTransformer")
    keep = spec.pos_interpolation is not None
    sha = None if checkpoint is None else load_pretrained(vit, checkpoint, spec.layout, name, keep_table_grid=keep)
    mean_std = mean_std or spec.mean_std
    expert: Expert
    if spec.family == "sam":
        expert = SamExpert(vit, name=name, mean_std=mean_std, img_size=size, pooling=pooling or spec.pooling,
                           features=features or "neck", preprocessing=prep)
    else:
        pooling = pooling or (spec.pooling if vit.has_class_token else "mean")
        expert = FrozenViTExpert(vit, name=name, mean_std=mean_std, img_size=size, pooling=pooling,
                                 pos_interpolation=spec.pos_interpolation, preprocessing=prep)
    expert.checkpoint_sha256 = sha
    expert.checkpoint_path = None if checkpoint is None else str(checkpoint)
    return expert


def resolve_preprocessing(value: str | Mapping, spec: ExpertSpec | None, name: str) -> Preprocessing:
    """`build_expert`'s `preprocessing` ("default", "authors" or a dict of `Preprocessing` fields) as a
    `Preprocessing`; a bad value names the expert."""
    if value == "default":
        return Preprocessing()
    if value == "authors" and spec is not None:
        return spec.authors.preprocessing
    if isinstance(value, Mapping):
        try:
            return Preprocessing(**value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"expert {name!r}: preprocessing {dict(value)}: {e}") from None
    raise ValueError(f"expert {name!r}: preprocessing must be 'default', 'authors' or a dict of "
                     f"{list(Preprocessing.__dataclass_fields__)}, got {value!r}")
