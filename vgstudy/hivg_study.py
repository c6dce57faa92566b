"""Notebook 02's experiment: HiVG's ablations as data, the tuning variants of its stage schedule, where a model looks
(CLIP's phrase-patch map, the head's [REG] attention), and the statistics that turn runs into verdicts.

The reference run is HiVG as the paper describes it (multi-layer bridge with per-token re-weighting, multi-level
visual features, HiLoRA, every loss term). Each `Ablation` changes one of those choices and is trained with the same
stages, data and seeds, so a difference in accuracy is the effect of that choice (plus noise, which `compare` sizes).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vgstudy.compare import difference, estimate
from vgstudy.errors import ConfigError
from vgstudy.losses_hivg import HiVGCriterion
from vgstudy.models.hilora import HILORA_SCHEDULE, HiLoRAStage, trainer_stages
from vgstudy.models.hivg import HiVG, HiVGConfig
from vgstudy.models.registry import build
from vgstudy.train import Stage

LOSS_TERMS = ("box", "contrastive", "align", "mask")
TUNINGS = ("hilora", "vanilla", "full", "frozen")


# --- The ablations --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ablation:
    """One design choice of HiVG replaced by an alternative; everything else stays as in the reference run.

    name:      the notebook parameter's name for it (`ablations="bridge-none,frozen"`).
    choice:    HiVG's choice it removes (the paper's claim is that this choice helps).
    setting:   what replaces it.
    overrides: HiVGConfig overrides, from the reference model's resolved config (layer choices depend on the tower).
    tuning:    how CLIP is adapted after the warm-up (`tuning_schedule`).
    losses:    the loss terms kept (`criterion_for`).
    """

    name: str
    choice: str
    setting: str
    overrides: Callable[[HiVGConfig], dict] = field(default=lambda config: {})
    tuning: str = "hilora"
    losses: tuple[str, ...] = LOSS_TERMS


ABLATIONS: dict[str, Ablation] = {
    a.name: a
    for a in (
        Ablation("bridge-none", "multi-layer bridge", "no bridge", lambda c: {"bridge_layers": "none"}),
        Ablation(
            "bridge-single",
            "multi-layer bridge",
            "one bridge (the deepest bridge block)",
            lambda c: {"bridge_layers": c.bridge_layers[-1:]},
        ),
        Ablation(
            "no-reweighting",
            "per-token re-weighting of the text levels",
            "text levels gated as they are",
            lambda c: {"adaptive_weights": False},
        ),
        Ablation(
            "last-layer-features",
            "multi-level visual features",
            "the last block's features only",
            lambda c: {"feature_layers": c.feature_layers[-1:]},
        ),
        Ablation("vanilla-lora", "HiLoRA", "vanilla LoRA: every block adapted from stage 1", tuning="vanilla"),
        Ablation("full-finetune", "HiLoRA", "full fine-tuning of CLIP, no LoRA", tuning="full"),
        Ablation("frozen", "HiLoRA", "frozen CLIP, no LoRA", tuning="frozen"),
        Ablation(
            "no-merge",
            "merge each stage's adapter (paper)",
            "one adapter trained on (release)",
            lambda c: {"hilora_merge": False},
        ),
        # Without the patch-text and mask terms the auxiliary heads would be parameters that never get a gradient.
        Ablation(
            "box-only", "auxiliary losses", "box loss only", lambda c: {"auxiliary_heads": False}, losses=("box",)
        ),
        Ablation(
            "box-contrastive",
            "patch-text and mask losses",
            "box + contrastive",
            lambda c: {"auxiliary_heads": False},
            losses=("box", "contrastive"),
        ),
        Ablation(
            "box-contrastive-align",
            "mask loss",
            "box + contrastive + patch-text alignment",
            losses=("box", "contrastive", "align"),
        ),
        Ablation(
            "official-layout",
            "fixed text layout (paper)",
            "the release's text layout (batch mis-pairing)",
            lambda c: {"text_layout": "official"},
        ),
    )
}


def ablation_names(spec: str) -> tuple[str, ...]:
    """The ablations a comma-separated `spec` names ("all": every one; "none" or "": none); ConfigError if unknown."""
    spec = spec.strip()
    if spec == "all":
        return tuple(ABLATIONS)
    if spec in ("", "none"):
        return ()
    names = tuple(name.strip() for name in spec.split(",") if name.strip())
    unknown = [name for name in names if name not in ABLATIONS]
    if unknown or len(set(names)) != len(names):
        raise ConfigError(
            f"ablations={spec!r}: expected 'all', 'none' or distinct names from {', '.join(ABLATIONS)}"
            + (f"; unknown: {unknown}" if unknown else "")
        )
    return names


def tuning_schedule(tuning: str, schedule: Sequence[HiLoRAStage] = HILORA_SCHEDULE) -> tuple[HiLoRAStage, ...]:
    """The schedule with the same stage names (so the same epochs and learning rates), adapting CLIP another way
    after the first stage (the warm-up, which never adapts CLIP):

    hilora:  the schedule as it is (vision LoRA opens shallow blocks first);
    vanilla: every stage adapts every vision block and the text tower with LoRA (LoRA on all layers at once);
    full:    every stage trains CLIP's own weights, no LoRA;
    frozen:  CLIP stays as pretrained; only the bridges, projections and head train.
    """
    schedule = tuple(schedule)
    if tuning not in TUNINGS:
        raise ConfigError(f"tuning={tuning!r}: expected one of {TUNINGS}")
    if tuning == "hilora":
        return schedule
    changes = {
        "vanilla": {"vision_lora_share": 1.0, "text_lora": True, "backbone": False},
        "full": {"vision_lora_share": 0.0, "text_lora": False, "backbone": True},
        "frozen": {"vision_lora_share": 0.0, "text_lora": False, "backbone": False},
    }[tuning]
    return (schedule[0], *(dataclasses.replace(stage, **changes) for stage in schedule[1:]))


def criterion_for(losses: Sequence[str]) -> HiVGCriterion:
    """HiVG's criterion: the release's weights for the terms in `losses` (the box term always), 0 for the rest."""
    unknown = set(losses) - set(LOSS_TERMS)
    if unknown or "box" not in losses:
        raise ConfigError(f"losses={tuple(losses)}: expected 'box' and any of {LOSS_TERMS[1:]}")
    off = {}
    if "contrastive" not in losses:
        off["contrastive_weight"] = 0.0
    if "align" not in losses:
        off.update(align_focal_weight=0.0, align_dice_weight=0.0)
    if "mask" not in losses:
        off.update(mask_focal_weight=0.0, mask_dice_weight=0.0)
    return HiVGCriterion(**off)


@dataclass(frozen=True)
class Recipe:
    """What the stages of every run share: epochs and learning rate per stage, in schedule order; the linear warm-up
    of each stage's learning rate; CLIP's learning rate relative to the stage's when it is fully fine-tuned."""

    epochs: tuple[int, ...]
    lrs: tuple[float, ...]
    warmup_steps: int = 0
    backbone_lr_scale: float = 0.1


def build_run(
    model_name: str,
    ablation: Ablation | None,
    recipe: Recipe,
    reference: HiVGConfig | None = None,
    **model_options,
) -> tuple[HiVG, tuple[Stage, ...], HiVGCriterion]:
    """(model, Trainer stages, criterion) of the reference run (`ablation=None`) or of one ablation.

    model_options: build arguments every run shares (clip_module, dataset, text_layout, hilora_merge, ...); an
    ablation's overrides replace them. `reference`: the reference model's resolved config, which the layer
    ablations read (needed when `ablation` is given).
    """
    overrides, tuning, losses = {}, "hilora", LOSS_TERMS
    if ablation is not None:
        if reference is None:
            raise ConfigError(f"build_run({ablation.name!r}): expected the reference model's config")
        overrides, tuning, losses = ablation.overrides(reference), ablation.tuning, ablation.losses
    schedule = tuning_schedule(tuning)
    model = build(model_name, **{**model_options, **overrides, "schedule": schedule})
    # A fully fine-tuned CLIP trains at a lower rate; CLIP's LoRA (under the same prefix) at the stage's own.
    lr_scale = {"clip.": recipe.backbone_lr_scale} if tuning == "full" else {}
    stages = trainer_stages(schedule, recipe.epochs, recipe.lrs, warmup_steps=recipe.warmup_steps, lr_scale=lr_scale)
    return model, stages, criterion_for(losses)


def trainable_counts(model: HiVG, schedule: Sequence[HiLoRAStage]) -> dict[str, int]:
    """{stage name: parameters that train in it} for `model` run under `schedule`, counted on the model as it is
    (adapters have the same size in every stage, so any stage's model gives the same counts)."""
    return {
        stage.name: sum(p.numel() for name, p in model.named_parameters() if model.trains(name, stage))
        for stage in schedule
    }


@torch.no_grad()
def trace_shapes(
    model: nn.Module, modules: Mapping[str, nn.Module], images: torch.Tensor, texts: list[str]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{label: (shape of the first input, shape of the output)} of each of `modules` in one forward pass of `model`
    (a module that returns a tuple: its first element); the last call counts when a module runs more than once."""
    shapes = {}

    def recorder(label: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            first = output[0] if isinstance(output, tuple) else output
            shapes[label] = (tuple(args[0].shape), tuple(first.shape))

        return hook

    handles = [module.register_forward_hook(recorder(label)) for label, module in modules.items()]
    was_training = model.training
    model.eval()
    try:
        model(images, texts)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return shapes


# --- Where a model looks --------------------------------------------------------------------------------------------


@torch.no_grad()
def reg_attention(model: HiVG, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes_cxcywh (B, 4), maps (B, h, w)): the prediction and the [REG] token's attention over the image patches
    in the head's last layer, averaged over heads (each map sums to the share of attention that went to patches).

    The head asks its attention for no weights; a forward hook on the last layer's attention runs it once more on
    the same inputs with weights (in eval mode, so without dropout).
    """
    attention = model.head.layers[-1].self_attn
    captured = {}

    def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output) -> None:
        query, key, value = args  # the head passes them positionally, the padding mask by keyword
        # forward() directly: calling the module would run this hook again
        _, weights = module.forward(query, key, value, key_padding_mask=kwargs.get("key_padding_mask"))
        captured["weights"] = weights  # (B, 1 + T, 1 + T), averaged over heads

    was_training = model.training
    model.eval()
    handle = attention.register_forward_hook(hook, with_kwargs=True)
    try:
        boxes = model(images, texts).boxes
    finally:
        handle.remove()
        model.train(was_training)
    num_patches = model.num_visual_tokens - 1
    reg_to_patches = captured["weights"][:, 0, 2 : 2 + num_patches]  # after [REG] and CLS
    return boxes, reg_to_patches.reshape(len(images), *model.grid_hw)


def pointing(maps: torch.Tensor, boxes_cxcywh: torch.Tensor) -> dict[str, torch.Tensor]:
    """Does a map's highest cell lie in the box? maps (B, h, w) over the square input; boxes (B, 4) normalised.

    Returns {"hit": (B,) bool, whether the centre of the argmax cell is inside the box; "chance": (B,) the share of
    cells whose centre is inside the box, the hit rate of a cell drawn at random}.
    """
    b, h, w = maps.shape
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    centre_y, centre_x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w)
    cx, cy, bw, bh = boxes_cxcywh.float().cpu().unbind(-1)
    inside = (
        ((centre_x[None] - cx[:, None, None]).abs() <= bw[:, None, None] / 2)
        & ((centre_y[None] - cy[:, None, None]).abs() <= bh[:, None, None] / 2)
    ).flatten(1)  # (B, h w)
    best = maps.float().cpu().flatten(1).argmax(dim=1)
    return {"hit": inside[torch.arange(b), best], "chance": inside.float().mean(dim=1)}


def attention_over(model: HiVG, dataset, *, batch_size: int, device: str | torch.device = "cpu") -> dict:
    """`reg_attention` and `pointing` over a transformed data set, batch by batch: {"boxes_cxcywh" (N, 4),
    "targets_cxcywh" (N, 4), "maps" (N, h, w), "hit" (N,), "chance" (N,)} on the CPU."""
    from torch.utils.data import DataLoader

    from vgstudy.data.transforms import collate

    parts: dict[str, list[torch.Tensor]] = {}
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        boxes, maps = reg_attention(model, batch["images"].to(device), batch["texts"])
        found = {"boxes_cxcywh": boxes.float().cpu(), "targets_cxcywh": batch["boxes_cxcywh"], "maps": maps.cpu()}
        found.update(pointing(found["maps"], found["targets_cxcywh"]))
        for key, value in found.items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


@contextlib.contextmanager
def text_layout(model: HiVG, layout: str) -> Iterator[HiVG]:
    """Run `model`'s bridges with another text layout inside the block (the weights are the same either way)."""
    bridges = list(model.bridges.values())
    before = [bridge.text_layout for bridge in bridges]
    for bridge in bridges:
        bridge.text_layout = layout
    try:
        yield model
    finally:
        for bridge, layout_before in zip(bridges, before, strict=True):
            bridge.text_layout = layout_before


@torch.no_grad()
def box_shift(model: nn.Module, images: torch.Tensor, texts: list[str], other_texts: list[str]) -> torch.Tensor:
    """(B,) how far each sample's box moves (max abs coordinate change, normalised) when the batch of `images` runs
    with `other_texts` instead of `texts`. Change only sample 0's text to see how much its box follows its own
    words; change only the others' to see whether it depends on the rest of its batch (it must not)."""
    if len(texts) != len(images) or len(other_texts) != len(images):
        raise ConfigError(f"box_shift: expected {len(images)} texts in each list, one per image")
    was_training = model.training
    model.eval()
    try:
        return (model(images, texts).boxes - model(images, other_texts).boxes).abs().amax(dim=1)
    finally:
        model.train(was_training)


# --- Statistics -----------------------------------------------------------------------------------------------------


def compare(reference: Sequence[float], variant: Sequence[float], n: int) -> dict:
    """The reference's accuracy minus the variant's (per-seed accuracies, %, each on n samples), its margin (two
    standard errors of the difference, `vgstudy.compare`'s) and the outcome: "holds" (the reference is better by
    more than the margin), "reversed" (worse by more), or "unresolved"."""
    gap, margin = difference(estimate(reference, n), estimate(variant, n))
    outcome = "holds" if gap > margin else "reversed" if gap < -margin else "unresolved"
    return {"difference": gap, "margin": margin, "outcome": outcome}


def length_bucket(text: str, buckets: Sequence[str]) -> str | None:
    """The bucket of `buckets` ("1-5", "6-7", "11+": word counts, both ends included) the expression falls in."""
    words = len(text.split())
    for bucket in buckets:
        low, _, high = bucket.rstrip("+").partition("-")
        if words >= int(low) and (bucket.endswith("+") or words <= int(high)):
            return bucket
    return None
