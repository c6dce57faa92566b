"""The one record every data source yields: an image, an expression and the box it refers to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Sample:
    """A referring-expression sample before any transform.

    image:     (3, H, W) uint8.
    text:      the referring expression.
    box_xyxy:  (4,) float32, pixels, x1 y1 x2 y2 of the referred object.
    mask:      (H, W) bool pixels of the referred object, when the source has masks (SynthRef does).
    source:    where the sample came from, for error messages ("synthref:train:12", "unc/unc_val.pth[3]").
    family:    expression family ("attribute", "relation", "position", "comparative") when known.
    scene:     the symbolic scene (SynthRef only).
    """

    image: torch.Tensor
    text: str
    box_xyxy: torch.Tensor
    mask: torch.Tensor | None = None
    source: str = ""
    family: str | None = None
    scene: Any = field(default=None, compare=False)
