"""Released HiVG checkpoints (linhuixiao/HiVG) <-> vgstudy's HiVG, strictly.

The release saves `{"model": HiVG.state_dict(), "args": argparse.Namespace, ...}`. Its key layout:
- CLIP is transformers' `CLIPModel` (`clip.text_model...`, `clip.vision_model...`) wrapped by peft's
  `get_peft_model` once per HiLoRA stage plus once (warm-up: 1, stage 3: 4), each wrap adding `base_model.model.`
  after `clip.`;
- peft's LoRA keys in either scheme: before peft 0.7 the adapted layer keeps its keys (`q_proj.weight`) beside
  `q_proj.lora_A.default.weight`; from 0.7 on it is `q_proj.base_layer.weight` (and earliest peft had no adapter
  name: `q_proj.lora_A.weight`). The release pins peft 0.3.0; loading its checkpoints non-strictly under a newer peft
  silently dropped every adapted weight (the accuracy collapse of the release's issues #12/#14);
- the bridge lives in the vision layers (`layers.{i}.cross_norm/cross_attn/cross_mlp/cross_gate/
  cross_adaptive_weights.{level}`), the head is a DETR encoder (`vl_transformer.encoder.layers.{i}...`), and
  four modules take no part in the forward pass (`RELEASE_UNUSED`), nor do HF's `position_ids` buffers.

`from_release` maps such a state dict onto a HiVG model's keys (the model's one adapter receives the release's LoRA;
the release's scaling alpha / r equals ours when the ranks match), and raises a CheckpointError that lists every
unmapped, missing or mis-shaped key; `load_release` loads a file or state dict that way. `to_release` is the inverse
(for running the release on vgstudy's weights, and for tests). `read_release_checkpoint` reads a release file
safely (tensors, plain containers and argparse.Namespace only), `release_overrides` turns its args into HiVG
overrides (the release's own behaviour: `text_layout="official"`, `hilora_merge=False`) and its stage.

A released model is evaluated as: `state, args = read_release_checkpoint(path)`;
`overrides, stage = release_overrides(args)`; `model = build("hivg-b", **overrides)`; `model.enter_stage(stage)`;
`load_release(model, state)`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from vgstudy.checkpoint import listed
from vgstudy.convert import release
from vgstudy.errors import CheckpointError, ConfigError

PEFT_SCHEMES = ("base_layer", "plain")
_CLIP_PREFIX = "clip."
_PEFT_WRAP = "base_model.model."
# Parameters of the release that its forward pass never reads; dropped (their shapes are not checked).
RELEASE_UNUSED = (
    "condition_text_proj.weight",
    "condition_text_proj.bias",
    "ml_text_feat_perceiver.weight",
    "ml_text_feat_perceiver.bias",
    "reg_pos_embed.weight",
    "condition_text_pos_embed.weight",
)
# HF CLIP's position-id buffers (transformers 4.30 saves them): arange, derivable, not weights.
RELEASE_BUFFERS = ("clip.text_model.embeddings.position_ids", "clip.vision_model.embeddings.position_ids")

# Placeholders of the rename rules below, as regular expressions.
_PLACEHOLDERS = {
    "i": r"\d+",
    "wb": r"weight|bias",
    "proj": r"q_proj|k_proj|v_proj|out_proj",
    "param": r"weight|bias|lora_A\.weight|lora_B\.weight",  # an adapted projection's keys, peft scheme removed
    "fc": r"fc1|fc2",
    "rest": r".+",
}
# (release key, vgstudy key): HF CLIP's names <-> open_clip's (the attention already split into q, k, v and out,
# `vgstudy.models.hilora.SplitAttention`), the release's bridge and head <-> vgstudy's modules. CLIP keys are written
# without the peft wraps and without peft's `base_layer` / adapter name.
_BLOCK_PARTS = (
    ("self_attn.{proj}.{param}", "attn.{proj}.{param}"),
    ("layer_norm1.{wb}", "ln_1.{wb}"),
    ("layer_norm2.{wb}", "ln_2.{wb}"),
    ("mlp.fc1.{wb}", "mlp.c_fc.{wb}"),
    ("mlp.fc2.{wb}", "mlp.c_proj.{wb}"),
)
_RULES: tuple[tuple[str, str], ...] = (
    ("clip.text_model.embeddings.token_embedding.weight", "clip.text.token_embedding.weight"),
    ("clip.text_model.embeddings.position_embedding.weight", "clip.text.positional_embedding"),
    ("clip.text_model.final_layer_norm.{wb}", "clip.text.ln_final.{wb}"),
    ("clip.text_projection.weight", "clip.text.text_projection"),
    ("clip.vision_model.embeddings.class_embedding", "clip.visual.class_embedding"),
    ("clip.vision_model.embeddings.patch_embedding.weight", "clip.visual.conv1.weight"),
    ("clip.vision_model.embeddings.position_embedding.weight", "clip.visual.positional_embedding"),
    ("clip.vision_model.pre_layrnorm.{wb}", "clip.visual.ln_pre.{wb}"),  # sic: HF's spelling
    ("clip.vision_model.post_layernorm.{wb}", "clip.visual.ln_post.{wb}"),
    ("clip.visual_projection.weight", "clip.visual.proj"),
    ("clip.logit_scale", "clip.logit_scale"),
    *(
        (f"clip.{hf}.encoder.layers.{{i}}.{release}", f"clip.{ours}.transformer.resblocks.{{i}}.{vgstudy}")
        for hf, ours in (("text_model", "text"), ("vision_model", "visual"))
        for release, vgstudy in _BLOCK_PARTS
    ),
    ("clip.vision_model.encoder.layers.{i}.cross_norm.{wb}", "bridges.{i}.norm.{wb}"),
    ("clip.vision_model.encoder.layers.{i}.cross_attn.{proj}.{param}", "bridges.{i}.attn.{proj}.{param}"),
    ("clip.vision_model.encoder.layers.{i}.cross_mlp.{fc}.{wb}", "bridges.{i}.mlp.{fc}.{wb}"),
    ("clip.vision_model.encoder.layers.{i}.cross_gate.{wb}", "bridges.{i}.gate.{wb}"),
    ("visu_proj.{wb}", "visual_proj.{wb}"),
    ("text_proj.{wb}", "text_proj.{wb}"),
    ("ml_visual_projection.{wb}", "feature_proj.{wb}"),
    ("reg_token.weight", "head.reg_token.weight"),
    ("vl_pos_embed.weight", "head.pos_embed.weight"),
    ("vl_transformer.encoder.layers.{i}.{rest}", "head.layers.{i}.{rest}"),  # DETR's names are EncoderLayer's
    ("vl_transformer.encoder.norm.{wb}", "head.final_norm.{wb}"),
    ("bbox_embed.layers.{i}.{wb}", "head.box_mlp.layers.{i}.{wb}"),
    ("visu_token_norm.{wb}", "patch_text_head.norm.{wb}"),
    ("visu_token_mlp.{fc}.{wb}", "patch_text_head.mlp.{fc}.{wb}"),
    ("seg_conv1.weight", "mask_head.upsample.0.weight"),
    ("seg_conv2.weight", "mask_head.upsample.1.weight"),
    ("seg_conv3.weight", "mask_head.upsample.2.weight"),
)
# HF's projections are Linear weights (out, in); open_clip's are matrices used as x @ P (in, out).
_TRANSPOSED = ("clip.text.text_projection", "clip.visual.proj")
# The bridge's per-level re-weighting: one nn.Embedding(77, Dt) per level in the release, one (levels, L, Dt) here.
_LEVEL_WEIGHT = re.compile(r"clip\.vision_model\.encoder\.layers\.(\d+)\.cross_adaptive_weights\.(\d+)\.weight")
_OUR_LEVEL_WEIGHTS = re.compile(r"bridges\.(\d+)\.level_weights")


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, expression in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape(f"{{{name}}}"), f"(?P<{name}>{expression})")
    return re.compile(pattern)


_COMPILED = tuple((_compile(release), release, _compile(ours), ours) for release, ours in _RULES)

# peft's LoRA key schemes: `.base_layer` (>= 0.7) and the adapter name (>= 0.3) are removed for matching.
_PEFT_LORA = re.compile(r"\.lora_(A|B)\.([^.]+)\.weight$")


def _without_peft(key: str) -> tuple[str, str | None]:
    """A key with peft's `.base_layer` and adapter name removed, and the adapter name (None if none)."""
    key = key.replace(".base_layer.", ".")
    match = _PEFT_LORA.search(key)
    if match:
        return key[: match.start()] + f".lora_{match[1]}.weight", match[2]
    return key, None


def _strip_wraps(key: str) -> tuple[str, int]:
    """A release key without its `base_model.model.` peft wraps after `clip.`, and how many there were."""
    if not key.startswith(_CLIP_PREFIX):
        return key, 0
    rest, wraps = key[len(_CLIP_PREFIX) :], 0
    while rest.startswith(_PEFT_WRAP):
        rest, wraps = rest[len(_PEFT_WRAP) :], wraps + 1
    return _CLIP_PREFIX + rest, wraps


def _model_keys(model: nn.Module) -> dict[str, str]:
    """The model's state-dict keys by their peft-free form (one adapter per adapted layer)."""
    keys: dict[str, str] = {}
    for key in model.state_dict():
        plain, _ = _without_peft(key)
        if plain in keys:
            raise CheckpointError(
                f"model key {key!r}: the model has more than one LoRA adapter on a layer; a release checkpoint has one"
            )
        keys[plain] = key
    return keys


def from_release(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A released HiVG state dict as a state dict of `model` (a HiVG of the same architecture), strictly.

    Accepts any number of peft wraps (the same for every CLIP key), both peft key schemes, and a DDP "module."
    prefix. Raises CheckpointError listing release keys that map to nothing, model keys left without a value, and
    shapes that differ.
    """
    model_keys = _model_keys(model)
    expected = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    wraps_seen: set[int] = set()
    level_weights: dict[str, dict[int, torch.Tensor]] = {}
    for original, value in state_dict.items():
        key, wraps = _strip_wraps(original.removeprefix("module."))
        if key.startswith(_CLIP_PREFIX):
            wraps_seen.add(wraps)
        key, _ = _without_peft(key)
        if key in RELEASE_UNUSED or key in RELEASE_BUFFERS:
            continue
        level = _LEVEL_WEIGHT.fullmatch(key)
        if level:
            level_weights.setdefault(f"bridges.{level[1]}.level_weights", {})[int(level[2])] = value
            continue
        renamed = _rename(key, to_release=False)
        if renamed is None or renamed[0] not in model_keys:
            unmapped.append(original)
            continue
        ours, transposed = renamed
        converted[model_keys[ours]] = value.t() if transposed else value
    for ours, levels in level_weights.items():
        if ours in model_keys and sorted(levels) == list(range(len(levels))):
            converted[model_keys[ours]] = torch.stack([levels[j] for j in range(len(levels))])  # (levels, L, Dt)
        else:
            unmapped.append(f"{ours} (levels {sorted(levels)})")
    if len(wraps_seen) > 1:
        raise CheckpointError(
            f"release checkpoint: CLIP keys with different numbers of peft wraps {sorted(wraps_seen)}"
        )
    problems = []
    if unmapped:
        problems.append(listed("release keys that map to no key of the model", sorted(unmapped)))
    missing = sorted(key for key in expected if key not in converted)
    if missing:
        problems.append(listed("model keys the release checkpoint does not provide", missing))
    mis_shaped = sorted(
        f"{key} (release {tuple(value.shape)}, model {tuple(expected[key].shape)})"
        for key, value in converted.items()
        if value.shape != expected[key].shape
    )
    if mis_shaped:
        problems.append(listed("keys of another shape (another architecture or LoRA rank?)", mis_shaped))
    if problems:
        raise CheckpointError(f"release checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    return converted


def _rename(key: str, to_release: bool) -> tuple[str, bool] | None:
    """A peft-free key renamed by the first rule that matches it, in either direction, and whether its tensor is
    transposed between the layouts; None when no rule matches."""
    for release_pattern, release_template, ours_pattern, ours_template in _COMPILED:
        pattern, template = (ours_pattern, release_template) if to_release else (release_pattern, ours_template)
        match = pattern.fullmatch(key)
        if match:
            renamed = template.format(**match.groupdict())
            return renamed, (key if to_release else renamed) in _TRANSPOSED
    return None


def load_release(model: nn.Module, checkpoint: str | Path | Mapping[str, torch.Tensor]) -> None:
    """Load a released HiVG checkpoint (a file, or the state dict under its "model") into `model`, strictly."""
    state_dict = read_release_checkpoint(checkpoint)[0] if isinstance(checkpoint, str | Path) else checkpoint
    model.load_state_dict(from_release(state_dict, model), strict=True)


def to_release(model: nn.Module, wraps: int, peft_scheme: str = "base_layer") -> dict[str, torch.Tensor]:
    """`model`'s (a HiVG's) weights under the release's key names: CLIP wrapped `wraps` times (the release's stage
    + 1), LoRA in peft's "base_layer" (>= 0.7) or "plain" (< 0.7) scheme with adapter name "default", the unused
    parameters as zeros and HF's position ids as aranges, so that the release's strict `load_state_dict` accepts it.
    """
    if peft_scheme not in PEFT_SCHEMES:
        raise ConfigError(f"to_release peft_scheme={peft_scheme!r}: expected one of {PEFT_SCHEMES}")
    if isinstance(wraps, bool) or not isinstance(wraps, int) or wraps < 0:
        raise ConfigError(f"to_release wraps={wraps!r}: expected an int >= 0")
    state = model.state_dict()
    plain: dict[str, torch.Tensor] = {}  # release keys without peft's scheme
    for key, value in state.items():
        key, _ = _without_peft(key)
        level = _OUR_LEVEL_WEIGHTS.fullmatch(key)
        if level:
            for j, weights in enumerate(value):
                plain[f"clip.vision_model.encoder.layers.{level[1]}.cross_adaptive_weights.{j}.weight"] = weights
            continue
        renamed = _rename(key, to_release=True)
        if renamed is None:
            raise CheckpointError(f"model key {key!r} has no counterpart in the release's layout")
        release, transposed = renamed
        plain[release] = value.t() if transposed else value
    head_dim, vision_dim = state["feature_proj.weight"].shape[0], state["clip.visual.class_embedding"].shape[0]
    text_len, text_dim = state["clip.text.positional_embedding"].shape
    levels = len(model.config.text_levels)
    for key, shape in {
        "condition_text_proj.weight": (vision_dim, head_dim),
        "condition_text_proj.bias": (vision_dim,),
        "ml_text_feat_perceiver.weight": (vision_dim, levels * text_dim),
        "ml_text_feat_perceiver.bias": (vision_dim,),
        "reg_pos_embed.weight": (1, head_dim),
        "condition_text_pos_embed.weight": (text_len, vision_dim),
    }.items():
        plain[key] = torch.zeros(shape)
    plain[RELEASE_BUFFERS[0]] = torch.arange(text_len)[None]
    plain[RELEASE_BUFFERS[1]] = torch.arange(state["clip.visual.positional_embedding"].shape[0])[None]

    adapted = {key.rsplit(".lora_", 1)[0] for key in plain if ".lora_" in key}
    out: dict[str, torch.Tensor] = {}
    for key, value in plain.items():
        lora = re.search(r"\.lora_(A|B)\.weight$", key)
        layer, _, parameter = key.rpartition(".")
        if lora:
            key = key[: lora.start()] + f".lora_{lora[1]}.default.weight"
        elif layer in adapted and peft_scheme == "base_layer":
            key = f"{layer}.base_layer.{parameter}"
        if key.startswith(_CLIP_PREFIX):
            key = _CLIP_PREFIX + _PEFT_WRAP * wraps + key.removeprefix(_CLIP_PREFIX)
        out[key] = value
    return out


def read_release_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the "model" state dict, the training arguments as a dict ({} when absent)) of a HiVG release checkpoint
    file, read safely (`vgstudy.convert.release.read_release_checkpoint`)."""
    return release.read_release_checkpoint(path, "HiVG")


def release_overrides(args: Mapping) -> tuple[dict, str]:
    """(HiVG overrides, stage name) reproducing a release run from its arguments: the backbone (--model), the text
    levels (--dataset), the re-weighting (--enable_adaptive_weights), the release's layout and single adapter, and
    the stage (--hi_lora_stage 0..3 -> warmup, stage1..3)."""
    from vgstudy.models.hilora import HILORA_SCHEDULE

    backbones = {"ViT-B/16": "clip:ViT-B-16-quickgelu", "ViT-L/14": "clip:ViT-L-14-quickgelu"}
    model = args.get("model", "ViT-B/16")
    if model not in backbones:
        raise ConfigError(f"release args model={model!r}: expected one of {sorted(backbones)}")
    stage = args.get("hi_lora_stage", 0)
    if stage not in range(len(HILORA_SCHEDULE)):
        raise ConfigError(f"release args hi_lora_stage={stage!r}: expected 0 ... {len(HILORA_SCHEDULE) - 1}")
    overrides = {
        "backbone": backbones[model],
        "dataset": args.get("dataset", "unc"),
        "adaptive_weights": bool(args.get("enable_adaptive_weights", False)),
        "text_layout": "official",
        "hilora_merge": False,
    }
    return overrides, HILORA_SCHEDULE[stage].name
