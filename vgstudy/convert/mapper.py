"""Released MaPPER checkpoints (liuting20/MaPPER) <-> vgstudy's MaPPER, strictly.

The release saves `{"model": MaPPER.state_dict(), "optimizer", "lr_scheduler", "epoch", "args": argparse.Namespace,
"val_accu"}` (`train.py`). Its key layout, from its code:
- `visumodel.*`: DINOv2 under the official names (timm's too), LoCA as `blocks.{i}.adapter.{D_fc1, D_fc2, branch1,
  branch2.0, branch2.1}` (each branch a `conv` + `bn`), and DINOv2's `mask_token`, which grounding never uses;
- `textmodel.bert.*`: BLIP's `med.py` BERT: no token-type embedding, a saved `position_ids` buffer, a cross-attention
  per layer (its config says add_cross_attention; never called), DyPA as `encoder.layer.{i}.dapt_text.*`;
- `textmodel_clip.clip.*`: OpenAI's whole CLIP (fp16 when trained on GPU), its text blocks as
  `transformer.resblocks.resblock_{i}`: the random blocks the release's prior ran on (see `vgstudy.models.mapper`);
  the image tower and `logit_scale` take no part;
- `text_adapter.down` (PGT), `visu_proj`, `text_proj`, `reg_token`, `vl_pos_embed`, `vl_transformer.encoder.layers.{i}`,
  `bbox_embed.layers.{i}`.

`from_release(state_dict, model)` maps such a state dict onto the model's keys and raises a CheckpointError listing
every release key with no place in the model, every model key the checkpoint lacks and every shape that differs.
Kept from the model as it was built, and only these: BERT's pooler (MaPPER never uses it; the release has none), and
CLIP's text blocks when the model was built with pretrained ones (random_prior_blocks=False: the release's random
blocks are then skipped). A model that adds BERT's token-type embedding cannot take a release checkpoint (its BERT
was trained without one): build it with no_token_type_embedding=True, as fidelity="release" does. A model whose
DINOv2 drops its registers (reg4 weights under drop_registers) gets the release's CLS position folded into its
CLS token, as timm stores register models.

A released model is evaluated as: `state, args = read_release_checkpoint(path)`;
`model = build("mapper-b", **release_overrides(args))`; `load_release(model, state)`.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from vgstudy.checkpoint import listed, load_into
from vgstudy.convert import release
from vgstudy.errors import CheckpointError
from vgstudy.models.mapper import RELEASE_PRIOR_MASK_LEN, MaPPER

# vgstudy key prefix -> release key prefix (the longest match wins).
_PREFIXES = {
    "visual.": "visumodel.",
    "text.": "textmodel.bert.",
    "prior.": "textmodel_clip.clip.",
    "pgt.proj.": "text_adapter.down.",
    **release.FUSION_PREFIXES,
}
_LOCA = r"^(visumodel\.blocks\.\d+\.adapter\.)"
_DYPA = r"^(textmodel\.bert\.encoder\.layer\.\d+\.)adapter\."
# Module names that differ once the prefix is replaced: (vgstudy pattern, release replacement).
_RENAMES = (
    (_LOCA + r"down\.", r"\1D_fc1."),
    (_LOCA + r"up\.", r"\1D_fc2."),
    (_LOCA + r"conv_1x1\.", r"\1branch1."),
    (_LOCA + r"conv_3x3_reduce\.", r"\1branch2.0."),
    (_LOCA + r"conv_3x3\.", r"\1branch2.1."),
    (_DYPA + r"norm\.", r"\1dapt_text.bert_adapter_layer_norm_before."),
    (_DYPA + r"prior_norm\.", r"\1dapt_text.clip_adapter_layer_norm_before."),
    (_DYPA + r"scale\.", r"\1dapt_text.scale."),
    (_DYPA + r"down\.", r"\1dapt_text.bert_down_proj."),
    (_DYPA + r"up\.", r"\1dapt_text.up_proj."),
    (_DYPA + r"prior_down\.", r"\1dapt_text.clip_down_proj."),
    (r"^(textmodel_clip\.clip\.transformer\.resblocks\.)(\d+)\.", r"\1resblock_\2."),
)
# Release keys that its forward pass never reads: dropped.
RELEASE_UNUSED = tuple(
    re.compile(pattern)
    for pattern in (
        r"visumodel\.mask_token",
        r"textmodel\.bert\.embeddings\.position_ids",
        r"textmodel\.bert\.encoder\.layer\.\d+\.crossattention\..+",
        r"textmodel\.bert\.encoder\.layer\.\d+\.dapt_text\.clip_down_proj\.(weight|bias)",
        r"textmodel_clip\.clip\.visual\..+",
        r"textmodel_clip\.clip\.logit_scale",
    )
)
_RELEASE_PRIOR_BLOCKS = re.compile(r"textmodel_clip\.clip\.transformer\.resblocks\..+")
_POOLER = "text.pooler."
_TOKEN_TYPES = "text.embeddings.token_type_embeddings.weight"


def release_key(key: str) -> str | None:
    """The release's name for a vgstudy MaPPER state-dict key (None: the release has no such weight)."""
    if key.startswith(_POOLER) or key == _TOKEN_TYPES:
        return None
    prefix = max((p for p in _PREFIXES if key.startswith(p)), key=len, default=None)
    if prefix is None:
        return None
    renamed = _PREFIXES[prefix] + key.removeprefix(prefix)
    for pattern, replacement in _RENAMES:
        renamed = re.sub(pattern, replacement, renamed)
    return renamed


def _keeps_prior_blocks(model: MaPPER) -> bool:
    """A model built with pretrained CLIP text blocks keeps them (the release's are random)."""
    return model.prior is not None and not model.deviations.random_prior_blocks


def _kept_from_model(key: str, model: MaPPER) -> bool:
    """Model keys that keep the model's own values when a release checkpoint is loaded."""
    return (
        key.startswith(_POOLER)
        or (key == _TOKEN_TYPES and model.deviations.no_token_type_embedding)
        or (key.startswith("prior.transformer.resblocks.") and _keeps_prior_blocks(model))
    )


def _folds_cls_position(model: MaPPER) -> bool:
    """timm stores register models with the CLS position folded into cls_token and positions for the patches only."""
    return bool(model.visual.no_embed_class)


def from_release(state_dict: Mapping[str, torch.Tensor], model: MaPPER) -> dict[str, torch.Tensor]:
    """A release state dict -> `model`'s full state dict (every key), or a CheckpointError listing what does not fit."""
    if not isinstance(model, MaPPER):
        raise CheckpointError(f"a MaPPER release checkpoint loads into a MaPPER model, not a {type(model).__name__}")
    if not model.deviations.no_token_type_embedding:
        raise CheckpointError(
            "the release's BERT has no token-type embedding, so its checkpoints do not fit a model that adds one; "
            "build the model with no_token_type_embedding=True (fidelity='release' does)"
        )
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for key, value in own.items():
        if _kept_from_model(key, model):
            mapped[key] = value
            continue
        name = release_key(key)
        if name is None or name not in state_dict:
            missing.append(f"{key} (the release has no counterpart)" if name is None else f"{name} (for {key})")
            continue
        used.add(name)
        mapped[key] = state_dict[name].to(value.dtype)
    if _folds_cls_position(model) and "visumodel.pos_embed" in used and "visumodel.cls_token" in used:
        positions = state_dict["visumodel.pos_embed"]  # (1, 1 + N, D): CLS first
        cls_token = state_dict["visumodel.cls_token"] + positions[:, :1]
        mapped["visual.cls_token"] = cls_token.to(own["visual.cls_token"].dtype)
        mapped["visual.pos_embed"] = positions[:, 1:].to(own["visual.pos_embed"].dtype)
    unexpected = [
        key
        for key in state_dict
        if key not in used
        and not any(pattern.fullmatch(key) for pattern in RELEASE_UNUSED)
        and not (_RELEASE_PRIOR_BLOCKS.fullmatch(key) and _keeps_prior_blocks(model))
    ]
    problems = [
        listed("release keys missing for the model", missing),
        listed("release keys with no place", unexpected),
    ]
    problems = [problem for problem in problems if problem]
    if problems:
        raise CheckpointError("MaPPER release checkpoint does not fit the model: " + "; ".join(problems))
    return mapped


def load_release(model: MaPPER, checkpoint: str | Path | Mapping[str, torch.Tensor]) -> MaPPER:
    """Load a release checkpoint (a file, or a state dict) into `model` strictly; returns the model."""
    state = read_release_checkpoint(checkpoint)[0] if isinstance(checkpoint, (str, Path)) else checkpoint
    mapped = from_release(state, model)
    try:
        load_into(model, mapped)
    except CheckpointError as error:  # shapes: a checkpoint of another size, image size or max_len
        raise CheckpointError(f"MaPPER release checkpoint does not fit the model: {error}") from error
    return model


def to_release(model: MaPPER) -> dict[str, torch.Tensor]:
    """`model`'s weights under the release's names: what the release's `model.state_dict()` holds for them (its
    unused weights aside). For running the release on vgstudy's weights, and for tests."""
    state = model.state_dict()
    out = {release_key(key): value for key, value in state.items() if release_key(key) is not None}
    if _folds_cls_position(model):  # the release adds pos_embed[:, 0] to CLS: a zero row keeps the folded CLS
        positions = state["visual.pos_embed"]
        out["visumodel.pos_embed"] = torch.cat([positions.new_zeros(1, 1, positions.shape[-1]), positions], dim=1)
    if _keeps_prior_blocks(model):
        out = {key: value for key, value in out.items() if not _RELEASE_PRIOR_BLOCKS.fullmatch(key)}
    return out


def read_release_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], argparse.Namespace | None]:
    """(state dict, training args) from a release file, read with `weights_only=True` (tensors, plain containers and
    argparse.Namespace only: a pickle that would run code is refused with a CheckpointError)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"MaPPER release checkpoint {path} does not exist") from error
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(f"MaPPER release checkpoint {path} cannot be read safely: {error}") from error
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"MaPPER release checkpoint {path}: expected {{'model': state dict}} or a state dict")
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    return state, args if isinstance(args, argparse.Namespace) else None


def release_overrides(args: argparse.Namespace | None) -> dict:
    """MaPPER overrides that rebuild a released model from its training args: fidelity="release", its text length,
    image size and fusion. RefCOCOg's max length 40 only ran with the CLIP mask edited to 40 (the release comments
    that edit), so fixed_prior_mask is off for any length but 20."""
    overrides: dict = {"fidelity": "release"}
    if args is None:
        return overrides
    fields = release.FUSION_ARGS.items()
    overrides.update({ours: getattr(args, theirs) for theirs, ours in fields if hasattr(args, theirs)})
    if overrides.get("max_len", RELEASE_PRIOR_MASK_LEN) != RELEASE_PRIOR_MASK_LEN:
        overrides["fixed_prior_mask"] = False
    return overrides
