"""A toy grounding model and data set for the trainer and checkpoint tests: a few thousand parameters, CPU-fast.

Each toy image is a dark square with one bright rectangle (the referred box) in the colour its expression names, plus
random noise drawn from the global torch RNG (like a random transform would), so data-order and RNG handling matter.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from torch.utils.data import Dataset

from vgstudy.models.base import Output

IMAGE_SIZE = 32
COLOURS = ("red", "green", "blue")


class ToyGroundingSet(Dataset):
    """`n` items {"image" (3, S, S) float, "text", "box_cxcywh" (4,) normalised, "source"}, a function of (seed, i)."""

    def __init__(self, n: int, seed: int = 0, noise: float = 0.05) -> None:
        self.n, self.seed, self.noise = n, seed, noise

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        rng = torch.Generator().manual_seed(self.seed * 100_003 + index)
        colour = int(torch.randint(len(COLOURS), (1,), generator=rng))
        w, h = (torch.randint(6, 16, (2,), generator=rng)).tolist()
        x1 = int(torch.randint(0, IMAGE_SIZE - w, (1,), generator=rng))
        y1 = int(torch.randint(0, IMAGE_SIZE - h, (1,), generator=rng))
        image = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)
        image[colour, y1 : y1 + h, x1 : x1 + w] = 1.0
        image += self.noise * torch.randn(image.shape)  # the global RNG: the trainer must seed it per item
        box_cxcywh = torch.tensor([x1 + w / 2, y1 + h / 2, w, h], dtype=torch.float32) / IMAGE_SIZE
        return {
            "image": image,
            "text": f"the {COLOURS[colour]} box",
            "box_cxcywh": box_cxcywh,
            "source": f"toy:{index}",
        }


def toy_collate(items: list[dict]) -> dict:
    """Items -> the batch dict every vgstudy model and criterion reads."""
    images = torch.stack([it["image"] for it in items])  # (B, 3, S, S)
    return {
        "images": images,
        "texts": [it["text"] for it in items],
        "boxes_cxcywh": torch.stack([it["box_cxcywh"] for it in items]),  # (B, 4)
        "masks": None,
        "valid": torch.ones(len(items), IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool),
        "families": [None] * len(items),
        "sources": [it["source"] for it in items],
    }


class ToyGroundingModel(nn.Module):
    """Pooled image -> conv -> linear; hashed words -> embedding bag; both -> MLP with dropout -> sigmoid box."""

    def __init__(self, dropout: float = 0.1, n_buckets: int = 64, text_dim: int = 8) -> None:
        super().__init__()
        self.n_buckets = n_buckets
        # A frozen parameter, as pretrained backbones have: it must still be saved and restored.
        self.pixel_scale = nn.Parameter(torch.tensor(2.0), requires_grad=False)
        self.image_encoder = nn.Sequential(
            nn.AvgPool2d(4),  # (B, 3, 8, 8)
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),  # (B, 256)
            nn.Linear(4 * 8 * 8, 16),
        )
        self.word_embedding = nn.EmbeddingBag(n_buckets, text_dim, mode="mean")
        self.head = nn.Sequential(nn.Linear(16 + text_dim, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 4))

    def forward(self, images: torch.Tensor, texts: list[str]) -> Output:
        words = [[zlib.crc32(w.encode()) % self.n_buckets for w in t.split()] for t in texts]
        ids = torch.tensor([i for ws in words for i in ws], device=images.device)
        offsets = torch.tensor([0] + [len(ws) for ws in words[:-1]], device=images.device).cumsum(0)
        features = torch.cat([self.image_encoder(images * self.pixel_scale), self.word_embedding(ids, offsets)], -1)
        return Output(boxes=torch.sigmoid(self.head(features)))  # (B, 4) cxcywh in [0, 1]


class StagedToyModel(ToyGroundingModel):
    """A two-stage toy: "warmup" trains the text and head only, "all" also the image encoder."""

    def enter_stage(self, stage_name: str) -> None:
        self.image_encoder.requires_grad_(stage_name == "all")
