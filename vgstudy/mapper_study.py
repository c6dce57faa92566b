"""What notebook 03 measures about MaPPER beyond training it: the ablation grid, memory, and the components at work.

- `VARIANTS`: the runs of the paper's Figure 1 (full fine-tuning, Adapter, LoRA, AdaptFormer, MaPPER) and of its
  ablations (frozen backbones, +DyPA, +LoCA, +PGT one at a time, MaPPER without the prior, the release's fidelity),
  each built by `build_variant` for the tiny configs (zoo backbones) or the full-size ones (weights from local files).
- `training_memory`: a training run's memory, measured: weights, gradients and AdamW state from the parameters, plus
  the tensors autograd keeps for the backward pass, counted as they are saved (`TrainingMemory`).
- `token_influence`, `dypa_token_scales`, `prior_pointing`: LoCA's local receptive field, DyPA's per-token scales
  and how well the prior points at the referred object in CLIP's image features, each measured on real tensors.
- `seed_summary`, `accuracy_margin`, `compare`: mean and spread over seeds and a verdict that needs a difference
  larger than the noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vgstudy.errors import ConfigError
from vgstudy.models.mapper import BertLayerWithParallelAdapter, MaPPER
from vgstudy.models.registry import build

# --- The grid -------------------------------------------------------------------------------------------------------

_NOTHING_TUNED = {"use_loca": False, "use_dypa": False, "use_pgt": False, "use_prior": False}


@dataclass(frozen=True)
class Variant:
    """One run of the grid: a registered model family ("mapper" or "petl-<method>") with overrides.

    label: what it is, in a few words (printed in the tables). figure1: the row of the paper's Figure 1 it repeats.
    """

    name: str
    family: str
    label: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    figure1: str | None = None

    @property
    def uses_prior(self) -> bool:
        return self.family == "mapper" and self.overrides.get("use_prior", True)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("full", "petl-full", "full fine-tuning of both backbones", figure1="full fine-tuning"),
        Variant("adapter", "petl-adapter", "Houlsby adapters in every block", figure1="Adapter"),
        Variant("lora", "petl-lora", "LoRA on the attention projections (peft)", figure1="LoRA"),
        Variant("adaptformer", "petl-adaptformer", "AdaptFormer beside every FFN", figure1="AdaptFormer"),
        Variant("frozen", "mapper", "frozen backbones, no module inside", _NOTHING_TUNED),
        Variant(
            "dypa", "mapper", "+DyPA only (with the prior)", {**_NOTHING_TUNED, "use_dypa": True, "use_prior": True}
        ),
        Variant("loca", "mapper", "+LoCA only", {**_NOTHING_TUNED, "use_loca": True}),
        Variant("pgt", "mapper", "+PGT only (with the prior)", {**_NOTHING_TUNED, "use_pgt": True, "use_prior": True}),
        Variant("mapper", "mapper", "MaPPER: LoCA + DyPA + PGT", figure1="MaPPER"),
        Variant("no-prior", "mapper", "LoCA + DyPA with scale 1, no PGT", {"use_pgt": False, "use_prior": False}),
        Variant("release", "mapper", "MaPPER as the release runs it", {"fidelity": "release"}),
    )
}
FIGURE1 = ("full", "adapter", "lora", "adaptformer", "mapper")
COMPONENTS = ("frozen", "dypa", "loca", "pgt", "mapper")


def parse_variants(text: str) -> tuple[str, ...]:
    """ "mapper, lora" -> ("mapper", "lora"); "all" -> every variant. ConfigError naming what is unknown."""
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if names == ("all",):
        return tuple(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ConfigError(
            f"{text!r}: unknown {unknown or 'empty list'}; expected 'all' or a comma-separated subset of "
            f"{list(VARIANTS)}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"{text!r}: a variant is named twice")
    return names


def build_variant(
    name: str,
    size: str,
    *,
    visual_module: nn.Module | None = None,
    prior_module: nn.Module | None = None,
    **overrides,
) -> nn.Module:
    """The variant's model at `size` ("tiny": `mapper-tiny` / `petl-<method>-tiny`; "b": the full-size ones).

    visual_module / prior_module: already-built backbones (the zoo's); the prior goes only to variants that use it.
    overrides: model fields for every variant (weights paths, max_len, image size...); prior options are dropped for
    the PETL baselines, which have no prior.
    """
    variant = _checked(name, size)
    options = dict(overrides)
    if visual_module is not None:
        options["visual_module"] = visual_module
    if not variant.uses_prior:
        options = {k: v for k, v in options.items() if not k.startswith("prior")}
    elif prior_module is not None:
        options["prior_module"] = prior_module
    return build(f"{variant.family}-{size}", **{**options, **variant.overrides})


def model_card(name: str, size: str, **overrides) -> tuple[str, dict]:
    """(registered name, overrides) that rebuild the variant's architecture, for the run's model card (`predict`).

    Built modules and weight files are left out: the checkpoint holds every weight, the zoo's backbones included.
    """
    variant = _checked(name, size)
    kept = {
        k: v
        for k, v in overrides.items()
        if not k.endswith(("_module", "_weights")) and (variant.uses_prior or not k.startswith("prior"))
    }
    return f"{variant.family}-{size}", {**kept, **variant.overrides}


def _checked(name: str, size: str) -> Variant:
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; expected one of {list(VARIANTS)}")
    if size not in ("tiny", "b"):
        raise ConfigError(f"variant size {size!r}: expected 'tiny' or 'b'")
    return VARIANTS[name]


# --- Counts and memory ----------------------------------------------------------------------------------------------


def tunable_backbone_parameters(model: nn.Module) -> int:
    """Tunable parameters as MaPPER's Figure 1 counts them: inside the backbones (adapters, LoRA, fine-tuned weights)
    and MaPPER's PGT; the projections, the fusion and the head are not counted."""
    return model.tunable_count().tunable


def state_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes a training run holds for the parameters: "weights" (all, frozen too) and "optimiser" (the gradient and
    AdamW's two moments of each trainable parameter, in the parameter's dtype)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"weights": weights, "optimiser": 3 * trainable}


class TrainingMemory:
    """Counts the bytes of the tensors autograd saves for backward, per forward pass of `model`; the largest pass
    is `peak_saved_bytes`. Use as a context manager around training.

    Each saved tensor's storage counts once per pass (views share it); the model's parameters are not counted (they
    are in `state_bytes`). Nothing is copied: the hooks hand the tensors back unchanged. When the model runs on CUDA
    (it may be moved there inside the block, as the Trainer does), the allocator's peak from the first pass on is
    recorded too (`torch.cuda.max_memory_allocated`).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.peak_saved_bytes = 0
        self.passes = 0
        self.cuda_peak_bytes: int | None = None
        self._pass: dict[int, int] = {}
        self._pass_bytes = 0
        self._parameters: set[int] = set()
        self._hooks = None
        self._handle = None
        self._cuda: torch.device | None = None

    def __enter__(self) -> TrainingMemory:
        self._handle = self.model.register_forward_pre_hook(self._new_pass)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._handle.remove()
        if self._cuda is not None:
            self.cuda_peak_bytes = torch.cuda.max_memory_allocated(self._cuda)

    def _new_pass(self, module, args) -> None:
        self._pass, self._pass_bytes = {}, 0
        parameters = list(self.model.parameters())
        self._parameters = {p.untyped_storage().data_ptr() for p in parameters}  # where they are now
        if self.passes == 0 and parameters and parameters[0].is_cuda:
            self._cuda = parameters[0].device
            torch.cuda.reset_peak_memory_stats(self._cuda)
        self.passes += 1

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout == torch.strided and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in self._parameters and key not in self._pass:
                self._pass[key] = storage.nbytes()
                self._pass_bytes += storage.nbytes()
                self.peak_saved_bytes = max(self.peak_saved_bytes, self._pass_bytes)
        return tensor


def training_memory(model: nn.Module, meter: TrainingMemory) -> dict[str, float]:
    """MiB: weights, optimiser (gradients + AdamW moments), activations (the peak saved for backward), their total,
    and on CUDA the allocator's measured peak."""
    mib = 2**20
    state = state_bytes(model)
    out = {
        "weights": state["weights"] / mib,
        "optimiser": state["optimiser"] / mib,
        "activations": meter.peak_saved_bytes / mib,
    }
    out["total"] = out["weights"] + out["optimiser"] + out["activations"]
    if meter.cuda_peak_bytes is not None:
        out["cuda_peak"] = meter.cuda_peak_bytes / mib
    return out


# --- The components at work -----------------------------------------------------------------------------------------


@torch.no_grad()
def token_influence(
    module: nn.Module, grid_hw: tuple[int, int], width: int, cell: tuple[int, int], prefix: int = 1, seed: int = 0
) -> torch.Tensor:
    """(h, w) how much each grid token's output moves when one input token (`cell`) changes: |f(x') - f(x)| summed
    over channels, for a token module f (B, prefix + h * w, width) -> same shape, e.g. a LoCA or a bottleneck
    adapter. A token-wise module moves one cell; LoCA's 3x3 convolution moves a 3x3 neighbourhood."""
    h, w = grid_hw
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, prefix + h * w, width, generator=generator)
    changed = x.clone()
    changed[0, prefix + cell[0] * w + cell[1]] += 1.0
    was_training = module.training
    module.eval()
    moved = (module(changed) - module(x)).abs().sum(-1)[0, prefix:]  # (h * w,)
    module.train(was_training)
    return moved.reshape(h, w)


@dataclass(frozen=True)
class TokenScales:
    """DyPA's scales for one expression: BERT's tokens and, position by position, the prior's (CLIP's) tokens and
    each DyPA layer's scale s = ReLU(Linear(LN(prior)))."""

    text: str
    bert_tokens: tuple[str, ...]
    prior_tokens: tuple[str, ...]
    scales: dict[str, tuple[float, ...]]


def _token_strings(tokenizer, ids: torch.Tensor, mask: torch.Tensor) -> tuple[str, ...]:
    ids = ids[mask].tolist()
    words = [tokenizer.decode([i]) for i in ids[1:-1]]
    return ("<start>", *words, "<end>")


@torch.no_grad()
def dypa_token_scales(model: MaPPER, texts: Sequence[str]) -> list[TokenScales]:
    """Per expression, the scale each DyPA layer gives each real BERT token (the prior at the same position)."""
    if model.prior is None or not any(isinstance(b, BertLayerWithParallelAdapter) for b in model.text.blocks):
        raise ConfigError("dypa_token_scales: the model has no DyPA with a prior (use_dypa and use_prior)")
    texts = list(texts)
    batch = model.text.tokenize(texts)
    prior = model.prior_features(texts, batch)  # (B, L, P)
    prior_batch = batch if model.deviations.bert_ids_for_prior else model.prior.tokenize(texts)
    layers = {
        f"layer {i}": block.adapter.token_scale(prior)[..., 0]  # (B, L)
        for i, block in enumerate(model.text.blocks)
        if isinstance(block, BertLayerWithParallelAdapter)
    }
    out = []
    for k, text in enumerate(texts):
        mask = batch.mask[k]
        prior_tokenizer = model.text.tokenizer if model.deviations.bert_ids_for_prior else model.prior.tokenizer
        out.append(
            TokenScales(
                text=text,
                bert_tokens=_token_strings(model.text.tokenizer, batch.ids[k], mask),
                prior_tokens=_token_strings(prior_tokenizer, prior_batch.ids[k], prior_batch.mask[k]),
                scales={name: tuple(values[k][mask].tolist()) for name, values in layers.items()},
            )
        )
    return out


def cells_inside(boxes_xyxy: torch.Tensor, grid_hw: tuple[int, int], image_size: int) -> torch.Tensor:
    """(B, h * w) bool: whether each grid cell's centre lies inside the image's box (boxes (B, 4) in pixels of the
    S x S input, cells in row-major order like the patches)."""
    h, w = grid_hw
    ys = (torch.arange(h) + 0.5) * image_size / h
    xs = (torch.arange(w) + 0.5) * image_size / w
    cy, cx = (grid.flatten() for grid in torch.meshgrid(ys, xs, indexing="ij"))  # (h * w,) each
    x1, y1, x2, y2 = (boxes_xyxy[:, k, None] for k in range(4))  # (B, 1) each
    return (cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)


@torch.no_grad()
def prior_end_features(model: MaPPER, texts: Sequence[str]) -> torch.Tensor:
    """(B, P) the model's prior at each expression's end token: CLIP's end-of-text feature, where CLIP pools its text
    embedding (with BERT's ids, as the release feeds them, the [SEP] position)."""
    if model.prior is None:
        raise ConfigError("prior_end_features: the model has no prior (use_prior=False)")
    texts = list(texts)
    batch = model.text.tokenize(texts)
    prior = model.prior_features(texts, batch)  # (B, L, P)
    mask = batch.mask if model.deviations.bert_ids_for_prior else model.prior.tokenize(texts).mask
    return prior[torch.arange(len(texts)), mask.long().sum(1) - 1]


def prior_pointing(model: MaPPER, patches: torch.Tensor, texts: Sequence[str], inside: torch.Tensor) -> dict:
    """How well the prior points at the referred object: the share (%) of expressions whose best-matching patch
    (cosine between CLIP's patch embeddings `patches` (B, N, P) and the prior's end feature) lies on the object
    (`inside` (B, N) bool, see `cells_inside`), and the chance of a random patch doing so."""
    text = F.normalize(prior_end_features(model, texts), dim=-1)  # (B, P)
    best = torch.einsum("bnp,bp->bn", F.normalize(patches, dim=-1), text).argmax(dim=1)  # (B,)
    hits = inside[torch.arange(len(texts)), best]
    return {"accuracy": 100.0 * hits.float().mean().item(), "chance": 100.0 * inside.float().mean().item()}


# --- Seeds, noise, verdicts -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """An accuracy over seeds: mean, sample standard deviation (0 for one seed), seeds, evaluation samples."""

    mean: float
    std: float
    seeds: int
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.1f}" if self.seeds == 1 else f"{self.mean:.1f} ± {self.std:.1f}"


def seed_summary(values: Iterable[float], n: int) -> Summary:
    """Mean and spread of one accuracy (%) measured with several seeds on the same `n` evaluation samples."""
    values = list(values)
    if not values:
        raise ConfigError("seed_summary: no value")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Summary(statistics.fmean(values), std, len(values), n)


def binomial_se(acc: float, n: int) -> float:
    """One standard error (percentage points) of an accuracy `acc` (%) on n samples, kept off 0 and 100."""
    p = min(max(acc / 100, 1 / n), 1 - 1 / n)
    return 100 * math.sqrt(p * (1 - p) / n)


def accuracy_margin(a: Summary, b: Summary) -> float:
    """Two standard errors of the difference a - b: each accuracy's evaluation noise (binomial) and, over seeds,
    the standard error of each mean."""
    variance = sum(binomial_se(s.mean, s.n) ** 2 + s.std**2 / s.seeds for s in (a, b))
    return 2 * math.sqrt(variance)


def compare(a: Summary, b: Summary) -> str:
    """ "holds" when a beats b by more than the margin, "contradicted" when b beats a by more, else "within noise"."""
    difference, margin = a.mean - b.mean, accuracy_margin(a, b)
    if difference > margin:
        return "holds"
    if -difference > margin:
        return "contradicted"
    return "within noise"


def compare_to_level(a: Summary, level: float) -> str:
    """`compare` against a fixed level (e.g. a chance rate computed exactly): only a's noise counts."""
    difference, margin = a.mean - level, 2 * math.sqrt(binomial_se(a.mean, a.n) ** 2 + a.std**2 / a.seeds)
    if difference > margin:
        return "holds"
    if -difference > margin:
        return "contradicted"
    return "within noise"


def summaries(runs: Mapping[str, Sequence[Mapping]], splits: Sequence[str]) -> dict[str, dict[str, Summary]]:
    """{variant: [results per seed]} (Trainer results dicts) -> {variant: {split: Summary of acc50}}."""
    out = {}
    for variant, per_seed in runs.items():
        out[variant] = {
            split: seed_summary((r["metrics"][split]["acc50"] for r in per_seed), per_seed[0]["metrics"][split]["n"])
            for split in splits
        }
    return out
