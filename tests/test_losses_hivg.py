"""HiVG's losses: each term zero where the prediction is right, positive where it is wrong, and switchable."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vgstudy.errors import ConfigError
from vgstudy.losses_hivg import HiVGCriterion, contrastive_loss, dice_loss, focal_loss
from vgstudy.models.base import Output

BIG = 30.0  # a logit far enough from 0 that sigmoid / softmax are 0 or 1 in float32


def perfect_output_and_batch(masks: bool = True) -> tuple[Output, dict]:
    """A prediction that is right on every term: the box, the pairing, the patches and the mask."""
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.75, 0.5, 0.5]])
    target = torch.zeros(2, 16, 16, dtype=torch.bool)  # masks at 16 px: the box, 2 x 2 patches of 8 px
    target[0, 4:12, 4:12] = True
    target[1, 8:16, 0:8] = True
    patches = torch.nn.functional.interpolate(target[:, None].float(), size=(2, 2), mode="nearest")[:, 0] > 0.5
    aux = {
        "logits_per_text": torch.eye(2) * 2 * BIG - BIG,
        "patch_text_logits": torch.where(patches.flatten(1), BIG, -BIG),
        "mask_logits": torch.where(target, BIG, -BIG),  # (B, 8h, 8w) = the mask's size here
    }
    batch = {"boxes_cxcywh": boxes.clone(), "masks": target if masks else None}
    return Output(boxes=boxes, aux=aux), batch


def test_every_term_is_zero_for_a_perfect_prediction():
    output, batch = perfect_output_and_batch()
    terms = HiVGCriterion()(output, batch)
    assert set(terms) == {"l1", "giou", "contrastive", "align_focal", "align_dice", "mask_focal", "mask_dice", "loss"}
    for name, value in terms.items():
        assert float(value) == pytest.approx(0.0, abs=1e-6), name


def test_every_term_is_positive_for_a_wrong_prediction():
    output, batch = perfect_output_and_batch()
    wrong = Output(
        boxes=output.boxes.flip(0),
        aux={key: -value for key, value in output.aux.items()},  # the pairs swapped, masks inverted
    )
    terms = HiVGCriterion()(wrong, batch)
    for name, value in terms.items():
        assert float(value) > 0.1, name
    weights = {
        "l1": 2,
        "giou": 2,
        "contrastive": 1,
        "align_focal": 20,
        "align_dice": 2,
        "mask_focal": 20,
        "mask_dice": 2,
    }
    assert float(terms["loss"]) == pytest.approx(sum(w * float(terms[name]) for name, w in weights.items()))


def test_without_masks_the_mask_terms_are_skipped():
    output, batch = perfect_output_and_batch(masks=False)
    assert set(HiVGCriterion()(output, batch)) == {"l1", "giou", "contrastive", "loss"}


def test_a_zero_weight_switches_a_term_off():
    output, batch = perfect_output_and_batch()
    criterion = HiVGCriterion(contrastive_weight=0, mask_focal_weight=0, mask_dice_weight=0)
    assert set(criterion(output, batch)) == {"l1", "giou", "align_focal", "align_dice", "loss"}
    del output.aux["mask_logits"]  # not read when its terms are off
    criterion(output, batch)


def test_a_term_that_needs_a_missing_output_is_a_config_error():
    output, batch = perfect_output_and_batch()
    del output.aux["patch_text_logits"]
    with pytest.raises(ConfigError, match="patch_text_logits"):
        HiVGCriterion()(output, batch)


@pytest.mark.parametrize(
    ("weights", "message"),
    [({"l1_weight": -1.0}, "l1_weight=-1.0"), ({"giou_weight": "2"}, "giou_weight='2'")],
)
def test_bad_weights_are_config_errors(weights, message):
    with pytest.raises(ConfigError, match=message):
        HiVGCriterion(**weights)
    with pytest.raises(ConfigError, match="every weight is 0"):
        HiVGCriterion(0, 0, 0, 0, 0, 0, 0)


def test_the_contrastive_loss_is_clips():
    assert float(contrastive_loss(torch.zeros(4, 4))) == pytest.approx(math.log(4))  # no preference: chance
    assert float(contrastive_loss(torch.zeros(1, 1))) == 0.0  # one pair: nothing to contrast
    logits = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    assert float(contrastive_loss(logits)) == pytest.approx(float(contrastive_loss(logits.t())))  # symmetric


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_focal_and_dice_are_non_negative_and_smallest_at_the_target(batch, n, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(batch, n, generator=generator)
    targets = torch.rand(batch, n, generator=generator) > 0.5
    perfect = torch.where(targets, BIG, -BIG)
    for loss in (focal_loss, dice_loss):
        value = float(loss(logits, targets))
        assert value >= 0.0
        assert float(loss(perfect, targets)) <= value + 1e-6
    assert float(dice_loss(logits, targets)) <= 1.0
