"""Bad input, fuzzed: every input either works correctly or raises our own error type.

Four targets, each a property over random input: the split-file loader, the grounding transforms, the tokenisers and
the parameter validation. "Works correctly" is checked against an expectation built independently of the code under
test (the box a good split-file entry loads as, where an uncropped image puts the box, the untruncated token ids,
the value a parameter coerces to), so a crash deep inside torch, a hang or a silently wrong box fails the test.
Each bug the properties found has its own regression test at the end of its section.

How many examples run is set by the hypothesis profile (conftest.py): "fast" by default, "long" with
VGSTUDY_FUZZ=long (`make test-long`). Each property counts the examples it tried; `test_fuzz_counts_reported`, the
last test here, checks that every property that ran tried some and prints the counts (visible with `-s`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import random
import re
import string
import tempfile
import time
import types
import typing
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image

from vgstudy import config as config_module
from vgstudy.config import RunParams, load, validate
from vgstudy.data.refer import DATASETS, DatasetLayout, load_split
from vgstudy.data.sample import Sample
from vgstudy.data.tokenizers import build_tokenizer, visible_text
from vgstudy.data.transforms import CLIP_MEAN, CLIP_STD, POSITION_WORDS, GroundingTransform, TransformConfig
from vgstudy.errors import ConfigError, DataError

# Examples tried per property in this session, reported by test_fuzz_counts_reported.
TRIED: Counter[str] = Counter()


# ---------------------------------------------------------------------------------------------------------------------
# The split-file loader
# ---------------------------------------------------------------------------------------------------------------------

# The images every fabricated split file refers to: name -> (height, width). Edge sizes on purpose.
IMAGES = {"dot.png": (1, 1), "strip.png": (3, 97), "tall.jpg": (80, 2), "photo.png": (40, 60)}
# Names that are no usable image: missing, empty, not an image, a folder, unencodable, absolute, escaping the root.
BAD_IMAGE_NAMES = (
    "missing.png",
    "",
    "corrupt.png",
    "empty.jpg",
    "folder",
    "a\x00b.png",
    "\udc80.png",
    "/no/such.png",
    "../dot.png",
)
WHITESPACE = " \t\n\r\x0b\x0c\x1c\x85\u00a0\u2028\u3000"  # what str.strip removes, ASCII and beyond
# Unicode's White_Space characters.
UNICODE_SPACES = " \t\n\r\x0b\x0c\x85\u00a0\u1680\u2000\u2028\u2029\u202f\u205f\u3000"
SPLIT = "val"  # every layout has a val split of one file


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_images")
    rng = np.random.default_rng(0)
    for name, (height, width) in IMAGES.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / name)
    (root / "corrupt.png").write_bytes(b"not an image at all")
    (root / "empty.jpg").write_bytes(b"")
    (root / "folder").mkdir()
    return root


@dataclass(frozen=True)
class FuzzEntry:
    """One fabricated split-file item; `good` items are valid by construction, with the box and text they must give."""

    item: Any
    good: bool
    image: str | None = None
    box_xyxy: tuple[float, float, float, float] | None = None
    text: str | None = None


# Numbers a box may hold: edges of float, huge ints (still within float range: beyond it is a known bug, below).
WILD_NUMBERS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0, -0.0, -1, 0.5, 1e308, -1e308, 5e-324, 2**63, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**80), 2**80),
)
# Anything else a split file can hold that torch.load(weights_only=True) rebuilds.
JUNK = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        WILD_NUMBERS,
        st.text(alphabet=st.characters(exclude_categories=()), max_size=8),
        st.binary(min_size=1, max_size=8),  # torch.load refuses b"" (the whole file)
        st.complex_numbers(max_magnitude=1e3),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=3), children, max_size=3),
    ),
    max_leaves=6,
)


@st.composite
def wild_tensors(draw) -> torch.Tensor:
    """Tensors of wrong or right shape, of every dtype, with non-finite values; some sparse, some without values."""
    shape = draw(st.sampled_from([(4,), (4,), (), (0,), (3,), (5,), (2, 2), (1, 4)]))
    values = draw(st.lists(WILD_NUMBERS, min_size=math.prod(shape), max_size=math.prod(shape)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64]))
    values = [float(v) for v in values]
    if draw(st.booleans()):
        dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool]))
        values = [int(v) % 256 if math.isfinite(v) else 0 for v in values]
    tensor = torch.tensor(values, dtype=dtype).reshape(shape)
    kind = draw(st.sampled_from(["dense", "dense", "dense", "sparse", "meta"]))
    if kind == "sparse" and tensor.dim() > 0 and dtype not in (torch.bool, torch.float16, torch.bfloat16):
        return tensor.to_sparse()
    return tensor.to("meta") if kind == "meta" else tensor


def pixel_span(size: int):
    """(low, high) integer pixel bounds inside [0, size], at the edges on purpose, high > low."""
    return st.integers(0, size - 1).flatmap(
        lambda low: st.tuples(st.just(low), st.sampled_from([low + 1, size]) | st.integers(low + 1, size))
    )


@st.composite
def good_entries(draw, layout: DatasetLayout, max_text_chars: int) -> FuzzEntry:
    """A valid item of `layout`: a box inside an image, a non-empty phrase (unicode, padded with whitespace)."""
    image = draw(st.sampled_from(sorted(IMAGES)))
    height, width = IMAGES[image]
    (x1, x2), (y1, y2) = draw(pixel_span(width)), draw(pixel_span(height))
    if layout.integer_boxes:
        # the release truncates box values to ints: fractions must not matter
        fractions = draw(st.lists(st.sampled_from([0.0, 0.5, 0.999]), min_size=4, max_size=4))
        whole = [x1, y1, x2 - x1, y2 - y1] if layout.box_format == "xywh" else [x1, y1, x2, y2]
        raw = [value + fraction for value, fraction in zip(whole, fractions, strict=True)]
        expected = (float(x1), float(y1), float(x2), float(y2))
    else:
        # float boxes (SynthRef): sub-pixel corners inside the same pixel span
        left, top = x1 + draw(st.sampled_from([0.0, 0.25])), y1 + draw(st.sampled_from([0.0, 0.25]))
        raw = [left, top, x2 - left, y2 - top] if layout.box_format == "xywh" else [left, top, x2, y2]
        expected = (left, top, float(x2), float(y2))
    box = draw(
        st.sampled_from(
            [raw, tuple(raw), torch.tensor(raw, dtype=torch.float64)]
            + ([[int(v) for v in raw]] if all(float(v).is_integer() for v in raw) else [])
        )
    )
    words = draw(
        st.text(alphabet=st.characters(exclude_categories=()), min_size=1, max_size=max_text_chars).filter(
            lambda t: visible_text(t).strip() and len(t.strip()) <= max_text_chars
        )
    )
    pad = st.text(alphabet=WHITESPACE, max_size=3)
    text = draw(pad) + words + draw(pad)
    if layout.tuple_length == 3:
        item = (image, box, text)
    else:
        attributes = [draw(st.text(max_size=10))] if layout.family_in_attributes else draw(JUNK)
        item = (image, draw(JUNK), box, text, attributes)
    return FuzzEntry(draw(st.sampled_from([item, list(item)])), True, image, expected, text.strip())


@st.composite
def bad_entries(draw, layout: DatasetLayout, max_text_chars: int) -> FuzzEntry:
    """An item that may or may not be usable: wrong container, a slot of junk, a wild box, text or image name."""
    good = draw(good_entries(layout, max_text_chars))
    item = list(good.item)
    box_slot, text_slot = (1, 2) if layout.tuple_length == 3 else (2, 3)
    how = draw(st.sampled_from(["container", "length", "slot", "box", "box outside", "text", "image"]))
    if how == "container":
        return FuzzEntry(draw(JUNK.filter(lambda v: not isinstance(v, (list, tuple))) | wild_tensors()), False)
    if how == "length":
        return FuzzEntry(draw(st.lists(JUNK, max_size=7).filter(lambda v: len(v) != layout.tuple_length)), False)
    if how == "slot":
        item[draw(st.integers(0, len(item) - 1))] = draw(JUNK)
    elif how == "box":
        item[box_slot] = draw(
            st.lists(WILD_NUMBERS | JUNK, max_size=6) | st.lists(WILD_NUMBERS, min_size=4, max_size=4)
        )
        item[box_slot] = draw(st.sampled_from([item[box_slot], tuple(item[box_slot])]) | wild_tensors())
    elif how == "box outside":
        item[box_slot] = draw(st.lists(st.integers(-400, 400) | st.floats(-400, 400), min_size=4, max_size=4))
    elif how == "text":
        too_long = "x" * (max_text_chars + 1)
        invisible = st.text(alphabet="\x00\x07\u200b\ufeff\x85 ", min_size=1, max_size=5)
        item[text_slot] = draw(st.text(alphabet=WHITESPACE, max_size=5) | invisible | st.just(too_long) | JUNK)
    else:
        item[0] = draw(st.sampled_from(BAD_IMAGE_NAMES) | JUNK)
    return FuzzEntry(tuple(item), False)


@st.composite
def split_files(draw):
    """(data set name, max_text_chars, entries): one split file's worth of good and bad items."""
    dataset = draw(st.sampled_from(sorted(DATASETS)))
    max_text_chars = draw(st.sampled_from([1000, 4]))
    layout = DATASETS[dataset]
    entries = draw(
        st.lists(good_entries(layout, max_text_chars) | bad_entries(layout, max_text_chars), min_size=0, max_size=6)
    )
    return dataset, max_text_chars, entries


def blamed_index(message: str, file_name: str) -> int | None:
    """The entry index an error message names next to the split file's name ("unc_val.pth [3]" or "unc_val.pth[3]")."""
    match = re.search(rf"{re.escape(file_name)} ?\[(\d+)\]", message)
    return None if match is None else int(match.group(1))


def assert_valid_sample(sample: Sample, entry: FuzzEntry, max_text_chars: int) -> None:
    """A loaded sample is usable: decoded image, a finite box with area inside it, a stripped non-empty phrase."""
    assert sample.image.dtype == torch.uint8 and sample.image.ndim == 3 and sample.image.shape[0] == 3
    height, width = sample.image.shape[1:]
    box = sample.box_xyxy
    assert box.dtype == torch.float32 and box.shape == (4,) and bool(torch.isfinite(box).all()), box
    x1, y1, x2, y2 = box.tolist()
    assert 0.0 <= x1 < x2 <= width and 0.0 <= y1 < y2 <= height, (box, width, height)
    assert isinstance(sample.text, str) and sample.text == sample.text.strip() and 0 < len(sample.text)
    assert len(sample.text) <= max_text_chars
    if entry.good:
        assert (height, width) == IMAGES[entry.image]
        torch.testing.assert_close(box, torch.tensor(entry.box_xyxy, dtype=torch.float32), atol=1e-4, rtol=0)
        assert sample.text == entry.text


@given(split_files())
def test_split_files_load_valid_samples_or_name_the_bad_entry(image_root, case):
    TRIED["split files"] += 1
    dataset, max_text_chars, entries = case
    file_name = f"{dataset}_{SPLIT}.pth"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / dataset).mkdir()
        torch.save([entry.item for entry in entries], Path(tmp) / dataset / file_name)

        # on_error="raise": the first unusable entry is named (file and index); good entries are never blamed
        try:
            data = load_split(tmp, dataset, SPLIT, image_root, max_text_chars=max_text_chars)
        except DataError as error:
            blamed = blamed_index(str(error), file_name)
            if "cannot be read by torch.load" in str(error):  # the file as a whole (torch refuses b"", for one)
                assert file_name in str(error)
                return
            if entries:
                assert blamed is not None and not entries[blamed].good, str(error)
            else:
                assert "no usable entries" in str(error)
        else:
            assert len(data) == len(entries) and data.skipped == []
            for index, entry in enumerate(entries):
                try:
                    sample = data[index]
                except DataError as error:  # only an image or a box that does not fit it is found this late
                    assert blamed_index(str(error), file_name) == index and not entry.good, str(error)
                    continue
                assert_valid_sample(sample, entry, max_text_chars)

        # on_error="skip": only bad entries are dropped, and every read gives a usable sample
        try:
            data = load_split(tmp, dataset, SPLIT, image_root, on_error="skip", max_text_chars=max_text_chars)
        except DataError as error:
            assert not any(entry.good for entry in entries) and "no usable entries" in str(error), str(error)
            return
        kept = [blamed_index(entry.source, file_name) for entry in data.entries]
        skipped = [blamed_index(source, file_name) for source, _ in data.skipped]
        assert sorted(kept + skipped) == list(range(len(entries)))
        assert not any(entries[index].good for index in skipped)
        for position in range(len(data)):
            try:
                sample = data[position]
            except DataError as error:
                assert "could be read" in str(error) and not any(entry.good for entry in entries), str(error)
                break
            assert_valid_sample(sample, entries[blamed_index(sample.source, file_name)], max_text_chars)


def write_one_entry(root: Path, box, text: str = "the red circle") -> None:
    """A RefCOCO split file of one entry on photo.png (40 x 60)."""
    (root / "unc").mkdir()
    torch.save([("photo.png", 1, box, text, ["red"])], root / "unc" / f"unc_{SPLIT}.pth")


def test_box_int_beyond_float_range_is_a_data_error(tmp_path, image_root):
    # Was: a box [10**400, 0, 5, 5] escaped as OverflowError ("int too large to convert to float").
    write_one_entry(tmp_path, [10**400, 0, 5, 5])
    with pytest.raises(DataError, match=r"unc_val.pth \[0\]"):
        load_split(tmp_path, "unc", SPLIT, image_root)


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_a_sparse_box_tensor_loads_as_its_dense_values_and_a_meta_one_is_a_data_error(tmp_path, image_root):
    dense = torch.tensor([1.0, 2.0, 3.0, 4.0])
    write_one_entry(tmp_path, dense.to_sparse())
    (entry,) = load_split(tmp_path, "unc", SPLIT, image_root).entries
    assert entry.box_xyxy == (1.0, 2.0, 4.0, 6.0)  # unc boxes are x, y, w, h
    (tmp_path / "meta").mkdir()
    write_one_entry(tmp_path / "meta", dense.to("meta"))
    with pytest.raises(DataError, match=r"unc_val.pth \[0\].*meta device"):
        load_split(tmp_path / "meta", "unc", SPLIT, image_root)


@pytest.mark.parametrize("text", ["\x00\u200b", "\u200b\u200c\ufeff", "\x85\x07"])
def test_phrase_of_invisible_characters_is_refused_where_it_is_read(tmp_path, image_root, text):
    write_one_entry(tmp_path, [1, 1, 5, 5], text=text)
    with pytest.raises(DataError, match=r"unc_val.pth \[0\].*empty"):
        load_split(tmp_path, "unc", SPLIT, image_root)


# ---------------------------------------------------------------------------------------------------------------------
# The grounding transforms
# ---------------------------------------------------------------------------------------------------------------------

TEXTS = ("the thing", "the left one", "top right corner", "the leftmost bottle")  # with and without position words


@dataclass(frozen=True)
class TransformCase:
    """An image size, a box (float32 values as Python floats) and whether it must be accepted."""

    height: int
    width: int
    box: list[float]
    usable: bool
    subpixel: bool = False


def side():
    return st.sampled_from([1, 2, 300]) | st.integers(1, 300)


@st.composite
def usable_boxes(draw, height: int, width: int) -> TransformCase:
    """Pixel boxes at the edges, or sub-pixel boxes overshooting the image by at most the 0.5 px tolerance."""
    subpixel = draw(st.booleans())
    corners = []
    for size in (width, height):
        low, high = draw(pixel_span(size))
        if subpixel:
            low, high = float(low), float(high)
            low += draw(st.sampled_from([0.0, 0.3]) if high - low > 0.5 else st.just(0.0))
            high -= draw(st.sampled_from([0.0, 0.3]) if high - low > 0.5 else st.just(0.0))
            low -= draw(st.sampled_from([0.0, 0.25, 0.5])) if low == 0 else 0.0  # overshoot within tolerance
            high += draw(st.sampled_from([0.0, 0.25, 0.5])) if high == size else 0.0
        corners.append((low, high))
    (x1, x2), (y1, y2) = corners
    box = torch.tensor([x1, y1, x2, y2], dtype=torch.float32).tolist()
    return TransformCase(height, width, box, True, subpixel)


@st.composite
def degenerate_boxes(draw, height: int, width: int) -> TransformCase:
    """Boxes that must be refused: no area, inverted, non-finite, too few/many values, beyond the tolerance."""
    x1, y1 = draw(st.integers(0, width - 1)), draw(st.integers(0, height - 1))
    x2, y2 = x1 + 1.0, y1 + 1.0
    how = draw(st.sampled_from(["zero width", "zero height", "inverted", "non-finite", "count", "outside"]))
    if how == "zero width":
        box = [x1, y1, x1, y2]
    elif how == "zero height":
        box = [x1, y1, x2, y1]
    elif how == "inverted":
        box = [x2, y1, x1 - draw(st.sampled_from([0.0, 0.01, 5.0])), y2]
    elif how == "non-finite":
        box = [x1, y1, x2, y2]
        box[draw(st.integers(0, 3))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    elif how == "count":
        box = draw(st.lists(st.floats(0, 1), max_size=6).filter(lambda values: len(values) != 4))
    else:
        beyond = draw(st.sampled_from([0.51, 0.75, 1.0, 40.0, 1e6]))
        box, corner = [x1, y1, x2, y2], draw(st.integers(0, 3))
        box[corner] = -beyond if corner < 2 else (width, height)[corner - 2] + beyond
        if corner < 2:  # keep the box's area: a far-out corner of an otherwise fine box
            box[corner + 2] = max(box[corner + 2], 1.0)
    return TransformCase(height, width, torch.tensor(box, dtype=torch.float32).tolist(), False)


@st.composite
def transform_cases(draw) -> TransformCase:
    height, width = draw(side()), draw(side())
    usable = draw(st.sampled_from([True, True, False]))  # most checks need a usable box
    return draw(usable_boxes(height, width) if usable else degenerate_boxes(height, width))


transform_configs = st.builds(
    TransformConfig,
    image_size=st.sampled_from([8, 13, 32, 64]),
    train=st.booleans(),
    mean=st.sampled_from([CLIP_MEAN, (0.0, 0.0, 0.0)]),
    std=st.sampled_from([CLIP_STD, (1.0, 1.0, 1.0)]),
    crop_prob=st.sampled_from([0.0, 0.5, 1.0]),
    color_jitter=st.sampled_from([0.0, 0.4]),
    flip_prob=st.sampled_from([0.0, 0.5, 1.0]),
    random_translate=st.booleans(),
    crop_skips_position_words=st.booleans(),
)


def pixel_cover(box: list[float], height: int, width: int) -> torch.Tensor:
    """(H, W) bool: the pixels the box touches."""
    x1, y1, x2, y2 = box
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[max(0, math.floor(y1)) : math.ceil(y2), max(0, math.floor(x1)) : math.ceil(x2)] = True
    return mask


def tight_box(region: torch.Tensor) -> list[float]:
    """x1y1x2y2 pixel box around the True pixels of an (H, W) bool tensor."""
    rows, cols = region.any(1).nonzero()[:, 0], region.any(0).nonzero()[:, 0]
    return [cols.min().item(), rows.min().item(), cols.max().item() + 1.0, rows.max().item() + 1.0]


@given(transform_cases(), transform_configs, st.sampled_from(TEXTS), st.booleans(), st.integers(0, 2**31 - 1))
def test_transforms_frame_the_same_pixels_or_refuse_the_box(case, config, text, with_mask, seed):
    TRIED["transforms"] += 1
    height, width, size = case.height, case.width, config.image_size
    cover = pixel_cover(case.box, height, width) if case.usable else torch.zeros(height, width, dtype=torch.bool)
    image = torch.where(cover, 255, 0).to(torch.uint8).expand(3, height, width).contiguous()
    box = torch.tensor(case.box, dtype=torch.float32)
    sample = Sample(image, text, box, cover if with_mask else None, source="fuzz/fuzz_val.pth[7]")
    transform = GroundingTransform(config, seed)
    event("transforms: box " + ("usable" if case.usable else "refused"))
    if not case.usable:
        with pytest.raises(DataError, match=re.escape("fuzz/fuzz_val.pth[7]")):
            transform(sample)
        return
    out = transform(sample)

    assert out["image"].shape == (3, size, size) and out["image"].dtype == torch.float32
    assert bool(torch.isfinite(out["image"]).all())
    valid = out["valid"]
    rows, cols = valid.any(1).nonzero()[:, 0], valid.any(0).nonzero()[:, 0]
    top, left, new_h, new_w = rows.min().item(), cols.min().item(), len(rows), len(cols)
    assert valid.sum() == new_h * new_w and rows.max().item() + 1 - top == new_h  # one rectangle
    # the box: finite, normalised, with area, on image pixels (never on padding)
    cxcywh = out["box_cxcywh"]
    assert cxcywh.shape == (4,) and bool(torch.isfinite(cxcywh).all())
    assert 0.0 <= cxcywh.min() and cxcywh.max() <= 1.0 and cxcywh[2] > 0 and cxcywh[3] > 0
    cx, cy, w, h = (cxcywh * size).tolist()
    found = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    slack = 1e-3 * size
    assert left - slack <= found[0] and found[2] <= left + new_w + slack, (found, left, new_w)
    assert top - slack <= found[1] and found[3] <= top + new_h + slack, (found, top, new_h)

    # without a crop, where the box must be follows from the valid rectangle alone
    cropped = (
        config.train and config.crop_prob > 0 and not (config.crop_skips_position_words and POSITION_WORDS.search(text))
    )
    flips_known = not config.train or config.flip_prob in (0.0, 1.0) or re.search(r"left|right", text)
    if not cropped and flips_known:
        if not config.train:  # eval: long side to S, centred
            assert (new_h, new_w) == (
                max(1, round(height * size / max(height, width))),
                max(1, round(width * size / max(height, width))),
            )
            assert (top, left) == ((size - new_h) // 2, (size - new_w) // 2)
        event("transforms: box checked against the valid rectangle")
        flipped = out["text"] != text if re.search(r"left|right", text) else config.train and config.flip_prob == 1.0
        x1, y1, x2, y2 = min(max(case.box[0], 0), width), max(case.box[1], 0), min(case.box[2], width), case.box[3]
        y2 = min(y2, height)
        if flipped:
            x1, x2 = width - x2, width - x1
        expected = [left + x1 * new_w / width, top + y1 * new_h / height, left + x2 * new_w / width]
        expected.append(top + y2 * new_h / height)
        assert found == pytest.approx(expected, abs=2e-3 * max(1.0, size / 32)), (found, expected, flipped)
    # the mask moves with the box (a nearest resize may drop parts thinner than an output pixel)
    if with_mask:
        mask = out["mask"]
        assert mask.shape == (size, size) and mask.dtype == torch.bool and not bool((mask & ~valid).any())
        scales = (w / (case.box[2] - case.box[0]), h / (case.box[3] - case.box[1]))  # output px per input px
        if w >= 1.5 and h >= 1.5 and bool(mask.any()):
            event("transforms: box checked against the mask")
            for axis, (mask_edge, box_edge) in enumerate(zip(tight_box(mask), found, strict=True)):
                # a sub-pixel box covers up to one more input pixel on each side than it spans
                assert abs(mask_edge - box_edge) <= 1.0 + (1.0 if case.subpixel else 0.5) * scales[axis % 2] + 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# The tokenisers
# ---------------------------------------------------------------------------------------------------------------------

MAX_CHARS = 10_000
# Pieces of text from many scripts and of many troublesome kinds; a text is a few of them, maybe repeated to 10k chars.
TEXT_PIECES = st.one_of(
    st.from_regex(r"[a-z]{1,12}", fullmatch=True),
    st.sampled_from(["the", "Red", "circle", "LEFT", "man's", "2nd", "x-ray", "t-shirt", "!!", "...", "42"]),
    st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=6),  # CJK
    st.sampled_from(["שלום", "مرحبا", "\u202eevil\u202c", "\u200f", "\u0627\u0644\u0639"]),  # right to left
    st.sampled_from(["😀", "👍🏽", "👨\u200d👩\u200d👧", "🇯🇵", "❤️", "\U0001f9ff"]),  # emoji, joiners, flags
    st.sampled_from(["e\u0301", "\u0301\u0301", "n\u0303", "ﬁ", "Å", "\u2126", "①"]),  # combining, compatibility
    st.text(alphabet=st.characters(categories=["Cc", "Cf", "Cs", "Co", "Cn"]), min_size=1, max_size=4),
    st.text(alphabet=WHITESPACE, min_size=1, max_size=3),
    st.just("\x00"),
    st.text(alphabet=st.characters(exclude_categories=()), max_size=12),
)


@st.composite
def fuzz_texts(draw) -> str:
    pieces = draw(st.lists(TEXT_PIECES, max_size=10))
    separator = draw(st.sampled_from(["", " ", "\x00", "\u200b", "\t"]))
    text = separator.join(pieces)
    repeat = draw(st.sampled_from([1, 1, 2, 50, MAX_CHARS]))  # up to 10k characters, in a few repeated chunks
    if repeat > 1 and text:
        # chunks end in a space: one word of 10k random letters is the quadratic BPE case, tested on its own below
        text = ((text + " ") * repeat)[:MAX_CHARS]
    return text


@functools.cache
def base_tokenizer(name: str):
    return build_tokenizer(name, 3)


def tokenizer_with(name: str, max_len: int, on_overflow: str):
    """A tokenizer of `name` with its own max_len and overflow policy, sharing the (slow to load) vocabulary."""
    variant = copy.copy(base_tokenizer(name))
    variant.max_len, variant.on_overflow, variant.truncated_count = max_len, on_overflow, 0
    return variant


def has_letter_or_digit(text: str) -> bool:
    return any(unicodedata.category(char)[0] in "LN" for char in text)


@given(
    st.sampled_from(["clip", "bert"]),
    st.integers(3, 80),
    st.sampled_from(["truncate", "error"]),
    st.lists(fuzz_texts(), min_size=1, max_size=3),
)
def test_tokenisers_give_well_formed_ids_or_our_error(name, max_len, on_overflow, texts):
    TRIED["tokenisers"] += 1
    tokenizer = tokenizer_with(name, max_len, on_overflow)
    # what each text must give, from an unbounded tokenizer: its full ids, or the error it must raise
    reference = tokenizer_with(name, 4 * MAX_CHARS + 2, "error")  # byte-level BPE: at most 4 tokens a character
    full_ids: list[list[int] | None] = []
    for text in texts:
        try:
            batch = reference([text])
            full_ids.append(batch.ids[0, batch.mask[0]].tolist())
        except DataError as error:
            assert re.search(r"batch position 0 (is empty|\(.*\) has no tokens)", str(error)), str(error)
            assert not has_letter_or_digit(text), (text, str(error))  # a letter or digit always gives a token
            full_ids.append(None)
    expected_error = next(
        (
            position
            for position, ids in enumerate(full_ids)
            if ids is None or (on_overflow == "error" and len(ids) > max_len)
        ),
        None,
    )

    started = time.monotonic()
    try:
        batch, error = tokenizer(texts), None
    except DataError as raised:
        batch, error = None, raised
    assert time.monotonic() - started < 30.0, "tokenising hangs"  # texts are capped at 10k characters
    if error is not None:
        assert expected_error is not None and f"batch position {expected_error} " in str(error), str(error)
        return
    assert expected_error is None, f"no DataError for batch position {expected_error}"
    assert batch.ids.shape == batch.mask.shape == (len(texts), max_len)
    assert batch.ids.dtype == torch.long and batch.mask.dtype == torch.bool
    end_id = full_ids[0][-1]
    for row, mask, ids in zip(batch.ids.tolist(), batch.mask, full_ids, strict=True):
        length = min(len(ids), max_len)
        assert torch.equal(mask, torch.arange(max_len) < length)  # one run from the start
        assert row[length:] == [tokenizer.pad_id] * (max_len - length)
        if len(ids) <= max_len:
            assert row[:length] == ids
        else:  # truncated: a prefix of the full ids, closed by the end token
            assert row[: max_len - 1] == ids[: max_len - 1] and row[max_len - 1] == end_id
        assert max(row) < tokenizer.vocab_size and min(row) >= 0
    assert tokenizer.truncated_count == sum(len(ids) > max_len for ids in full_ids)


@given(
    st.sampled_from(["clip", "bert"]),
    st.lists(st.from_regex(r"[a-z]{1,10}", fullmatch=True), min_size=1, max_size=12),
    st.lists(st.text(alphabet="\x00\x07\x1b\u200b\u200d\ufeff", max_size=2), min_size=13, max_size=13),
    st.lists(st.text(alphabet=UNICODE_SPACES, min_size=1, max_size=3), min_size=13, max_size=13),
)
def test_plain_words_decode_back_through_any_whitespace_and_control_characters(name, words, invisible, spaces):
    TRIED["tokenisers: round trip"] += 1
    # every word boundary is whitespace with invisible characters around it; they must change nothing but spacing
    text = invisible[0] + "".join(
        f"{word}{before}{space}{after}"
        for word, before, space, after in zip(words, invisible[1:], spaces, reversed(invisible), strict=False)
    )
    tokenizer = tokenizer_with(name, 2 + 12 * 10, "error")  # room for a token per letter
    batch = tokenizer([text])
    assert tokenizer.decode(batch.ids[0]) == " ".join(words)
    assert torch.equal(batch.ids, tokenizer([" ".join(words)]).ids)


def test_one_very_long_word_does_not_hang_the_clip_tokeniser():
    # 12k letters with no space took ~15 s before words were cut to what their first max_len tokens can span.
    rng = random.Random(0)
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(12_000))
    started = time.monotonic()
    ids = tokenizer_with("clip", 77, "truncate")([word]).ids[0]
    assert time.monotonic() - started < 5.0
    # The kept tokens are the full word's: BPE's first tokens do not depend on the word's far end.
    from open_clip.tokenizer import SimpleTokenizer

    assert ids[1:76].tolist() == SimpleTokenizer().encode(word[:4000])[:75]
    with pytest.raises(DataError, match="tokens; expected at most max_len=77"):
        tokenizer_with("clip", 77, "error")([word])


@pytest.mark.parametrize("name", ["clip", "bert"])
@pytest.mark.parametrize("space", ["\x85", "\u2028", "\u2029", "\u3000"])
def test_every_unicode_space_separates_words(name, space):
    tokenizer = tokenizer_with(name, 16, "error")
    assert tokenizer.decode(tokenizer([f"red{space}circle"]).ids[0]) == "red circle"


# ---------------------------------------------------------------------------------------------------------------------
# The parameter validation
# ---------------------------------------------------------------------------------------------------------------------


def schemas() -> list[type[RunParams]]:
    """RunParams and every schema vgstudy.config derives from it (tests may define more: not those)."""
    found, todo = [], [RunParams]
    while todo:
        schema = todo.pop()
        found.append(schema)
        todo.extend(sub for sub in schema.__subclasses__() if sub.__module__ == config_module.__name__)
    return sorted(found, key=lambda schema: schema.__name__)


NUMERIC_STRINGS = ("1e-4", "3", "3.0", " 7 ", "-1", "0", "1e400", "1e30", "nan", "inf", "-inf", "0x10", "1_000")
WORDS = ("None", "null", "", "true", "no", "tiny", "paper", "cpu", "cuda", "cuda:0", "auto", "mps", "unc", "synthref")
WORDS += ("random,clip", "clip", "../runs")


@st.composite
def default_forms(draw, value: Any) -> Any:
    """`value` as a notebook, the command line or YAML may give it: itself, or a string or number that means it."""
    forms = [value]
    if value is None:
        forms += ["None", "null", ""]
    elif isinstance(value, bool):
        forms += [str(value), str(value).lower(), "yes" if value else "no", int(value)]
    elif isinstance(value, int):
        forms += [str(value), f"{value}.0", float(value), f" {value} "]
    elif isinstance(value, float):
        forms += [repr(value), f"{value:e}"] + ([int(value)] if value.is_integer() else [])
    elif isinstance(value, Path):
        forms += [str(value)]
    return draw(st.sampled_from(forms))


WILD_PARAMETER_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(NUMERIC_STRINGS + WORDS),
    st.text(alphabet=st.characters(exclude_categories=()), max_size=12),
    st.lists(st.integers() | st.text(max_size=3), max_size=3),
    st.tuples(st.integers()),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from([Path("."), Path("/no/such/place"), Path("~")]),
    st.binary(max_size=3),  # not a plain value: load() leaves it out, validate() must refuse it
    st.complex_numbers(max_magnitude=10),
)


@st.composite
def parameter_sets(draw):
    """(schema, values, which values are good): known names with good or wild values, and unknown names."""
    schema = draw(st.sampled_from(schemas()))
    defaults = {field.name: field.default for field in dataclasses.fields(schema)}
    names = draw(st.lists(st.sampled_from(sorted(defaults)), max_size=6, unique=True))
    values, good = {}, set()
    for name in names:
        if draw(st.booleans()):
            values[name] = draw(default_forms(defaults[name]))
            good.add(name)
        else:
            values[name] = draw(WILD_PARAMETER_VALUES)
    typos = st.sampled_from(sorted(defaults)).map(lambda name: name[:-1] or "x") | st.text(min_size=1, max_size=10)
    for name in draw(st.lists(typos, max_size=2)):
        if name not in defaults:
            values[name] = draw(WILD_PARAMETER_VALUES)
    return schema, values, good


def conforms(value: Any, tp: Any) -> bool:
    """`value` is of the declared type `tp` exactly (an int is not a bool, a float is finite)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, option) for option in typing.get_args(tp))
    if origin is Literal:
        return isinstance(value, str) and value in typing.get_args(tp)
    if origin is tuple:
        return isinstance(value, tuple) and all(conforms(item, typing.get_args(tp)[0]) for item in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return type(value) is float and math.isfinite(value)
    if tp is Path:
        return isinstance(value, Path)
    return type(value) is tp


def expected_coercion(value: Any, tp: Any) -> Any:
    """What a value meant to be of type `tp` must become (for the forms `default_forms` and plain values give)."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if type(None) in options and (value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS)):
        return None
    base = next(option for option in options if option is not type(None))
    if base is bool:
        return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "yes", "1")
    if base in (int, float):
        return base(float(value))
    if base is Path:
        return Path(value).expanduser()
    return value


NONE_WORDS = ("none", "null", "")


@given(parameter_sets(), st.booleans())
def test_parameters_are_coerced_and_checked_or_refused_with_a_config_error(case, through_load):
    TRIED["parameters"] += 1
    schema, values, good = case
    fields = {field.name: field for field in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    try:
        params = load(values, schema) if through_load else validate(values, schema)
    except ConfigError as error:
        message = str(error)
        assert message.startswith(f"{message.count(chr(10) + '  - ')} bad parameter(s) for {schema.__name__}:")
        unknown = {name for name in values if name not in fields}
        if through_load:  # load() only looks at public plain values
            unknown = {name for name in unknown if not name.startswith("_") and name not in ("In", "Out", "open")}
            unknown = {name for name in unknown if not isinstance(values[name], (bytes, complex))}
        assert all(f"\n  - {name}: unknown parameter" in message for name in unknown), (unknown, message)
        assert good != set(values), f"good values were refused: {message}"
        return
    assert isinstance(params, schema) and params.problems() == []
    for name, field in fields.items():
        value = getattr(params, name)
        assert conforms(value, hints[name]), (name, value, hints[name])
        meta = field.metadata
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert meta["low"] is None or value >= meta["low"], (name, value)
            assert meta["high"] is None or value <= meta["high"], (name, value)
        if meta["choices"] is not None and value is not None:
            assert value in list(meta["choices"]()), (name, value)
        if meta["exists"] and value is not None:
            assert value.exists(), (name, value)
        if name in good:
            assert value == field.default, (name, values[name], value)
        elif name in values and not (through_load and isinstance(values[name], (bytes, complex))):
            assert value == expected_coercion(values[name], hints[name]), (name, values[name], value)
    if good == set(values):
        assert params == schema()


def test_an_accepted_seed_can_seed_torch():
    # Reproducer: validate({"seed": 2**64}).seed passes, then vgstudy.seed_everything(params.seed) raises
    # ValueError("Overflow when unpacking long long") from torch.manual_seed (also for the YAML string "1e30").
    try:
        params = validate({"seed": 2**64}, RunParams)
    except ConfigError:
        return  # refused up front: what we want
    torch.Generator().manual_seed(params.seed)


def test_an_accepted_out_dir_can_be_made(tmp_path):
    # Reproducer: validate({"out_dir": "runs\x00"}).out_dir passes, then making the run folder raises ValueError
    # ("embedded null byte") from os.mkdir.
    try:
        params = validate({"out_dir": "runs\x00"}, RunParams)
    except ConfigError:
        return
    (tmp_path / params.out_dir).mkdir(parents=True)


# ---------------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------------

PROPERTIES = {
    "split files": "test_split_files_load_valid_samples_or_name_the_bad_entry",
    "transforms": "test_transforms_frame_the_same_pixels_or_refuse_the_box",
    "tokenisers": "test_tokenisers_give_well_formed_ids_or_our_error",
    "tokenisers: round trip": "test_plain_words_decode_back_through_any_whitespace_and_control_characters",
    "parameters": "test_parameters_are_coerced_and_checked_or_refused_with_a_config_error",
}


def test_fuzz_counts_reported(request, tmp_path_factory):
    """Every property that ran in this session tried examples; the counts are printed and written to a JSON file."""
    selected = {getattr(item, "originalname", item.name) for item in request.session.items}
    ran = {target: TRIED[target] for target, test in PROPERTIES.items() if test in selected}
    assert all(count > 0 for count in ran.values()), ran
    report = tmp_path_factory.getbasetemp() / "fuzz_counts.json"
    report.write_text(json.dumps(ran, indent=1), encoding="utf-8")
    print(f"\nfuzz examples tried: {ran} (total {sum(ran.values())}; {report})")
