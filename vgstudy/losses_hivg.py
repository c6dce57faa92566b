"""HiVG's losses (the release's `utils/loss_utils.py:trans_vg_loss`): the box terms plus three auxiliary objectives.

    loss = 2 L1 + 2 GIoU                                  on the box (`vgstudy.losses.box_losses`)
         + 1 contrastive                                  CLIP's symmetric cross-entropy over the batch's image-text
                                                          logits (matching pairs on the diagonal)
         + 20 focal + 2 dice  (patch-text alignment)      patch-text logits vs the target mask at the patch grid
         + 20 focal + 2 dice  (mask)                      mask logits, bilinearly resized to the image, vs the mask

Focal: RetinaNet's sigmoid focal loss (alpha 0.25, gamma 2), averaged over pixels and samples; dice: 1 - (2 |P T| +
1) / (|P| + |T| + 1) with P the sigmoid of the logits, averaged over samples. The alignment target is the mask
resized to the patch grid (nearest, > 0.5). Both mask-based objectives need `batch["masks"]` (SynthRef has them) and
are skipped when it is None. A weight of 0 switches a term off (the auxiliary ones are then not computed).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from vgstudy.errors import ConfigError
from vgstudy.losses import box_losses
from vgstudy.models.base import Output


def contrastive_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's loss on (B, B) text-to-image logits: mean of the text->image and image->text cross-entropies."""
    targets = torch.arange(len(logits_per_text), device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, targets) + F.cross_entropy(logits_per_text.t(), targets)) / 2


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft dice loss between (B, ...) logits and binary targets, averaged over the batch."""
    probabilities = logits.sigmoid().flatten(1)
    targets = targets.flatten(1).float()
    overlap = 2 * (probabilities * targets).sum(dim=1)
    return (1 - (overlap + 1) / (probabilities.sum(dim=1) + targets.sum(dim=1) + 1)).mean()


def focal_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """torchvision's sigmoid focal loss (alpha 0.25, gamma 2) averaged over every element."""
    return sigmoid_focal_loss(logits, targets.float(), alpha=0.25, gamma=2.0, reduction="mean")


@dataclass(frozen=True)
class HiVGCriterion:
    """`criterion(output, batch) -> {"loss", and each computed term, unweighted}` with the release's weights.

    A weight of 0 takes a term out of the loss (and the auxiliary terms out of the computation); at least one
    weight must be positive. The patch-text and mask terms read
    output.aux["patch_text_logits"] / ["mask_logits"] (models built with auxiliary heads) and batch["masks"]
    ((B, S, S) bool), and are skipped when batch["masks"] is None.
    """

    l1_weight: float = 2.0
    giou_weight: float = 2.0
    contrastive_weight: float = 1.0
    align_focal_weight: float = 20.0
    align_dice_weight: float = 2.0
    mask_focal_weight: float = 20.0
    mask_dice_weight: float = 2.0

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"HiVGCriterion.{field.name}={value!r}: expected a number >= 0")
        if not any(getattr(self, field.name) for field in fields(self)):
            raise ConfigError("HiVGCriterion: every weight is 0; expected at least one term in the loss")

    def __call__(self, output: Output, batch: dict) -> dict[str, torch.Tensor]:
        weights = {
            "l1": self.l1_weight,
            "giou": self.giou_weight,
            "contrastive": self.contrastive_weight,
            "align_focal": self.align_focal_weight,
            "align_dice": self.align_dice_weight,
            "mask_focal": self.mask_focal_weight,
            "mask_dice": self.mask_dice_weight,
        }
        terms = box_losses(output.boxes.float(), batch["boxes_cxcywh"].float())
        if self.contrastive_weight:
            terms["contrastive"] = contrastive_loss(self._aux(output, "logits_per_text").float())
        masks = batch.get("masks")
        if masks is not None and (self.align_focal_weight or self.align_dice_weight):
            logits = self._aux(output, "patch_text_logits").float()  # (B, N)
            side = round(logits.shape[1] ** 0.5)
            # the target at the patch grid: nearest cell, as the release resizes it
            targets = F.interpolate(masks[:, None].float(), size=(side, side), mode="nearest")[:, 0] > 0.5
            targets = targets.flatten(1)  # (B, N)
            if self.align_focal_weight:
                terms["align_focal"] = focal_loss(logits, targets)
            if self.align_dice_weight:
                terms["align_dice"] = dice_loss(logits, targets)
        if masks is not None and (self.mask_focal_weight or self.mask_dice_weight):
            logits = self._aux(output, "mask_logits").float()  # (B, 8h, 8w)
            logits = F.interpolate(logits[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            if self.mask_focal_weight:
                terms["mask_focal"] = focal_loss(logits, masks)
            if self.mask_dice_weight:
                terms["mask_dice"] = dice_loss(logits, masks)
        # started from a zero tensor: without masks, the weighted terms may all be auxiliary ones that were skipped
        terms["loss"] = sum(
            (weights[name] * value for name, value in terms.items() if weights[name]), output.boxes.new_zeros(())
        )
        return terms

    @staticmethod
    def _aux(output: Output, key: str) -> torch.Tensor:
        if key not in output.aux:
            raise ConfigError(
                f"HiVGCriterion needs output.aux[{key!r}], which this model does not give (a HiVG built with "
                "auxiliary_heads=False?); expected a weight of 0 for the terms that read it"
            )
        return output.aux[key]
