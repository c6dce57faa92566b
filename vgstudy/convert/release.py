"""What the releases' checkpoint files share: TransVG's training script, which HiVG and MaPPER grew from, saves
`{"model": state dict, "optimizer", "lr_scheduler", "epoch", "args": argparse.Namespace, ...}`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vgstudy.checkpoint import safe_torch_load
from vgstudy.errors import CheckpointError

# The projections and head MaPPER's release kept from TransVG's: vgstudy key prefix -> release key prefix.
FUSION_PREFIXES = {
    "visual_proj.": "visu_proj.",
    "text_proj.": "text_proj.",
    "head.reg_token.": "reg_token.",
    "head.pos_embed.": "vl_pos_embed.",
    "head.layers.": "vl_transformer.encoder.layers.",
    "head.box_mlp.layers.": "bbox_embed.layers.",
}
# The training arguments both releases read for the text length, the input size and the fusion -> the build override.
FUSION_ARGS = {
    "max_query_len": "max_len",
    "imsize": "image_size",
    "vl_hidden_dim": "dim",
    "vl_enc_layers": "depth",
    "vl_nheads": "heads",
    "vl_dim_feedforward": "ffn_dim",
    "vl_dropout": "dropout",
}


def read_release_checkpoint(path: str | Path, method: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(the "model" state dict, the training arguments as a dict ({} when absent)) of `method`'s release checkpoint.

    Read with `torch.load(weights_only=True)`, allowing argparse.Namespace (the releases store their arguments so):
    anything else that is not a tensor or plain container is refused with a CheckpointError.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = safe_torch_load(path)
    state_dict = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{method} release checkpoint {path}: expected a dict with a state dict under 'model'")
    args = checkpoint.get("args")
    return state_dict, vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
