"""TransVG (Deng et al., ICCV 2021): unimodal backbones, projections to one width, and a visual-linguistic transformer.

Sec. 3 of the paper, as the release (djiajunustc/TransVG, `models/trans_vg.py`) builds it:

1. Visual branch: ResNet + DETR encoder (`resnet50+detr`: 640 px -> 20 x 20 = 400 tokens of width 256). The image's
   padding mask (True on padded pixels) goes down to the feature grid and masks those tokens.
2. Linguistic branch: BERT-base, `max_len` tokens (20; 40 on RefCOCOg), the output of its last (12th) layer.
3. Both are projected to `dim` by a Linear each, and the grounding head ([REG]; text; visual, learned position
   embeddings, 6 post-norm layers, padding masked) regresses the box from the [REG] output.

Other backbones plug into the same branches: a ViT image tower (DINOv2, CLIP's image tower) gives its patch tokens;
its prefix tokens (CLS, registers) are left out, so the visual tokens are always the image grid, one per location,
as TransVG's are, and a padding mask reaches them the same way (nearest cell of the pixel mask). CLIP's text tower
gives its per-token features.

Training as the release (`train.py` defaults, `train.sh`): AdamW, lr 1e-4, 1e-5 for the visual backbone (CNN and
DETR encoder alike) and for BERT, i.e. `Stage(lr=1e-4, lr_scale=LR_SCALE)`; weight decay 1e-4; batch 64; 90 epochs,
x 0.1 at 60. Frozen: the ResNet's stem and layer1 (and its BatchNorm, as buffers), as in DETR. A backbone whose
release learning rate is 0 is frozen whole (`--lr_bert 0`): `freeze_visual` / `freeze_text` here.

Two parameter sets exist in the model but take no part in the loss, as in the release: BERT's pooler (and CLIP's
projections). Under DDP train with `TrainConfig(find_unused_parameters=True)`, as the release does.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vgstudy.data.tokenizers import TokenBatch
from vgstudy.data.transforms import TransformConfig
from vgstudy.errors import ConfigError
from vgstudy.models.backbones import (
    CLIPBackbone,
    ResNetDETREncoder,
    TextTower,
    VisionTower,
    build_backbone,
)
from vgstudy.models.base import Output, check_inputs
from vgstudy.models.head import GroundingHead
from vgstudy.models.memo import BackboneMemo, tensor_key
from vgstudy.models.registry import register

# The release's learning rates relative to lr = 1e-4: --lr_visu_cnn, --lr_visu_tra and --lr_bert are all 1e-5.
LR_SCALE = {"visual.": 0.1, "text.": 0.1}
RELEASE_MAX_LEN = 20  # --max_query_len on RefCOCO / RefCOCO+ / ReferIt (40 on RefCOCOg)


class TransVG(nn.Module):
    """TransVG: `model(images, texts, valid=None) -> Output(boxes (B, 4) cxcywh in [0, 1], aux)`.

    visual, text:      backbone names for `build_backbone` ("resnet50+detr", "dinov2:...", "clip:..." for a branch
                       built from CLIP's image or text tower; "bert:base", "bert:minilm", "clip:..." for text).
    dim, depth, heads, ffn_dim, dropout: the visual-linguistic transformer (release: 256, 6, 8, 2048, 0.1).
    max_len:           text tokens; None: 20 (the release's) for a text branch built by name, the tower's own
                       `max_len` for a `text_module`.
    image_size:        input side of the visual backbone built by name (None: its config's).
    visual_weights, text_weights: local weight files/folders for the backbones built by name.
    visual_options:    further overrides for building the visual backbone (e.g. ResNetDETRConfig fields).
    visual_module, text_module: already-built backbones (e.g. pretrained from the zoo) used instead of the names:
                       a ResNetDETREncoder or VisionTower (or a CLIPBackbone, whose image tower is taken), and a
                       TextTower (or a CLIPBackbone, whose text tower is taken).
    freeze_visual, freeze_text: freeze a whole backbone (the release does so for a backbone given lr 0); it then
                       stays in eval mode.

    `remember_frozen_backbones(BackboneMemo())` makes the frozen backbones answer inputs they have seen from memory
    (`vgstudy.models.memo`): for training on fixed inputs (no augmentation), where it runs each backbone once per
    input instead of once per epoch.

    Attributes: visual, text (the backbones), visual_proj, text_proj (Linear to `dim`), head (GroundingHead),
    transform (the eval TransformConfig: the visual backbone's image size and normalisation).
    """

    def __init__(
        self,
        visual: str = "resnet50+detr",
        text: str = "bert:base",
        *,
        dim: int = 256,
        depth: int = 6,
        heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        max_len: int | None = None,
        image_size: int | None = None,
        visual_weights: str | Path | None = None,
        text_weights: str | Path | None = None,
        visual_options: dict | None = None,
        visual_module: nn.Module | None = None,
        text_module: nn.Module | None = None,
        freeze_visual: bool = False,
        freeze_text: bool = False,
    ):
        super().__init__()
        visual_options = dict(visual_options or {})
        if visual_module is None and text_module is None and visual == text and visual.startswith("clip:"):
            # both towers of one CLIP: built once (text_weights, if any, must then be visual_weights)
            if text_weights is not None and text_weights != visual_weights:
                raise ConfigError(
                    f"TransVG visual = text = {visual!r} builds one CLIP: expected text_weights=None or the same file "
                    "as visual_weights"
                )
            clip = build_backbone(
                visual,
                weights=visual_weights,
                image_size=image_size,
                max_len=RELEASE_MAX_LEN if max_len is None else max_len,
                **visual_options,
            )
            visual_module, text_module = clip.visual, clip.text
            visual_weights = text_weights = image_size = None
            visual_options = {}
        self.visual = _visual_branch(visual, visual_module, visual_weights, image_size, visual_options)
        self.text = _text_branch(text, text_module, text_weights, max_len)
        self.visual_proj = nn.Linear(self.visual.width, dim)
        self.text_proj = nn.Linear(self.text.width, dim)
        self.num_visual_tokens = _grid_tokens(self.visual)
        self.num_text_tokens = self.text.max_len
        self.head = GroundingHead(
            self.num_text_tokens + self.num_visual_tokens, dim, depth, heads, ffn_dim, dropout, normalize_before=False
        )
        self.freeze_visual, self.freeze_text = freeze_visual, freeze_text
        self.memo: BackboneMemo | None = None  # beside the model, not in its state dict
        if freeze_visual:
            self.visual.requires_grad_(False)
        if freeze_text:
            self.text.requires_grad_(False)
        self.image_size = self.visual.image_size
        # flip_prob: the release flips (swapping left/right words); used by `replace(model.transform, train=True)`
        self.transform = TransformConfig(
            image_size=self.image_size, mean=self.visual.mean, std=self.visual.std, flip_prob=0.5
        )

    def remember_frozen_backbones(self, memo: BackboneMemo | None) -> None:
        """Answer the frozen backbones' inputs from `memo` when seen before (None: run them every time)."""
        if memo is not None and not (self.freeze_visual or self.freeze_text):
            raise ConfigError(
                "TransVG.remember_frozen_backbones: neither backbone is frozen (freeze_visual / freeze_text); a "
                "backbone that trains changes its outputs, so they cannot be remembered"
            )
        self.memo = memo

    def train(self, mode: bool = True) -> TransVG:
        """Train mode for everything but a frozen backbone, which stays a fixed feature extractor (eval mode: its
        BatchNorm statistics and dropout do not change with training)."""
        super().train(mode)
        for frozen, backbone in ((self.freeze_visual, self.visual), (self.freeze_text, self.text)):
            if frozen:
                backbone.eval()
        return self

    def forward(self, images: torch.Tensor, texts: list[str] | TokenBatch, valid: torch.Tensor | None = None) -> Output:
        """images (B, 3, S, S) through `transform`; texts: B strings (or the text tower's TokenBatch of them);
        valid (B, S, S) bool, True on image pixels (False on padding), or None: nothing masked.

        aux: "reg" (B, dim) the [REG] output; "visual_tokens" (B, Nv, dim) and "text_tokens" (B, L, dim) after the
        projections; "visual_mask" (B, Nv) and "text_mask" (B, L) bool, True on real tokens.
        """
        check_inputs("TransVG", self.image_size, images, texts, valid, token_batch=True)
        visual_tokens, visual_padding = self._visual_tokens(images, valid)  # (B, Nv, Dv), (B, Nv)
        visual_tokens = self.visual_proj(visual_tokens)  # (B, Nv, dim)
        text_features, text_mask = self._text_tokens(texts)  # (B, L, Dt), (B, L)
        text_tokens = self.text_proj(text_features)  # (B, L, dim)
        text_padding = ~text_mask  # (B, L)
        tokens = torch.cat([text_tokens, visual_tokens], dim=1)  # (B, L + Nv, dim): the release's order
        padding = torch.cat([text_padding, visual_padding], dim=1)
        boxes_cxcywh, reg = self.head(tokens, padding)  # (B, 4), (B, dim)
        aux = {
            "reg": reg,
            "visual_tokens": visual_tokens,
            "text_tokens": text_tokens,
            "visual_mask": ~visual_padding,
            "text_mask": text_mask,
        }
        return Output(boxes=boxes_cxcywh, aux=aux)

    def _visual_tokens(self, images: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid tokens (B, Nv, Dv) and their padding mask (B, Nv), True on padding (from the memo when it has them)."""
        if self.memo is None or not self.freeze_visual:
            return self._run_visual(images, valid)
        keys = [("visual", tensor_key(image, None if valid is None else valid[i])) for i, image in enumerate(images)]

        def compute(rows: torch.Tensor) -> dict[str, torch.Tensor]:
            tokens, padding = self._run_visual(images[rows], None if valid is None else valid[rows])
            return {"tokens": tokens, "padding": padding}

        out = self.memo.run(keys, compute)
        return out["tokens"], out["padding"]

    def _text_tokens(self, texts: list[str] | TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The text backbone's tokens (B, L, Dt) and mask (B, L), True on real tokens (from the memo when it has
        them: a text is known by its token ids)."""
        if self.memo is None or not self.freeze_text:
            out = self.text(texts)
            return out.tokens, out.mask
        batch = self.text.tokenize(texts)
        keys = [("text", tensor_key(ids, mask)) for ids, mask in zip(batch.ids, batch.mask, strict=True)]

        def compute(rows: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.text(TokenBatch(ids=batch.ids[rows], mask=batch.mask[rows]))
            return {"tokens": out.tokens, "mask": out.mask}

        out = self.memo.run(keys, compute)
        return out["tokens"], out["mask"]

    def _run_visual(self, images: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        pixel_padding = None if valid is None else ~valid.bool()  # (B, S, S)
        if isinstance(self.visual, ResNetDETREncoder):
            out = self.visual(images, pixel_mask=pixel_padding)
            tokens = out.tokens
        else:
            out = self.visual(images)
            tokens = out.tokens[:, out.num_prefix_tokens :]  # (B, h * w, Dv): the grid, CLS/registers left out
        if pixel_padding is None:
            return tokens, torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        # the nearest pixel of each cell, as DETR resizes its mask (the ResNet encoder has done so already)
        padding = F.interpolate(pixel_padding[None].float(), size=out.grid_hw).bool()[0]  # (B, h, w)
        return tokens, padding.flatten(1)


def _grid_tokens(visual: nn.Module) -> int:
    """Visual tokens the head sees: the feature/patch grid at the backbone's image size."""
    h, w = visual.grid_hw
    return h * w


def _visual_branch(
    name: str, module: nn.Module | None, weights: str | Path | None, image_size: int | None, options: dict
) -> nn.Module:
    where = "visual_module"
    if module is None:
        module = build_backbone(name, weights=weights, image_size=image_size, **options)
        where = f"visual={name!r}"
    elif weights is not None or image_size is not None or options:
        raise ConfigError(
            "TransVG: visual_weights, image_size and visual_options build the visual backbone by name; "
            "expected none of them with visual_module"
        )
    if isinstance(module, CLIPBackbone):
        module = module.visual
    if not isinstance(module, ResNetDETREncoder | VisionTower):
        raise ConfigError(
            f"TransVG {where} is a {type(module).__name__}; expected a visual backbone (resnet*+detr, dinov2:*, clip:*)"
        )
    return module


def _text_branch(name: str, module: nn.Module | None, weights: str | Path | None, max_len: int | None) -> TextTower:
    if module is None:
        max_len = RELEASE_MAX_LEN if max_len is None else max_len
        overrides = {"max_len": max_len} if name.startswith(("bert:", "clip:")) else {}
        module = build_backbone(name, weights=weights, **overrides)
        where = f"text={name!r}"
    elif weights is not None:
        raise ConfigError("TransVG: text_weights builds the text backbone by name; expected none with text_module")
    else:
        where = "text_module"
    if isinstance(module, CLIPBackbone):
        module = module.text
    if not isinstance(module, TextTower):
        raise ConfigError(f"TransVG {where} is a {type(module).__name__}; expected a text backbone (bert:*, clip:*)")
    if max_len is not None and module.max_len != max_len:
        raise ConfigError(
            f"TransVG max_len={max_len}, but text_module tokenises to {module.max_len} tokens; expected the same "
            "(or max_len=None)"
        )
    return module


# --- Registered configurations --------------------------------------------------------------------------------------


@register("transvg-r50")
def transvg_r50(**overrides) -> TransVG:
    """The paper's TransVG-R50: ResNet-50 + DETR encoder at 640 px, BERT-base, 20 text tokens; random weights unless
    visual_weights (a DETR checkpoint) and text_weights (a BERT folder) are given."""
    return TransVG(**{"visual": "resnet50+detr", "text": "bert:base", **overrides})


@register("transvg-r101")
def transvg_r101(**overrides) -> TransVG:
    """TransVG-R101: ResNet-101 + DETR encoder at 640 px, BERT-base."""
    return TransVG(**{"visual": "resnet101+detr", "text": "bert:base", **overrides})


# The tiny profile's fusion: the width, depth, heads and FFN of the tiny DETR encoder (resnet18+detr:tiny).
_TINY_FUSION = {"dim": 128, "depth": 3, "heads": 4, "ffn_dim": 512}


@register("transvg-tiny")
def transvg_tiny(**overrides) -> TransVG:
    """TransVG for 2 CPU cores and SynthRef's 128 px: ResNet-18 to layer3 (stride 16: 8 x 8 tokens) + a 3-layer DETR
    encoder of width 128, the pretrained 6-layer MiniLM (bert:minilm), and a 3-layer fusion of width 128."""
    defaults = {"visual": "resnet18+detr:tiny", "text": "bert:minilm", **_TINY_FUSION}
    if "visual_module" not in overrides and "visual" not in overrides:
        defaults["visual_options"] = {"return_layer": "layer3"}
    return TransVG(**{**defaults, **overrides})


@register("transvg-tiny-clip")
def transvg_tiny_clip(**overrides) -> TransVG:
    """TransVG with the image and text towers of clip:tiny as its backbones (8 x 8 patch tokens, 20 text tokens)."""
    return TransVG(**{"visual": "clip:tiny", "text": "clip:tiny", **_TINY_FUSION, **overrides})
