"""MaPPER (Liu et al., EMNLP 2024 Findings): frozen DINOv2 and BERT, tuned by adapters that a CLIP text prior guides.

The method, as the paper describes it and the release (liuting20/MaPPER, `models/mapper_vg.py`) builds it:

1. Vision: DINOv2 ViT-B/14 at 518 px (37 x 37 patches + CLS), frozen. A Local Convolution Adapter (LoCA) sits
   parallel to the MLP of blocks 3, 7 and 11:  x = x + gamma_2 * (MLP(LN_2(x)) + 0.2 * LoCA(LN_2(x))).
   LoCA: Linear 768 -> 288 + ReLU; on the 37 x 37 grid a 1x1 conv branch (-> 192) and a 1x1 -> 3x3 branch
   (-> 24 -> 96), each conv + BatchNorm + ReLU, concatenated back to 288; + the residual; Linear 288 -> 768.
   The CLS token skips the convolutions (so it leaves as twice its projection, as in the release).
2. Prior: the per-token 512-d features of CLIP ViT-B/16's frozen text encoder for the same expression
   (ln_final, then the text projection applied to every token): an "aligned multimodal prior".
3. Language: BERT-base, frozen. A Dynamic Prior Adapter (DyPA) sits parallel to the FFN of layers 3, 7, 11: on the
   attention output a, LN -> Linear 768 -> 32 -> ReLU -> Linear 32 -> 768, scaled per token by
   s = ReLU(Linear 512 -> 1 (LN(prior))), added to the layer's output. Up-projection and biases start at zero.
4. Prior-guided text (PGT): Linear(768 + 512 -> 768) on [BERT tokens ; prior].
5. TransVG's fusion and head (width 256, 6 post-norm layers, 8 heads, FFN 2048): tokens [REG; text; visual], the
   visual tokens being DINOv2's CLS and its grid (1 + 37 x 37), so 1 + 20 + 1370 positions; L1 + GIoU losses.

Training (release `train.py`): AdamW, lr 1e-4 for PGT, the projections and the fusion; 1e-5 for everything inside the
backbones (the adapters; the release's --lr_bert and --lr_visu_tra), i.e. `Stage(lr=1e-4, lr_scale=LR_SCALE)`.
The unused prior projection (below) gets no gradient: under DDP train with `find_unused_parameters=True`.

Tunable backbone parameters (the paper's 1.41% = 2,774,043 / 196.06 M, DINOv2-B + BERT-base): LoCA 527,304 x 3,
DyPA 69,441 x 3, PGT 983,808. The DyPA count includes a prior down-projection Linear(512 -> 32) (16,416) that the
release creates and counts but never uses; `fidelity="paper"` leaves it out: 2,724,795. `print(model.tunable_count())`
shows the breakdown.

Release vs paper (`fidelity="paper" | "release"`; each deviation is also a flag of its own, see `ReleaseDeviations`):
the release never loads CLIP's text blocks (random frozen blocks), feeds BERT's WordPiece ids to CLIP, fixes CLIP's
causal mask at 20 tokens, adds +1 to the attention logits of padding tokens instead of masking them, drops DINOv2's
register tokens, counts the unused projection, builds BERT without token-type embeddings, and lets transformers'
`from_pretrained` re-initialise DyPA (normal(0, 0.02) weights: the up-projection does not start at zero).

`map_positions` maps the paper's adapter positions onto the small backbones of the tiny profile and prints it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vgstudy.data.tokenizers import TokenBatch, build_tokenizer
from vgstudy.data.transforms import TransformConfig
from vgstudy.errors import ConfigError
from vgstudy.models.backbones import (
    BertTextTower,
    CLIPBackbone,
    CLIPTextTower,
    DINOv2VisionTower,
    build_backbone,
)
from vgstudy.models.base import Output, check_inputs
from vgstudy.models.head import GroundingHead
from vgstudy.models.registry import register

FIDELITIES = ("paper", "release")
PAPER_POSITIONS = (3, 7, 11)  # LoCA's DINOv2 blocks and DyPA's BERT layers, of 12
PAPER_DEPTH = 12
RELEASE_PRIOR_MASK_LEN = 20  # the release's CLIP `build_attention_mask`: a fixed 20 x 20 causal mask
# Everything inside the backbones (adapters, PETL modules, fine-tuned weights) trains at lr x 0.1 (release: 1e-5).
LR_SCALE = {"visual.": 0.1, "text.": 0.1}


# --- Fidelity -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseDeviations:
    """Each way the release differs from the paper; all False is the paper, all True the release.

    random_prior_blocks:     CLIP's text transformer blocks are random and frozen (the release's vendored CLIP names
                             them `resblocks.resblock_N`, OpenAI's weights `resblocks.N`, and loads non-strictly); the
                             token/position embeddings, ln_final and projection are pretrained.
    bert_ids_for_prior:      the CLIP text encoder reads BERT's WordPiece ids (the release passes one token tensor to
                             both) instead of CLIP's own BPE tokens of the expression.
    fixed_prior_mask:        CLIP's causal mask is fixed at 20 x 20, so any other max_len (RefCOCOg: 40) fails.
    unmasked_fusion_padding: padding tokens are not masked in the fusion: the release's key padding mask is float
                             (a float CLS column concatenated to the bool masks), which torch adds to the attention
                             logits, so padded text and image tokens get +1 instead of -inf.
    drop_registers:          DINOv2's register tokens are dropped (the release's ViT has none and loads the reg4
                             weights non-strictly); with the paper they stay in the backbone (not in the fusion).
    unused_prior_projection: DyPA holds a prior down-projection Linear(512 -> rank) that is trained (counted as
                             tunable) but never used.
    no_token_type_embedding: BERT adds no token-type embedding (the release's BERT is BLIP's `med.py`, which has none).
    bert_init_dypa:          DyPA's linear layers start as BERT initialises missing weights, normal(0, 0.02) and zero
                             bias (the release builds DyPA inside `BertModel.from_pretrained`, whose initialisation of
                             weights absent from the checkpoint overrides the adapter's zero up-projection).
    """

    random_prior_blocks: bool = False
    bert_ids_for_prior: bool = False
    fixed_prior_mask: bool = False
    unmasked_fusion_padding: bool = False
    drop_registers: bool = False
    unused_prior_projection: bool = False
    no_token_type_embedding: bool = False
    bert_init_dypa: bool = False

    @classmethod
    def of(cls, fidelity: str) -> ReleaseDeviations:
        """All flags off for "paper", all on for "release"."""
        if fidelity not in FIDELITIES:
            raise ConfigError(f"fidelity={fidelity!r}: expected one of {FIDELITIES}")
        on = fidelity == "release"
        return cls(**{field.name: on for field in dataclasses.fields(cls)})


DEVIATIONS = tuple(field.name for field in dataclasses.fields(ReleaseDeviations))


# --- Configuration --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaPPERConfig:
    """Every choice of a MaPPER model; the defaults are the paper's MaPPER-B.

    visual, text, prior:   backbone names (`build_backbone`): DINOv2, BERT, CLIP (the prior: its text tower only).
                           OpenAI's CLIP weights need the QuickGELU variant, hence clip:ViT-B-16-quickgelu.
    visual_weights, text_weights, prior_weights: local weight files/folders for them (None: random weights).
    image_size:            input side (None: the DINOv2 config's, 518 for the full-size names).
    max_len:               text tokens for BERT and the prior (release: 20; 40 on RefCOCOg).
    visual_positions:      DINOv2 blocks with a LoCA; text_positions: BERT layers with a DyPA.
    use_loca, use_dypa, use_pgt, use_prior: the ablation switches. Without the prior, DyPA's scale is 1 and PGT
                           cannot exist (it concatenates the prior).
    loca_hidden, loca_1x1, loca_3x3_reduce, loca_3x3: LoCA's widths (288, 192, 24, 96); loca_1x1 + loca_3x3 must be
                           loca_hidden (the concatenated branches are added to the down-projection).
    loca_scale:            LoCA's weight beside the MLP (0.2). dypa_rank: DyPA's bottleneck (32).
    dim, depth, heads, ffn_dim, dropout: the fusion transformer (256, 6, 8, 2048, 0.1).
    fidelity:              "paper" or "release": the default of every deviation flag below.
    random_prior_blocks ... bert_init_dypa: one `ReleaseDeviations` flag each; None follows `fidelity`.
    prior_seed:            seed of the random CLIP blocks under random_prior_blocks.
    """

    visual: str = "dinov2:vit_base_patch14_dinov2"
    text: str = "bert:base"
    prior: str = "clip:ViT-B-16-quickgelu"
    visual_weights: str | Path | None = None
    text_weights: str | Path | None = None
    prior_weights: str | Path | None = None
    image_size: int | None = None
    max_len: int = 20
    visual_positions: tuple[int, ...] = PAPER_POSITIONS
    text_positions: tuple[int, ...] = PAPER_POSITIONS
    use_loca: bool = True
    use_dypa: bool = True
    use_pgt: bool = True
    use_prior: bool = True
    loca_hidden: int = 288
    loca_1x1: int = 192
    loca_3x3_reduce: int = 24
    loca_3x3: int = 96
    loca_scale: float = 0.2
    dypa_rank: int = 32
    dim: int = 256
    depth: int = 6
    heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    fidelity: str = "paper"
    random_prior_blocks: bool | None = None
    bert_ids_for_prior: bool | None = None
    fixed_prior_mask: bool | None = None
    unmasked_fusion_padding: bool | None = None
    drop_registers: bool | None = None
    unused_prior_projection: bool | None = None
    no_token_type_embedding: bool | None = None
    bert_init_dypa: bool | None = None
    prior_seed: int = 0

    def __post_init__(self):
        for name in ("visual_positions", "text_positions"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in value):
                raise ConfigError(f"MaPPERConfig.{name}={value!r}: expected a sequence of block indices >= 0")
            if len(set(value)) != len(value):
                raise ConfigError(f"MaPPERConfig.{name}={value!r}: expected distinct block indices")
            object.__setattr__(self, name, tuple(sorted(value)))
        for name in ("visual", "text", "prior", "fidelity"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"MaPPERConfig.{name}={getattr(self, name)!r}: expected a str")
        for name in ("use_loca", "use_dypa", "use_pgt", "use_prior"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"MaPPERConfig.{name}={getattr(self, name)!r}: expected a bool")
        for name in DEVIATIONS:
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ConfigError(f"MaPPERConfig.{name}={getattr(self, name)!r}: expected a bool or None")
        positive = ("max_len", "loca_hidden", "loca_1x1", "loca_3x3_reduce", "loca_3x3", "dypa_rank", "dim", "depth")
        for name in (*positive, "heads", "ffn_dim"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"MaPPERConfig.{name}={getattr(self, name)!r}: expected an int >= 1")
        if self.max_len < 3:
            raise ConfigError(f"MaPPERConfig.max_len={self.max_len}: expected >= 3 (start, a token, end)")
        if self.image_size is not None and (not _is_int(self.image_size) or self.image_size < 1):
            raise ConfigError(f"MaPPERConfig.image_size={self.image_size!r}: expected a positive int or None")
        if not _is_int(self.prior_seed):
            raise ConfigError(f"MaPPERConfig.prior_seed={self.prior_seed!r}: expected an int")
        if not _is_number(self.loca_scale) or self.loca_scale < 0:
            raise ConfigError(f"MaPPERConfig.loca_scale={self.loca_scale!r}: expected a number >= 0")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ConfigError(f"MaPPERConfig.dropout={self.dropout!r}: expected a number in [0, 1)")
        if self.loca_1x1 + self.loca_3x3 != self.loca_hidden:
            raise ConfigError(
                f"MaPPERConfig: loca_1x1 + loca_3x3 = {self.loca_1x1 + self.loca_3x3}, expected loca_hidden = "
                f"{self.loca_hidden} (LoCA adds the concatenated branches to its down-projection)"
            )
        if self.dim % self.heads:
            raise ConfigError(f"MaPPERConfig.dim={self.dim}: expected a multiple of heads={self.heads}")
        if self.use_pgt and not self.use_prior:
            raise ConfigError("MaPPERConfig: use_pgt=True needs use_prior=True (PGT concatenates the prior)")
        ReleaseDeviations.of(self.fidelity)  # validates the name

    def deviations(self) -> ReleaseDeviations:
        """The release deviations in force: `fidelity`'s, with every flag that is not None taking precedence."""
        chosen = {name: getattr(self, name) for name in DEVIATIONS if getattr(self, name) is not None}
        return dataclasses.replace(ReleaseDeviations.of(self.fidelity), **chosen)


def map_positions(
    positions: Sequence[int], depth: int, reference_depth: int = PAPER_DEPTH, *, name: str = "", show: bool = True
) -> dict[int, int]:
    """The block of a `depth`-block stack at the same relative depth as each of `positions` of `reference_depth`.

    Block i ends at fraction (i + 1) / reference_depth of the stack; its image is the block that ends there or just
    after: ceil((i + 1) * depth / reference_depth) - 1. The paper's 3, 7, 11 of 12 become 1, 3, 5 of 6. Prints the
    mapping (prefixed by `name`) unless show=False. Raises ConfigError when two positions land on one block.
    """
    if any(not 0 <= i < reference_depth for i in positions):
        raise ConfigError(f"positions {list(positions)}: expected block indices in [0, {reference_depth})")
    mapping = {i: math.ceil((i + 1) * depth / reference_depth) - 1 for i in positions}
    if len(set(mapping.values())) != len(mapping):
        raise ConfigError(f"positions {list(positions)} of {reference_depth} collide at depth {depth}: {mapping}")
    if show:
        prefix = f"{name}: " if name else ""
        print(
            f"{prefix}blocks {', '.join(map(str, mapping))} of {reference_depth} -> "
            f"{', '.join(map(str, mapping.values()))} of {depth}"
        )
    return mapping


# --- Adapters -------------------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Sequential):
    """Conv2d (with bias) -> BatchNorm2d (eps 1e-3) -> ReLU, the release's `BasicConv2d`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)
        self.relu = nn.ReLU()


class LocalConvAdapter(nn.Module):
    """LoCA: (B, P + h * w, width) tokens -> (B, P + h * w, width), local convolutions over the patch grid.

    The P prefix tokens (CLS, and registers if kept) skip the convolutions: they leave as twice their projection
    (the convolution path passes them through, then the residual adds them again), as the release does with CLS.
    """

    def __init__(
        self,
        width: int,
        hidden: int,
        branch_1x1: int,
        branch_3x3_reduce: int,
        branch_3x3: int,
        grid_hw: tuple[int, int],
        num_prefix_tokens: int,
    ):
        super().__init__()
        self.down = nn.Linear(width, hidden)
        self.conv_1x1 = ConvBNReLU(hidden, branch_1x1, 1)
        self.conv_3x3_reduce = ConvBNReLU(hidden, branch_3x3_reduce, 1)
        self.conv_3x3 = ConvBNReLU(branch_3x3_reduce, branch_3x3, 3)
        self.up = nn.Linear(hidden, width)
        self.grid_hw = grid_hw
        self.num_prefix_tokens = num_prefix_tokens
        # the release's DINOv2 initialises every Linear inside it, adapters included, as timm's ViT does
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, _ = x.shape
        h, w = self.grid_hw
        x0 = F.relu(self.down(x))  # (B, P + h * w, C)
        prefix, grid = x0[:, : self.num_prefix_tokens], x0[:, self.num_prefix_tokens :]
        grid = grid.transpose(1, 2).reshape(b, -1, h, w)  # (B, C, h, w), row-major like the patches
        local = torch.cat([self.conv_1x1(grid), self.conv_3x3(self.conv_3x3_reduce(grid))], dim=1)  # (B, C, h, w)
        mixed = torch.cat([prefix, local.flatten(2).transpose(1, 2)], dim=1) + x0  # (B, P + h * w, C)
        return self.up(mixed)


class DynamicPriorAdapter(nn.Module):
    """DyPA: a bottleneck adapter on BERT tokens whose output each token's prior scales.

    forward(tokens (B, L, width), prior (B, L, prior_dim) or None) -> (B, L, width):
        up(ReLU(down(LN(tokens)))) * ReLU(scale(LN_prior(prior)))     (scale 1 when the model has no prior)
    prior_dim=None builds it without a prior (no prior norm, no scale). unused_prior_projection adds the release's
    `clip_down_proj`, Linear(prior_dim -> rank), which takes no part in the output. bert_init: initialise as BERT
    does (normal(0, 0.02), zero biases) instead of kaiming down-projections and a zero up-projection.
    """

    def __init__(
        self,
        width: int,
        rank: int,
        prior_dim: int | None,
        unused_prior_projection: bool = False,
        bert_init: bool = False,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, rank)
        self.up = nn.Linear(rank, width)
        self.prior_norm = nn.LayerNorm(prior_dim) if prior_dim else None
        self.scale = nn.Linear(prior_dim, 1) if prior_dim else None
        self.prior_down = nn.Linear(prior_dim, rank) if prior_dim and unused_prior_projection else None
        linears = [m for m in (self.down, self.up, self.scale, self.prior_down) if m is not None]
        for linear in linears:
            nn.init.zeros_(linear.bias)
            if bert_init:
                nn.init.normal_(linear.weight, std=0.02)
            elif linear is self.up:
                nn.init.zeros_(linear.weight)  # the adapter starts as the identity of its layer
            else:
                nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))

    def token_scale(self, prior: torch.Tensor) -> torch.Tensor:
        """s = ReLU(scale(LN(prior))): (B, L, prior_dim) -> (B, L, 1)."""
        return F.relu(self.scale(self.prior_norm(prior.float())))

    def forward(self, tokens: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        out = self.up(F.relu(self.down(self.norm(tokens))))  # (B, L, width)
        if self.scale is None:
            return out
        if prior is None:
            raise ValueError("this DynamicPriorAdapter was built with a prior: expected prior (B, L, prior_dim)")
        return out * self.token_scale(prior)


class PriorGuidedText(nn.Module):
    """PGT: Linear(width + prior_dim -> width) on [BERT tokens ; prior], (B, L, .) -> (B, L, width)."""

    def __init__(self, width: int, prior_dim: int):
        super().__init__()
        self.proj = nn.Linear(width + prior_dim, width)
        nn.init.zeros_(self.proj.bias)  # release: kaiming-uniform weight (torch's default), zero bias

    def forward(self, tokens: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([tokens, prior.to(tokens.dtype)], dim=-1))


class ViTBlockWithParallelAdapter(nn.Module):
    """A timm ViT block with `adapter` parallel to its MLP:  x + ls_2(MLP(LN_2(x)) + scale * adapter(LN_2(x))).

    The block's own modules keep timm's names (norm1, attn, ls1, norm2, mlp, ls2, ...), so pretrained weights load
    into it unchanged; the adapter is `adapter` (the release's name too). LoCA uses it with scale 0.2, AdaptFormer 0.1.
    """

    def __init__(self, block: nn.Module, adapter: nn.Module, scale: float):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.adapter = adapter
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        h = self.norm2(x)
        return x + self.drop_path2(self.ls2(self.mlp(h) + self.scale * self.adapter(h)))


class BertLayerWithParallelAdapter(nn.Module):
    """A BERT layer with `adapter` parallel to its FFN: FFN block(a) + scale * adapter(a[, prior]), a the attention
    output (after its LayerNorm) and the FFN block BERT's own (FFN, residual, LayerNorm).

    The layer's modules keep transformers' names (attention, intermediate, output). `forward(x, attention_mask,
    prior=None)`; the prior is passed to the adapter when given (DyPA).
    """

    def __init__(self, layer: nn.Module, adapter: nn.Module, scale: float = 1.0):
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        self.adapter = adapter
        self.scale = scale

    def forward(self, x: torch.Tensor, attention_mask, prior: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attention(x, attention_mask)[0]  # (B, L, D)
        side = self.adapter(a) if prior is None else self.adapter(a, prior)
        return self.output(self.intermediate(a), a) + self.scale * side


# --- The model ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TunableCount:
    """Tunable parameters inside the backbones (the paper's accounting), per module, and the share of the backbones.

    modules:  module name -> tunable parameters: each LoCA / DyPA / PGT; any other tunable backbone parameters
              (PETL modules, fine-tuned weights) as "visual" and "text".
    tunable:  their sum. backbone: the pretrained DINOv2 + BERT parameters (196.06 M for the full-size names).
    """

    modules: dict[str, int]
    tunable: int
    backbone: int

    @property
    def share(self) -> float:
        return self.tunable / self.backbone

    def __str__(self) -> str:
        width = max(len(name) for name in [*self.modules, "tunable"])
        lines = [f"{name:<{width}}  {count:>11,}" for name, count in self.modules.items()]
        lines.append(f"{'tunable':<{width}}  {self.tunable:>11,}")
        lines.append(f"{'backbones':<{width}}  {self.backbone:>11,}  ({100 * self.share:.2f}% tunable)")
        return "\n".join(lines)


class MaPPER(nn.Module):
    """MaPPER: `model(images, texts, valid=None) -> Output(boxes (B, 4) cxcywh in [0, 1], aux)`.

    config: MaPPERConfig. visual_module, text_module, prior_module: already-built backbones (e.g. pretrained from the
    zoo) used instead of the names: a DINOv2VisionTower, a BertTextTower (its max_len must be config.max_len), a
    CLIPBackbone or CLIPTextTower. They are copied (adapters go inside the copies; the originals stay as they were).

    Attributes: visual (DINOv2 with LoCA blocks), text (BERT with DyPA layers), prior (CLIP's text tower, frozen;
    None without the prior), pgt (None without PGT), visual_proj, text_proj, head (GroundingHead), deviations
    (ReleaseDeviations in force), backbone_parameters (pretrained DINOv2 + BERT parameters), transform (the eval
    TransformConfig).
    """

    def __init__(
        self,
        config: MaPPERConfig | None = None,
        *,
        visual_module: nn.Module | None = None,
        text_module: nn.Module | None = None,
        prior_module: nn.Module | None = None,
    ):
        super().__init__()
        config = MaPPERConfig() if config is None else config
        self.config = config
        self.deviations = deviations = config.deviations()
        visual = _visual_backbone(config, visual_module)
        text = _text_backbone(config, text_module)
        prior = _prior_backbone(config, prior_module, text) if config.use_prior else None
        if deviations.drop_registers:
            _drop_registers(visual)
        for backbone in (visual, text, prior):
            if backbone is not None:
                backbone.requires_grad_(False)
        self.backbone_parameters = sum(p.numel() for p in visual.parameters()) + sum(
            p.numel() for p in text.parameters()
        )
        prior_dim = _prior_dim(prior) if prior is not None else None
        for name, positions, depth, used in (
            ("visual_positions", config.visual_positions, visual.depth, config.use_loca),
            ("text_positions", config.text_positions, text.depth, config.use_dypa),
        ):
            if used and positions and positions[-1] >= depth:
                raise ConfigError(f"MaPPERConfig.{name}={positions}: the backbone has {depth} blocks (0..{depth - 1})")
        if config.use_loca:
            for i in config.visual_positions:
                loca = LocalConvAdapter(
                    visual.width,
                    config.loca_hidden,
                    config.loca_1x1,
                    config.loca_3x3_reduce,
                    config.loca_3x3,
                    visual.grid_hw,
                    visual.num_prefix_tokens,
                )
                visual.blocks[i] = ViTBlockWithParallelAdapter(visual.blocks[i], loca, config.loca_scale)
        if config.use_dypa:
            for i in config.text_positions:
                dypa = DynamicPriorAdapter(
                    text.width,
                    config.dypa_rank,
                    prior_dim,
                    unused_prior_projection=deviations.unused_prior_projection,
                    bert_init=deviations.bert_init_dypa,
                )
                text.blocks[i] = BertLayerWithParallelAdapter(text.blocks[i], dypa)
        self.visual = visual
        self.text = text
        self.prior = prior
        self.pgt = PriorGuidedText(text.width, prior_dim) if config.use_pgt else None
        self.visual_proj = nn.Linear(visual.width, config.dim)
        self.text_proj = nn.Linear(text.width, config.dim)
        h, w = visual.grid_hw
        self.num_visual_tokens = 1 + h * w  # CLS + the grid (registers, if any, stay inside DINOv2)
        self.num_text_tokens = config.max_len
        self.head = GroundingHead(
            self.num_text_tokens + self.num_visual_tokens,
            config.dim,
            config.depth,
            config.heads,
            config.ffn_dim,
            config.dropout,
            normalize_before=False,
        )
        self.image_size = visual.image_size
        # flip_prob: the release flips (swapping left/right words); used by `replace(model.transform, train=True)`
        self.transform = TransformConfig(image_size=self.image_size, mean=visual.mean, std=visual.std, flip_prob=0.5)

    def forward(self, images: torch.Tensor, texts: list[str], valid: torch.Tensor | None = None) -> Output:
        """images (B, 3, S, S) through `transform`; texts: B strings; valid (B, S, S) bool, True on image pixels
        (False on padding) or None (nothing masked).

        aux: "reg" (B, dim) the [REG] output; "visual_tokens" (B, 1 + h * w, dim) and "text_tokens" (B, L, dim) after
        the projections; "visual_mask" and "text_mask" bool, True on real tokens; "prior" (B, L, prior_dim) when the
        model has the prior.
        """
        check_inputs("MaPPER", self.image_size, images, texts, valid)
        batch = self.text.tokenize(texts)  # BERT's ids (B, L)
        prior = self.prior_features(texts, batch) if self.prior is not None else None  # (B, L, P)
        text_tokens = self._text_tokens(batch, prior)  # (B, L, Dt)
        if self.pgt is not None:
            text_tokens = self.pgt(text_tokens, prior)
        text_tokens = self.text_proj(text_tokens)  # (B, L, dim)
        visual_tokens = self.visual_proj(self._visual_tokens(images))  # (B, 1 + h * w, dim)
        visual_padding = self._visual_padding(valid, images)  # (B, 1 + h * w)
        tokens = torch.cat([text_tokens, visual_tokens], dim=1)  # (B, L + 1 + h * w, dim): [REG] comes in the head
        padding = torch.cat([~batch.mask, visual_padding], dim=1)
        if self.deviations.unmasked_fusion_padding:
            # The release's mask reaches attention as a float 0/1: added to the logits (+1) instead of masking.
            padding = padding.float()
        boxes_cxcywh, reg = self.head(tokens, padding)
        aux = {
            "reg": reg,
            "visual_tokens": visual_tokens,
            "text_tokens": text_tokens,
            "visual_mask": ~visual_padding,
            "text_mask": batch.mask,
        }
        if prior is not None:
            aux["prior"] = prior
        return Output(boxes=boxes_cxcywh, aux=aux)

    @torch.no_grad()
    def prior_features(self, texts: list[str], bert_batch: TokenBatch) -> torch.Tensor:
        """The prior: per-token CLIP text features (B, L, P), ln_final then the text projection on every token."""
        tower = self.prior
        batch = bert_batch if self.deviations.bert_ids_for_prior else tower.tokenize(texts)
        x, causal = tower.embed(batch)  # (B, L, Dp), the causal mask (L, L)
        for block in tower.blocks:
            x = tower.run_block(block, x, causal)
        tokens, _ = tower.finish(x, batch)  # (B, L, Dp) after ln_final
        projection = tower.text_projection
        return projection(tokens) if isinstance(projection, nn.Linear) else tokens @ projection  # (B, L, P)

    def tunable_count(self) -> TunableCount:
        """Tunable backbone parameters as the paper counts them: each LoCA, DyPA and PGT (and any other tunable
        parameter inside DINOv2 or BERT), over the pretrained DINOv2 + BERT parameters."""
        modules: dict[str, int] = {}
        counted: set[int] = set()
        for name, module in self.named_modules():
            if isinstance(module, (LocalConvAdapter, DynamicPriorAdapter, PriorGuidedText)):
                parameters = [p for p in module.parameters() if p.requires_grad]
                modules[name] = sum(p.numel() for p in parameters)
                counted.update(id(p) for p in parameters)
        for part in ("visual", "text"):
            rest = [p for p in getattr(self, part).parameters() if p.requires_grad and id(p) not in counted]
            if rest:
                modules[part] = sum(p.numel() for p in rest)
        return TunableCount(modules=modules, tunable=sum(modules.values()), backbone=self.backbone_parameters)

    # --- The branches -----------------------------------------------------------------------------------------------

    def _visual_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """DINOv2 with LoCA -> (B, 1 + h * w, Dv): CLS and the grid after the final norm (registers left out)."""
        tower = self.visual
        first = _first_tunable_step(tower, tower.blocks)
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and first < 0):
            x = tower.embed(images)  # (B, P + h * w, Dv)
        for i, block in enumerate(tower.blocks):
            with torch.set_grad_enabled(grad and i >= first):  # no autograd before the first tunable block
                x = block(x)
        x = tower.finish(x)
        return torch.cat([x[:, :1], x[:, tower.num_prefix_tokens :]], dim=1)  # (B, 1 + h * w, Dv)

    def _text_tokens(self, batch: TokenBatch, prior: torch.Tensor | None) -> torch.Tensor:
        """BERT with DyPA -> (B, L, Dt), the last layer's output."""
        tower = self.text
        first = _first_tunable_step(tower, tower.blocks)
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and first < 0):
            x, attention = tower.embed(batch)  # (B, L, Dt), the attention mask in the kernel's form
            if self.deviations.no_token_type_embedding:
                x = _embed_without_token_types(tower.embeddings, batch.ids)
        for i, block in enumerate(tower.blocks):
            with torch.set_grad_enabled(grad and i >= first):
                if isinstance(block, BertLayerWithParallelAdapter):
                    x = block(x, attention, prior)
                else:
                    x = tower.run_block(block, x, attention)
        return x

    def _visual_padding(self, valid: torch.Tensor | None, images: torch.Tensor) -> torch.Tensor:
        """(B, 1 + h * w) bool, True on padded grid cells (nearest pixel of each cell, as DETR); CLS never."""
        b = images.shape[0]
        h, w = self.visual.grid_hw
        if valid is None:
            return torch.zeros((b, 1 + h * w), dtype=torch.bool, device=images.device)
        cells = F.interpolate((~valid.bool())[None].float(), size=(h, w)).bool()[0]  # (B, h, w)
        return torch.cat([cells.new_zeros(b, 1), cells.flatten(1)], dim=1)


def _embed_without_token_types(embeddings: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """BERT's embeddings as the release's BERT computes them: word + position, LayerNorm, dropout; no token type."""
    positions = embeddings.position_ids[:, : ids.shape[1]]
    x = embeddings.word_embeddings(ids) + embeddings.position_embeddings(positions)  # (B, L, D)
    return embeddings.dropout(embeddings.LayerNorm(x))


def _first_tunable_step(tower: nn.Module, blocks: nn.ModuleList) -> int:
    """-1 when a parameter outside the blocks (embeddings, norms) trains, else the first block with a trainable
    parameter (len(blocks) when none): the steps before it need no autograd."""
    in_blocks = {id(p) for p in blocks.parameters()}
    if any(p.requires_grad for p in tower.parameters() if id(p) not in in_blocks):
        return -1
    trainable = (i for i, block in enumerate(blocks) if any(p.requires_grad for p in block.parameters()))
    return next(trainable, len(blocks))


# --- Building the branches ------------------------------------------------------------------------------------------


def _visual_backbone(config: MaPPERConfig, module: nn.Module | None) -> DINOv2VisionTower:
    if module is None:
        module = build_backbone(config.visual, weights=config.visual_weights, image_size=config.image_size)
        where = f"visual={config.visual!r}"
    elif config.visual_weights is not None or config.image_size is not None:
        raise ConfigError(
            "MaPPER: visual_weights and image_size build DINOv2 by name; expected neither with visual_module"
        )
    else:
        module, where = copy.deepcopy(module), "visual_module"
    if not isinstance(module, DINOv2VisionTower):
        raise ConfigError(f"MaPPER {where} is a {type(module).__name__}; expected a DINOv2 backbone (dinov2:*)")
    return module


def _text_backbone(config: MaPPERConfig, module: nn.Module | None) -> BertTextTower:
    if module is None:
        overrides = {"max_len": config.max_len} if config.text.startswith("bert:") else {}
        module = build_backbone(config.text, weights=config.text_weights, **overrides)
        where = f"text={config.text!r}"
    elif config.text_weights is not None:
        raise ConfigError("MaPPER: text_weights builds BERT by name; expected none with text_module")
    else:
        module, where = copy.deepcopy(module), "text_module"
    if not isinstance(module, BertTextTower):
        raise ConfigError(f"MaPPER {where} is a {type(module).__name__}; expected a BERT backbone (bert:*)")
    if module.max_len != config.max_len:
        raise ConfigError(
            f"MaPPER max_len={config.max_len}, but {where} tokenises to {module.max_len} tokens; expected the same"
        )
    return module


def _prior_backbone(config: MaPPERConfig, module: nn.Module | None, text: BertTextTower) -> CLIPTextTower:
    """CLIP's text tower for the prior, tokenising to max_len, with random blocks under random_prior_blocks."""
    deviations = config.deviations()
    if module is None:
        clip = build_backbone(config.prior, weights=config.prior_weights)
        tower, where = clip.text, f"prior={config.prior!r}"
    elif config.prior_weights is not None:
        raise ConfigError("MaPPER: prior_weights builds CLIP by name; expected none with prior_module")
    else:
        tower = module.text if isinstance(module, CLIPBackbone) else module
        tower, where = copy.deepcopy(tower), "prior_module"
    if not isinstance(tower, CLIPTextTower):
        raise ConfigError(f"MaPPER {where} is a {type(module).__name__}; expected a CLIP backbone (clip:*)")
    if config.max_len > tower.context_length:
        raise ConfigError(
            f"MaPPER max_len={config.max_len}: the prior's CLIP ({where}) has a context of {tower.context_length}"
        )
    if deviations.fixed_prior_mask and config.max_len != RELEASE_PRIOR_MASK_LEN:
        raise ConfigError(
            f"MaPPER max_len={config.max_len} with fixed_prior_mask (fidelity='release'): the release's CLIP causal "
            f"mask is fixed at {RELEASE_PRIOR_MASK_LEN} x {RELEASE_PRIOR_MASK_LEN}, so any other length fails there "
            "(RefCOCOg's 40 included); expected max_len=20, or fixed_prior_mask=False"
        )
    if deviations.bert_ids_for_prior and text.tokenizer.vocab_size > tower.token_embedding.num_embeddings:
        raise ConfigError(
            f"MaPPER bert_ids_for_prior: BERT's vocabulary ({text.tokenizer.vocab_size}) is larger than the prior's "
            f"token embedding ({tower.token_embedding.num_embeddings}); expected it to fit"
        )
    tower.max_len = config.max_len
    tower.tokenizer = build_tokenizer("clip", config.max_len)
    if deviations.random_prior_blocks:
        randomize_clip_text_blocks(tower, torch.Generator().manual_seed(config.prior_seed))
    return tower.eval()


def randomize_clip_text_blocks(tower: CLIPTextTower, generator: torch.Generator) -> None:
    """Re-initialise the text transformer blocks as CLIP's `initialize_parameters` does (what the release's prior
    runs on): normal attention/MLP matrices with CLIP's standard deviations, torch's defaults for the rest."""
    width, layers = tower.width, tower.depth
    attn_std = width**-0.5
    proj_std = attn_std * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    with torch.no_grad():
        for block in tower.blocks:
            block.ln_1.reset_parameters()
            block.ln_2.reset_parameters()
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std, generator=generator)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std, generator=generator)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std, generator=generator)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std, generator=generator)
            for linear in (block.mlp.c_fc, block.mlp.c_proj):  # nn.Linear's default bias
                bound = linear.in_features**-0.5
                nn.init.uniform_(linear.bias, -bound, bound, generator=generator)


def _drop_registers(tower: DINOv2VisionTower) -> None:
    """Remove DINOv2's register tokens, as the release's register-less ViT does with the reg4 weights; the CLS
    position is folded into cls_token by timm, so CLS and the patches are what the release computes."""
    if tower.num_registers:
        tower.reg_token = None
        tower.num_registers = 0
        tower.num_prefix_tokens = 1


def _prior_dim(tower: CLIPTextTower) -> int:
    projection = tower.text_projection
    return projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- Registered configurations --------------------------------------------------------------------------------------

_MODULE_OVERRIDES = ("visual_module", "text_module", "prior_module")

# The tiny profile: the small backbones, the adapters' widths scaled with the backbones (LoCA 3/8 of DINOv2's width,
# its branches 2/3 and 1/3 of that, the 3x3 reduction 1/12; DyPA's rank 1/24 of BERT's), and transvg-tiny's fusion.
_TINY = {
    "visual": "dinov2:tiny",
    "text": "bert:minilm",
    "prior": "clip:tiny",
    "loca_hidden": 72,
    "loca_1x1": 48,
    "loca_3x3_reduce": 6,
    "loca_3x3": 24,
    "dypa_rank": 16,
    "dim": 128,
    "depth": 3,
    "heads": 4,
    "ffn_dim": 512,
}
TINY_DEPTH = 6  # dinov2:tiny's blocks and bert:minilm's layers


def build_mapper(base: dict, overrides: dict) -> MaPPER:
    """A MaPPER from a registered configuration (`base`: MaPPERConfig fields) and the caller's overrides: MaPPERConfig
    fields and visual_module / text_module / prior_module. Unknown names are a ConfigError."""
    modules = {name: overrides.pop(name) for name in _MODULE_OVERRIDES if name in overrides}
    fields = [field.name for field in dataclasses.fields(MaPPERConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(f"MaPPER overrides {unknown}: expected MaPPERConfig fields {fields} or {_MODULE_OVERRIDES}")
    return MaPPER(MaPPERConfig(**{**base, **overrides}), **modules)


def tiny_config(show: bool = True) -> dict:
    """mapper-tiny's MaPPERConfig fields: the small backbones and the paper's positions mapped onto them."""
    positions = tuple(
        map_positions(PAPER_POSITIONS, TINY_DEPTH, name="mapper-tiny adapter positions", show=show).values()
    )
    return {**_TINY, "visual_positions": positions, "text_positions": positions}


@register("mapper-b")
def mapper_b(**overrides) -> MaPPER:
    """The paper's MaPPER: DINOv2 ViT-B/14 at 518 px, BERT-base, the CLIP ViT-B/16 text prior, 20 tokens; random
    weights unless visual_weights, text_weights (a BERT folder) and prior_weights (OpenAI's ViT-B/16) are given."""
    return build_mapper({}, overrides)


@register("mapper-tiny")
def mapper_tiny(**overrides) -> MaPPER:
    """MaPPER for 2 CPU cores and SynthRef's 128 px: dinov2:tiny (8 x 8 patches), the pretrained 6-layer MiniLM,
    the clip:tiny text prior, adapters at blocks 1, 3, 5 of 6 (the paper's 3, 7, 11 of 12), a 3-layer fusion of
    width 128 (transvg-tiny's). Pass the zoo's pretrained backbones as visual_module / prior_module."""
    return build_mapper(tiny_config(show=False), overrides)
