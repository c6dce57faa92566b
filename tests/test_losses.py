import torch

from vgstudy.losses import BoxCriterion, box_losses
from vgstudy.models.base import Output


def test_losses_are_zero_for_perfect_boxes_and_positive_otherwise():
    target = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1]])
    zero = box_losses(target.clone(), target)
    assert zero["l1"].item() == 0.0 and abs(zero["giou"].item()) < 1e-4  # torchvision adds eps = 1e-7 to the areas
    off = box_losses(target + torch.tensor([0.1, 0.0, 0.0, 0.0]), target)
    # L1 is summed over the 4 coordinates and averaged over the batch.
    assert torch.isclose(off["l1"], torch.tensor(0.1))
    assert off["giou"].item() > 0


def test_criterion_weights_and_gradients():
    target = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    pred = torch.tensor([[0.4, 0.5, 0.3, 0.4]], requires_grad=True)
    batch = {"boxes_cxcywh": target}
    one = BoxCriterion()(Output(boxes=pred), batch)
    two = BoxCriterion(2.0, 2.0)(Output(boxes=pred), batch)
    assert torch.isclose(two["loss"], 2 * one["loss"])
    assert torch.isclose(one["loss"], one["l1"] + one["giou"])
    one["loss"].backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
