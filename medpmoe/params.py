"""Trainable-parameter accounting per component and as a multiple of one backbone."""

from __future__ import annotations

from torch import nn


def parameter_report(model: nn.Module) -> dict:
    """Trainable parameters per top-level component (and per sub-component), the backbone size and multiples;
    for a PMoEModel also each expert's prompt blocks, input size and preprocessing (`experts`) and the factory's
    `notices` (e.g. an expert whose GaPT temperature is off).

    `multiple_of_backbone` is trainable / one backbone; `total_multiple` is the pMoE tables' per-task "Total
    Params", (one backbone + trainable) / one backbone, e.g. 1.04X (VPT's Table 1 instead sums over its tasks).
    """
    components: dict[str, int] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        key = parts[0] if parts[0] not in ("methods", "experts") else f"{parts[0]}.{parts[-1]}"
        components[key] = components.get(key, 0) + p.numel()
    trainable = sum(components.values())
    experts = getattr(model, "experts", None)
    backbone = experts[0].num_backbone_parameters() if experts else sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    report = {
        "components": components,
        "trainable": trainable,
        "frozen": frozen,
        "one_backbone": backbone,
        "multiple_of_backbone": trainable / backbone,
        "total_multiple": (backbone + trainable) / backbone,
    }
    blocks = getattr(model, "prompt_blocks", None)
    if experts is not None and blocks is not None:  # a PMoEModel: where each expert gets its prompts
        report["experts"] = [
            {"name": e.name, "depth": e.depth, "prompt_blocks": list(b), "img_size": e.img_size,
             "preprocessing": e.preprocessing.as_dict()}
            for e, b in zip(experts, blocks)
        ]
    if getattr(model, "notices", None):
        report["notices"] = list(model.notices)
    return report


def format_parameter_report(report: dict) -> str:
    """Human-readable table of `parameter_report` output."""
    lines = ["trainable parameters:"]
    for k, v in sorted(report["components"].items()):
        lines.append(f"  {k:<32} {v:>12,d}")
    lines.append(f"  {'total trainable':<32} {report['trainable']:>12,d}")
    for e in report.get("experts", []):
        p = e["preprocessing"]
        prep = f"{p['resize']} {p['interpolation']}" + (", per-image min-max" if p["minmax"] else "")
        lines.append(f"  expert {e['name']}: {len(e['prompt_blocks'])} prompt layers at blocks {e['prompt_blocks']} "
                     f"of {e['depth']}; input {e['img_size']} px ({prep})")
    lines += [f"  notice: {n}" for n in report.get("notices", [])]
    lines.append(
        f"  one backbone {report['one_backbone']:,d}; trainable = {100 * report['multiple_of_backbone']:.3f}% of it; "
        f"total params {report['total_multiple']:.3f}X"
    )
    return "\n".join(lines)
