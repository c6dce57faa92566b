"""The real REC data sets, read from the split files of the TransVG release (also used by HiVG and MaPPER).

A split file is `<root>/<dataset>/<dataset>_<split>.pth`: a `torch.save`d list of tuples, one per expression.

| data set | what it is | tuple | box |
|---|---|---|---|
| `unc`, `unc+` | RefCOCO, RefCOCO+ (UNC splits) | (image file, id, box, phrase, attributes) | x, y, w, h |
| `gref`, `gref_umd` | RefCOCOg (Google / UMD splits) | same | x, y, w, h |
| `referit` | ReferItGame | same | x1, y1, x2, y2 |
| `flickr` | Flickr30k Entities | (image file, box, phrase) | x1, y1, x2, y2 |
| `synthref` | our exported SynthRef | same as `unc`, attributes = `[family]` | x, y, w, h (floats) |

Like the release (`datasets/data_loader.py`, `pull_item`), boxes of the real data sets are cast to integers by
truncation before use (for x, y, w, h: each of the four, then x2 = x + w), so the ground truth matches the numbers
the papers report; SynthRef keeps its float boxes so an export reads back exactly. Every entry is validated when the
split file is loaded; the box is checked against the image when the image is decoded (`ReferDataset.__getitem__`).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vgstudy.data.sample import Sample
from vgstudy.data.tokenizers import visible_text
from vgstudy.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("raise", "skip")

# A box partly outside its image is clipped when at least this share of its area is inside; below it the box is more
# likely in the wrong convention (x1y1x2y2 read as xywh) or for another image, so it is an error.
MIN_INSIDE_FRACTION = 0.5


@dataclass(frozen=True)
class DatasetLayout:
    """How one data set's split files are laid out (the defaults are RefCOCO's).

    tuple_length:      5 = (image file, id, box, phrase, attributes); 3 = (image file, box, phrase) (Flickr).
    box_format:        "xywh" (x, y of the top-left corner, width, height) or "xyxy", in pixels.
    splits:            every split name `load_split` accepts, `trainval` included where the release allows it.
    trainval_is_union: `trainval` reads the train and val files; otherwise it is a file of its own (ReferIt).
    integer_boxes:     cast box values to int by truncation, as the release does.
    family_in_attributes: the attributes slot is `[family]` (our SynthRef export).
    image_dir_hint:    where the release expects the images, below its data root (pass it as `image_root`).
    """

    name: str
    description: str
    tuple_length: int = 5
    box_format: str = "xywh"
    splits: tuple[str, ...] = ("train", "val", "trainval", "testA", "testB")
    trainval_is_union: bool = True
    integer_boxes: bool = True
    family_in_attributes: bool = False
    image_dir_hint: str = "other/images/mscoco/images/train2014 (COCO train2014)"

    @property
    def tuple_fields(self) -> str:
        """What each split-file tuple holds, for error messages."""
        if self.tuple_length == 3:
            return "(image file, box, phrase)"
        return "(image file, id, box, phrase, attributes)"

    def split_files(self, split: str) -> tuple[str, ...]:
        """The split names whose files make up `split` (`trainval` may be `("train", "val")`)."""
        if split == "trainval" and self.trainval_is_union:
            return ("train", "val")
        return (split,)


DATASETS: dict[str, DatasetLayout] = {
    layout.name: layout
    for layout in (
        DatasetLayout("unc", "RefCOCO, UNC splits"),
        DatasetLayout("unc+", "RefCOCO+, UNC splits"),
        DatasetLayout("gref", "RefCOCOg, Google splits", splits=("train", "val")),
        DatasetLayout("gref_umd", "RefCOCOg, UMD splits", splits=("train", "val", "test")),
        DatasetLayout(
            "referit",
            "ReferItGame",
            box_format="xyxy",
            splits=("train", "val", "trainval", "test"),
            trainval_is_union=False,
            image_dir_hint="referit/images",
        ),
        DatasetLayout(
            "flickr",
            "Flickr30k Entities",
            tuple_length=3,
            box_format="xyxy",
            splits=("train", "val", "test"),
            image_dir_hint="Flickr30k/flickr30k-images",
        ),
        DatasetLayout(
            "synthref",
            "SynthRef export (vgstudy)",
            integer_boxes=False,
            family_in_attributes=True,
            image_dir_hint="images/ next to the split files (written by SynthRef.export)",
        ),
    )
}


@dataclass(frozen=True)
class Entry:
    """One validated line of a split file.

    box_xyxy is in pixels of the (not yet decoded) image; `source` names the split file and the index in it.
    """

    image_path: Path
    box_xyxy: tuple[float, float, float, float]
    text: str
    attributes: Any
    family: str | None
    source: str


class ReferDataset(torch.utils.data.Dataset):
    """The validated entries of one split; `dataset[i]` decodes the image and returns a `Sample`.

    With `on_error="skip"`, `skipped` lists the (split-file source, reason) of every entry dropped at load time, and
    an image that cannot be read, or whose box does not fit it, is replaced by the next good sample (index + 1, + 2,
    ... wrapping around), with a warning each time.
    """

    def __init__(self, entries: list[Entry], on_error: str, skipped: list[tuple[str, str]]):
        self.entries = entries
        self.on_error = on_error
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self.entries):
            raise IndexError(f"index {index} out of range for a data set of {len(self.entries)} entries")
        if self.on_error == "raise":
            return self._read(self.entries[index])
        for offset in range(len(self.entries)):
            entry = self.entries[(index + offset) % len(self.entries)]
            try:
                return self._read(entry)
            except DataError as error:
                logger.warning("skipping %s: %s", entry.source, error)
        raise DataError(f"no entry of this data set could be read (all {len(self.entries)} failed; see the warnings)")

    @staticmethod
    def _read(entry: Entry) -> Sample:
        image = _decode_rgb(entry)  # (3, H, W) uint8
        height, width = image.shape[1:]
        box_xyxy = clip_box_to_image(entry.box_xyxy, width, height, entry.source)
        return Sample(
            image=image,
            text=entry.text,
            box_xyxy=torch.tensor(box_xyxy, dtype=torch.float32),
            mask=None,
            source=entry.source,
            family=entry.family,
        )


def load_split(
    root: str | Path,
    dataset: str,
    split: str,
    image_root: str | Path,
    *,
    on_error: str = "raise",
    max_text_chars: int = 1000,
) -> ReferDataset:
    """Read and validate `<root>/<dataset>/<dataset>_<split>.pth` (both train and val files for a union `trainval`).

    image_root: the folder the image file names are relative to (see `DATASETS[dataset].image_dir_hint`).
    on_error:   "raise" stops at the first bad entry with a `DataError` naming the file and index; "skip" drops bad
                entries with a warning each, records them in `dataset.skipped`, and logs a summary count.
    max_text_chars: expressions longer than this are bad entries.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ConfigError(f"on_error={on_error!r}: expected one of {ON_ERROR_CHOICES}")
    if isinstance(max_text_chars, bool) or not isinstance(max_text_chars, int) or max_text_chars < 1:
        raise ConfigError(f"max_text_chars={max_text_chars!r}: expected a positive int")
    if dataset not in DATASETS:
        raise DataError(f"unknown data set {dataset!r}: expected one of {sorted(DATASETS)}")
    layout = DATASETS[dataset]
    if split not in layout.splits:
        raise DataError(f"data set {dataset!r} has no split {split!r}: expected one of {layout.splits}")
    dataset_dir = Path(root) / dataset
    if not dataset_dir.is_dir():
        raise DataError(f"data set folder {dataset_dir} not found: expected the split files of {layout.description}")
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise DataError(f"image folder {image_root} not found: expected {layout.image_dir_hint}")

    entries: list[Entry] = []
    skipped: list[tuple[str, str]] = []
    for file_split in layout.split_files(split):
        file_name = f"{dataset}_{file_split}.pth"
        items = _load_items(dataset_dir / file_name)
        for index, item in enumerate(items):
            source = f"{dataset}/{file_name}[{index}]"
            try:
                entries.append(_parse_entry(item, layout, image_root, source, max_text_chars))
            except DataError as error:
                if on_error == "raise":
                    raise DataError(f"{dataset_dir / file_name} [{index}]: {error}") from None
                logger.warning("skipping %s: %s", source, error)
                skipped.append((source, str(error)))
    if skipped:
        logger.warning("%s %s: skipped %d of %d entries", dataset, split, len(skipped), len(skipped) + len(entries))
    if not entries:
        raise DataError(f"{dataset_dir}: split {split!r} has no usable entries; expected at least one")
    return ReferDataset(entries, on_error, skipped)


def clip_box_to_image(
    box_xyxy: Sequence[float], width: int, height: int, where: str
) -> tuple[float, float, float, float]:
    """Clip a pixel box to a width x height image, or raise `DataError` when that would change its meaning.

    A box with at least `MIN_INSIDE_FRACTION` of its area inside the image is clipped (annotations often overshoot
    the border by a pixel); a box mostly or entirely outside, or with no area left, is an error naming `where`.
    """
    x1, y1, x2, y2 = (float(value) for value in box_xyxy)
    clipped = (max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))
    inside_area = max(clipped[2] - clipped[0], 0.0) * max(clipped[3] - clipped[1], 0.0)
    area = (x2 - x1) * (y2 - y1)
    if inside_area <= 0.0:
        raise DataError(
            f"{where}: box x1y1x2y2={[x1, y1, x2, y2]} is outside the {width}x{height} image; expected a box inside it"
        )
    if inside_area < MIN_INSIDE_FRACTION * area:
        raise DataError(
            f"{where}: box x1y1x2y2={[x1, y1, x2, y2]} has only {inside_area / area:.0%} of its area inside the "
            f"{width}x{height} image; expected at least {MIN_INSIDE_FRACTION:.0%} (is the box format right?)"
        )
    return clipped


def _load_items(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"split file {path} not found")
    try:
        # weights_only: a split file is data, never code to run.
        items = torch.load(path, weights_only=True)
    except Exception as error:
        raise DataError(
            f"{path}: cannot be read by torch.load(weights_only=True) ({type(error).__name__}: {error}); "
            "expected a list of tuples of str/number/list values"
        ) from error
    if not isinstance(items, list):
        raise DataError(f"{path}: holds a {type(items).__name__}; expected a list of tuples")
    return items


def _parse_entry(item: Any, layout: DatasetLayout, image_root: Path, source: str, max_text_chars: int) -> Entry:
    if not isinstance(item, (tuple, list)) or len(item) != layout.tuple_length:
        got = f"a {type(item).__name__} of length {len(item)}" if isinstance(item, (tuple, list)) else repr(item)[:80]
        raise DataError(f"expected a {layout.tuple_length}-tuple {layout.tuple_fields}, got {got}")
    if layout.tuple_length == 3:
        image_file, box, text = item
        attributes = None
    else:
        image_file, _, box, text, attributes = item
    if not isinstance(image_file, str) or not image_file:
        raise DataError(f"image file {image_file!r}: expected a non-empty str")
    if not isinstance(text, str):
        raise DataError(f"phrase is a {type(text).__name__}: expected a str")
    text = text.strip()
    if not visible_text(text).strip():  # what the tokenisers would see: nothing, an error mid-training otherwise
        raise DataError(f"phrase {text[:40]!r} is empty (no visible characters); expected a referring expression")
    if len(text) > max_text_chars:
        raise DataError(f"phrase has {len(text)} characters; expected at most max_text_chars={max_text_chars}")
    family = None
    if layout.family_in_attributes:
        if not isinstance(attributes, (list, tuple)) or not attributes or not isinstance(attributes[0], str):
            raise DataError(f"attributes {attributes!r}: expected [family: str] in a {layout.name} export")
        family = attributes[0]
    return Entry(
        image_path=image_root / image_file,
        box_xyxy=_parse_box(box, layout),
        text=text,
        attributes=attributes,
        family=family,
        source=source,
    )


def _parse_box(box: Any, layout: DatasetLayout) -> tuple[float, float, float, float]:
    if isinstance(box, torch.Tensor):
        if box.is_meta:
            raise DataError(
                f"box is a {tuple(box.shape)} tensor on the meta device, which holds no values; expected 4 numbers"
            )
        box = box.to_dense() if box.layout != torch.strided else box  # a sparse tensor's values are its dense ones
    if isinstance(box, (torch.Tensor, np.ndarray)):
        box = box.tolist()
    if (
        not isinstance(box, (list, tuple))
        or len(box) != 4
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in box)
    ):
        raise DataError(f"box {box!r}: expected 4 numbers ({layout.box_format})")
    try:
        values = [float(v) for v in box]
    except OverflowError:  # an int beyond float's range
        raise DataError(f"box {box!r} ({layout.box_format}) has values beyond any image; expected pixels") from None
    if not all(math.isfinite(v) for v in values):
        raise DataError(f"box {values} ({layout.box_format}) has non-finite values; expected finite pixels")
    if layout.integer_boxes:
        values = [float(int(v)) for v in values]  # the release's np.array(box, dtype=int): truncation
    if layout.box_format == "xywh":
        x1, y1, w, h = values
        x2, y2 = x1 + w, y1 + h
    else:
        x1, y1, x2, y2 = values
    if not (x2 > x1 and y2 > y1):
        raise DataError(
            f"box {box!r} ({layout.box_format}) has zero or negative area as x1y1x2y2={[x1, y1, x2, y2]}; "
            "expected x2 > x1 and y2 > y1"
        )
    return (x1, y1, x2, y2)


def _decode_rgb(entry: Entry) -> torch.Tensor:
    """The entry's image as (3, H, W) uint8 RGB, decoded with PIL like the release (no EXIF rotation)."""
    if not entry.image_path.is_file():
        raise DataError(f"{entry.source}: image {entry.image_path} not found")
    try:
        with Image.open(entry.image_path) as image:
            pixels = np.asarray(image.convert("RGB"))  # (H, W, 3)
    except Exception as error:  # PIL raises many types for broken files; all mean "cannot use this image"
        raise DataError(
            f"{entry.source}: image {entry.image_path} cannot be decoded ({type(error).__name__}: {error}); "
            "expected a readable JPEG/PNG image"
        ) from error
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)
