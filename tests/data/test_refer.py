"""The split-file loader on small fabricated split files in every layout of the TransVG release."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vgstudy.data.refer import DATASETS, load_split
from vgstudy.errors import ConfigError, DataError


class NotData:
    """An arbitrary object: torch.load(weights_only=True) must refuse to rebuild it."""


def write_image(path: Path, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Write a random RGB image (PNG or JPEG by suffix) and return it as (3, H, W) uint8 as written."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


def make_item(dataset: str, image_file: str, box, text: str, family: str = "attribute") -> tuple:
    """A split-file tuple in `dataset`'s layout."""
    if DATASETS[dataset].tuple_length == 3:
        return (image_file, box, text)
    attributes = [family] if DATASETS[dataset].family_in_attributes else ["red", "left"]
    return (image_file, 7, box, text, attributes)


def write_split(root: Path, dataset: str, split: str, items) -> Path:
    path = root / dataset / f"{dataset}_{split}.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(items, path)
    return path


@pytest.fixture
def image_root(tmp_path) -> Path:
    """Two images: a.png 40x60 (H x W) and b.jpg 50x30."""
    root = tmp_path / "images"
    root.mkdir()
    write_image(root / "a.png", 40, 60, seed=1)
    write_image(root / "b.jpg", 50, 30, seed=2)
    return root


# (raw box in the layout's format, expected x1y1x2y2 pixels): the release truncates real data sets' boxes to ints.
RAW_AND_EXPECTED = {
    "xywh": ([10.7, 5.2, 20.9, 30.1], [10.0, 5.0, 30.0, 35.0]),
    "xyxy": ([10.7, 5.2, 20.9, 30.1], [10.0, 5.0, 20.0, 30.0]),
}


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_every_layout_reads_boxes_texts_and_images(tmp_path, image_root, dataset):
    layout = DATASETS[dataset]
    raw, expected = RAW_AND_EXPECTED[layout.box_format]
    if not layout.integer_boxes:
        expected = [raw[0], raw[1], raw[0] + raw[2], raw[1] + raw[3]] if layout.box_format == "xywh" else raw
    items = [
        make_item(dataset, "a.png", raw, "  the red circle ", family="attribute"),
        make_item(dataset, "b.jpg", [1, 2, 3, 4], "the thing on the left", family="position"),
    ]
    write_split(tmp_path, dataset, "val", items)

    data = load_split(tmp_path, dataset, "val", image_root)

    assert len(data) == 2 and data.skipped == []
    first, second = data[0], data[1]
    assert first.box_xyxy.dtype == torch.float32
    torch.testing.assert_close(first.box_xyxy, torch.tensor(expected, dtype=torch.float32))
    assert first.text == "the red circle"
    assert first.image.shape == (3, 40, 60) and first.image.dtype == torch.uint8
    assert second.image.shape == (3, 50, 30)
    assert first.source == f"{dataset}/{dataset}_val.pth[0]" and second.source.endswith("[1]")
    assert first.mask is None
    if layout.family_in_attributes:
        assert (first.family, second.family) == ("attribute", "position")
    else:
        assert first.family is None
    second_box = [1, 2, 4, 6] if layout.box_format == "xywh" else [1, 2, 3, 4]
    assert second.box_xyxy.tolist() == second_box


def test_png_pixels_come_back_exactly(tmp_path, image_root):
    written = write_image(image_root / "c.png", 9, 11, seed=3)
    write_split(tmp_path, "unc", "val", [make_item("unc", "c.png", [0, 0, 5, 5], "x")])
    assert torch.equal(load_split(tmp_path, "unc", "val", image_root)[0].image, written)


def test_trainval_is_train_then_val_for_refcoco(tmp_path, image_root):
    write_split(tmp_path, "unc", "train", [make_item("unc", "a.png", [0, 0, 5, 5], f"train {i}") for i in range(3)])
    write_split(tmp_path, "unc", "val", [make_item("unc", "b.jpg", [0, 0, 5, 5], "val 0")])
    data = load_split(tmp_path, "unc", "trainval", image_root)
    assert [e.text for e in data.entries] == ["train 0", "train 1", "train 2", "val 0"]
    assert data.entries[3].source == "unc/unc_val.pth[0]"


def test_referit_trainval_is_its_own_file(tmp_path, image_root):
    write_split(tmp_path, "referit", "trainval", [make_item("referit", "a.png", [0, 0, 5, 5], "own file")])
    assert [e.text for e in load_split(tmp_path, "referit", "trainval", image_root).entries] == ["own file"]


@pytest.mark.parametrize("dataset", ["gref", "gref_umd", "flickr"])
def test_trainval_is_refused_where_the_release_refuses_it(tmp_path, image_root, dataset):
    write_split(tmp_path, dataset, "train", [make_item(dataset, "a.png", [0, 0, 5, 5], "x")])
    with pytest.raises(DataError, match="no split 'trainval'.*'train'"):
        load_split(tmp_path, dataset, "trainval", image_root)


BAD_ENTRIES = {
    "wrong tuple length": ("a.png", 7, [0, 0, 5, 5], "x"),
    "not a tuple": "a.png",
    "image file not str": (3, 7, [0, 0, 5, 5], "x", []),
    "empty image file": ("", 7, [0, 0, 5, 5], "x", []),
    "box of 3 values": ("a.png", 7, [0, 0, 5], "x", []),
    "box with a string": ("a.png", 7, [0, 0, "5", 5], "x", []),
    "box with a bool": ("a.png", 7, [0, 0, True, 5], "x", []),
    "box is a dict": ("a.png", 7, {"x": 0}, "x", []),
    "nan box": ("a.png", 7, [0, 0, math.nan, 5], "x", []),
    "infinite box": ("a.png", 7, [0, 0, math.inf, 5], "x", []),
    "zero width": ("a.png", 7, [3, 3, 0, 5], "x", []),
    "negative height": ("a.png", 7, [3, 3, 4, -2], "x", []),
    "zero after truncation": ("a.png", 7, [3, 3, 0.9, 5], "x", []),
    "phrase not str": ("a.png", 7, [0, 0, 5, 5], b"x", []),
    "blank phrase": ("a.png", 7, [0, 0, 5, 5], " \t\n ", []),
    "over-long phrase": ("a.png", 7, [0, 0, 5, 5], "w" * 31, []),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_bad_entry_raises_naming_file_and_index(tmp_path, image_root, case):
    path = write_split(tmp_path, "unc", "val", [make_item("unc", "a.png", [0, 0, 5, 5], "good"), BAD_ENTRIES[case]])
    with pytest.raises(DataError) as raised:
        load_split(tmp_path, "unc", "val", image_root, max_text_chars=30)
    assert str(path) in str(raised.value) and "[1]" in str(raised.value)
    assert "expected" in str(raised.value)


def test_synthref_export_needs_a_family_in_the_attributes(tmp_path, image_root):
    write_split(tmp_path, "synthref", "val", [("a.png", 0, [0, 0, 5, 5], "x", [])])
    with pytest.raises(DataError, match=r"synthref_val.pth \[0\].*family"):
        load_split(tmp_path, "synthref", "val", image_root)


def test_flickr_three_tuples_are_required(tmp_path, image_root):
    path = write_split(tmp_path, "flickr", "test", [("a.png", 7, [0, 0, 5, 5], "x", [])])
    with pytest.raises(DataError, match=rf"{path} \[0\]: expected a 3-tuple"):
        load_split(tmp_path, "flickr", "test", image_root)


@pytest.mark.parametrize("content", [{"a": 1}, ("a.png", 7, [0, 0, 5, 5], "x", []), torch.zeros(3)])
def test_a_file_that_is_not_a_list_is_refused(tmp_path, image_root, content):
    path = write_split(tmp_path, "unc", "val", content)
    with pytest.raises(DataError, match=rf"{path}: holds a .*expected a list"):
        load_split(tmp_path, "unc", "val", image_root)


def test_arbitrary_pickled_objects_are_refused_by_weights_only(tmp_path, image_root):
    path = write_split(tmp_path, "unc", "val", [NotData()])
    with pytest.raises(DataError, match=rf"{path}: cannot be read by torch.load\(weights_only=True\)"):
        load_split(tmp_path, "unc", "val", image_root)


def test_a_file_that_is_not_a_torch_file_is_refused(tmp_path, image_root):
    path = tmp_path / "unc" / "unc_val.pth"
    path.parent.mkdir()
    path.write_bytes(b"not a torch file")
    with pytest.raises(DataError, match=str(path)):
        load_split(tmp_path, "unc", "val", image_root)


def test_missing_places_and_unknown_names_are_named(tmp_path, image_root):
    with pytest.raises(DataError, match=r"data set folder .*unc not found"):
        load_split(tmp_path, "unc", "val", image_root)
    write_split(tmp_path, "unc", "train", [make_item("unc", "a.png", [0, 0, 5, 5], "x")])
    with pytest.raises(DataError, match=r"split file .*unc_val.pth not found"):
        load_split(tmp_path, "unc", "val", image_root)
    with pytest.raises(DataError, match=r"image folder .*nowhere not found"):
        load_split(tmp_path, "unc", "train", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"unknown data set 'refcoco'.*'unc'"):
        load_split(tmp_path, "refcoco", "train", image_root)
    with pytest.raises(DataError, match=r"no split 'test'.*'testA'"):
        load_split(tmp_path, "unc", "test", image_root)


def test_bad_parameters_are_config_errors(tmp_path, image_root):
    write_split(tmp_path, "unc", "val", [make_item("unc", "a.png", [0, 0, 5, 5], "x")])
    with pytest.raises(ConfigError, match="on_error='ignore'"):
        load_split(tmp_path, "unc", "val", image_root, on_error="ignore")
    with pytest.raises(ConfigError, match="max_text_chars"):
        load_split(tmp_path, "unc", "val", image_root, max_text_chars="100")


def test_skip_drops_bad_entries_and_records_them(tmp_path, image_root, caplog):
    items = [
        make_item("unc", "a.png", [0, 0, 5, 5], "good 0"),
        BAD_ENTRIES["nan box"],
        make_item("unc", "a.png", [0, 0, 5, 5], "   "),
        make_item("unc", "b.jpg", [0, 0, 5, 5], "good 3"),
    ]
    write_split(tmp_path, "unc", "val", items)
    with caplog.at_level(logging.WARNING, logger="vgstudy.data.refer"):
        data = load_split(tmp_path, "unc", "val", image_root, on_error="skip")
    assert [e.text for e in data.entries] == ["good 0", "good 3"]
    assert [source for source, _ in data.skipped] == ["unc/unc_val.pth[1]", "unc/unc_val.pth[2]"]
    assert "non-finite" in data.skipped[0][1] and "empty" in data.skipped[1][1]
    messages = [record.getMessage() for record in caplog.records]
    assert sum("skipping unc/unc_val.pth[" in m for m in messages) == 2
    assert any("skipped 2 of 4 entries" in m for m in messages)


def test_skip_with_nothing_left_is_an_error(tmp_path, image_root):
    write_split(tmp_path, "unc", "val", [BAD_ENTRIES["zero width"]])
    with pytest.raises(DataError, match="no usable entries"):
        load_split(tmp_path, "unc", "val", image_root, on_error="skip")


def test_missing_and_corrupt_images_name_the_path_and_index(tmp_path, image_root):
    (image_root / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    items = [make_item("unc", "gone.png", [0, 0, 5, 5], "x"), make_item("unc", "broken.jpg", [0, 0, 5, 5], "x")]
    write_split(tmp_path, "unc", "val", items)
    data = load_split(tmp_path, "unc", "val", image_root)
    with pytest.raises(DataError, match=r"unc_val.pth\[0\]: image .*gone.png not found"):
        data[0]
    with pytest.raises(DataError, match=r"unc_val.pth\[1\]: image .*broken.jpg cannot be decoded"):
        data[1]


def test_skip_replaces_unreadable_images_with_the_next_good_sample(tmp_path, image_root, caplog):
    (image_root / "broken.png").write_bytes(b"\x89PNG not really")
    items = [
        make_item("unc", "a.png", [0, 0, 5, 5], "good 0"),
        make_item("unc", "broken.png", [0, 0, 5, 5], "bad 1"),
        make_item("unc", "gone.png", [0, 0, 5, 5], "bad 2"),
    ]
    write_split(tmp_path, "unc", "val", items)
    data = load_split(tmp_path, "unc", "val", image_root, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="vgstudy.data.refer"):
        sample = data[1]
    assert sample.text == "good 0" and sample.source == "unc/unc_val.pth[0]"  # 1 and 2 bad: wraps around to 0
    messages = [record.getMessage() for record in caplog.records]
    assert any("broken.png" in m for m in messages) and any("gone.png" in m for m in messages)


def test_boxes_are_checked_against_the_decoded_image(tmp_path, image_root):
    # a.png is 60 wide, 40 high
    items = [
        make_item("unc", "a.png", [50, 30, 12, 12], "overshoots by a little: clipped"),
        make_item("unc", "a.png", [55, 5, 20, 5], "mostly outside"),
        make_item("unc", "a.png", [70, 5, 5, 5], "entirely outside"),
    ]
    write_split(tmp_path, "unc", "val", items)
    data = load_split(tmp_path, "unc", "val", image_root)
    assert data[0].box_xyxy.tolist() == [50.0, 30.0, 60.0, 40.0]
    with pytest.raises(DataError, match=r"unc_val.pth\[1\]: box .*25% of its area inside the 60x40 image"):
        data[1]
    with pytest.raises(DataError, match=r"unc_val.pth\[2\]: box .*outside the 60x40 image"):
        data[2]


def test_synthref_export_round_trip(tmp_path):
    synthref = pytest.importorskip("vgstudy.data.synthref")
    source = synthref.SynthRef("val", 8, seed=0)
    source.export(tmp_path)
    data = load_split(tmp_path, "synthref", "val", tmp_path / "images")
    assert len(data) == len(source) == 8
    for index in range(8):
        original, loaded = source[index], data[index]
        assert torch.equal(loaded.image, original.image)
        assert loaded.text == original.text.strip()
        torch.testing.assert_close(loaded.box_xyxy, original.box_xyxy.float(), atol=1e-4, rtol=0)
        assert loaded.family == original.family
