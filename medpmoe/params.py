"""Trainable-parameter accounting per component and as a multiple of one backbone."""

from __future__ import annotations

from torch import nn


def parameter_report(model: nn.Module) -> dict:
    """Trainable parameters per top-level component (and per sub-component), the backbone size and multiples;
    for a PMoEModel also each expert's prompt blocks (`prompt_layers`) and the factory's `notices`.

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
        report["prompt_layers"] = [{"expert": e.name, "depth": e.depth, "blocks": list(b)}
                                   for e, b in zip(experts, blocks)]
    if getattr(model, "notices", None):
        report["notices"] = list(model.notices)
    return report


def format_parameter_report(report: dict) -> str:
    """Human-readable table of `parameter_report` output."""
    lines = ["trainable parameters:"]
    for k, v in sorted(report["components"].items()):
        lines.append(f"  {k:<32} {v:>12,d}")
    lines.append(f"  {'total trainable':<32} {report['trainable']:>12,d}")
    if report.get("prompt_layers"):
        per = "; ".join(f"{p['expert']} blocks {p['blocks']} of {p['depth']}" for p in report["prompt_layers"])
        lines.append(f"  prompt layers per expert: {per}")
    lines += [f"  notice: {n}" for n in report.get("notices", [])]
    lines.append(
        f"  one backbone {report['one_backbone']:,d}; trainable = {100 * report['multiple_of_backbone']:.3f}% of it; "
        f"total params {report['total_multiple']:.3f}X"
    )
    return "\n".join(lines)
