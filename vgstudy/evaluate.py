"""Accuracy of predicted boxes, the trivial baselines that give every accuracy its floor.

REC is scored per sample: a prediction counts as correct when its IoU with the ground-truth box reaches a threshold
(Acc@0.5 is the metric of every paper here). IoU does not change under a common scaling of both boxes, so boxes
normalised by the padded square input give the same accuracy as pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import box_convert, box_iou

from vgstudy.data.sample import Sample


def cxcywh_to_xyxy(boxes_cxcywh: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre-size boxes -> corner boxes, in the same units."""
    return box_convert(boxes_cxcywh, "cxcywh", "xyxy")


def xyxy_to_cxcywh(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """(..., 4) corner boxes -> centre-size boxes, in the same units."""
    return box_convert(boxes_xyxy, "xyxy", "cxcywh")


def paired_iou(boxes_a_xyxy: torch.Tensor, boxes_b_xyxy: torch.Tensor) -> torch.Tensor:
    """IoU of box i of `a` with box i of `b`: (N, 4), (N, 4) -> (N,)."""
    if boxes_a_xyxy.shape != boxes_b_xyxy.shape:
        raise ValueError(
            f"paired_iou needs two (N, 4) tensors of one shape, got {tuple(boxes_a_xyxy.shape)} "
            f"and {tuple(boxes_b_xyxy.shape)}"
        )
    if len(boxes_a_xyxy) == 0:
        return boxes_a_xyxy.new_zeros(0)
    # The diagonal of the pairwise matrix; N is a batch, so N x N stays small.
    return box_iou(boxes_a_xyxy.float(), boxes_b_xyxy.float()).diagonal()


def box_metrics(pred_xyxy: torch.Tensor, target_xyxy: torch.Tensor) -> dict[str, float]:
    """Acc@0.5, Acc@0.75 (in %) and mean IoU of paired boxes (same units, x1y1x2y2)."""
    iou = paired_iou(pred_xyxy, target_xyxy)
    n = len(iou)
    if n == 0:
        return {"acc50": float("nan"), "acc75": float("nan"), "miou": float("nan"), "n": 0}
    return {
        "acc50": 100.0 * (iou >= 0.5).float().mean().item(),
        "acc75": 100.0 * (iou >= 0.75).float().mean().item(),
        "miou": iou.mean().item(),
        "n": n,
    }


@torch.no_grad()
def predict_boxes(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    collate_fn: Callable,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> dict[str, torch.Tensor | list]:
    """Run `model` over a transformed data set: {"pred_cxcywh", "target_cxcywh" (N, 4) normalised, "families"}."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=num_workers)
    preds, targets, families = [], [], []
    for batch in loader:
        out = model(batch["images"].to(device), batch["texts"])
        preds.append(out.boxes.float().cpu())
        targets.append(batch["boxes_cxcywh"].float())
        families.extend(batch.get("families") or [None] * len(batch["texts"]))
    model.train(was_training)
    return {"pred_cxcywh": torch.cat(preds), "target_cxcywh": torch.cat(targets), "families": families}


def evaluate_model(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    collate_fn: Callable,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> dict[str, float]:
    """Acc@0.5 / Acc@0.75 (%), mean IoU and n of `model` on one split (items as made by a GroundingTransform)."""
    pred = predict_boxes(
        model, dataset, collate_fn=collate_fn, batch_size=batch_size, device=device, num_workers=num_workers
    )
    return box_metrics(cxcywh_to_xyxy(pred["pred_cxcywh"]), cxcywh_to_xyxy(pred["target_cxcywh"]))


def metrics_by_family(
    pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor, families: Iterable[str | None]
) -> dict[str, dict[str, float]]:
    """`box_metrics` per expression family (SynthRef's attribute / relation / position / comparative)."""
    families = list(families)
    out = {}
    for family in sorted({f for f in families if f is not None}):
        idx = torch.tensor([i for i, f in enumerate(families) if f == family])
        out[family] = box_metrics(cxcywh_to_xyxy(pred_cxcywh[idx]), cxcywh_to_xyxy(target_cxcywh[idx]))
    return out


# --- Trivial baselines: what a model gets without reading the expression (or the image) --------------------------


def _image_size(sample: Sample) -> tuple[int, int]:
    h, w = sample.image.shape[-2:]
    return int(h), int(w)


def centre_box(sample: Sample, rng: torch.Generator, fraction: float = 0.5) -> torch.Tensor:
    """A box of `fraction` x the image's width and height, centred: the guess of a model that sees nothing."""
    h, w = _image_size(sample)
    bw, bh = fraction * w, fraction * h
    return torch.tensor([(w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2])


def largest_object(sample: Sample, rng: torch.Generator) -> torch.Tensor:
    """The box of the scene's largest object: a model that finds objects but ignores the expression."""
    objects = sample.scene.objects
    areas = [(o.box_xyxy[2] - o.box_xyxy[0]) * (o.box_xyxy[3] - o.box_xyxy[1]) for o in objects]
    return torch.tensor(objects[max(range(len(objects)), key=areas.__getitem__)].box_xyxy, dtype=torch.float32)


def random_object(sample: Sample, rng: torch.Generator) -> torch.Tensor:
    """The box of a random object of the scene: chance level for a perfect detector that cannot read."""
    objects = sample.scene.objects
    i = int(torch.randint(len(objects), (1,), generator=rng))
    return torch.tensor(objects[i].box_xyxy, dtype=torch.float32)


def oracle_object_wrong_size(sample: Sample, rng: torch.Generator, scale: float = 2.0) -> torch.Tensor:
    """The right object's centre with its box scaled by `scale`: how strict Acc@0.5 is about box size."""
    cx, cy, w, h = xyxy_to_cxcywh(sample.box_xyxy.float()).tolist()
    return cxcywh_to_xyxy(torch.tensor([cx, cy, w * scale, h * scale]))


BASELINES: Mapping[str, Callable[[Sample, torch.Generator], torch.Tensor]] = {
    "centre box": centre_box,
    "largest object": largest_object,
    "random object": random_object,
    "oracle object, 2x box": oracle_object_wrong_size,
}
# The baselines that read every object of the scene (`sample.scene`, SynthRef only).
SCENE_BASELINES = frozenset({"largest object", "random object"})


def evaluate_baseline(baseline: str | Callable, samples: Iterable[Sample], seed: int = 0) -> dict[str, float]:
    """Score a trivial baseline (a name of `BASELINES` or a callable (sample, rng) -> box_xyxy pixels)."""
    fn = BASELINES[baseline] if isinstance(baseline, str) else baseline
    rng = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for sample in samples:
        preds.append(fn(sample, rng))
        targets.append(sample.box_xyxy.float())
    if not preds:
        return box_metrics(torch.zeros(0, 4), torch.zeros(0, 4))
    return box_metrics(torch.stack(preds), torch.stack(targets))
