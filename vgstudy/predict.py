"""Single-image prediction: an image and an expression in, the box it refers to out, in the image's own pixels.

    predictor = load_predictor("runs/01_transvg/p-1234")  # a run folder, a checkpoint folder or a .safetensors file
    prediction = predictor.predict("photo.jpg", "the man on the left")
    prediction.box_xyxy                                     # (x1, y1, x2, y2), pixels of photo.jpg
    prediction.overlay("photo-box.png")

The image goes through the model's eval transform (`model.transform`: long side resized to S, normalised, padded to
S x S, centred), exactly as evaluation does, and the predicted normalised (cx, cy, w, h) is mapped back through that
transform: padding removed, resize undone (`input_box_to_image`).

A run folder does not say which model it trained: the Trainer saves state dicts, not architectures. Training code
records it with `write_model_card(run_dir, name, overrides)`, a `model.json` sidecar ({"name": registered name,
"overrides": build overrides}) from which `load_predictor` rebuilds the model before loading the weights.
"""

from __future__ import annotations

import difflib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torch import nn

from vgstudy.checkpoint import (
    STATE_FILE,
    atomic_write_bytes,
    atomic_write_json,
    latest_checkpoint,
    load_into,
    load_state_dict,
    verify_checkpoint,
)
from vgstudy.data.sample import Sample
from vgstudy.data.transforms import GroundingTransform, TransformConfig, centred_offset, resized_size
from vgstudy.errors import CheckpointError, ConfigError, DataError
from vgstudy.evaluate import cxcywh_to_xyxy
from vgstudy.models.registry import build, model_names
from vgstudy.train import MODEL_FILE
from vgstudy.viz import PRED_COLOUR

MODEL_CARD_FILE = "model.json"
CHECKPOINTS_DIR = "checkpoints"  # the Trainer's run_dir / "checkpoints"


# --- The model card -------------------------------------------------------------------------------------------------


def _json_value(value: Any, where: str) -> Any:
    """`value` as plain JSON (paths as strings, tuples as lists), or a ConfigError naming `where`."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list | tuple):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(
        f"model card override {where} is a {type(value).__name__}, which a JSON model card cannot hold; expected "
        "numbers, strings, paths, lists and dicts: give what builds it by name instead (e.g. visual='clip:tiny' "
        "for a visual_module), the checkpoint holds its weights"
    )


def write_model_card(run_dir: str | os.PathLike, name: str, overrides: dict[str, Any] | None = None) -> Path:
    """Record in `run_dir/model.json` which registered model (and build overrides) the run trains; returns the path.

    `load_predictor(run_dir)` rebuilds the model from it. Overrides must be JSON-able (paths are stored as strings);
    an unknown model name or an override such as an already-built module is a ConfigError.
    """
    known = model_names()
    if name not in known:
        hint = difflib.get_close_matches(str(name), known, n=1)
        raise ConfigError(f"model card: unknown model {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    card = {"name": name, "overrides": {k: _json_value(v, k) for k, v in (overrides or {}).items()}}
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / MODEL_CARD_FILE, card)
    return run_dir / MODEL_CARD_FILE


def read_model_card(run_dir: str | os.PathLike) -> tuple[str, dict[str, Any]] | None:
    """(model name, overrides) from `run_dir/model.json`; None when there is none; CheckpointError when malformed."""
    path = Path(run_dir) / MODEL_CARD_FILE
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"model card {path} is unreadable: {e}") from e
    if (
        not isinstance(card, dict)
        or not isinstance(card.get("name"), str)
        or not isinstance(card.get("overrides", {}), dict)
    ):
        raise CheckpointError(f'model card {path}: expected {{"name": <registered model>, "overrides": {{...}}}}')
    return card["name"], dict(card.get("overrides", {}))


# --- Mapping a prediction back to the image -------------------------------------------------------------------------


def input_box_to_image(box_cxcywh: torch.Tensor, image_hw: tuple[int, int], transform: TransformConfig) -> torch.Tensor:
    """(..., 4) boxes normalised by the model input (cx, cy, w, h) -> (..., 4) x1 y1 x2 y2 pixels of the original image.

    Inverts `GroundingTransform(transform)` for an image of `image_hw` = (height, width): the eval transform resizes
    the long side to S (each side rounded to whole pixels) and pads to S x S, centred. Parts of a box in the padding
    are clipped to the image.
    """
    if transform.train:
        raise ConfigError("input_box_to_image needs the eval transform (train=False): training pads at random offsets")
    height, width = image_hw
    size = transform.image_size
    resized_h, resized_w = resized_size(height, width, size)  # where the transform put the image in the input
    top, left = centred_offset(resized_h, resized_w, size)
    x1, y1, x2, y2 = (cxcywh_to_xyxy(box_cxcywh.float()) * size).unbind(-1)  # pixels of the S x S input
    scale_x, scale_y = width / resized_w, height / resized_h
    return torch.stack(
        [
            ((x1 - left) * scale_x).clamp(0, width),
            ((y1 - top) * scale_y).clamp(0, height),
            ((x2 - left) * scale_x).clamp(0, width),
            ((y2 - top) * scale_y).clamp(0, height),
        ],
        dim=-1,
    )


# --- Images ---------------------------------------------------------------------------------------------------------


def read_image(image: str | os.PathLike | Image.Image | np.ndarray) -> Image.Image:
    """An RGB PIL image from a path (EXIF orientation applied: the box is on the image as viewers show it), a PIL
    image, or a uint8 (H, W) / (H, W, 3|4) array; DataError naming the path or shape when it cannot be used."""
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise DataError(f"image {path} does not exist (or is not a file)")
        try:
            with Image.open(path) as opened:
                return ImageOps.exif_transpose(opened).convert("RGB")  # decodes here, inside the `try`
        except Exception as e:  # PIL raises many types for broken files; all mean "cannot use this image"
            raise DataError(
                f"image {path} cannot be decoded ({type(e).__name__}: {e}); expected a readable JPEG/PNG image"
            ) from e
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        shape_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))
        if image.dtype != np.uint8 or not shape_ok or 0 in image.shape:
            raise DataError(
                f"image array of dtype {image.dtype} and shape {image.shape}: expected uint8 (H, W), (H, W, 3) or "
                "(H, W, 4)"
            )
        return Image.fromarray(image).convert("RGB")
    raise DataError(f"image of type {type(image).__name__}: expected a path, a PIL image or a uint8 (H, W, 3) array")


# --- Prediction -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """One predicted box.

    box_xyxy:   x1, y1, x2, y2 in pixels of the original image.
    score:      the model's confidence, None for models that regress one box without one (all of vgstudy's).
    text:       the expression.
    image_size: (height, width) of the original image.
    image:      the original image (RGB), for `overlay`.
    """

    box_xyxy: tuple[float, float, float, float]
    score: float | None
    text: str
    image_size: tuple[int, int]
    image: Image.Image = field(repr=False, compare=False)

    def overlay(self, path: str | os.PathLike) -> Path:
        """Write the image with the box drawn on it as a PNG at `path` (atomically; folders created); returns it."""
        path = Path(path)
        canvas = self.image.copy()
        line_width = max(2, round(max(canvas.size) / 200))  # visible on large photos, not a smear on small ones
        ImageDraw.Draw(canvas).rectangle(self.box_xyxy, outline=PRED_COLOUR, width=line_width)
        buffer = io.BytesIO()
        canvas.save(buffer, format="PNG")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as e:
            raise ConfigError(f"overlay {path} cannot be written: {e}") from e
        return path


class Predictor:
    """A grounding model ready for single images: `Predictor(model).predict(image, text) -> Prediction`.

    The model is put in eval mode on `device`; images go through `GroundingTransform(model.transform)` (the eval
    transform) and, as in evaluation and training, the model sees the padded input without a padding mask.
    `name` and `checkpoint` only describe where the model came from.
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "cpu",
        name: str | None = None,
        checkpoint: Path | None = None,
    ) -> None:
        transform = getattr(model, "transform", None)
        if not isinstance(transform, TransformConfig) or transform.train:
            raise ConfigError(
                f"Predictor: {type(model).__name__}.transform is {transform!r}; expected the model's eval "
                "TransformConfig (train=False)"
            )
        self.device = _checked_device(device)
        self.model = model.to(self.device).eval()
        self.transform = GroundingTransform(transform)
        self.name = name
        self.checkpoint = checkpoint

    @torch.no_grad()
    def predict(self, image: str | os.PathLike | Image.Image | np.ndarray, text: str) -> Prediction:
        """The box `text` refers to in `image` (a path, PIL image or uint8 (H, W, 3) array), in its pixels."""
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"text={text!r}: expected a non-empty referring expression")
        picture = read_image(image)
        pixels = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)  # (3, H, W) uint8
        height, width = pixels.shape[1:]
        # GroundingTransform needs a box; the whole image is always a valid one, and only the image is used.
        whole_image = torch.tensor([0.0, 0.0, width, height])
        source = os.fspath(image) if isinstance(image, str | os.PathLike) else "image"
        item = self.transform(Sample(image=pixels, text=text, box_xyxy=whole_image, source=source))
        output = self.model(item["image"][None].to(self.device), [text])
        box_cxcywh = output.boxes[0].float().cpu()  # (4,) normalised by the input side
        box_xyxy = input_box_to_image(box_cxcywh, (height, width), self.transform.config)
        return Prediction(
            box_xyxy=tuple(box_xyxy.tolist()),
            score=None,
            text=text,
            image_size=(int(height), int(width)),
            image=picture,
        )


def _checked_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r}: expected 'cpu', 'cuda', 'cuda:0', ... ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r}, but no CUDA device is available here; expected device='cpu'")
    return device


# --- Loading --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Located:
    """What a `checkpoint` argument points at: the weights file, the stages to replay, and the folder of the run."""

    weights: Path
    stages: tuple[str, ...]
    run_dir: Path | None


def _saved_stages(state: dict) -> tuple[str, ...]:
    """The stage names a checkpoint's model went through (the Trainer enters each in turn), from its state.json."""
    try:
        stages = [stage["name"] for stage in state["config"]["stages"]]
        return tuple(stages[: state["stage_index"] + 1])
    except (KeyError, TypeError, IndexError):
        return (state["stage"],) if isinstance(state.get("stage"), str) else ()


def _locate(checkpoint: Path) -> _Located:
    if checkpoint.is_file():
        return _Located(checkpoint, (), None)
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    if (checkpoint / STATE_FILE).is_file():  # a checkpoint folder, run_dir/checkpoints/step-<N>
        state = verify_checkpoint(checkpoint)
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS_DIR else None
        return _Located(checkpoint / MODEL_FILE, _saved_stages(state), run_dir)
    if (checkpoint / CHECKPOINTS_DIR).is_dir() or (checkpoint / MODEL_CARD_FILE).is_file():  # a run folder
        latest = latest_checkpoint(checkpoint / CHECKPOINTS_DIR)
        if latest is None:
            raise CheckpointError(f"run folder {checkpoint} holds no checkpoint (expected {CHECKPOINTS_DIR}/step-<N>)")
        state = json.loads((latest / STATE_FILE).read_text())  # verified by latest_checkpoint just now
        return _Located(latest / MODEL_FILE, _saved_stages(state), checkpoint)
    raise CheckpointError(
        f"checkpoint {checkpoint}: expected a run folder (with {CHECKPOINTS_DIR}/), a checkpoint folder (with "
        "state.json) or a .safetensors weights file"
    )


def load_predictor(
    checkpoint: str | os.PathLike,
    model: str | None = None,
    device: str | torch.device = "cpu",
    stage: str | None = None,
    **overrides: Any,
) -> Predictor:
    """A Predictor for trained weights.

    checkpoint: a run folder (its newest checkpoint that verifies; the model from its `model.json` card), a
                checkpoint folder `<run>/checkpoints/step-<N>` (verified; the card of its run when there is one), or
                a .safetensors file of the model's state dict.
    model:      the registered model name; required when no model card is found; given, it wins over the card's.
    stage:      for a weights file of a staged model (HiVG), the stage it was saved in; checkpoint folders record it.
    overrides:  build overrides, on top of the card's when the card names the same model.

    The weights load strictly: a checkpoint of another model (or other overrides) is a CheckpointError listing the
    missing, unexpected and mis-shaped keys. A missing checkpoint is a CheckpointError, an unknown model name a
    ConfigError with the closest registered name.
    """
    located = _locate(Path(checkpoint))
    card = read_model_card(located.run_dir) if located.run_dir is not None else None
    if model is None and card is None:
        raise ConfigError(
            f"checkpoint {checkpoint}: no model card ({MODEL_CARD_FILE}) says which model it is; expected "
            "model=<registered name> (--model on the command line)"
        )
    name = model if model is not None else card[0]
    build_overrides = {**(card[1] if card is not None and card[0] == name else {}), **overrides}
    network = build(name, **build_overrides)

    stages = located.stages if stage is None else (stage,)
    enter_stage = getattr(network, "enter_stage", None)
    if stages and callable(enter_stage):
        for stage_name in stages:  # rebuild the saved stage's modules (adapters added, merged) before loading
            enter_stage(stage_name)
    elif stage is not None:
        raise ConfigError(f"stage={stage!r}, but model {name!r} has no stages (no enter_stage)")

    try:
        load_into(network, load_state_dict(located.weights), strict=True)
    except CheckpointError as e:
        built = f"model {name!r}" + (f" built with {build_overrides}" if build_overrides else "")
        raise CheckpointError(f"{located.weights} does not hold {built}: {e}") from e
    return Predictor(network, device=device, name=name, checkpoint=located.weights)
