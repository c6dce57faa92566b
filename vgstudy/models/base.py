"""What every grounding model returns, and how its parameters are counted."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vgstudy.errors import DataError


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


def check_inputs(
    method: str,
    image_size: int,
    images: torch.Tensor,
    texts,
    valid: torch.Tensor | None,
    *,
    token_batch: bool = False,
) -> None:
    """A DataError naming what is wrong unless images are (B, 3, S, S) at the model's `image_size`, texts are B
    strings (or, with token_batch=True, a TokenBatch of B rows) and valid is None or (B, S, S) bool."""
    size = image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise DataError(
            f"{method} images of shape {tuple(images.shape)}: expected (B, 3, {size}, {size}), images through the "
            "model's transform (vgstudy.data.GroundingTransform(model.transform))"
        )
    rows = texts.ids if token_batch and hasattr(texts, "ids") else texts
    if isinstance(rows, str) or not hasattr(rows, "__len__") or len(rows) != len(images):
        raise DataError(f"{method} texts: expected a list of {len(images)} strings, one per image, got {texts!r}")
    if valid is not None and tuple(valid.shape) != (len(images), size, size):
        raise DataError(
            f"{method} valid of shape {tuple(valid.shape)}: expected ({len(images)}, {size}, {size}) bool, True on "
            "image pixels"
        )
