"""Box losses shared by every method: L1 on normalised (cx, cy, w, h) and generalised IoU.

Following TransVG's release: L1 is summed over the four coordinates and averaged over the batch; GIoU is averaged
over the batch. Methods add their own terms (HiVG's contrastive and segmentation losses, EpmVG-R's distillation) to
the dictionary this returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import generalized_box_iou_loss

from vgstudy.evaluate import cxcywh_to_xyxy
from vgstudy.models.base import Output


def box_losses(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"l1", "giou"} for (B, 4) normalised cxcywh boxes."""
    l1 = (pred_cxcywh - target_cxcywh).abs().sum(dim=-1).mean()
    giou = generalized_box_iou_loss(cxcywh_to_xyxy(pred_cxcywh), cxcywh_to_xyxy(target_cxcywh), reduction="mean")
    return {"l1": l1, "giou": giou}


@dataclass(frozen=True)
class BoxCriterion:
    """loss = l1_weight * L1 + giou_weight * GIoU (TransVG: 1 and 1; HiVG: 2 and 2)."""

    l1_weight: float = 1.0
    giou_weight: float = 1.0

    def __call__(self, output: Output, batch: dict) -> dict[str, torch.Tensor]:
        terms = box_losses(output.boxes.float(), batch["boxes_cxcywh"].float())
        terms["loss"] = self.l1_weight * terms["l1"] + self.giou_weight * terms["giou"]
        return terms
