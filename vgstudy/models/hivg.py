"""HiVG (Xiao et al., ACM MM 2024): CLIP, a multi-layer adaptive cross-modal bridge, and hierarchical LoRA.

Sec. 3 of the paper, as the release (linhuixiao/HiVG, `models/HiVG.py`) builds it; ViT-B/16 at 224 px:

1. Text: CLIP's text tower encodes the expression (77 tokens). The hidden states of some of its blocks (the "levels";
   the release picks them per data set: the last block on RefCOCO, blocks 6 and 12 on RefCOCO+ and ReferIt, all 12 on
   RefCOCOg) feed the bridge; its final tokens, through CLIP's text projection, feed the head.
2. Vision with the bridge (Sec. 3.2): CLIP's image tower runs block by block; inside blocks 0, 3, 7, 11 [ViT-L/14: 4,
   10, 16, 22], between the block's self-attention and its MLP (where the release puts it), a `CrossModalBridge`
   re-weights each text level per token and channel (T_l' = W_l * T_l + T_l), mixes the levels with a linear gate,
   lets the image tokens cross-attend to the result and adds a CLIP-style MLP of it to the image tokens.
3. Multi-level visual features: the outputs of blocks 0, 3, 7, 11 [5, 11, 17, 23] are concatenated on channels and
   projected to the head width (initialised with CLIP's visual projection repeated for each level, so at the start
   it is CLIP's projection of their sum).
4. Head: [REG] + (CLS + 196 patches) + 77 text tokens = 275 tokens, the shared `GroundingHead` pre-norm (width 512
   [768], 8 heads, FFN 2048, 6 layers), padding masked; [REG] -> 3-layer MLP -> sigmoid -> (cx, cy, w, h).
5. Auxiliary outputs for the extra losses (`vgstudy.losses_hivg`): CLIP's image-text logits (contrastive), and from
   the head's outputs the patch-text alignment logits (`PatchTextHead`) and mask logits at 8x the patch grid
   (`MaskHead`): dot products of patch features with the head's end-of-text feature.
6. HiLoRA (Sec. 3.3, `vgstudy.models.hilora`): `enter_stage(name)` switches what trains, stage by stage.

Fidelity switches (default = paper): `text_layout` "fixed" | "official" — the release permutes the bridge's text to
(77, B, D) and its attention then views that buffer as (B, 77, heads, head_dim), so with B > 1 image b attends to
other samples' words (and it masks no text padding); `hilora_merge` True | False (see hilora). The release
normalises images with ImageNet statistics (`normalisation="imagenet"`, default) rather than CLIP's own.

Small towers (clip:tiny) keep every structural feature: the layer indices are mapped proportionally to their depth
(`map_layer_indices`, which prints the mapping). Four modules of the release take no part in its forward pass and are
left out here (`condition_text_proj`, `ml_text_feat_perceiver`, `condition_text_pos_embed`, `reg_pos_embed`: 0.85 M
parameters at ViT-B/16); `vgstudy.convert.hivg` drops them from released checkpoints by name.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vgstudy.data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, TransformConfig
from vgstudy.errors import ConfigError
from vgstudy.models.backbones import CLIPBackbone, build_backbone
from vgstudy.models.base import Output, check_inputs
from vgstudy.models.head import GroundingHead
from vgstudy.models.hilora import (
    HILORA_SCHEDULE,
    RELEASE_ADAPTER,
    HiLoRAStage,
    LoRASettings,
    SplitAttention,
    adapter_names,
    add_adapter,
    check_schedule,
    merge_adapter,
    split_attention,
)
from vgstudy.models.registry import register

TEXT_LAYOUTS = ("fixed", "official")
NORMALISATIONS = ("imagenet", "clip")
# The release's layer choices by vision depth (0-based block indices): ViT-B/16 (12 blocks) and ViT-L/14 (24).
RELEASE_BRIDGE_LAYERS = {12: (0, 3, 7, 11), 24: (4, 10, 16, 22)}
RELEASE_FEATURE_LAYERS = {12: (0, 3, 7, 11), 24: (5, 11, 17, 23)}
# Text levels by data set, as 0-based blocks of CLIP's 12-block text tower (the release's hidden_states[i], i = b + 1).
RELEASE_TEXT_LEVELS = {
    "unc": (11,),
    "unc+": (5, 11),
    "referit": (5, 11),
    "gref": tuple(range(12)),
    "gref_umd": tuple(range(12)),
    "flickr": (11,),
}
# peft targets: the attention projections of every vision and text block and of every bridge.
LORA_TARGETS = r"(clip\.(visual|text)\.transformer\.resblocks\.\d+|bridges\.\d+)\.attn\.(q_proj|k_proj|v_proj|out_proj)"
_VISION_BLOCK = re.compile(r"clip\.visual\.transformer\.resblocks\.(\d+)\.")


def map_layer_indices(indices: Sequence[int], from_depth: int, to_depth: int, what: str = "layers") -> tuple[int, ...]:
    """Block indices of a `from_depth`-block tower mapped proportionally onto a `to_depth`-block one, and printed.

    Block i ends at the fraction (i + 1) / from_depth of the tower; it maps to the block ending nearest that fraction
    of the new tower. Indices that collide are kept once. E.g. 0, 3, 7, 11 of 12 -> 0, 1, 3, 5 of 6.
    """
    mapped = tuple(
        dict.fromkeys(min(max(math.floor((i + 1) * to_depth / from_depth + 0.5) - 1, 0), to_depth - 1) for i in indices)
    )
    print(f"HiVG {what}: {tuple(indices)} of {from_depth} blocks -> {mapped} of {to_depth}")
    return mapped


# --- Configuration --------------------------------------------------------------------------------------------------


def _index_tuple(value, name: str) -> tuple[int, ...] | None:
    """None (the release's choice), "none" / () (no layer), or a sequence of block indices, as a tuple."""
    if value is None:
        return None
    if value == "none":
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"HiVGConfig.{name}={value!r}: expected None, 'none' or a sequence of block indices")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise ConfigError(f"HiVGConfig.{name}={value!r}: expected block indices (ints >= 0)")
    if len(set(value)) != len(value) or list(value) != sorted(value):
        raise ConfigError(f"HiVGConfig.{name}={value!r}: expected increasing, distinct block indices")
    return tuple(value)


@dataclass(frozen=True)
class HiVGConfig:
    """HiVG's architecture and switches; the defaults are the release's ViT-B/16 RefCOCO model (paper switches).

    backbone:          CLIP by name for `build_backbone` (release: OpenAI's ViT-B/16, which uses QuickGELU).
    image_size:        input side (None: the backbone's, 224).
    dataset:           picks the release's text levels when `text_levels` is None (unc, unc+, referit, gref,
                       gref_umd, flickr).
    bridge_layers:     vision blocks with a bridge (0-based); None: the release's for the tower's depth (mapped for
                       other depths); "none" or (): no bridge.
    feature_layers:    vision blocks whose outputs make the multi-level feature; None: the release's; (d - 1,): the
                       last block only.
    text_levels:       text blocks whose outputs feed the bridges; None: the release's for `dataset`.
    adaptive_weights:  the bridge's per-token, per-channel re-weighting of each level (release flag
                       --enable_adaptive_weights); False: the levels are gated as they are.
    text_layout:       "fixed" (paper: each image attends to its own words, padding masked) or "official" (the
                       release's batch mis-pairing, no padding mask).
    hilora_merge:      True (paper: merge each stage's adapter, train a fresh one) or False (release: one adapter).
    schedule:          the HiLoRA stages (`HILORA_SCHEDULE`); the Trainer's stage names must be these.
    lora_rank, lora_alpha, lora_dropout: peft LoRA (release: 32, 16, 0.1).
    head_depth, head_heads, head_ffn_dim, dropout: the grounding head (release: 6, 8, 2048, 0.1); its width is
                       CLIP's embedding width (512 for ViT-B/16, 768 for ViT-L/14).
    token_mlp_dim:     hidden width of the patch-text head's MLP (release: 3072 for both sizes).
    auxiliary_heads:   build the patch-text and mask heads (the extra losses need them; FLOPs without them are the
                       grounding model's own).
    normalisation:     "imagenet" (release) or "clip" image statistics for `transform`.
    """

    backbone: str = "clip:ViT-B-16-quickgelu"
    image_size: int | None = None
    dataset: str = "unc"
    bridge_layers: tuple[int, ...] | None = None
    feature_layers: tuple[int, ...] | None = None
    text_levels: tuple[int, ...] | None = None
    adaptive_weights: bool = True
    text_layout: str = "fixed"
    hilora_merge: bool = True
    schedule: tuple[HiLoRAStage, ...] = HILORA_SCHEDULE
    lora_rank: int = 32
    lora_alpha: float = 16
    lora_dropout: float = 0.1
    head_depth: int = 6
    head_heads: int = 8
    head_ffn_dim: int = 2048
    dropout: float = 0.1
    token_mlp_dim: int = 3072
    auxiliary_heads: bool = True
    normalisation: str = "imagenet"

    def __post_init__(self):
        for name in ("bridge_layers", "feature_layers", "text_levels"):
            object.__setattr__(self, name, _index_tuple(getattr(self, name), name))
        object.__setattr__(self, "schedule", check_schedule(self.schedule))
        if self.feature_layers == ():
            raise ConfigError("HiVGConfig.feature_layers=(): expected at least one vision block")
        if self.text_levels == () and self.bridge_layers != ():
            raise ConfigError("HiVGConfig.text_levels=(): the bridges need at least one text level")
        if not isinstance(self.backbone, str) or not self.backbone.startswith("clip:"):
            raise ConfigError(f"HiVGConfig.backbone={self.backbone!r}: expected a CLIP backbone name ('clip:...')")
        if self.dataset not in RELEASE_TEXT_LEVELS:
            raise ConfigError(f"HiVGConfig.dataset={self.dataset!r}: expected one of {sorted(RELEASE_TEXT_LEVELS)}")
        if self.text_layout not in TEXT_LAYOUTS:
            raise ConfigError(f"HiVGConfig.text_layout={self.text_layout!r}: expected one of {TEXT_LAYOUTS}")
        if self.normalisation not in NORMALISATIONS:
            raise ConfigError(f"HiVGConfig.normalisation={self.normalisation!r}: expected one of {NORMALISATIONS}")
        for name in ("adaptive_weights", "hilora_merge", "auxiliary_heads"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"HiVGConfig.{name}={getattr(self, name)!r}: expected a bool")
        for name in ("head_depth", "head_heads", "head_ffn_dim", "token_mlp_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"HiVGConfig.{name}={value!r}: expected an int >= 1")
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)):
            raise ConfigError(f"HiVGConfig.image_size={self.image_size!r}: expected an int or None")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ConfigError(f"HiVGConfig.dropout={self.dropout!r}: expected a number in [0, 1)")
        LoRASettings(self.lora_rank, self.lora_alpha, self.lora_dropout)  # raises ConfigError on bad values

    @property
    def lora(self) -> LoRASettings:
        return LoRASettings(self.lora_rank, self.lora_alpha, self.lora_dropout)


# --- The bridge -----------------------------------------------------------------------------------------------------


class CrossModalBridge(nn.Module):
    """Multi-layer adaptive cross-modal bridge (Sec. 3.2), inside one vision block, after its self-attention.

    text:  the levels T_l (B, L, Dt) each -> T_l' = W_l * T_l + T_l, W_l (L, Dt) learned per token and channel
           (`level_weights`, initialised N(0, 1) as the release's nn.Embedding) -> concatenated (B, L, levels Dt)
           -> linear gate to the vision width (B, L, Dv).
    image: x (B, T, Dv) -> x + MLP(CrossAttention(LayerNorm(x), text)) with queries from the image tokens, keys and
           values from the text; the MLP is CLIP's (Dv -> mlp_dim -> Dv, QuickGELU), applied straight to the
           attention output, as in the release.

    text_layout "fixed" masks the text padding; "official" reproduces the release's layout bug: the text is laid
    out as (L, B, Dv) and read back as (B, L, Dv) (a view of the same memory), so with B > 1 each image attends to a
    mix of the batch's words, and no padding is masked.
    """

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        text_len: int,
        num_levels: int,
        heads: int,
        mlp_dim: int,
        adaptive_weights: bool = True,
        text_layout: str = "fixed",
    ):
        super().__init__()
        if text_layout not in TEXT_LAYOUTS:
            raise ConfigError(f"CrossModalBridge text_layout={text_layout!r}: expected one of {TEXT_LAYOUTS}")
        self.text_layout = text_layout
        self.num_levels = num_levels
        self.norm = nn.LayerNorm(vision_dim)
        self.level_weights = nn.Parameter(torch.randn(num_levels, text_len, text_dim)) if adaptive_weights else None
        self.gate = nn.Linear(num_levels * text_dim, vision_dim)
        self.attn = SplitAttention(vision_dim, heads)
        self.mlp = nn.Sequential(
            OrderedDict(fc1=nn.Linear(vision_dim, mlp_dim), act=_quick_gelu(), fc2=nn.Linear(mlp_dim, vision_dim))
        )

    def text_feature(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """The text levels, each (B, L, Dt) -> one re-weighted, gated text feature (B, L, Dv)."""
        if len(levels) != self.num_levels:
            raise ValueError(f"CrossModalBridge was built for {self.num_levels} text levels, got {len(levels)}")
        if self.level_weights is not None:
            levels = [w * t + t for w, t in zip(self.level_weights, levels, strict=True)]  # T_l' = W_l * T_l + T_l
        return self.gate(torch.cat(list(levels), dim=-1))  # (B, L, Dv)

    def forward(self, x: torch.Tensor, levels: Sequence[torch.Tensor], text_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, Dv) image tokens; levels: (B, L, Dt) each; text_mask (B, L) True on real tokens -> (B, T, Dv)."""
        text = self.text_feature(levels)  # (B, L, Dv)
        b, length, dim = text.shape
        if self.text_layout == "official":
            # the release's (L, B, D) buffer read as (B, L, D): row b holds tokens b*L ... b*L + L - 1 of the
            # flattened (L * B) sequence, i.e. words of every sample of the batch
            text = text.transpose(0, 1).reshape(b, length, dim)
            attention_mask = None
        else:
            attention_mask = text_mask[:, None, None, :]  # (B, 1, 1, L), True = attend
        attended, _ = self.attn(self.norm(x), text, text, attn_mask=attention_mask)  # (B, T, Dv)
        return x + self.mlp(attended)


def _quick_gelu() -> nn.Module:
    from open_clip.transformer import QuickGELU  # imported here: open_clip is a heavy import

    return QuickGELU()


# --- Auxiliary heads ------------------------------------------------------------------------------------------------


class PatchTextHead(nn.Module):
    """Patch-text alignment logits: LayerNorm + MLP (QuickGELU) on the head's patch outputs, dot product with the
    head's L2-normalised end-of-text output (the release's visu_token_norm / visu_token_mlp)."""

    def __init__(self, dim: int, mlp_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            OrderedDict(fc1=nn.Linear(dim, mlp_dim), act=_quick_gelu(), fc2=nn.Linear(mlp_dim, dim))
        )

    def forward(self, patches: torch.Tensor, text_eos: torch.Tensor) -> torch.Tensor:
        """patches (B, N, E), text_eos (B, E) normalised -> logits (B, N)."""
        return (self.mlp(self.norm(patches)) * text_eos[:, None]).sum(dim=-1)


class MaskHead(nn.Module):
    """Mask logits at 8x the patch grid: three 2x transposed convolutions (no bias) on the head's patch outputs laid
    out as a grid, dot product with the head's normalised end-of-text output (the release's seg_conv1..3)."""

    def __init__(self, dim: int):
        super().__init__()
        self.upsample = nn.Sequential(
            *(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2, bias=False) for _ in range(3))
        )

    def forward(self, patches: torch.Tensor, text_eos: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """patches (B, h * w, E), text_eos (B, E) normalised -> logits (B, 8h, 8w)."""
        b, _, dim = patches.shape
        grid = patches.transpose(1, 2).reshape(b, dim, *grid_hw)  # (B, E, h, w)
        return torch.einsum("behw,be->bhw", self.upsample(grid), text_eos)  # (B, 8h, 8w)


# --- The model ------------------------------------------------------------------------------------------------------


class HiVG(nn.Module):
    """HiVG: `model(images, texts, valid=None) -> Output(boxes (B, 4) cxcywh in [0, 1], aux)`.

    aux: "logits_per_text" (B, B) CLIP's scaled cosine similarities of the (bridged) image and text embeddings;
    with `auxiliary_heads`, "patch_text_logits" (B, N) and "mask_logits" (B, 8h, 8w).

    config:       HiVGConfig (layer indices left None are resolved for the backbone; `model.config` holds them).
    clip_weights: a local weights file for the CLIP built by `config.backbone`.
    clip_module:  an already-built CLIPBackbone (e.g. from the zoo) used instead; it is copied, not modified.

    Attributes: clip (CLIPBackbone, its attention split for LoRA), bridges (ModuleDict by vision block index),
    feature_proj, visual_proj, text_proj, head (GroundingHead), patch_text_head, mask_head (None without
    auxiliary heads), transform (the eval TransformConfig), stage (the HiLoRA stage the model is in: a freshly built
    model is in the first one).
    """

    def __init__(
        self,
        config: HiVGConfig | None = None,
        *,
        clip_weights: str | Path | None = None,
        clip_module: CLIPBackbone | None = None,
    ):
        super().__init__()
        config = config or HiVGConfig()
        if clip_module is None:
            clip = build_backbone(config.backbone, weights=clip_weights, image_size=config.image_size)
        elif not isinstance(clip_module, CLIPBackbone):
            raise ConfigError(f"HiVG clip_module is a {type(clip_module).__name__}; expected a CLIPBackbone")
        elif clip_weights is not None or config.image_size is not None:
            raise ConfigError(
                "HiVG: clip_weights and image_size build the CLIP by name; expected neither with clip_module"
            )
        else:
            clip = copy.deepcopy(clip_module)
        if not isinstance(clip.text.text_projection, nn.Parameter):
            raise ConfigError(f"HiVG backbone {config.backbone!r}: expected CLIP's text projection as a matrix")
        self.clip = clip
        vision, text = clip.visual, clip.text
        config = self._resolve_layers(config, vision.depth, text.depth)
        self.config = config

        split_attention(vision.blocks)
        split_attention(text.blocks)
        self.bridges = nn.ModuleDict(
            {
                str(index): CrossModalBridge(
                    vision_dim=vision.width,
                    text_dim=text.width,
                    text_len=text.max_len,
                    num_levels=len(config.text_levels),
                    heads=vision.blocks[index].attn.heads,
                    mlp_dim=vision.blocks[index].mlp.c_fc.out_features,
                    adaptive_weights=config.adaptive_weights,
                    text_layout=config.text_layout,
                )
                for index in config.bridge_layers
            }
        )
        dim = clip.embed_dim
        # the release initialises the multi-level projection with CLIP's visual projection, once per level
        self.feature_proj = nn.Linear(len(config.feature_layers) * vision.width, dim)
        with torch.no_grad():
            self.feature_proj.weight.copy_(torch.cat([vision.proj.t()] * len(config.feature_layers), dim=1))
        self.visual_proj = nn.Linear(dim, dim)
        self.text_proj = nn.Linear(dim, dim)
        self.grid_hw = vision.grid_hw
        self.num_visual_tokens = vision.num_tokens  # CLS + patches
        self.num_text_tokens = text.max_len
        self.head = GroundingHead(
            self.num_visual_tokens + self.num_text_tokens,
            dim,
            config.head_depth,
            config.head_heads,
            config.head_ffn_dim,
            config.dropout,
            normalize_before=True,
        )
        self.patch_text_head = PatchTextHead(dim, config.token_mlp_dim) if config.auxiliary_heads else None
        self.mask_head = MaskHead(dim) if config.auxiliary_heads else None

        self.image_size = vision.image_size
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if config.normalisation == "imagenet" else (CLIP_MEAN, CLIP_STD)
        self.transform = TransformConfig(image_size=self.image_size, mean=mean, std=std)
        self._stage_index = -1
        self.enter_stage(config.schedule[0].name)

    @staticmethod
    def _resolve_layers(config: HiVGConfig, vision_depth: int, text_depth: int) -> HiVGConfig:
        """`config` with its None layer choices replaced by the release's for these depths (mapped when needed)."""

        def release(table: dict[int, tuple[int, ...]], what: str) -> tuple[int, ...]:
            if vision_depth in table:
                return table[vision_depth]
            return map_layer_indices(table[12], 12, vision_depth, what)

        bridge_layers = config.bridge_layers
        if bridge_layers is None:
            bridge_layers = release(RELEASE_BRIDGE_LAYERS, "bridge layers")
        feature_layers = config.feature_layers
        if feature_layers is None:
            feature_layers = release(RELEASE_FEATURE_LAYERS, "multi-level feature layers")
        text_levels = config.text_levels
        if text_levels is None:
            text_levels = RELEASE_TEXT_LEVELS[config.dataset]
            if text_depth != 12:
                text_levels = map_layer_indices(text_levels, 12, text_depth, f"text levels ({config.dataset})")
        for name, indices, depth in [
            ("bridge_layers", bridge_layers, vision_depth),
            ("feature_layers", feature_layers, vision_depth),
            ("text_levels", text_levels, text_depth),
        ]:
            if any(i >= depth for i in indices):
                raise ConfigError(
                    f"HiVGConfig.{name}={indices}: expected block indices below the tower's depth {depth}"
                )
        return dataclasses.replace(
            config, bridge_layers=bridge_layers, feature_layers=feature_layers, text_levels=text_levels
        )

    # --- Forward ----------------------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, texts: list[str], valid: torch.Tensor | None = None) -> Output:
        """images (B, 3, S, S) through `transform`; texts: B strings; valid (B, S, S) bool, True on image pixels
        (None: no padding); padded patches are masked in the head, as the release does."""
        check_inputs("HiVG", self.image_size, images, texts, valid)
        batch = self.clip.text.tokenize(texts)  # ids, mask (B, L)
        text = self.clip.text(batch, return_hidden=True)
        levels = [text.hidden_states[i] for i in self.config.text_levels]  # (B, L, Dt) each
        multi_level, image_embeds = self._encode_image(images, levels, batch.mask)  # (B, 1 + N, k Dv), (B, E)

        visual_tokens = self.visual_proj(self.feature_proj(multi_level))  # (B, 1 + N, E)
        text_tokens = self.text_proj(text.tokens @ self.clip.text.text_projection)  # (B, L, E)
        tokens = torch.cat([visual_tokens, text_tokens], dim=1)  # (B, 1 + N + L, E)
        padding = torch.cat([self._visual_padding(images, valid), ~batch.mask], dim=1)
        out = self.head.encode(tokens, padding)  # (B, 1 + 1 + N + L, E): the auxiliary heads read every token
        boxes_cxcywh = self.head.box_mlp(out[:, 0]).sigmoid()

        # CLIP's image-text logits, for the contrastive loss
        scale = self.clip.logit_scale.exp()
        aux = {"logits_per_text": scale * F.normalize(text.pooled, dim=-1) @ F.normalize(image_embeds, dim=-1).t()}
        if self.patch_text_head is not None:
            num_patches = self.num_visual_tokens - 1
            patches = out[:, 2 : 2 + num_patches]  # (B, N, E): after [REG] and CLS
            eos = batch.mask.sum(dim=1) - 1  # the end-of-text token is the last real one
            text_out = out[:, 1 + self.num_visual_tokens :]  # (B, L, E)
            text_eos = F.normalize(text_out[torch.arange(len(eos), device=eos.device), eos], dim=-1)  # (B, E)
            aux["patch_text_logits"] = self.patch_text_head(patches, text_eos)
            aux["mask_logits"] = self.mask_head(patches, text_eos, self.grid_hw)
        return Output(boxes=boxes_cxcywh, aux=aux)

    def _encode_image(
        self, images: torch.Tensor, levels: list[torch.Tensor], text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP's image tower with the bridges inside -> (multi-level features (B, 1 + N, k Dv), image embedding)."""
        tower = self.clip.visual
        x = tower.embed(images)  # (B, 1 + N, Dv)
        features = []
        for index, block in enumerate(tower.blocks):
            # an open_clip block, run in its two halves so that a bridge can sit between them
            x = x + block.ls_1(block.attention(q_x=block.ln_1(x)))
            if str(index) in self.bridges:
                x = self.bridges[str(index)](x, levels, text_mask)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
            if index in self.config.feature_layers:
                features.append(x)
        return torch.cat(features, dim=-1), tower.project(tower.finish(x))

    def _visual_padding(self, images: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """(B, 1 + N) True on patches that the release masks; CLS never.

        The release resizes the padding mask to the patch grid with torchvision's `Resize` (bilinear, antialiased)
        and casts back to bool: a patch is masked when any padding pixel falls in the filter's footprint, i.e. in the
        patch or within half a patch of it (a letterbox edge masks symmetrically on both sides of the image).
        """
        b = len(images)
        if valid is None:
            return torch.zeros(b, self.num_visual_tokens, dtype=torch.bool, device=images.device)
        padding = (~valid.bool())[None].float()  # (1, B, H, W): the batch as channels, as Resize sees it
        resized = F.interpolate(padding, size=self.grid_hw, mode="bilinear", align_corners=False, antialias=True)
        patches = resized[0] != 0  # (B, h, w)
        return torch.cat([patches.new_zeros(b, 1), patches.flatten(1)], dim=1)

    # --- HiLoRA stages ----------------------------------------------------------------------------------------------

    @property
    def stage(self) -> str:
        """The HiLoRA stage the model is in."""
        return self.config.schedule[self._stage_index].name

    def enter_stage(self, name: str) -> None:
        """Switch to HiLoRA stage `name` (called by the Trainer at each stage start).

        Stages run in schedule order: entering a later stage also passes through those in between, the current one
        again changes nothing, an earlier one is a ConfigError. Replaying the stages on a freshly built model gives
        the same modules and parameter names, so a checkpoint saved in stage `name` loads strictly after
        `enter_stage(name)`.
        - hilora_merge=True: leaving a stage merges its adapter into the weights; the new stage gets a fresh adapter
          named after it.
        - hilora_merge=False: one adapter, "hilora", injected in the first stage and trained on.
        Then every parameter's requires_grad is set for the stage (see `trains`).
        """
        names = [stage.name for stage in self.config.schedule]
        if name not in names:
            raise ConfigError(f"HiVG.enter_stage({name!r}): expected one of the schedule's stages {names}")
        index = names.index(name)
        if index < self._stage_index:
            raise ConfigError(
                f"HiVG.enter_stage({name!r}): the model is already in the later stage {self.stage!r}; stages run in "
                f"the order {names} (build a fresh model to start again)"
            )
        for next_index in range(self._stage_index + 1, index + 1):
            if self.config.hilora_merge:
                for adapter in adapter_names(self):
                    merge_adapter(self, adapter)
                add_adapter(self, names[next_index], LORA_TARGETS, self.config.lora)
            elif not adapter_names(self):
                add_adapter(self, RELEASE_ADAPTER, LORA_TARGETS, self.config.lora)
            self._stage_index = next_index
        self.train(self.training)  # peft's new modules (LoRA dropout) start in training mode: follow the model's
        stage = self.config.schedule[index]
        for parameter_name, parameter in self.named_parameters():
            parameter.requires_grad_(self.trains(parameter_name, stage))

    def trains(self, parameter_name: str, stage: HiLoRAStage) -> bool:
        """Whether the parameter `parameter_name` trains in `stage`.

        Bridges (their LoRA per `stage.bridge_lora`), projections and heads: always. CLIP's LoRA: text per
        `stage.text_lora`, vision in the first `stage.vision_blocks_open(depth)` blocks. CLIP's own weights (and its
        temperature): only with `stage.backbone`.
        """
        is_lora = ".lora_" in parameter_name
        if parameter_name.startswith("bridges."):
            return stage.bridge_lora if is_lora else True
        if not parameter_name.startswith("clip."):
            return True
        if not is_lora:
            return stage.backbone
        vision_block = _VISION_BLOCK.match(parameter_name)
        if vision_block:
            return int(vision_block[1]) < stage.vision_blocks_open(self.clip.visual.depth)
        return stage.text_lora

    def trainable_by_stage(self) -> dict[str, int]:
        """Trainable parameters in each stage of the schedule (the adapters have the same size in every stage);
        printed as a table and returned as {stage name: count}."""
        counts = {
            stage.name: sum(p.numel() for name, p in self.named_parameters() if self.trains(name, stage))
            for stage in self.config.schedule
        }
        total = sum(p.numel() for p in self.parameters())
        for stage in self.config.schedule:
            blocks = stage.vision_blocks_open(self.clip.visual.depth)
            vision = f"vision LoRA blocks 0-{blocks - 1}" if blocks else "no vision LoRA"
            text = "text LoRA" if stage.text_lora else "no text LoRA"
            print(f"{stage.name:>10}: {counts[stage.name]:>12,} trainable of {total:,} ({vision}, {text})")
        return counts


# --- Registered configurations --------------------------------------------------------------------------------------

_BUILD_ARGUMENTS = ("clip_weights", "clip_module")
# The CLIP each registered configuration is built on (a `build_backbone` name): what its clip_weights must hold.
CLIP_BACKBONES = {"hivg-b": HiVGConfig.backbone, "hivg-l": "clip:ViT-L-14-quickgelu", "hivg-tiny": "clip:tiny"}


def build_hivg(defaults: dict, overrides: dict) -> HiVG:
    """A HiVG from a registered configuration's `defaults` and the caller's `overrides` (HiVGConfig fields,
    clip_weights, clip_module); an unknown override is a ConfigError naming the known ones."""
    fields = [field.name for field in dataclasses.fields(HiVGConfig)]
    unknown = sorted(set(overrides) - set(fields) - set(_BUILD_ARGUMENTS))
    if unknown:
        raise ConfigError(f"HiVG overrides {unknown}: expected HiVGConfig fields {fields} or {list(_BUILD_ARGUMENTS)}")
    build_arguments = {key: overrides[key] for key in _BUILD_ARGUMENTS if key in overrides}
    fields_given = {key: value for key, value in overrides.items() if key not in _BUILD_ARGUMENTS}
    return HiVG(HiVGConfig(**{**defaults, **fields_given}), **build_arguments)


@register("hivg-b")
def hivg_b(**overrides) -> HiVG:
    """HiVG-B: OpenAI's CLIP ViT-B/16 (QuickGELU) at 224 px, bridges after blocks 0, 3, 7, 11, head width 512;
    random weights unless clip_weights (a CLIP file) is given, or convert a released checkpoint
    (`vgstudy.convert.hivg`)."""
    return build_hivg({}, overrides)


@register("hivg-l")
def hivg_l(**overrides) -> HiVG:
    """HiVG-L: OpenAI's CLIP ViT-L/14 (QuickGELU) at 224 px, bridges in blocks 4, 10, 16, 22, features of blocks 5,
    11, 17, 23, head width 768."""
    return build_hivg({"backbone": CLIP_BACKBONES["hivg-l"]}, overrides)


# The tiny profile's head: width 128 (clip:tiny's embedding), as transvg-tiny's fusion: 3 layers, 4 heads, FFN 512.
_TINY = {
    "backbone": CLIP_BACKBONES["hivg-tiny"],
    "head_depth": 3,
    "head_heads": 4,
    "head_ffn_dim": 512,
    "token_mlp_dim": 512,
}


@register("hivg-tiny")
def hivg_tiny(**overrides) -> HiVG:
    """HiVG on clip:tiny (6 + 6 blocks, 128 px, 32 text tokens): bridges and features in blocks 0, 1, 3, 5 (mapped
    from ViT-B's), a 3-layer head of width 128."""
    return build_hivg(_TINY, overrides)
