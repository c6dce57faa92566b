"""HiLoRA (HiVG, Xiao et al. 2024, Sec. 3.3): hierarchical low-rank adaptation, shallow layers first, through peft.

Fine-tuning errors accumulate from shallow to deep layers, so HiVG adapts CLIP in stages: a warm-up trains the
cross-modal bridge and the head with the backbone frozen, then LoRA opens on the vision blocks cumulatively, blocks
0-4, then 0-7, then 0-11 of ViT-B/16, with the text tower's LoRA trained in every one of those stages. The schedule
is data (`HiLoRAStage`, `HILORA_SCHEDULE`), its Trainer stages come from `trainer_stages`, and the model switches
between stages in `enter_stage` (see `vgstudy.models.hivg.HiVG`).

The LoRA itself is peft's (release: r = 32, alpha = 16, dropout 0.1, no bias, `LoRASettings`): `add_adapter`
injects a named adapter with `inject_adapter_in_model`, `merge_adapter` merges one into the weights it adapts and
unloads peft's wrappers (what `merge_and_unload` does for a PeftModel). Two ways to chain the stages, the switch
`hilora_merge`:
- paper (`True`): after each stage its adapter is merged into the weights, and a fresh adapter, named after the next
  stage, is trained;
- release (`False`): one adapter ("hilora") for the whole run; the release re-wraps the model with `get_peft_model`
  at each stage and reloads the previous stage's weights, which amounts to training the same adapter on.

Where LoRA goes: the q, k, v and out projections of self-attention in every vision and text block, and of each
bridge's cross-attention (release: HF CLIP's `q_proj`, `k_proj`, `v_proj`, `out_proj`; its target list also names
`fc_in`, `fc_out`, `wte`, which HF CLIP does not have, so no MLP or embedding is adapted). open_clip's blocks use
`nn.MultiheadAttention`, whose q, k and v live in one fused `in_proj_weight`. peft can adapt an
`nn.MultiheadAttention`, but with one LoRA pair on the fused projection (A shared by q, k and v), which is not the
release's three independent adapters and cannot load its weights. So `split_attention` replaces each block's
`nn.MultiheadAttention` by `SplitAttention`, the same computation with HF CLIP's four separate `nn.Linear`s (the
fused weight cut in three), and peft targets those by name, as it does in the release.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vgstudy.errors import ConfigError
from vgstudy.train import Stage

RELEASE_ADAPTER = "hilora"  # the one adapter of `hilora_merge=False` (peft's "default" in the release)


# --- The attention layout LoRA targets ------------------------------------------------------------------------------


class SplitAttention(nn.Module):
    """Multi-head attention with separate q, k, v and out projections (HF CLIP's layout), batch first.

    Called like a batch-first `nn.MultiheadAttention` (`attn(query, key, value, attn_mask=...)` -> (output, None)),
    so it can stand in for one inside open_clip's blocks; attention weights are never returned. `attn_mask`: an
    additive float mask or a boolean mask (True = may attend), broadcastable to (B, heads, Nq, Nk).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"SplitAttention dim={dim}: expected a multiple of heads={heads}")
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    @classmethod
    def from_multihead(cls, attention: nn.MultiheadAttention) -> SplitAttention:
        """The same attention as a batch-first `nn.MultiheadAttention` (with biases), its weights copied."""
        if not attention.batch_first or attention.in_proj_weight is None or attention.in_proj_bias is None:
            raise ConfigError(
                "SplitAttention.from_multihead: expected a batch-first nn.MultiheadAttention with a fused, biased "
                "in-projection (open_clip's blocks)"
            )
        split = cls(attention.embed_dim, attention.num_heads, attention.dropout)
        split = split.to(device=attention.in_proj_weight.device, dtype=attention.in_proj_weight.dtype)
        weights = attention.in_proj_weight.detach().chunk(3)  # q, k, v: (D, D) each
        biases = attention.in_proj_bias.detach().chunk(3)
        with torch.no_grad():
            for projection, weight, bias in zip(
                (split.q_proj, split.k_proj, split.v_proj), weights, biases, strict=True
            ):
                projection.weight.copy_(weight)
                projection.bias.copy_(bias)
            split.out_proj.weight.copy_(attention.out_proj.weight)
            split.out_proj.bias.copy_(attention.out_proj.bias)
        return split

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """query (B, Nq, D), key and value (B, Nk, D) -> ((B, Nq, D), None). `need_weights` is accepted for
        `nn.MultiheadAttention`'s call signature; no weights are computed."""
        b, nq, d = query.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, heads, N, D / heads)
            return x.view(b, x.shape[1], self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)  # (B, heads, Nq, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, d)), None


def split_attention(blocks: nn.ModuleList) -> None:
    """Replace the `attn` (`nn.MultiheadAttention`) of every open_clip block in `blocks` by a `SplitAttention`."""
    for block in blocks:
        block.attn = SplitAttention.from_multihead(block.attn)


# --- LoRA through peft ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRASettings:
    """peft LoRA hyper-parameters (release: r = 32, alpha = 16, dropout 0.1, no bias; scaling alpha / r = 0.5)."""

    rank: int = 32
    alpha: float = 16
    dropout: float = 0.1

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRASettings.rank={self.rank!r}: expected an int >= 1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise ConfigError(f"LoRASettings.alpha={self.alpha!r}: expected a number > 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRASettings.dropout={self.dropout!r}: expected a number in [0, 1)")


def add_adapter(model: nn.Module, name: str, target_modules: str, settings: LoRASettings) -> None:
    """Inject a LoRA adapter `name` into every module of `model` whose full name matches the regular expression
    `target_modules` (peft's `inject_adapter_in_model`), and make it the active one.

    peft's injection leaves only adapters trainable; callers set what trains afterwards.
    """
    from peft import LoraConfig
    from peft.functional import inject_adapter_in_model, set_adapter

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        bias="none",
        target_modules=target_modules,
    )
    inject_adapter_in_model(config, model, adapter_name=name)
    set_adapter(model, name)


def adapter_names(model: nn.Module) -> list[str]:
    """The LoRA adapters present in `model` (in the order peft holds them)."""
    from peft.tuners.lora import LoraLayer

    names: dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            names.update(dict.fromkeys(module.lora_A.keys()))
    return list(names)


def merge_adapter(model: nn.Module, name: str) -> None:
    """Merge adapter `name` into the weights it adapts and remove every LoRA wrapper (each module becomes its base
    layer again, holding W + B A alpha / r): peft's merge, then its unload."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(path, module) for path, module in model.named_modules() if isinstance(module, LoraLayer)]
    for path, module in wrapped:
        module.merge(adapter_names=[name])
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, module.get_base_layer())
    # peft keeps the configs of injected adapters on the model; none is left after unloading
    if hasattr(model, "peft_config"):
        del model.peft_config


# --- The schedule ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HiLoRAStage:
    """What one training stage adapts.

    name:              the Trainer stage's name (`Stage.name`), passed to `model.enter_stage`.
    vision_lora_share: share of the vision blocks, from the first, whose LoRA trains; the release's 5/12, 8/12 and
                       12/12 of ViT-B/16 open blocks 0-4, 0-7, 0-11; n blocks open is round(share x depth).
    text_lora:         the text tower's LoRA trains.
    bridge_lora:       the bridges' cross-attention LoRA trains (release: in every stage, warm-up included).
    backbone:          CLIP's own weights train too (a full fine-tuning ablation; never in HiVG).

    The bridges, the projections and the head train in every stage.
    """

    name: str
    vision_lora_share: float = 0.0
    text_lora: bool = False
    bridge_lora: bool = True
    backbone: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"HiLoRAStage.name={self.name!r}: expected a non-empty string")
        share = self.vision_lora_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
            raise ConfigError(f"HiLoRAStage {self.name!r}: vision_lora_share={share!r}, expected a number in [0, 1]")
        for flag in ("text_lora", "bridge_lora", "backbone"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"HiLoRAStage {self.name!r}: {flag}={getattr(self, flag)!r}, expected a bool")

    def vision_blocks_open(self, depth: int) -> int:
        """How many vision blocks, from the first, have trainable LoRA in a tower of `depth` blocks."""
        return math.floor(self.vision_lora_share * depth + 0.5)


# HiVG's release (RefCOCO family): warm-up, then three HiLoRA stages.
HILORA_SCHEDULE: tuple[HiLoRAStage, ...] = (
    HiLoRAStage("warmup"),
    HiLoRAStage("stage1", vision_lora_share=5 / 12, text_lora=True),
    HiLoRAStage("stage2", vision_lora_share=8 / 12, text_lora=True),
    HiLoRAStage("stage3", vision_lora_share=12 / 12, text_lora=True),
)
# The release's ViT-B recipe per stage (train_single_dataset_finetuning_base.sh): epochs and learning rates.
RELEASE_EPOCHS = (60, 20, 20, 20)
RELEASE_LRS = (2.5e-4, 1e-4, 5e-5, 2.5e-5)


def check_schedule(schedule: Sequence[HiLoRAStage]) -> tuple[HiLoRAStage, ...]:
    """`schedule` as a tuple, or a ConfigError: at least one stage, all HiLoRAStage, distinct names."""
    schedule = tuple(schedule)
    if not schedule or not all(isinstance(stage, HiLoRAStage) for stage in schedule):
        raise ConfigError(f"HiLoRA schedule {schedule!r}: expected a non-empty sequence of HiLoRAStage")
    names = [stage.name for stage in schedule]
    if len(set(names)) != len(names):
        raise ConfigError(f"HiLoRA schedule: stage names {names} must be distinct")
    return schedule


def trainer_stages(
    schedule: Sequence[HiLoRAStage] = HILORA_SCHEDULE,
    epochs: Sequence[int] = RELEASE_EPOCHS,
    lrs: Sequence[float] = RELEASE_LRS,
    **stage_options,
) -> tuple[Stage, ...]:
    """The Trainer's stages for a HiLoRA schedule: one `Stage` per `HiLoRAStage`, same name, with its epochs and
    learning rate (cosine schedule by default, as the release); `stage_options` are further `Stage` fields."""
    schedule = check_schedule(schedule)
    if len(epochs) != len(schedule) or len(lrs) != len(schedule):
        raise ConfigError(
            f"trainer_stages: {len(schedule)} stages ({[s.name for s in schedule]}), but {len(epochs)} epochs "
            f"and {len(lrs)} learning rates; expected one of each per stage"
        )
    return tuple(
        Stage(name=stage.name, epochs=n, lr=lr, **stage_options)
        for stage, n, lr in zip(schedule, epochs, lrs, strict=True)
    )
