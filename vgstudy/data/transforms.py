"""Grounding-aware transforms: the image, its target box and mask move together (torchvision v2 + tv_tensors).

The pipeline follows the TransVG/HiVG releases (`datasets/__init__.py:make_transforms`, `datasets/transforms.py`):

  train: [random crop that keeps the whole box, unless the text has position words] -> long-side resize to a random
         scale of S -> colour jitter (p=0.8; brightness, contrast, saturation in random order, no hue) ->
         [horizontal flip that swaps left/right words] -> normalise -> pad to S x S at a random offset
  eval:  long-side resize to S -> normalise -> pad to S x S, centred (the releases' `NormalizeAndPad`:
         top = round(dh / 2 - 0.1), i.e. dh // 2)

Padding is 0 *after* normalisation, as in the releases, and `valid` marks the real image pixels.
Two deliberate differences from the releases: the crop keeps the whole target box (the release can cut it, and its
corner test mixes up x and y), and position words are whole words, not substrings ("bottle" is not "bottom").

Randomness: with `seed_or_generator=None` (the default) every draw comes from torch's global RNG, so
`seed_everything` makes a single-process run repeatable, and in a DataLoader each worker draws from its own seeded
stream (torch seeds worker k with base_seed + k, a new base_seed every epoch from the loader's generator).
An int seed or a `torch.Generator` gives the transform a stream of its own, for notebooks and demonstrations; a
copy of it in every DataLoader worker would repeat the same augmentations, so that case is refused with a ConfigError.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from vgstudy.data.sample import Sample
from vgstudy.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the releases' NormalizeAndPad default
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's own preprocessing
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The releases' words that switch the crop off (`RandomSelect`), matched at the start of a word: "leftmost" counts.
POSITION_WORDS = re.compile(r"\b(left|right|top|bottom|middle)", re.IGNORECASE)
# left <-> right as whole words, also inside leftmost / rightward(s) / left-hand.
_LEFT_RIGHT = re.compile(r"\b(left|right)(?=(most|wards?)?\b)", re.IGNORECASE)

# Boxes may overshoot the image by this much (float noise); more means the Sample is broken.
_BOX_TOLERANCE_PX = 0.5


@dataclass(frozen=True)
class TransformConfig:
    """Parameters of `GroundingTransform`; the defaults are the HiVG release's training recipe at S = image_size.

    random_resize_scales: long-side sizes as fractions of image_size; the releases use imsize - 32 i, i = 0..6, which
                          at imsize 640 are these fractions.
    crop_prob:            probability of the box-keeping random crop (releases: 0.5 with --aug_crop).
    crop_min_side:        each side of the crop is at least this fraction of the image's side (the releases crop
                          384..600 px of a 400..600 px short side).
    color_jitter:         brightness/contrast/saturation strength, factors in [1 - j, 1 + j]; 0 disables it.
    color_jitter_prob:    the releases apply the jitter with probability 0.8.
    flip_prob:            HiVG's release: no flip (0.0); TransVG's: 0.5. Flipping swaps left/right words.
    random_translate:     training pads at a random offset instead of centring (the releases' --aug_translate).
    crop_skips_position_words: no crop when the expression has position words (the releases' RandomSelect).
    """

    image_size: int = 128
    train: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    random_resize_scales: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
    crop_prob: float = 0.5
    crop_min_side: float = 0.64
    color_jitter: float = 0.4
    color_jitter_prob: float = 0.8
    flip_prob: float = 0.0
    random_translate: bool = True
    crop_skips_position_words: bool = True

    def __post_init__(self):
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 8:
            raise ConfigError(f"TransformConfig.image_size={self.image_size!r}: expected an int >= 8")
        for name in ("crop_prob", "crop_min_side", "color_jitter_prob", "flip_prob"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"TransformConfig.{name}={value!r}: expected a number in [0, 1]")
        if not isinstance(self.color_jitter, (int, float)) or not 0.0 <= self.color_jitter < 1.0:
            raise ConfigError(f"TransformConfig.color_jitter={self.color_jitter!r}: expected a number in [0, 1)")
        scales = self.random_resize_scales
        if not scales or not all(isinstance(s, (int, float)) and 0.0 < s <= 1.0 for s in scales):
            raise ConfigError(f"TransformConfig.random_resize_scales={scales!r}: expected fractions in (0, 1]")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if (
                not isinstance(value, (tuple, list))
                or len(value) != 3
                or not all(isinstance(v, (int, float)) for v in value)
            ):
                raise ConfigError(f"TransformConfig.{name}={value!r}: expected 3 numbers (R, G, B)")
        if not all(s > 0 for s in self.std):
            raise ConfigError(f"TransformConfig.std={self.std!r}: expected positive numbers")


def swap_left_right(text: str) -> str:
    """Swap the words left and right (also in leftmost, rightwards, left-hand ...), keeping their case."""

    def swap(match: re.Match) -> str:
        word = match.group(1)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        if word[0].isupper():
            return other.capitalize()
        return other

    return _LEFT_RIGHT.sub(swap, text)


class GroundingTransform:
    """Sample -> dict of tensors ready for a model; see the module docstring for the pipeline and its randomness.

    Returns {"image": (3, S, S) float32 normalised, "text": str (left/right swapped when flipped),
    "box_cxcywh": (4,) float32 normalised by S, "mask": (S, S) bool or None, "valid": (S, S) bool (True = image
    pixel, False = padding), "family": ..., "source": ...}.
    """

    def __init__(self, config: TransformConfig, seed_or_generator: int | torch.Generator | None = None):
        self.config = config
        if seed_or_generator is None or isinstance(seed_or_generator, torch.Generator):
            self.generator = seed_or_generator
        elif isinstance(seed_or_generator, int) and not isinstance(seed_or_generator, bool):
            self.generator = torch.Generator().manual_seed(seed_or_generator)
        else:
            raise ConfigError(f"seed_or_generator={seed_or_generator!r}: expected None, an int or a torch.Generator")

    def __call__(self, sample: Sample) -> dict:
        config = self.config
        if config.train and self.generator is not None and torch.utils.data.get_worker_info() is not None:
            raise ConfigError(
                "GroundingTransform with its own seed/generator runs in a DataLoader worker, where every worker "
                "would repeat the same augmentations; expected seed_or_generator=None (torch's per-worker seeding)"
            )
        height, width = sample.image.shape[-2:]
        image = tv_tensors.Image(sample.image)
        boxes_xyxy = tv_tensors.BoundingBoxes(
            _checked_box(sample, width, height)[None], format="XYXY", canvas_size=(height, width)
        )  # (1, 4) pixels
        mask = None if sample.mask is None else tv_tensors.Mask(sample.mask)
        text = sample.text

        long_side = config.image_size
        if config.train:
            if self._draw() < config.crop_prob and not (
                config.crop_skips_position_words and POSITION_WORDS.search(text)
            ):
                image, boxes_xyxy, mask = self._crop_keeping_box(image, boxes_xyxy, mask)
            scale = config.random_resize_scales[self._draw_int(0, len(config.random_resize_scales) - 1)]
            long_side = max(1, round(scale * config.image_size))
        image, boxes_xyxy, mask = _resize_long_side(image, boxes_xyxy, mask, long_side)
        if config.train:
            if config.color_jitter > 0 and self._draw() < config.color_jitter_prob:
                image = self._jitter_colour(image)
            if self._draw() < config.flip_prob:
                image, boxes_xyxy = F.horizontal_flip(image), F.horizontal_flip(boxes_xyxy)
                mask = None if mask is None else F.horizontal_flip(mask)
                text = swap_left_right(text)

        image = F.normalize(F.to_dtype(image, torch.float32, scale=True), mean=config.mean, std=config.std)
        valid = tv_tensors.Mask(torch.ones(image.shape[-2:], dtype=torch.bool))
        padding = self._padding(*image.shape[-2:])
        image, boxes_xyxy, valid = F.pad(image, padding), F.pad(boxes_xyxy, padding), F.pad(valid, padding)
        mask = None if mask is None else F.pad(mask, padding)

        size = config.image_size
        boxes_cxcywh = F.convert_bounding_box_format(F.clamp_bounding_boxes(boxes_xyxy), new_format="CXCYWH")
        return {
            "image": image.as_subclass(torch.Tensor),  # (3, S, S)
            "text": text,
            "box_cxcywh": (boxes_cxcywh.as_subclass(torch.Tensor)[0] / size).clamp(0.0, 1.0),  # (4,)
            "mask": None if mask is None else mask.as_subclass(torch.Tensor),  # (S, S)
            "valid": valid.as_subclass(torch.Tensor),  # (S, S)
            "family": sample.family,
            "source": sample.source,
        }

    def _draw(self) -> float:
        return torch.rand((), generator=self.generator).item()

    def _draw_int(self, low: int, high: int) -> int:
        """An int in [low, high], both included."""
        return int(torch.randint(low, high + 1, (), generator=self.generator).item())

    def _crop_keeping_box(self, image, boxes_xyxy, mask):
        """A random crop of at least crop_min_side of each side that contains the whole box."""
        height, width = image.shape[-2:]
        x1, y1, x2, y2 = boxes_xyxy[0].tolist()
        # the box's pixel extent, which every crop must contain
        left_max, top_max = math.floor(x1), math.floor(y1)
        right_min, bottom_min = min(math.ceil(x2), width), min(math.ceil(y2), height)
        crop_w = self._draw_int(max(right_min - left_max, math.ceil(self.config.crop_min_side * width)), width)
        crop_h = self._draw_int(max(bottom_min - top_max, math.ceil(self.config.crop_min_side * height)), height)
        left = self._draw_int(max(0, right_min - crop_w), min(left_max, width - crop_w))
        top = self._draw_int(max(0, bottom_min - crop_h), min(top_max, height - crop_h))
        region = dict(top=top, left=left, height=crop_h, width=crop_w)
        return F.crop(image, **region), F.crop(boxes_xyxy, **region), None if mask is None else F.crop(mask, **region)

    def _jitter_colour(self, image):
        """Brightness, contrast and saturation by factors in [1 - j, 1 + j], in random order; no hue change."""
        strength = self.config.color_jitter
        adjustments = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
        for which in torch.randperm(3, generator=self.generator).tolist():
            factor = 1.0 - strength + 2.0 * strength * self._draw()
            image = adjustments[which](image, factor)
        return image

    def _padding(self, height: int, width: int) -> list[int]:
        """[left, top, right, bottom] padding to S x S: random offset when training with translation, else centred."""
        extra_h, extra_w = self.config.image_size - height, self.config.image_size - width
        if self.config.train and self.config.random_translate:
            top, left = self._draw_int(0, extra_h), self._draw_int(0, extra_w)
        else:
            top, left = centred_offset(height, width, self.config.image_size)
        return [left, top, extra_w - left, extra_h - top]


class TransformedDataset(torch.utils.data.Dataset):
    """`dataset[i]` passed through `transform` (a `GroundingTransform`)."""

    def __init__(self, dataset, transform: GroundingTransform):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.transform(self.dataset[index])


class RememberedItems(torch.utils.data.Dataset):
    """`dataset[i]`, computed on first use and then kept in memory: for a deterministic pipeline (the eval transform,
    no augmentation) read for many epochs, so rendering or decoding and transforming happen once per item.

    Memory: one item each, e.g. about 0.2 MB per 128 px SynthRef item (float image, masks). Each worker of a
    DataLoader keeps its own copy; use it with num_workers=0.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self._items: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        if index not in self._items:
            self._items[index] = self.dataset[index]
        return self._items[index]


def collate(items: list[dict]) -> dict:
    """Batch `GroundingTransform` outputs.

    Returns {"images": (B, 3, S, S), "texts": list[str], "boxes_cxcywh": (B, 4) normalised, "masks": (B, S, S) bool
    when every item has a mask else None, "valid": (B, S, S) bool, "families": list, "sources": list}.
    """
    masks = [item["mask"] for item in items]
    return {
        "images": torch.stack([item["image"] for item in items]),
        "texts": [item["text"] for item in items],
        "boxes_cxcywh": torch.stack([item["box_cxcywh"] for item in items]),
        "masks": torch.stack(masks) if all(m is not None for m in masks) else None,
        "valid": torch.stack([item["valid"] for item in items]),
        "families": [item["family"] for item in items],
        "sources": [item["source"] for item in items],
    }


def resized_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(height, width) after resizing the longer side to `long_side`, keeping the aspect ratio (no side below 1 px)."""
    ratio = long_side / max(height, width)
    return max(1, round(height * ratio)), max(1, round(width * ratio))


def centred_offset(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(top, left) of a (height, width) image padded to image_size x image_size, centred (the eval padding)."""
    return (image_size - height) // 2, (image_size - width) // 2


def _resize_long_side(image, boxes_xyxy, mask, long_side: int):
    """Resize so the longer side is `long_side` (`resized_size`)."""
    size = list(resized_size(*image.shape[-2:], long_side))
    mask = None if mask is None else F.resize(mask, size)  # nearest, as the releases resize masks
    return F.resize(image, size, antialias=True), F.resize(boxes_xyxy, size), mask


def _checked_box(sample: Sample, width: int, height: int) -> torch.Tensor:
    """The sample's box as (4,) float32 pixels inside the image, or a DataError (never NaN boxes downstream)."""
    box = torch.as_tensor(sample.box_xyxy, dtype=torch.float32).reshape(-1)
    where = sample.source or "sample"
    if box.numel() != 4 or not bool(torch.isfinite(box).all()):
        raise DataError(f"{where}: box_xyxy={box.tolist()}: expected 4 finite pixel values")
    x1, y1, x2, y2 = box.tolist()
    if not (x2 > x1 and y2 > y1):
        raise DataError(f"{where}: box_xyxy={box.tolist()} has zero or negative area; expected x2 > x1 and y2 > y1")
    tol = _BOX_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise DataError(
            f"{where}: box_xyxy={box.tolist()} is outside the {width}x{height} image; expected a box inside it "
            "(the loaders clip boxes to the image)"
        )
    box = torch.stack(
        [box[0].clamp(0, width), box[1].clamp(0, height), box[2].clamp(0, width), box[3].clamp(0, height)]
    )
    if not (box[2] > box[0] and box[3] > box[1]):
        raise DataError(f"{where}: box_xyxy={box.tolist()} has no area inside the {width}x{height} image")
    return box
