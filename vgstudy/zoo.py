"""Small pretrained backbones: pretrained on SynthRef, deterministically, and cached on first use.

Grounding methods start from pretrained backbones, multimodal (CLIP: HiVG, and EpmVG-R's teacher) or unimodal
(a vision encoder + BERT: TransVG, MaPPER). The `tiny`/`study` profiles cannot download them, so they pretrain small
versions of the same architectures on SynthRef, with the *kind* of pretraining the papers' backbones had:

- `clip-tiny` (`clip:tiny`), contrastive image <-> text, as CLIP (Radford et al., 2021, Sec. 2.3): the symmetric
  InfoNCE loss over a batch with CLIP's learnable logit scale, between each scene image (CLS, projected) and a
  caption of it (`scene_caption`: every object, synonyms, random order). Captions alone teach the image embedding
  what a scene holds but leave the patch tokens untrained, and HiVG grounds from the patch tokens. So a second term
  aligns *phrases with regions*: each image also gets the phrase of one of its objects ("the crimson disc", "a big
  star", with synonyms), scored against an image by its best-matching patch (the maximum over the patches of the
  cosine between the phrase and the projected patch tokens, as FILIP's token-wise similarity, Yao et al., 2022), in an
  InfoNCE over the batch with its own learnable scale. The other images of the batch give hard negatives; an image
  that also holds an object the phrase names counts as a positive (the scenes are symbolic, so this is exact). This
  is cheaper than encoding object crops (no extra image passes) and trains exactly the tokens a grounding model
  reads, so phrase -> patch similarity maps point at the objects (measured as "pointing accuracy").
- `vit-tiny` (`dinov2:tiny`) and `resnet-tiny` (`resnet18+detr:tiny`), vision only: multi-label prediction of which
  shapes, colours and (colour, shape) pairs a scene holds, each label scored by its best token (max pooling, as in
  multiple-instance learning), plus a per-token target (the colour and the shape of the front-most object whose
  visible box covers the token's cell centre, or background), so the tokens stay spatially informative, which
  grounding needs. Both heads are dropped: the cache holds the backbone only.

Every run renders its scenes once into a uint8 tensor (SynthRef "train" for training, "val" for the held-out metrics,
both with the spec's seed), augments with horizontal flips only (no word in a caption or phrase depends on
left/right), and trains with AdamW (no decay on vectors), linear warm-up then cosine decay and gradient clipping at 1.
All randomness comes from the spec's seed, inside a forked torch RNG (the caller's RNG state is left as it was), so
the same spec gives bitwise the same weights on the same machine. Torch's thread settings are not changed. The
images are normalised with each backbone's own mean/std (`backbone.mean`/`.std`, CLIP's for clip-tiny).

Cache: `<cache_dir>/<name>-<profile>-<spec hash[:10]>/` with `model.safetensors` (the backbone's state dict) and
`report.json` (spec, metrics before/after, the loss curve, wall time, versions, the weights' sha256). The default
cache_dir is `$VGSTUDY_CACHE`, else `<repository root>/runs/zoo`. An entry is trained in memory, written into a
temporary folder and renamed into place, under an exclusive lock (`fcntl.flock`) on `<entry>.lock`, so a killed run
leaves no finished-looking entry and two notebooks asking at once train it once. A corrupt entry (checksum mismatch,
unreadable file) is reported with a warning and retrained; an entry that does not fit its backbone raises
CheckpointError naming the file (`force=True` retrains).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vgstudy.checkpoint import atomic_write_json, load_into, load_state_dict, save_state_dict, sha256_file
from vgstudy.data.synthref import (
    COLOR_WORDS,
    COLORS,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    Scene,
    SynthRef,
    object_phrase,
    scene_caption,
)
from vgstudy.data.tokenizers import TokenBatch
from vgstudy.errors import CheckpointError, ConfigError
from vgstudy.models.backbones import build_backbone
from vgstudy.notebook import progress_bars_disabled

logger = logging.getLogger(__name__)

OBJECTIVES: tuple[str, ...] = ("contrastive", "multilabel")
MODEL_FILE = "model.safetensors"
REPORT_FILE = "report.json"
# Part of every spec hash: bump it when the training code changes what a spec produces, so old entries are not reused.
RECIPE_VERSION = 1
_TEMP_PREFIX = ".tmp-"
# Rough cost of one training image (forward + backward + its share of the step) on 2 CPU cores, for the log line.
_SECONDS_PER_IMAGE = {"clip:tiny": 0.015, "dinov2:tiny": 0.01, "resnet18+detr:tiny": 0.026}
_RENDER_PER_SECOND = 800  # SynthRef scenes rendered per second


@dataclass(frozen=True)
class PretrainSpec:
    """Everything that determines a zoo model's weights (and its report); its hash names the cache entry.

    backbone:      a `build_backbone` name ("clip:tiny", "dinov2:tiny", "resnet18+detr:tiny").
    objective:     "contrastive" (image <-> text; CLIP backbones) or "multilabel" (vision only).
    steps, batch_size: optimiser steps and images per step.
    lr, weight_decay, warmup_steps: AdamW's peak learning rate and decay (matrices only), linear warm-up steps.
    image_size:    side of the SynthRef scenes and the backbone's input, pixels.
    n_scenes:      training scenes (SynthRef "train"), rendered once; n_val_scenes: held-out scenes (SynthRef "val")
                   for the metrics before and after (retrieval is top-1 among all of them: chance = 1 / n_val_scenes).
    seed:          the scenes' seed and every random draw of the run.
    region_weight: contrastive: weight of the phrase <-> patch term (0: captions only, plain CLIP).
    dense_weight:  multilabel: weight of the per-token colour/shape term (0: scene labels only).
    log_every:     steps per point of the loss curve.
    """

    backbone: str
    objective: str
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    n_scenes: int
    image_size: int = 128
    n_val_scenes: int = 100
    seed: int = 0
    region_weight: float = 1.0
    dense_weight: float = 1.0
    log_every: int = 5

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = {"str": str, "int": int, "float": (int, float)}[field.type]
            if isinstance(value, bool) or not isinstance(value, expected):
                raise ConfigError(f"PretrainSpec.{field.name}={value!r}: expected a {field.type}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"PretrainSpec.objective={self.objective!r}: expected one of {OBJECTIVES}")
        if (self.objective == "contrastive") != self.backbone.startswith("clip:"):
            raise ConfigError(
                f"PretrainSpec: objective={self.objective!r} with backbone={self.backbone!r}; expected "
                "'contrastive' for clip:* backbones and 'multilabel' for vision backbones"
            )
        for name in ("steps", "batch_size", "image_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"PretrainSpec.{name}={getattr(self, name)}: expected >= 1")
        if self.batch_size < 2 or self.n_scenes < self.batch_size:
            raise ConfigError(
                f"PretrainSpec: batch_size={self.batch_size}, n_scenes={self.n_scenes}: expected "
                "2 <= batch_size <= n_scenes (contrast needs two images; every batch is full)"
            )
        if self.n_val_scenes < 2:
            raise ConfigError(f"PretrainSpec.n_val_scenes={self.n_val_scenes}: expected >= 2")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"PretrainSpec.warmup_steps={self.warmup_steps}: expected 0 ... steps={self.steps}")
        if self.seed < 0:
            raise ConfigError(f"PretrainSpec.seed={self.seed}: expected >= 0")
        for name in ("lr", "weight_decay", "region_weight", "dense_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0) or (name == "lr" and value == 0):
                raise ConfigError(f"PretrainSpec.{name}={value}: expected a finite number >= 0 (lr > 0)")

    def hash(self) -> str:
        """Hex sha256 of the recipe version and every field: equal hashes, equal weights."""
        payload = json.dumps({"recipe": RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def _study(tiny: PretrainSpec) -> PretrainSpec:
    """The `study` profile's spec: 8x the steps on 4x the scenes (minutes rather than one)."""
    return dataclasses.replace(
        tiny,
        steps=8 * tiny.steps,
        n_scenes=4 * tiny.n_scenes,
        warmup_steps=4 * tiny.warmup_steps,
        log_every=4 * tiny.log_every,
    )


# Learning rates from short sweeps at the tiny budget (2e-4 ... 3e-3): CLIP learns best at 5e-4 (1e-3 retrieves 5x
# worse after 100 steps); the ViT's layer scale (DINOv2's, initialised at 1e-5) needs a high rate to open up; the
# ResNet + post-norm DETR encoder a low one. A ResNet-18 image costs ~3x a ViT image on a CPU, hence fewer of them.
_CLIP_TINY = PretrainSpec(
    backbone="clip:tiny",
    objective="contrastive",
    steps=100,
    batch_size=32,
    lr=5e-4,
    weight_decay=0.05,
    warmup_steps=10,
    n_scenes=2000,
    log_every=10,
)
_VIT_TINY = PretrainSpec(
    backbone="dinov2:tiny",
    objective="multilabel",
    steps=150,
    batch_size=32,
    lr=3e-3,
    weight_decay=0.05,
    warmup_steps=10,
    n_scenes=2000,
    n_val_scenes=200,
    log_every=10,
)
_RESNET_TINY = dataclasses.replace(
    _VIT_TINY, backbone="resnet18+detr:tiny", steps=160, batch_size=16, lr=3e-4, n_val_scenes=100
)

# name -> profile -> spec.
ZOO: dict[str, dict[str, PretrainSpec]] = {
    name: {"tiny": tiny, "study": _study(tiny)}
    for name, tiny in (("clip-tiny", _CLIP_TINY), ("vit-tiny", _VIT_TINY), ("resnet-tiny", _RESNET_TINY))
}


# --- Scenes ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SceneBank:
    """Scenes rendered once: images (N, 3, S, S) uint8 and their symbolic scenes."""

    images: torch.Tensor
    scenes: tuple[Scene, ...]

    @classmethod
    def render(cls, split: str, n: int, spec: PretrainSpec) -> _SceneBank:
        dataset = SynthRef(split, n, seed=spec.seed, image_size=spec.image_size)
        samples = [dataset[i] for i in range(n)]
        return cls(torch.stack([s.image for s in samples]), tuple(s.scene for s in samples))


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches forever: a fresh permutation every epoch, the last partial batch dropped."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


# --- Objectives -----------------------------------------------------------------------------------------------------


def _multi_positive_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """InfoNCE with any number of positives per row: -log(sum of softmax over the positives), averaged over rows.

    logits (R, C), positives (R, C) bool with at least one True per row. With `positives` the identity it is the
    cross-entropy of CLIP's loss.
    """
    return (logits.logsumexp(1) - logits.masked_fill(~positives, float("-inf")).logsumexp(1)).mean()


def _symmetric_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric loss: the mean of the row (e.g. image -> text) and column (text -> image) directions."""
    return (_multi_positive_nce(logits, positives) + _multi_positive_nce(logits.T, positives.T)) / 2


_PHRASE_ATTRIBUTES = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))


def _random_phrase(scene: Scene, rng: np.random.Generator) -> tuple[str, dict[str, str]]:
    """A phrase naming one object of the scene with a random attribute set and synonyms: ("a crimson disc",
    {"color": "red", "shape": "circle"})."""
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    attributes = _PHRASE_ATTRIBUTES[int(rng.integers(len(_PHRASE_ATTRIBUTES)))]
    words = [("a", "the")[int(rng.integers(2))]]
    if "size" in attributes:
        words.append(SIZE_WORDS[obj.size][int(rng.integers(len(SIZE_WORDS[obj.size])))])
    if "color" in attributes:
        words.append(COLOR_WORDS[obj.color][int(rng.integers(len(COLOR_WORDS[obj.color])))])
    words.append(SHAPE_WORDS[obj.shape][int(rng.integers(len(SHAPE_WORDS[obj.shape])))][0])
    return " ".join(words), {a: getattr(obj, a) for a in attributes}


def _holds(scene: Scene, attributes: dict[str, str]) -> bool:
    return any(all(getattr(o, a) == v for a, v in attributes.items()) for o in scene.objects)


def _phrases(scenes: Sequence[Scene], rng: np.random.Generator) -> tuple[list[str], torch.Tensor]:
    """One random phrase per scene, and (P, B) bool: phrase p names an object of scene b (not only of its own)."""
    drawn = [_random_phrase(scene, rng) for scene in scenes]
    positives = torch.tensor([[_holds(scene, attributes) for scene in scenes] for _, attributes in drawn])
    return [phrase for phrase, _ in drawn], positives


def _cell_boxes_xyxy(grid_hw: tuple[int, int], image_size: int) -> torch.Tensor:
    """(h * w, 4) pixel boxes of the token grid's cells, row by row."""
    h, w = grid_hw
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cell_h, cell_w = image_size / h, image_size / w
    return torch.stack([xs * cell_w, ys * cell_h, (xs + 1) * cell_w, (ys + 1) * cell_h], dim=-1).flatten(0, 1)


def _overlaps(boxes_a_xyxy: torch.Tensor, boxes_b_xyxy: torch.Tensor) -> torch.Tensor:
    """(K,) bool: box a[k] and box b[k] share some area (boxes broadcast against each other)."""
    a, b = torch.broadcast_tensors(boxes_a_xyxy, boxes_b_xyxy)
    width = torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])
    height = torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])
    return (width > 0) & (height > 0)


def image_and_patch_embeddings(clip: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A CLIPBackbone's (B, E) image embeddings and (B, N, E) patch embeddings (each patch token through the image
    projection), L2-normalised: what the region term trains, and what similarity maps show."""
    visual = clip.visual
    tokens = visual(images).tokens  # (B, 1 + N, D)
    image = F.normalize(visual.project(tokens), dim=-1)  # (B, E)
    patches = F.normalize(tokens[:, visual.num_prefix_tokens :] @ visual.proj, dim=-1)  # (B, N, E)
    return image, patches


@torch.no_grad()
def phrase_similarity_maps(clip: nn.Module, images: torch.Tensor, phrases: list[str]) -> torch.Tensor:
    """(B, h, w) cosine similarity between each image's patches and its phrase (images in CLIP's normalisation)."""
    _, patches = image_and_patch_embeddings(clip, images)
    text = F.normalize(clip.text(phrases).pooled, dim=-1)  # (B, E)
    h, w = clip.visual.grid_hw
    return torch.einsum("bne,be->bn", patches, text).view(len(images), h, w)


class _ContrastiveObjective(nn.Module):
    """CLIP's caption InfoNCE + the phrase <-> best-patch InfoNCE (see the module docstring); trains a CLIPBackbone.

    Held-out texts are drawn once, so the metrics before and after training see the same ones.
    """

    def __init__(self, backbone: nn.Module, spec: PretrainSpec, train: _SceneBank, val: _SceneBank):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        # The region term's temperature, learned like CLIP's (init 1 / 0.07) and dropped with the objective.
        self.region_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.train_scenes = train.scenes
        rng = np.random.default_rng([spec.seed, 1])
        self.val_captions = [scene_caption(scene, rng) for scene in val.scenes]
        self.val_phrases, val_positives = _phrases(val.scenes, rng)
        self.register_buffer("val_positives", val_positives, persistent=False)
        # Pointing: the full description of every object no other object of its scene shares.
        pointing = [
            (i, object_phrase(obj), obj.box_xyxy)
            for i, scene in enumerate(val.scenes)
            for obj in scene.objects
            if [object_phrase(o) for o in scene.objects].count(object_phrase(obj)) == 1
        ]
        self.pointing_phrases = [phrase for _, phrase, _ in pointing]
        self.register_buffer("pointing_scenes", torch.tensor([i for i, _, _ in pointing]), persistent=False)
        self.register_buffer("pointing_boxes_xyxy", torch.tensor([b for _, _, b in pointing]), persistent=False)
        cells = _cell_boxes_xyxy(backbone.visual.grid_hw, spec.image_size)
        self.register_buffer("cell_boxes_xyxy", cells, persistent=False)  # (N, 4) pixels

    def _embed_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (B, E) image embeddings and (B, N, E) patch embeddings, L2-normalised."""
        return image_and_patch_embeddings(self.backbone, images)

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        """-> (T, E) L2-normalised. Padding after the longest text is cut: with causal attention the features of
        the first positions do not depend on later ones, and phrases are far shorter than the context."""
        batch = self.backbone.text.tokenizer(texts)
        length = int(batch.mask.sum(1).max())
        batch = TokenBatch(ids=batch.ids[:, :length], mask=batch.mask[:, :length])  # (T, length)
        return F.normalize(self.backbone.text(batch).pooled, dim=-1)

    def _losses(self, image, patches, captions, phrases, phrase_positives) -> dict[str, torch.Tensor]:
        caption, phrase = self._embed_texts(captions), self._embed_texts(phrases)  # (B, E), (P, E)
        scale = self.backbone.logit_scale.exp().clamp(max=100)  # CLIP clips the scale at 100
        identity = torch.eye(len(captions), dtype=torch.bool, device=image.device)
        caption_loss = _symmetric_nce(scale * image @ caption.T, identity)
        region_scores = torch.einsum("pe,bne->pbn", phrase, patches).amax(-1)  # (P, B): each image's best patch
        region_scale = self.region_logit_scale.exp().clamp(max=100)
        region_loss = _symmetric_nce(region_scale * region_scores, phrase_positives)
        total = caption_loss + self.spec.region_weight * region_loss
        return {"loss": total, "caption_loss": caption_loss, "region_loss": region_loss}

    def training_loss(
        self, images: torch.Tensor, indices: torch.Tensor, flips: torch.Tensor, step: int
    ) -> dict[str, torch.Tensor]:
        """Losses on a batch of training images (flips change no caption or phrase)."""
        scenes = [self.train_scenes[i] for i in indices.tolist()]
        rng = np.random.default_rng([self.spec.seed, 0, step])
        captions = [scene_caption(scene, rng) for scene in scenes]
        phrases, positives = _phrases(scenes, rng)
        return self._losses(*self._embed_images(images), captions, phrases, positives.to(images.device))

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor) -> dict[str, float]:
        """Held-out losses, caption retrieval top-1 both ways among all held-out scenes, pointing accuracy."""
        image, patches = self._embed_images(images)
        losses = self._losses(image, patches, self.val_captions, self.val_phrases, self.val_positives)
        similarity = image @ self._embed_texts(self.val_captions).T  # (N, N) images x captions
        targets = torch.arange(len(images), device=images.device)
        phrase = self._embed_texts(self.pointing_phrases)  # (U, E)
        best = torch.einsum("ue,une->un", phrase, patches[self.pointing_scenes]).argmax(1)  # (U,) best patch
        pointed = _overlaps(self.cell_boxes_xyxy[best], self.pointing_boxes_xyxy)
        return {
            **{name: value.item() for name, value in losses.items()},
            "image_to_text_top1": (similarity.argmax(1) == targets).float().mean().item(),
            "text_to_image_top1": (similarity.argmax(0) == targets).float().mean().item(),
            "pointing_accuracy": pointed.float().mean().item(),
        }

    def chance(self) -> dict[str, float]:
        """Chance on the held-out metrics: retrieval 1 / N; pointing with a uniformly random patch."""
        touched = _overlaps(self.cell_boxes_xyxy[None], self.pointing_boxes_xyxy[:, None])  # (U, N)
        return {"retrieval_top1": 1 / len(self.val_captions), "pointing_accuracy": touched.float().mean().item()}


# Multi-label targets: each shape, each colour, each (colour, shape) pair present in the scene.
_COLOR_NAMES = tuple(COLORS)
_LABELS: tuple[str, ...] = (*SHAPES, *_COLOR_NAMES, *(f"{c} {s}" for s in SHAPES for c in _COLOR_NAMES))
_LABEL_GROUPS = {
    "shape": list(range(len(SHAPES))),
    "color": list(range(len(SHAPES), len(SHAPES) + len(_COLOR_NAMES))),
    "pair": list(range(len(SHAPES) + len(_COLOR_NAMES), len(_LABELS))),
}


def _multilabel_targets(scenes: Sequence[Scene], grid_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) float 0/1 scene labels over `_LABELS`, and (N, h, w, 2) long token targets: per cell, 1 + the colour
    index and 1 + the shape index of the front-most object whose visible box covers the cell centre, (0, 0) for
    background."""
    h, w = grid_hw
    labels = torch.zeros(len(scenes), len(_LABELS))
    tokens = torch.zeros(len(scenes), h * w, 2, dtype=torch.long)
    for i, scene in enumerate(scenes):
        cells = _cell_boxes_xyxy(grid_hw, scene.image_size)
        centres_x, centres_y = (cells[:, 0] + cells[:, 2]) / 2, (cells[:, 1] + cells[:, 3]) / 2
        for obj in scene.objects:  # back to front: later objects cover earlier ones
            for label in (obj.shape, obj.color, f"{obj.color} {obj.shape}"):
                labels[i, _LABELS.index(label)] = 1
            x1, y1, x2, y2 = obj.box_xyxy
            inside = (centres_x >= x1) & (centres_x < x2) & (centres_y >= y1) & (centres_y < y2)
            tokens[i, inside] = torch.tensor([1 + _COLOR_NAMES.index(obj.color), 1 + SHAPES.index(obj.shape)])
    return labels, tokens.view(len(scenes), h, w, 2)


class _MultilabelObjective(nn.Module):
    """Scene labels, max-pooled over per-token scores (BCE), + per-token colour and shape (cross-entropy).

    Max pooling (multiple-instance learning) rather than a mean: a label is present when some token sees it, so each
    token learns to recognise what lies under it instead of the scene's average.
    """

    def __init__(self, backbone: nn.Module, spec: PretrainSpec, train: _SceneBank, val: _SceneBank):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.label_head = nn.Linear(backbone.width, len(_LABELS))
        self.n_color_classes, self.n_shape_classes = 1 + len(_COLOR_NAMES), 1 + len(SHAPES)  # + background
        self.token_head = nn.Linear(backbone.width, self.n_color_classes + self.n_shape_classes)
        for split, bank in (("train", train), ("val", val)):
            labels, tokens = _multilabel_targets(bank.scenes, backbone.grid_hw)
            self.register_buffer(f"{split}_labels", labels, persistent=False)  # (N, L)
            self.register_buffer(f"{split}_tokens", tokens, persistent=False)  # (N, h, w, 2)

    def _predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (B, L) label logits, (B, h * w, colours + 1) and (B, h * w, shapes + 1) logits per grid token."""
        out = self.backbone(images)
        per_token = self.token_head(out.tokens[:, out.num_prefix_tokens :])  # (B, h * w, C + S)
        color_logits, shape_logits = per_token.split([self.n_color_classes, self.n_shape_classes], dim=-1)
        return self.label_head(out.tokens).amax(1), color_logits, shape_logits  # (B, L) best token per label

    def _losses(self, predictions, labels, tokens) -> dict[str, torch.Tensor]:
        label_logits, color_logits, shape_logits = predictions
        tokens = tokens.flatten(1, 2)  # (B, h * w, 2)
        label_loss = F.binary_cross_entropy_with_logits(label_logits, labels)
        token_loss = (
            F.cross_entropy(color_logits.flatten(0, 1), tokens[..., 0].flatten())
            + F.cross_entropy(shape_logits.flatten(0, 1), tokens[..., 1].flatten())
        ) / 2
        total = label_loss + self.spec.dense_weight * token_loss
        return {"loss": total, "label_loss": label_loss, "token_loss": token_loss}

    def training_loss(
        self, images: torch.Tensor, indices: torch.Tensor, flips: torch.Tensor, step: int
    ) -> dict[str, torch.Tensor]:
        """Losses on a batch of training images; flipped images get flipped token targets."""
        indices, flips = indices.to(images.device), flips.to(images.device)
        tokens = self.train_tokens[indices]  # (B, h, w, 2)
        tokens = torch.where(flips.view(-1, 1, 1, 1), tokens.flip(2), tokens)
        return self._losses(self._predict(images), self.train_labels[indices], tokens)

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor) -> dict[str, float]:
        """Held-out losses; label mAP, overall and per group (shapes, colours, pairs); on the cells an object covers,
        the accuracy of the predicted colour and shape."""
        predictions = self._predict(images)
        losses = self._losses(predictions, self.val_labels, self.val_tokens)
        label_logits, color_logits, shape_logits = predictions
        labels, scores = self.val_labels.cpu(), label_logits.cpu()
        tokens = self.val_tokens.flatten(1, 2)  # (N, h * w, 2)
        on_object = tokens[..., 0] > 0
        return {
            **{name: value.item() for name, value in losses.items()},
            "label_map": mean_average_precision(scores, labels),
            **{
                f"{group}_map": mean_average_precision(scores[:, columns], labels[:, columns])
                for group, columns in _LABEL_GROUPS.items()
            },
            "token_color_accuracy": (color_logits.argmax(-1) == tokens[..., 0])[on_object].float().mean().item(),
            "token_shape_accuracy": (shape_logits.argmax(-1) == tokens[..., 1])[on_object].float().mean().item(),
        }

    def chance(self) -> dict[str, float]:
        """Trivial predictors on the held-out scenes: a constant label score (its AP is the label's prevalence); the
        most frequent colour and shape on every object cell."""
        labels = self.val_labels.cpu()
        tokens = self.val_tokens.flatten(0, 2).cpu()  # (N * h * w, 2)
        on_object = tokens[tokens[:, 0] > 0]
        return {
            "label_map": _prevalence_map(labels),
            **{f"{group}_map": _prevalence_map(labels[:, columns]) for group, columns in _LABEL_GROUPS.items()},
            "token_color_accuracy": (on_object[:, 0].bincount().max() / len(on_object)).item(),
            "token_shape_accuracy": (on_object[:, 1].bincount().max() / len(on_object)).item(),
        }


def _prevalence_map(labels: torch.Tensor) -> float:
    """The mAP of a constant score: the mean prevalence of the labels that have both positives and negatives."""
    positives = labels.sum(0)
    counted = (positives > 0) & (positives < len(labels))
    return labels[:, counted].mean(0).mean().item()


def mean_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Macro mean of average precision over the labels that have both positives and negatives.

    scores, labels: (N, L). The AP of one label is the mean, over its positives, of the precision at that positive's
    rank (scores sorted descending, ties in index order).
    """
    aps = []
    for column in range(labels.shape[1]):
        truth = labels[:, column].bool()
        if truth.all() or not truth.any():
            continue
        ranked = truth[scores[:, column].argsort(descending=True, stable=True)].float()
        precision = ranked.cumsum(0) / torch.arange(1, len(ranked) + 1)
        aps.append(((precision * ranked).sum() / ranked.sum()).item())
    return float(np.mean(aps))


# --- Training -------------------------------------------------------------------------------------------------------


def _warmup_cosine(spec: PretrainSpec) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up to 1, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def pretrain(spec: PretrainSpec, *, device: str = "cpu", label: str | None = None) -> tuple[nn.Module, dict]:
    """Train the spec's backbone from scratch in memory; returns (backbone in eval mode on `device`, report).

    The report holds the spec, the held-out metrics before and after training and at chance, the training loss curve
    (each point the mean over `log_every` steps), wall times and versions; see the module docstring for the
    objectives. `label` names the run in the progress bar.
    """
    start = time.perf_counter()
    device = torch.device(device)
    # Every draw comes from the spec's seed; the caller's RNG state is restored afterwards.
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(spec.seed)
        backbone = build_backbone(spec.backbone, image_size=spec.image_size)
        train_bank = _SceneBank.render("train", spec.n_scenes, spec)
        val_bank = _SceneBank.render("val", spec.n_val_scenes, spec)
        render_seconds = time.perf_counter() - start
        objective_class = _ContrastiveObjective if spec.objective == "contrastive" else _MultilabelObjective
        objective = objective_class(backbone, spec, train_bank, val_bank).to(device)
        tower = backbone.visual if spec.objective == "contrastive" else backbone
        mean = torch.tensor(tower.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(tower.std, device=device).view(1, 3, 1, 1)
        val_images = (val_bank.images.to(device).float() / 255 - mean) / std  # (N, 3, S, S)
        before = objective.eval().evaluate(val_images)

        parameters = [p for p in objective.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": spec.weight_decay},
                {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},  # biases, norms, scales
            ],
            lr=spec.lr,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(spec))
        generator = torch.Generator().manual_seed(spec.seed)
        batches = _batches(spec.n_scenes, spec.batch_size, generator)
        curve: dict[str, list] = {"step": []}
        window: dict[str, list[float]] = {}
        train_start = time.perf_counter()
        objective.train()
        quiet = progress_bars_disabled()
        for step in tqdm(range(spec.steps), desc=f"pretraining {label or spec.backbone}", unit="step", disable=quiet):
            indices = next(batches)
            flips = torch.rand(len(indices), generator=generator) < 0.5
            images = train_bank.images[indices]
            images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)  # (B, 3, S, S) uint8
            images = (images.to(device).float() / 255 - mean) / std
            losses = objective.training_loss(images, indices, flips, step)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            for name, value in losses.items():
                window.setdefault(name, []).append(value.item())
            if (step + 1) % spec.log_every == 0 or step + 1 == spec.steps:
                curve["step"].append(step + 1)
                for name, values in window.items():
                    curve.setdefault(name, []).append(float(np.mean(values)))
                window = {}
        train_seconds = time.perf_counter() - train_start
        after = objective.eval().evaluate(val_images)
    return backbone.eval(), {
        "backbone": spec.backbone,
        "objective": spec.objective,
        "spec": dataclasses.asdict(spec),
        "spec_hash": spec.hash(),
        "metrics": {"before": before, "after": after, "chance": objective.chance()},
        "loss_curve": curve,
        "normalisation": {"mean": list(tower.mean), "std": list(tower.std)},
        "seconds": {"render": render_seconds, "train": train_seconds, "total": time.perf_counter() - start},
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }


# --- The cache ------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$VGSTUDY_CACHE` if set, else `<repository root>/runs/zoo` (the root is the parent of the package folder)."""
    configured = os.environ.get("VGSTUDY_CACHE")
    return Path(configured).expanduser() if configured else Path(__file__).resolve().parent.parent / "runs" / "zoo"


def _spec_for(name: str, profile: str, spec: PretrainSpec | None) -> PretrainSpec:
    if name not in ZOO:
        raise ConfigError(f"unknown zoo model {name!r}; expected one of {', '.join(ZOO)}")
    if profile not in ZOO[name]:
        raise ConfigError(f"unknown profile {profile!r} for zoo model {name!r}; expected one of {', '.join(ZOO[name])}")
    if spec is None:
        return ZOO[name][profile]
    if not isinstance(spec, PretrainSpec):
        raise ConfigError(f"spec={spec!r} for {name!r}: expected a PretrainSpec or None")
    if spec.backbone != ZOO[name][profile].backbone:
        raise ConfigError(
            f"spec.backbone={spec.backbone!r} for zoo model {name!r}: expected {ZOO[name][profile].backbone!r}"
        )
    return spec


def cache_path(
    name: str, profile: str = "tiny", cache_dir: str | Path | None = None, *, spec: PretrainSpec | None = None
) -> Path:
    """The cache folder of a zoo model: `<cache_dir>/<name>-<profile>-<spec hash[:10]>`.

    `spec` replaces the zoo's spec for (name, profile) (reduced runs in tests); its backbone must be the same.
    """
    spec = _spec_for(name, profile, spec)
    root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return root / f"{name}-{profile}-{spec.hash()[:10]}"


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if needed); other processes asking for it wait."""
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_verified_report(entry: Path) -> dict | None:
    """The entry's report when the entry is complete and its weights match their sha256; None when there is no entry.

    Raises CheckpointError when the entry is there but corrupt (unreadable report, missing or altered weights).
    """
    if not entry.exists():
        return None
    try:
        report = json.loads((entry / REPORT_FILE).read_text())
        expected = report["files"][MODEL_FILE]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"zoo entry {entry}: {REPORT_FILE} is missing or unreadable ({error})") from error
    weights = entry / MODEL_FILE
    if not weights.is_file() or sha256_file(weights) != expected:
        raise CheckpointError(f"zoo entry {entry}: {weights} is missing or does not match its sha256 in {REPORT_FILE}")
    return report


def _load_entry(entry: Path, spec: PretrainSpec) -> nn.Module | None:
    """The cached backbone, or None when there is no entry or it is corrupt (with a warning).

    Raises CheckpointError naming the weights file when they do not fit the spec's backbone.
    """
    try:
        if _read_verified_report(entry) is None:
            return None
        state_dict = load_state_dict(entry / MODEL_FILE)
    except CheckpointError as error:
        warnings.warn(f"corrupt zoo entry, retraining it: {error}", stacklevel=3)
        return None
    backbone = build_backbone(spec.backbone, image_size=spec.image_size)
    try:
        load_into(backbone, state_dict, strict=True)
    except CheckpointError as error:
        raise CheckpointError(
            f"cached weights {entry / MODEL_FILE} do not fit {spec.backbone!r} (pass force=True to retrain): {error}"
        ) from error
    return backbone.eval()


def _write_entry(entry: Path, backbone: nn.Module, run_report: dict) -> None:
    """Write weights + report into a temporary folder, then rename it to `entry` (replacing an old one)."""
    temp = entry.with_name(f"{_TEMP_PREFIX}{entry.name}.{uuid.uuid4().hex}")
    temp.mkdir()
    try:
        save_state_dict(temp / MODEL_FILE, backbone.state_dict())
        atomic_write_json(temp / REPORT_FILE, {**run_report, "files": {MODEL_FILE: sha256_file(temp / MODEL_FILE)}})
        if entry.exists():  # corrupt or forced: move it aside first, a rename cannot replace a non-empty folder
            old = entry.with_name(f"{_TEMP_PREFIX}old-{entry.name}.{uuid.uuid4().hex}")
            os.rename(entry, old)
            shutil.rmtree(old)
        os.rename(temp, entry)
    finally:
        if temp.exists():
            shutil.rmtree(temp)


def pretrained(
    name: str,
    *,
    profile: str = "tiny",
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    force: bool = False,
    spec: PretrainSpec | None = None,
) -> nn.Module:
    """A zoo backbone with its SynthRef-pretrained weights, in eval mode on `device`; trained and cached on first use.

    name:      "clip-tiny" (a CLIPBackbone), "vit-tiny" (DINOv2VisionTower), "resnet-tiny" (ResNetDETREncoder).
    profile:   "tiny" or "study" (see `ZOO`).
    cache_dir: see `default_cache_dir`; notebooks pass `Path(params.out_dir) / "zoo"`.
    force:     retrain and replace the cached entry.
    spec:      replaces the zoo's spec (same backbone), e.g. a reduced run; it gets its own cache entry.
    Raises ConfigError for an unknown name or profile, CheckpointError when a cached entry does not fit its backbone.
    """
    spec = _spec_for(name, profile, spec)
    entry = cache_path(name, profile, cache_dir, spec=spec)
    entry.parent.mkdir(parents=True, exist_ok=True)
    # One process trains an entry; the others wait on the lock and then load what it wrote.
    with _exclusive_lock(entry.with_name(f"{entry.name}.lock")):
        for stale in entry.parent.glob(f"{_TEMP_PREFIX}*{entry.name}.*"):  # left by a killed run (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        backbone = None if force else _load_entry(entry, spec)
        if backbone is None:
            seconds = spec.steps * spec.batch_size * _SECONDS_PER_IMAGE.get(spec.backbone, 0.02)
            seconds += (spec.n_scenes + spec.n_val_scenes) / _RENDER_PER_SECOND
            logger.info(
                f"pretraining {name} ({profile}) on SynthRef: ~{seconds:.0f} s on 2 CPU cores, cached at {entry}"
            )
            backbone, run_report = pretrain(spec, device=device, label=f"{name} ({profile})")
            _write_entry(entry, backbone, {"name": name, "profile": profile, **run_report})
    return backbone.to(device)


def report(
    name: str, *, profile: str = "tiny", cache_dir: str | Path | None = None, spec: PretrainSpec | None = None
) -> dict:
    """The cached run's report: spec, metrics before/after (and chance), loss curve, wall times, versions.

    Raises CheckpointError when the entry is not cached yet (call `pretrained` first) or is corrupt.
    """
    entry = cache_path(name, profile, cache_dir, spec=spec)
    found = _read_verified_report(entry)
    if found is None:
        raise CheckpointError(f"zoo model {name!r} ({profile}) is not cached at {entry}; call pretrained() first")
    return found
