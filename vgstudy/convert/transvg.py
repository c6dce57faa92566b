"""Released TransVG checkpoints (djiajunustc/TransVG) <-> vgstudy's TransVG, strictly.

The release saves `{"model": TransVG.state_dict(), "optimizer", "lr_scheduler", "epoch", "args": argparse.Namespace}`
(`train.py`). Its key layout, from its code (`models/trans_vg.py` and the DETR and BERT modules it builds):
- `visumodel.backbone.0.body.*`: the torchvision ResNet up to layer4 (DETR's `Joiner`: index 0 the backbone, index 1
  the sine position embedding, which has no weights), FrozenBatchNorm2d as four buffers per norm;
- `visumodel.input_proj.*` (1x1 conv) and `visumodel.transformer.encoder.layers.{i}.*` (DETR's post-norm encoder; no
  decoder with --dec_layers 0, no final norm without --pre_norm);
- `textmodel.bert.*`: pytorch_pretrained_bert's BertModel, whose names are transformers' BertModel's (pooler
  included: the release never uses it, nor does vgstudy, but both have it);
- `visu_proj`, `text_proj`, `reg_token`, `vl_pos_embed`, `vl_transformer.encoder.layers.{i}` (the same DETR layer
  names as vgstudy's `EncoderLayer`) and `bbox_embed.layers.{i}`.

So the mapping is a renaming of prefixes, one to one: no weight is dropped, transposed or split. `from_release` maps a
release state dict onto a TransVG model's keys and raises a CheckpointError listing every release key with no place,
every model key left without a value and every shape that differs; `load_release` loads a file or state dict that
way; `to_release` is the inverse (for running the release on vgstudy's weights, and for tests).
`read_release_checkpoint` reads a release file safely (tensors, plain containers and argparse.Namespace only) and
`release_overrides` turns its args into TransVG overrides.

A released model is evaluated as: `state, args = read_release_checkpoint(path)`;
`model = build("transvg-r50", **release_overrides(args))`; `load_release(model, state)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from vgstudy.checkpoint import listed
from vgstudy.convert import release
from vgstudy.errors import CheckpointError, ConfigError

# vgstudy key prefix -> release key prefix; every key of a TransVG model starts with exactly one of them.
PREFIXES = {
    "visual.body.": "visumodel.backbone.0.body.",
    "visual.input_proj.": "visumodel.input_proj.",
    "visual.blocks.": "visumodel.transformer.encoder.layers.",
    "text.": "textmodel.bert.",
    **release.FUSION_PREFIXES,
}
# transformers' BertModel keeps these as non-persistent buffers; pytorch_pretrained_bert has none. Older
# transformers saved them: derivable (arange, zeros), not weights.
MODEL_BUFFERS = ("text.embeddings.position_ids", "text.embeddings.token_type_ids")


def release_key(key: str) -> str | None:
    """The release's name for a vgstudy TransVG state-dict key (None: the key is not TransVG's)."""
    prefix = next((p for p in PREFIXES if key.startswith(p)), None)
    return None if prefix is None else PREFIXES[prefix] + key.removeprefix(prefix)


def our_key(key: str) -> str | None:
    """vgstudy's name for a release key (None: the release key has no counterpart)."""
    prefix = next((p for p, release in PREFIXES.items() if key.startswith(release)), None)
    return None if prefix is None else prefix + key.removeprefix(PREFIXES[prefix])


def from_release(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A released TransVG state dict (a DDP "module." prefix allowed) as a state dict of `model`, strictly.

    Raises CheckpointError listing release keys that map to nothing, model keys the checkpoint does not provide, and
    shapes that differ (another backbone, width, image size or text length).
    """
    expected = {key: value for key, value in model.state_dict().items() if key not in MODEL_BUFFERS}
    converted: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for original, value in state_dict.items():
        key = our_key(original.removeprefix("module."))
        if key in MODEL_BUFFERS:
            continue
        if key is None or key not in expected:
            unmapped.append(original)
            continue
        converted[key] = value
    missing = sorted(release_key(key) + f" (for {key})" for key in expected if key not in converted)
    mis_shaped = sorted(
        f"{release_key(key)} (release {tuple(value.shape)}, model {tuple(expected[key].shape)})"
        for key, value in converted.items()
        if value.shape != expected[key].shape
    )
    problems = [
        listed("release keys that map to no key of the model", sorted(unmapped)),
        listed("model keys the release checkpoint does not provide", missing),
        listed("keys of another shape (another backbone, width, image size or text length?)", mis_shaped),
    ]
    problems = [problem for problem in problems if problem]
    if problems:
        raise CheckpointError(f"TransVG release checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    return {key: value.to(expected[key].dtype) for key, value in converted.items()}


def load_release(model: nn.Module, checkpoint: str | Path | Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a released TransVG checkpoint (a file, or a state dict) into `model`, strictly; returns the model."""
    state_dict = read_release_checkpoint(checkpoint)[0] if isinstance(checkpoint, str | Path) else checkpoint
    # strict=False only for transformers' derivable buffers, which from_release leaves out
    missing, unexpected = model.load_state_dict(from_release(state_dict, model), strict=False)
    left = [key for key in missing if key not in MODEL_BUFFERS]
    if left or unexpected:
        raise CheckpointError(f"TransVG release checkpoint: missing {left}, unexpected {unexpected}")
    return model


def to_release(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights under the release's key names: what the release's `model.state_dict()` holds."""
    out = {}
    for key, value in model.state_dict().items():
        if key in MODEL_BUFFERS:
            continue
        name = release_key(key)
        if name is None:
            raise CheckpointError(f"model key {key!r} has no counterpart in the TransVG release's layout")
        out[name] = value
    return out


def read_release_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the "model" state dict, the training arguments as a dict ({} when absent)) of a TransVG release checkpoint
    file, read safely (`vgstudy.convert.release.read_release_checkpoint`)."""
    return release.read_release_checkpoint(path, "TransVG")


# The release's DETR-encoder arguments -> ResNetDETRConfig fields (the fusion's: release.FUSION_ARGS).
_DETR_ARGS = {
    "hidden_dim": "width",
    "enc_layers": "depth",
    "nheads": "heads",
    "dim_feedforward": "ffn_dim",
    "dropout": "dropout",
    "dilation": "dilation",
}


def release_overrides(args: Mapping) -> dict:
    """TransVG overrides reproducing a release run from its arguments (`read_release_checkpoint`'s dict): the ResNet
    (--backbone), the DETR encoder, the fusion and the text length. Release options vgstudy's TransVG does not have
    are a ConfigError: a BERT layer other than the last (--bert_enc_num), no DETR encoder (--detr_enc_num 0), a
    pre-norm or learned-position DETR."""
    backbone = args.get("backbone", "resnet50")
    if backbone not in ("resnet50", "resnet101"):
        raise ConfigError(f"release args backbone={backbone!r}: expected resnet50 or resnet101")
    unsupported = {
        "bert_enc_num": (12, "vgstudy reads BERT's last layer"),
        "detr_enc_num": (6, "vgstudy always runs the DETR encoder (its depth is --enc_layers)"),
        "pre_norm": (False, "vgstudy's DETR encoder is post-norm"),
        "position_embedding": ("sine", "vgstudy's DETR encoder uses the sine embedding"),
        "dec_layers": (0, "TransVG runs no DETR decoder"),
    }
    for name, (value, why) in unsupported.items():
        if args.get(name, value) != value:
            raise ConfigError(f"release args {name}={args[name]!r}: expected {value!r} ({why})")
    overrides: dict = {"visual": f"{backbone}+detr", "text": "bert:base"}
    overrides.update({ours: args[theirs] for theirs, ours in release.FUSION_ARGS.items() if theirs in args})
    detr = {ours: args[theirs] for theirs, ours in _DETR_ARGS.items() if theirs in args}
    if detr:
        overrides["visual_options"] = detr
    return overrides
