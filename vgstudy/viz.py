"""Plots: images with their expression, the ground-truth box and a prediction."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle

GT_COLOUR = "#00d000"
PRED_COLOUR = "#ff2020"


def draw_box(ax, box_xyxy: Sequence[float], colour: str, label: str | None = None, linestyle: str = "-") -> None:
    """One box (pixels, x1 y1 x2 y2) on a matplotlib axis."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    ax.add_patch(
        Rectangle(
            (x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2, linestyle=linestyle, label=label
        )
    )


def show_sample(ax, image: torch.Tensor, text: str, gt_xyxy=None, pred_xyxy=None, title: str | None = None) -> None:
    """An image (3,H,W uint8 or float in [0,1]) with its expression, ground truth (green), prediction (red)."""
    img = image.detach().cpu()
    if img.dtype == torch.uint8:
        img = img.float() / 255
    ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy())
    if gt_xyxy is not None:
        draw_box(ax, gt_xyxy, GT_COLOUR, "ground truth")
    if pred_xyxy is not None:
        draw_box(ax, pred_xyxy, PRED_COLOUR, "prediction", linestyle="--")
    caption = "\n".join(textwrap.wrap(f'"{text}"', 28))
    ax.set_title(caption if title is None else f"{title}\n{caption}", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def sample_grid(
    samples: Sequence,
    preds_xyxy: Sequence | None = None,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    size: float = 2.4,
):
    """A grid of `Sample`s (ground truth green, optional predictions red); returns the figure."""
    n = len(samples)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * (size + 0.5)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        s = samples[i]
        show_sample(
            ax,
            s.image,
            s.text,
            s.box_xyxy,
            None if preds_xyxy is None else preds_xyxy[i],
            None if titles is None else titles[i],
        )
    fig.tight_layout()
    return fig
