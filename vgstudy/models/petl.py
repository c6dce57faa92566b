"""Generic parameter-efficient tuning on MaPPER's frozen backbones: the baselines of MaPPER's Figure 1.

Each baseline is MaPPER's pipeline (frozen DINOv2 + BERT, TransVG's fusion over [REG; text; CLS + grid]) with
MaPPER's own modules (LoCA, DyPA, PGT, the prior) off and one generic method in both backbones, every block:

- adapter (Houlsby et al., 2019): a bottleneck (down, ReLU, up, the up-projection starting at zero) after the
  attention's output projection and after the FFN's output projection, added to what that projection outputs.
- lora (Hu et al., 2022), through peft: rank-r updates of DINOv2's qkv projection and BERT's query and value.
- adaptformer (Chen et al., 2022): a bottleneck parallel to the FFN on the FFN's input, scaled by 0.1; placed as
  MaPPER's LoCA (inside DINOv2's layer scale) and DyPA (added to BERT's layer output) are.
- full: full fine-tuning of both backbones.

Everything inside the backbones trains at lr x 0.1 (`mapper.LR_SCALE`), as MaPPER's adapters and TransVG's
fine-tuned backbones do. The default widths give each PETL method about MaPPER's budget at full size (2.4 M tunable
backbone parameters against MaPPER's 2.77 M): adapter bottleneck 32, AdaptFormer 64, LoRA rank 32 (alpha = rank).
Registered as `petl-<method>-b` and `petl-<method>-tiny`; `model.tunable_count()` gives each one's count. Full
fine-tuning also unfreezes BERT's pooler, which grounding never uses: under DDP train it with
`find_unused_parameters=True`, as TransVG.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vgstudy.errors import ConfigError
from vgstudy.models.mapper import (
    BertLayerWithParallelAdapter,
    MaPPER,
    MaPPERConfig,
    ViTBlockWithParallelAdapter,
    tiny_config,
)
from vgstudy.models.registry import register

PETL_METHODS = ("adapter", "lora", "adaptformer", "full")
# MaPPER's own modules and options of its prior: a PETL baseline has none of them.
_MAPPER_ONLY = (
    "use_loca",
    "use_dypa",
    "use_pgt",
    "use_prior",
    "visual_positions",
    "text_positions",
    "loca_hidden",
    "loca_1x1",
    "loca_3x3_reduce",
    "loca_3x3",
    "loca_scale",
    "dypa_rank",
    "prior",
    "prior_weights",
    "prior_seed",
)


@dataclass(frozen=True)
class PETLConfig:
    """A generic PETL method on both backbones.

    method:            one of PETL_METHODS.
    bottleneck:        hidden width of the adapter / AdaptFormer bottlenecks.
    lora_rank, lora_alpha: LoRA's rank r and alpha (the update is scaled by alpha / r).
    adaptformer_scale: AdaptFormer's weight beside the FFN (0.1).
    """

    method: str
    bottleneck: int = 32
    lora_rank: int = 32
    lora_alpha: float = 32.0
    adaptformer_scale: float = 0.1

    def __post_init__(self):
        if self.method not in PETL_METHODS:
            raise ConfigError(f"PETLConfig.method={self.method!r}: expected one of {PETL_METHODS}")
        for name in ("bottleneck", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"PETLConfig.{name}={value!r}: expected an int >= 1")
        for name in ("lora_alpha", "adaptformer_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"PETLConfig.{name}={value!r}: expected a number > 0")


class BottleneckAdapter(nn.Module):
    """(…, width) -> (…, width): up(ReLU(down(x))), the up-projection starting at zero (the adapter adds nothing)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(width, hidden)
        self.up = nn.Linear(hidden, width)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(x)))


class LinearWithAdapter(nn.Module):
    """A frozen Linear followed by a sequential adapter: y + adapter(y), y = linear(x).

    The Linear's weight and bias stay under their own names (…proj.weight), so the key layout is the backbone's plus
    `adapter`.
    """

    def __init__(self, linear: nn.Linear, adapter: nn.Module):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + self.adapter(y)


class PETLBaseline(MaPPER):
    """MaPPER's pipeline without MaPPER's modules, tuned by a generic PETL method: `model(images, texts) -> Output`.

    petl: PETLConfig. config: MaPPERConfig for the backbones, the fusion and the fidelity flags (its MaPPER-only
    switches are turned off). visual_module, text_module: as for MaPPER.
    """

    def __init__(self, petl: PETLConfig, config: MaPPERConfig | None = None, **modules):
        config = dataclasses.replace(
            MaPPERConfig() if config is None else config,
            use_loca=False,
            use_dypa=False,
            use_pgt=False,
            use_prior=False,
        )
        super().__init__(config, **modules)
        self.petl = petl
        if petl.method == "adapter":
            _add_sequential_adapters(self, petl.bottleneck)
        elif petl.method == "adaptformer":
            _add_parallel_adapters(self, petl.bottleneck, petl.adaptformer_scale)
        elif petl.method == "lora":
            _add_lora(self, petl.lora_rank, petl.lora_alpha)
        else:
            self.visual.requires_grad_(True)
            self.text.requires_grad_(True)


def _add_sequential_adapters(model: MaPPER, hidden: int) -> None:
    """Houlsby adapters after the attention output and the FFN output projections of every block."""
    for block in model.visual.blocks:  # timm: attn.proj, mlp.fc2
        block.attn.proj = LinearWithAdapter(block.attn.proj, BottleneckAdapter(model.visual.width, hidden))
        block.mlp.fc2 = LinearWithAdapter(block.mlp.fc2, BottleneckAdapter(model.visual.width, hidden))
    for layer in model.text.blocks:  # transformers: attention.output.dense, output.dense
        attention_output = layer.attention.output
        attention_output.dense = LinearWithAdapter(attention_output.dense, BottleneckAdapter(model.text.width, hidden))
        layer.output.dense = LinearWithAdapter(layer.output.dense, BottleneckAdapter(model.text.width, hidden))


def _add_parallel_adapters(model: MaPPER, hidden: int, scale: float) -> None:
    """AdaptFormer: a scaled bottleneck beside every block's FFN."""
    blocks = model.visual.blocks
    for i, block in enumerate(blocks):
        blocks[i] = ViTBlockWithParallelAdapter(block, BottleneckAdapter(model.visual.width, hidden), scale)
    layers = model.text.blocks
    for i, layer in enumerate(layers):
        layers[i] = BertLayerWithParallelAdapter(layer, BottleneckAdapter(model.text.width, hidden), scale)


def _add_lora(model: MaPPER, rank: int, alpha: float) -> None:
    """LoRA through peft, injected into the backbones in place (only the LoRA matrices train)."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["qkv"]), model.visual)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["query", "value"]), model.text)


# --- Registered configurations --------------------------------------------------------------------------------------

# Widths per size: about MaPPER's tunable budget at full size, scaled down with the backbones for tiny.
_WIDTHS = {
    "b": {"adapter": {"bottleneck": 32}, "adaptformer": {"bottleneck": 64}, "lora": {"lora_rank": 32}, "full": {}},
    "tiny": {"adapter": {"bottleneck": 8}, "adaptformer": {"bottleneck": 16}, "lora": {"lora_rank": 8}, "full": {}},
}


def build_petl(method: str, size: str, **overrides) -> PETLBaseline:
    """A PETL baseline: `method` in PETL_METHODS on MaPPER-`size`'s backbones and fusion ("b" or "tiny").

    overrides: PETLConfig fields (bottleneck, lora_rank, lora_alpha, adaptformer_scale), MaPPERConfig fields other
    than MaPPER's own modules and prior, and visual_module / text_module.
    """
    if size not in _WIDTHS:
        raise ConfigError(f"PETL size {size!r}: expected one of {sorted(_WIDTHS)}")
    petl_fields = [field.name for field in dataclasses.fields(PETLConfig) if field.name != "method"]
    petl_options = dict(_WIDTHS[size].get(method, {}))
    petl_options.update({name: overrides.pop(name) for name in petl_fields if name in overrides})
    if method == "lora" and "lora_alpha" not in petl_options:
        petl_options["lora_alpha"] = float(petl_options["lora_rank"])
    petl = PETLConfig(method=method, **petl_options)
    modules = {name: overrides.pop(name) for name in ("visual_module", "text_module") if name in overrides}
    mapper_fields = [f.name for f in dataclasses.fields(MaPPERConfig) if f.name not in _MAPPER_ONLY]
    unknown = sorted(set(overrides) - set(mapper_fields))
    if unknown:
        raise ConfigError(
            f"petl-{method}-{size} overrides {unknown}: expected PETLConfig fields {petl_fields}, MaPPERConfig fields "
            f"{mapper_fields} or visual_module / text_module"
        )
    base = tiny_config(show=False) if size == "tiny" else {}
    fields = {name: value for name, value in base.items() if name not in _MAPPER_ONLY}
    return PETLBaseline(petl, MaPPERConfig(**{**fields, **overrides}), **modules)


def _register(method: str, size: str) -> None:
    @register(f"petl-{method}-{size}")
    def build(**overrides) -> PETLBaseline:
        return build_petl(method, size, **overrides)

    build.__doc__ = f"The {method} PETL baseline on MaPPER-{size}'s frozen backbones and fusion."


for _method in PETL_METHODS:
    for _size in _WIDTHS:
        _register(_method, _size)
