"""Grounding-aware transforms: the box keeps framing the same pixels through every random step."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vgstudy.data.sample import Sample
from vgstudy.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    GroundingTransform,
    TransformConfig,
    TransformedDataset,
    collate,
    swap_left_right,
)
from vgstudy.errors import ConfigError, DataError

S = 64  # output size used by the property tests: small keeps them fast
NO_JITTER_TRAIN = TransformConfig(
    image_size=S, train=True, color_jitter=0.0, flip_prob=0.5, crop_skips_position_words=False
)


def marked_sample(height: int, width: int, box_xyxy: tuple[int, int, int, int], text: str = "the thing") -> Sample:
    """A black image whose box region is white, with the box region as its mask."""
    x1, y1, x2, y2 = box_xyxy
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[:, y1:y2, x1:x2] = 255
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[y1:y2, x1:x2] = True
    return Sample(image, text, torch.tensor(box_xyxy, dtype=torch.float32), mask, "test[0]", "attribute")


def denormalised(out: dict, config: TransformConfig) -> torch.Tensor:
    mean, std = torch.tensor(config.mean)[:, None, None], torch.tensor(config.std)[:, None, None]
    return out["image"] * std + mean  # (3, S, S) in [0, 1] on the image


def box_xyxy_pixels(out: dict) -> list[float]:
    cx, cy, w, h = (out["box_cxcywh"] * out["image"].shape[-1]).tolist()
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def tight_box(region: torch.Tensor) -> list[float]:
    """x1y1x2y2 pixel box around the True pixels of an (H, W) bool tensor."""
    rows, cols = region.any(1).nonzero()[:, 0], region.any(0).nonzero()[:, 0]
    return [cols.min().item(), rows.min().item(), cols.max().item() + 1.0, rows.max().item() + 1.0]


@st.composite
def images_with_boxes(draw):
    height, width = draw(
        st.sampled_from([(16, 300), (300, 16), (8, 8)]) | st.tuples(st.integers(8, 200), st.integers(8, 200))
    )
    x1 = draw(st.sampled_from([0, width - 1]) | st.integers(0, width - 1))  # edges on purpose
    y1 = draw(st.sampled_from([0, height - 1]) | st.integers(0, height - 1))
    x2 = draw(st.sampled_from([x1 + 1, width]) | st.integers(x1 + 1, width))  # 1-pixel boxes on purpose
    y2 = draw(st.sampled_from([y1 + 1, height]) | st.integers(y1 + 1, height))
    return height, width, (x1, y1, x2, y2)


@settings(max_examples=80, deadline=None)
@given(images_with_boxes(), st.integers(0, 2**31 - 1))
def test_box_frames_the_same_pixels_after_random_transforms(image_and_box, seed):
    height, width, box = image_and_box
    sample = marked_sample(height, width, box)
    out = GroundingTransform(NO_JITTER_TRAIN, seed)(sample)

    assert out["image"].shape == (3, S, S) and out["valid"].shape == (S, S) and out["mask"].shape == (S, S)
    assert bool(torch.isfinite(out["image"]).all())
    assert 0.0 <= out["box_cxcywh"].min() and out["box_cxcywh"].max() <= 1.0
    predicted = box_xyxy_pixels(out)
    assert predicted[2] > predicted[0] and predicted[3] > predicted[1]
    # padding holds nothing of the image, and the image is one rectangle
    valid = out["valid"]
    assert bool((out["image"][:, ~valid] == 0).all())
    assert valid.sum() == valid.any(1).sum() * valid.any(0).sum()
    # the white pixels are where the box says: a resize spreads them by about 1 output px + half an input px
    marker = (denormalised(out, NO_JITTER_TRAIN).amax(0) > 0.5 / 255) & valid
    scales = [(predicted[2] - predicted[0]) / (box[2] - box[0]), (predicted[3] - predicted[1]) / (box[3] - box[1])]
    for axis, (found, expected) in enumerate(zip(tight_box(marker), predicted, strict=True)):
        assert abs(found - expected) <= 1.5 + 0.5 * scales[axis % 2], (tight_box(marker), predicted)
    # the mask moves with the box too (nearest resize may drop an object thinner than a pixel)
    if predicted[2] - predicted[0] >= 1.5 and predicted[3] - predicted[1] >= 1.5:
        for axis, (found, expected) in enumerate(zip(tight_box(out["mask"]), predicted, strict=True)):
            assert abs(found - expected) <= 1.0 + 0.5 * scales[axis % 2]
    assert not bool((out["mask"] & ~valid).any())


@settings(max_examples=40, deadline=None)
@given(images_with_boxes(), st.integers(0, 2**31 - 1))
def test_flip_mirrors_image_box_and_words(image_and_box, seed):
    height, width, box = image_and_box
    sample = marked_sample(height, width, box, text="the Left one, not the rightmost")
    config = TransformConfig(image_size=S, train=True, color_jitter=0.0, crop_skips_position_words=False)
    plain = GroundingTransform(config, seed)(sample)
    flipped = GroundingTransform(replace(config, flip_prob=1.0), seed)(sample)

    assert flipped["text"] == "the Right one, not the leftmost" and plain["text"] == sample.text
    assert torch.equal(flipped["valid"], plain["valid"])  # same draws otherwise: same crop, scale and offset
    cols = plain["valid"].any(0).nonzero()[:, 0]
    left, right = cols.min().item(), cols.max().item() + 1
    x1, y1, x2, y2 = box_xyxy_pixels(plain)
    mirrored = [left + right - x2, y1, left + right - x1, y2]
    assert box_xyxy_pixels(flipped) == pytest.approx(mirrored, abs=1e-3)
    content_plain = plain["image"][:, :, left:right]
    content_flipped = flipped["image"][:, :, left:right]
    torch.testing.assert_close(content_flipped, content_plain.flip(-1), atol=0.02, rtol=0)


def test_crop_keeps_the_whole_box():
    sample = marked_sample(200, 300, (250, 150, 299, 199))  # a box in the corner
    config = TransformConfig(image_size=S, train=True, crop_prob=1.0, color_jitter=0.0, random_translate=False)
    content_shapes = set()
    for seed in range(30):
        out = GroundingTransform(config, seed)(sample)
        x1, y1, x2, y2 = box_xyxy_pixels(out)
        # cut boxes would change the box's aspect ratio (49 x 49 here) against the scale of the content
        assert (x2 - x1) / (y2 - y1) == pytest.approx(1.0, rel=0.05)
        valid = out["valid"]
        content_shapes.add((valid.any(1).sum().item(), valid.any(0).sum().item()))
    assert len(content_shapes) > 3  # crops really happened (uncropped, the content is always 3:2)


def test_position_words_switch_the_crop_off():
    sample = marked_sample(120, 180, (30, 30, 60, 60))
    config = TransformConfig(image_size=S, train=True, crop_prob=1.0, color_jitter=0.0)
    no_crop = replace(config, crop_prob=0.0)

    def run(text: str, cfg: TransformConfig) -> torch.Tensor:
        return GroundingTransform(cfg, 3)(Sample(sample.image, text, sample.box_xyxy))["box_cxcywh"]

    torch.testing.assert_close(run("the leftmost square", config), run("the leftmost square", no_crop))
    torch.testing.assert_close(run("the one at the Bottom", config), run("the one at the Bottom", no_crop))
    assert not torch.allclose(run("the bottle", config), run("the bottle", no_crop))


def test_eval_is_deterministic_centred_and_scaled():
    sample = marked_sample(30, 60, (10, 5, 20, 25))
    transform = GroundingTransform(TransformConfig(image_size=S))
    torch.manual_seed(0)
    first = transform(sample)
    torch.manual_seed(1)
    second = transform(sample)
    for key in ("image", "box_cxcywh", "mask", "valid"):
        assert torch.equal(first[key], second[key])
    # 60 x 30 -> 64 x 32, centred: rows 16..48
    rows = first["valid"].any(1).nonzero()[:, 0]
    assert (rows.min().item(), rows.max().item() + 1) == (16, 48)
    assert box_xyxy_pixels(first) == pytest.approx([10 * 64 / 60, 16 + 5 * 32 / 30, 20 * 64 / 60, 16 + 25 * 32 / 30])


def test_same_seed_same_output_and_global_rng_is_reproducible():
    sample = marked_sample(50, 70, (5, 5, 40, 30))
    config = TransformConfig(image_size=S, train=True, flip_prob=0.5)

    def outputs(transform, n=5):
        return [transform(sample)["image"] for _ in range(n)]

    for a, b in zip(outputs(GroundingTransform(config, 7)), outputs(GroundingTransform(config, 7)), strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(5)
    first = outputs(GroundingTransform(config))
    torch.manual_seed(5)
    second = outputs(GroundingTransform(config))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(first[0], later) for later in first[1:])  # it is random


def test_dataloader_workers_are_reproducible_and_differ():
    samples = [marked_sample(40, 50, (5, 5, 30, 30)) for _ in range(8)]
    dataset = TransformedDataset(samples, GroundingTransform(TransformConfig(image_size=32, train=True)))

    def epoch(seed):
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=2, num_workers=2, collate_fn=collate, generator=torch.Generator().manual_seed(seed)
        )
        return torch.cat([batch["images"] for batch in loader])

    first, again = epoch(0), epoch(0)
    assert torch.equal(first, again)
    assert len({tuple(image.flatten()[::97].tolist()) for image in first}) > 4  # workers draw different streams


def test_owned_generator_in_a_worker_is_refused():
    dataset = TransformedDataset(
        [marked_sample(20, 20, (2, 2, 9, 9))], GroundingTransform(TransformConfig(train=True), 0)
    )
    loader = torch.utils.data.DataLoader(dataset, num_workers=1, collate_fn=collate)
    with pytest.raises(ConfigError, match="seed_or_generator=None"):
        next(iter(loader))


def test_colour_jitter_leaves_hue_alone():
    image = torch.zeros(3, 20, 20, dtype=torch.uint8)
    image[0], image[1], image[2] = 200, 40, 40  # red: green and blue stay equal unless the hue moves
    config = TransformConfig(
        image_size=32, train=True, color_jitter=0.9, color_jitter_prob=1.0, mean=CLIP_MEAN, std=CLIP_STD
    )
    for seed in range(10):
        out = GroundingTransform(config, seed)(Sample(image, "the red square", torch.tensor([0.0, 0, 20, 20])))
        pixels = denormalised(out, config)[:, out["valid"]]
        torch.testing.assert_close(pixels[1], pixels[2], atol=1e-5, rtol=0)
        assert bool((pixels[0] > pixels[1]).all())


@pytest.mark.parametrize(
    "box, message",
    [
        ([5.0, 5.0, 5.0, 9.0], "zero or negative area"),
        ([9.0, 5.0, 4.0, 9.0], "zero or negative area"),
        ([25.0, 5.0, 30.0, 9.0], "outside the 20x20 image"),
        ([-8.0, 5.0, 4.0, 9.0], "outside the 20x20 image"),
        ([math.nan, 5.0, 4.0, 9.0], "finite"),
        ([1.0, 2.0, 3.0], "4 finite"),
    ],
)
def test_degenerate_boxes_are_data_errors(box, message):
    sample = Sample(torch.zeros(3, 20, 20, dtype=torch.uint8), "x", torch.tensor(box), source="unc/unc_val.pth[4]")
    for config in (TransformConfig(), TransformConfig(train=True)):
        with pytest.raises(DataError, match=rf"unc/unc_val.pth\[4\].*{message}"):
            GroundingTransform(config, 0)(sample)


def test_collate_batches_and_keeps_masks_only_when_all_have_them():
    transform = GroundingTransform(TransformConfig(image_size=32))
    with_mask = transform(marked_sample(20, 30, (1, 1, 5, 5), "a"))
    without = transform(Sample(torch.zeros(3, 20, 30, dtype=torch.uint8), "b", torch.tensor([1.0, 1, 5, 5])))
    batch = collate([with_mask, with_mask])
    assert batch["images"].shape == (2, 3, 32, 32) and batch["boxes_cxcywh"].shape == (2, 4)
    assert batch["masks"].shape == (2, 32, 32) and batch["masks"].dtype == torch.bool
    assert batch["valid"].shape == (2, 32, 32) and batch["texts"] == ["a", "a"]
    assert batch["families"] == ["attribute", "attribute"] and batch["sources"] == ["test[0]", "test[0]"]
    assert collate([with_mask, without])["masks"] is None


@pytest.mark.parametrize(
    "text, swapped",
    [
        ("the left cat", "the right cat"),
        ("Right of the LEFT box", "Left of the RIGHT box"),
        ("leftmost, rightmost", "rightmost, leftmost"),
        ("the left-hand side, moving rightwards", "the right-hand side, moving leftwards"),
        ("leftover bright copyright", "leftover bright copyright"),
    ],
)
def test_swap_left_right_whole_words_keeping_case(text, swapped):
    assert swap_left_right(text) == swapped
    assert swap_left_right(swapped) == text


@pytest.mark.parametrize(
    "overrides",
    [
        {"image_size": 4},
        {"image_size": 64.0},
        {"crop_prob": 1.5},
        {"color_jitter": 1.0},
        {"random_resize_scales": ()},
        {"random_resize_scales": (0.0,)},
        {"std": (0.1, 0.0, 0.1)},
        {"mean": (0.5, 0.5)},
        {"std": 0.2},
    ],
)
def test_bad_config_is_a_config_error(overrides):
    with pytest.raises(ConfigError, match=f"TransformConfig.{next(iter(overrides))}"):
        TransformConfig(**overrides)
