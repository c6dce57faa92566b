"""What every grounding model returns, and how its parameters are counted."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Output:
    """A grounding model's prediction.

    boxes: (B, 4) cxcywh, normalised to [0, 1] by the (square, padded) input size.
    aux:   extra tensors a method's losses or plots need (attention maps, projected features, ...).
    """

    boxes: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


def describe(model: nn.Module) -> dict:
    """Parameter counts: `total`, `trainable`, and `parts` {child name: {total, trainable}} per direct child.

    Shared parameters (tied weights) are counted once, as `model.parameters()` does.
    """
    seen: set[int] = set()

    def count(module: nn.Module) -> tuple[int, int]:
        total = trainable = 0
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return total, trainable

    parts: dict[str, dict[str, int]] = {}
    for name, child in model.named_children():
        t, tr = count(child)
        parts[name] = {"total": t, "trainable": tr}
    # Parameters held directly by the model (not in any listed child).
    t, tr = count(model)
    if t:
        parts["(own)"] = {"total": t, "trainable": tr}
    total = sum(p["total"] for p in parts.values())
    trainable = sum(p["trainable"] for p in parts.values())
    return {"total": total, "trainable": trainable, "parts": parts}
