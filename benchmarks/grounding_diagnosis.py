"""Why the tiny profile's grounding models stay near chance: the token features and the fusion head, measured apart.

    .venv/bin/python benchmarks/grounding_diagnosis.py [--features oracle vit-tiny] [--steps 1500] [--n-train 2000]
        [--batch-size 16] [--object-scale 1.0] [--quick] [--out runs/bench/grounding_diagnosis]

Every run trains only a *reader* on frozen per-token features, so a step costs milliseconds and the two possible
bottlenecks separate:

features (the visual tokens, 8 x 8 per 128 px SynthRef image; the text is always the frozen MiniLM's tokens):
- `oracle`:   what a perfect backbone could give: per cell, the one-hot shape, colour and size of the front-most
              object whose visible box covers the cell centre, that object's normalised box, and the cell position.
- `vit-tiny`: the zoo's SynthRef-pretrained ViT (`vgstudy.zoo.pretrained("vit-tiny")`), frozen (pretrains on first use).
- `random`:   the same ViT with random weights.

readers (all regress a normalised cxcywh box, L1 + GIoU, AdamW):
- `probe`:          one cross-attention: every text token queries the visual tokens, a learned per-token weight pools
                    the text tokens' attention maps, and the box is the attention-weighted mean of a per-token box MLP.
- `head-release`:   the shared GroundingHead as TransVG's release builds it (post-norm, position table N(0, 1)).
- `head-prenorm`:   the same head pre-norm, with the position table and [REG] drawn from N(0, 0.02).

targets:
- `expression`: the referred object's box (needs the text);
- `largest`:    the largest visible object's box (no text needed: the head's plain "find an object" ability).

Prints a Markdown table of Acc@0.5 on SynthRef val (and train, to tell memorising from learning) and writes
results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from torch import nn

from vgstudy.data.synthref import COLORS, SHAPES, SIZES, SynthRef
from vgstudy.evaluate import cxcywh_to_xyxy, paired_iou
from vgstudy.losses import box_losses
from vgstudy.models.backbones import build_backbone
from vgstudy.models.head import GroundingHead

GRID = 8  # tokens per side at 128 px, patch 16
ORACLE_DIM = len(SHAPES) + len(COLORS) + len(SIZES) + 4 + 2


def oracle_tokens(scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 64, ORACLE_DIM) symbolic token features and (N, 4) normalised cxcywh boxes of the largest object."""
    size = scenes[0].image_size
    cell = size / GRID
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    centre_x, centre_y = (cols.flatten() + 0.5) * cell, (rows.flatten() + 0.5) * cell
    tokens = torch.zeros(len(scenes), GRID * GRID, ORACLE_DIM)
    tokens[:, :, -2], tokens[:, :, -1] = cols.flatten() / GRID, rows.flatten() / GRID
    largest = torch.zeros(len(scenes), 4)
    colors = list(COLORS)
    for i, scene in enumerate(scenes):
        areas = []
        for obj in scene.objects:  # back to front: later objects cover earlier ones
            x1, y1, x2, y2 = obj.box_xyxy
            box = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]) / size
            feature = torch.zeros(ORACLE_DIM - 2)
            feature[SHAPES.index(obj.shape)] = 1
            feature[len(SHAPES) + colors.index(obj.color)] = 1
            feature[len(SHAPES) + len(COLORS) + SIZES.index(obj.size)] = 1
            feature[-4:] = box
            inside = (centre_x >= x1) & (centre_x < x2) & (centre_y >= y1) & (centre_y < y2)
            tokens[i, inside, :-2] = feature
            areas.append((float((x2 - x1) * (y2 - y1)), box))
        largest[i] = max(areas, key=lambda pair: pair[0])[1]
    return tokens, largest


def vit_tokens(dataset: SynthRef, vision: nn.Module, batch_size: int = 100) -> torch.Tensor:
    """(N, 64, width) grid tokens of a frozen ViT on the dataset's images (its own normalisation)."""
    mean = torch.tensor(vision.mean).view(1, 3, 1, 1)
    std = torch.tensor(vision.std).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            images = torch.stack(
                [dataset[i].image for i in range(start, min(start + batch_size, len(dataset)))]
            ).float()
            result = vision((images / 255 - mean) / std)
            out.append(result.tokens[:, result.num_prefix_tokens :])
    return torch.cat(out)


class Probe(nn.Module):
    """Text tokens query the visual tokens once; the box is read from the attended tokens."""

    def __init__(self, visual_dim: int, text_dim: int, dim: int = 128):
        super().__init__()
        self.query, self.key = nn.Linear(text_dim, dim), nn.Linear(visual_dim, dim)
        self.importance = nn.Linear(text_dim, 1)
        self.box = nn.Sequential(nn.Linear(visual_dim, dim), nn.ReLU(), nn.Linear(dim, 4))

    def forward(self, visual, text, text_mask):
        attention = torch.einsum("bld,bnd->bln", self.query(text), self.key(visual)).div(
            math.sqrt(self.key.out_features)
        )
        weights = self.importance(text).squeeze(-1).masked_fill(~text_mask, float("-inf")).softmax(-1)  # (B, L)
        pooled = torch.einsum("bl,bln->bn", weights, attention.softmax(-1))  # (B, N)
        return torch.einsum("bn,bnc->bc", pooled, self.box(visual)).sigmoid()


class HeadReader(nn.Module):
    """Projections to `dim` + the shared GroundingHead over [REG] + text + visual tokens (TransVG's order)."""

    def __init__(self, visual_dim, text_dim, num_tokens, prenorm: bool, dim=64, depth=2, with_text=True):
        super().__init__()
        self.with_text = with_text
        self.visual_proj, self.text_proj = nn.Linear(visual_dim, dim), nn.Linear(text_dim, dim)
        self.head = GroundingHead(num_tokens, dim, depth, 4, 2 * dim, dropout=0.0, normalize_before=prenorm)
        if prenorm:
            nn.init.normal_(self.head.pos_embed.weight, std=0.02)
            nn.init.normal_(self.head.reg_token.weight, std=0.02)

    def forward(self, visual, text, text_mask):
        visual = self.visual_proj(visual)
        if not self.with_text:
            return self.head(visual)[0]
        padding = torch.cat([~text_mask, text_mask.new_zeros(visual.shape[:2])], dim=1)
        return self.head(torch.cat([self.text_proj(text), visual], dim=1), padding)[0]


def accuracy(reader, data, target, limit=300) -> float:
    reader.eval()
    with torch.no_grad():
        index = torch.arange(min(limit, len(data[target])))
        boxes = reader(data["visual"][index], data["text"][index], data["text_mask"][index])
        hits = paired_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(data[target][index])) >= 0.5
    reader.train()
    return 100 * hits.float().mean().item()


def train(reader, data, target, steps, batch_size, lr, seed) -> dict:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    train_set, n = data["train"], len(data["train"][target])
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, n, (batch_size,), generator=generator)
        boxes = reader(train_set["visual"][index], train_set["text"][index], train_set["text_mask"][index])
        terms = box_losses(boxes, train_set[target][index])
        optimizer.zero_grad()
        (terms["l1"] + terms["giou"]).backward()
        nn.utils.clip_grad_norm_(reader.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    return {
        "train_acc50": accuracy(reader, train_set, target),
        "val_acc50": accuracy(reader, data["val"], target),
        "step_ms": 1000 * seconds / steps,
    }


def build_data(features: str, n_train: int, n_val: int, seed: int, text_tower, object_scale: float = 1.0) -> dict:
    data = {}
    vision = None
    if features in ("vit-tiny", "random"):
        if features == "vit-tiny":
            from vgstudy.zoo import pretrained

            vision = pretrained("vit-tiny")
        else:
            torch.manual_seed(seed)
            vision = build_backbone("dinov2:tiny")
        vision.eval()
    for split, n in (("train", n_train), ("val", n_val)):
        dataset = SynthRef(split, n, seed=seed, object_scale=object_scale)
        expressions = [dataset.expression(i) for i in range(n)]
        scenes = [scene for _, _, scene in expressions]
        oracle, largest = oracle_tokens(scenes)
        with torch.no_grad():
            text = text_tower([text for text, _, _ in expressions])
        target = torch.stack([torch.tensor(dataset[i].box_xyxy, dtype=torch.float32) for i in range(n)]) / (
            scenes[0].image_size
        )
        data[split] = {
            "visual": oracle if vision is None else vit_tokens(dataset, vision),
            "text": text.tokens,
            "text_mask": text.mask,
            "expression": torch.cat([(target[:, :2] + target[:, 2:]) / 2, target[:, 2:] - target[:, :2]], dim=1),
            "largest": largest,
        }
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--features", nargs="+", default=["oracle", "vit-tiny"], choices=["oracle", "vit-tiny", "random"]
    )
    parser.add_argument("--readers", nargs="+", default=["probe", "head-release", "head-prenorm"])
    parser.add_argument("--targets", nargs="+", default=["expression", "largest"], choices=["expression", "largest"])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--object-scale", type=float, default=1.0, help="SynthRef's object size multiplier")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="100 steps on 200 samples: checks the script runs")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/grounding_diagnosis"))
    args = parser.parse_args()
    if args.quick:
        args.steps, args.n_train, args.n_val = 100, 200, 100
    if args.threads:
        torch.set_num_threads(args.threads)

    text_tower = build_backbone("bert:minilm", max_len=20).eval()
    rows = []
    for features in args.features:
        start = time.perf_counter()
        data = build_data(features, args.n_train, args.n_val, args.seed, text_tower, args.object_scale)
        feature_s = time.perf_counter() - start
        visual_dim, text_dim = data["train"]["visual"].shape[-1], data["train"]["text"].shape[-1]
        num_visual, num_text = data["train"]["visual"].shape[1], data["train"]["text"].shape[1]
        for target in args.targets:
            for reader_name in args.readers:
                torch.manual_seed(args.seed)
                if reader_name == "probe":
                    reader = Probe(visual_dim, text_dim)
                else:
                    with_text = target == "expression"
                    reader = HeadReader(
                        visual_dim,
                        text_dim,
                        num_visual + (num_text if with_text else 0),
                        prenorm=reader_name == "head-prenorm",
                        with_text=with_text,
                    )
                result = train(reader, data, target, args.steps, args.batch_size, args.lr, args.seed)
                rows.append(
                    {"features": features, "target": target, "reader": reader_name, **result, "feature_s": feature_s}
                )
                print(json.dumps(rows[-1]), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "settings": {key: str(value) for key, value in vars(args).items()},
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print(
        f"\n{args.steps} steps, batch {args.batch_size}, {args.n_train} training samples, lr {args.lr:g}, "
        f"object scale {args.object_scale:g}"
    )
    print("| features | target | reader | train Acc@0.5 | val Acc@0.5 | ms/step |\n|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['features']} | {row['target']} | {row['reader']} | {row['train_acc50']:.1f} | "
            f"{row['val_acc50']:.1f} | {row['step_ms']:.0f} |"
        )


if __name__ == "__main__":
    main()
