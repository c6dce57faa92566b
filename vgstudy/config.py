"""Run parameters: frozen dataclasses, validated once at the boundary (a notebook's parameters cell, the CLI).

A notebook's first code cell (tagged `parameters`) assigns plain values; papermill may inject others after it, as
strings when they come from the command line or YAML (`1e-4` is a string to YAML). The next cell calls

    params = vgstudy.config.load(locals(), DataParams)

which coerces each value to its declared type, checks ranges, choices and paths, rejects names the schema does not
know (a typo must not be ignored silently), and raises one `ConfigError` that lists every bad parameter.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vgstudy.errors import ConfigError

# Names IPython puts in a notebook's namespace; never parameters.
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}
_PLAIN_TYPES = (bool, int, float, str, type(None), list, tuple, dict, Path)


def param(
    default: Any,
    doc: str,
    *,
    low: float | None = None,
    high: float | None = None,
    exists: bool = False,
    choices: typing.Callable[[], typing.Iterable[str]] | None = None,
) -> Any:
    """A dataclass field with its documentation and checks.

    low/high: inclusive numeric range; exists: a path that must exist (when not None);
    choices: a callable giving the allowed values (evaluated at validation time, so registries can grow).
    """
    return field(default=default, metadata={"doc": doc, "low": low, "high": high, "exists": exists, "choices": choices})


def _data_sets() -> list[str]:
    from vgstudy.data.refer import DATASETS  # local import: config must stay importable without torch work

    return sorted(DATASETS)


@dataclass(frozen=True)
class RunParams:
    """Parameters every notebook has."""

    profile: Literal["tiny", "study", "paper"] = param("tiny", "size of the run: tiny (CPU, minutes), study, paper")
    seed: int = param(0, "seed of every random draw (data, initialisation, order)", low=0, high=2**63 - 1)
    device: str = param("cpu", "cpu, cuda, cuda:N, or auto (cuda when available)")
    out_dir: Path = param(Path("../runs"), "where results, checkpoints and the model cache go (relative to notebooks/)")
    run_id: str | None = param(
        None,
        "run folder under out_dir/<notebook>/ (default: a UTC timestamp; the runner: a hash of the parameters)",
    )

    def problems(self) -> list[str]:
        """Checks across parameters (one parameter's own checks are in its field); messages, empty when fine."""
        return []


@dataclass(frozen=True)
class DataParams(RunParams):
    """Parameters of a notebook that reads a data set (SynthRef by default, or real split files)."""

    dataset: str = param(
        "synthref",
        "synthref (built in) or a real data set: unc, unc+, gref, gref_umd, referit, flickr",
        choices=_data_sets,
    )
    data_root: Path | None = param(None, "folder with <dataset>/<dataset>_<split>.pth (real data only)", exists=True)
    image_root: Path | None = param(None, "folder with the data set's images (real data only)", exists=True)
    image_size: int = param(128, "side of the square model input, pixels", low=32, high=2048)
    n_train: int = param(2000, "SynthRef training samples", low=1)
    n_eval: int = param(500, "SynthRef samples per evaluation split", low=1)
    object_scale: float = param(
        1.0, "SynthRef object size multiplier (1: targets ~4 % of the image; larger is easier to box)", low=0.5, high=2
    )

    def problems(self) -> list[str]:
        out = super().problems()
        if self.dataset != "synthref":
            for name in ("data_root", "image_root"):
                if getattr(self, name) is None:
                    out.append(f"{name}: required for the real data set {self.dataset!r}")
        return out


BACKBONE_VARIANTS = ("random", "unimodal", "clip")


@dataclass(frozen=True)
class BackbonesParams(DataParams):
    """Notebook 01: TransVG trained from random, unimodal-pretrained and CLIP backbones."""

    n_train: int = param(640, "SynthRef training samples", low=1)
    n_eval: int = param(100, "SynthRef samples per evaluation split", low=1)
    variants: str = param("random,unimodal,clip", "comma-separated backbone variants: random, unimodal, clip")
    epochs: int = param(1, "training epochs of each TransVG", low=1)
    batch_size: int = param(32, "training batch size", low=1)
    lr: float = param(5e-4, "learning rate of the fusion and head (the release: 1e-4)", low=0)
    backbone_lr_scale: float = param(0.1, "backbone learning rate / lr when not frozen (the release: 0.1)", low=0)
    freeze_backbones: bool = param(True, "freeze both backbones (tiny: only the fusion trains)")
    remember_backbones: bool = param(
        True,
        "train without augmentation and remember the frozen backbones' outputs (each input runs through them once); "
        "needs freeze_backbones",
    )
    detr_weights: Path | None = param(
        None, "paper: local DETR-R50 checkpoint for the unimodal visual branch", exists=True
    )
    bert_weights: Path | None = param(None, "paper: local BERT-base folder for the unimodal text branch", exists=True)
    clip_weights: Path | None = param(None, "paper: local open_clip ViT-B-16 weights for the clip variant", exists=True)

    def variant_list(self) -> tuple[str, ...]:
        return tuple(v.strip() for v in self.variants.split(",") if v.strip())

    def problems(self) -> list[str]:
        out = super().problems()
        if self.remember_backbones and not self.freeze_backbones:
            out.append(
                "remember_backbones: true needs freeze_backbones: true (backbones that train change their outputs); "
                "set remember_backbones: false"
            )
        unknown = [v for v in self.variant_list() if v not in BACKBONE_VARIANTS]
        if unknown or not self.variant_list():
            out.append(f"variants: {self.variants!r}: expected a comma-separated subset of {BACKBONE_VARIANTS}")
        if self.profile == "paper":
            # Only the weights the chosen variants load: random and unimodal read BERT, unimodal DETR, clip CLIP.
            needed = {
                "random": ("bert_weights",),
                "unimodal": ("detr_weights", "bert_weights"),
                "clip": ("clip_weights",),
            }
            for name in dict.fromkeys(n for v in self.variant_list() for n in needed.get(v, ())):
                if getattr(self, name) is None:
                    out.append(f"{name}: required by the paper profile's variants (no downloads: a local file)")
        return out


def _describe_type(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any) -> Any:
    """Convert `value` to `tp` or raise ValueError with what was expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(" or ".join(errors))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ValueError(f"one of {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, list | tuple):
            raise ValueError(f"a list of {_describe_type(item_tp)}")
        return tuple(_coerce(v, item_tp) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise ValueError("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError("an integer (not a bool)")
        if isinstance(value, int):
            return value
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise ValueError("an integer") from None
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            return int(number)
        raise ValueError("an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError("a number (not a bool)")
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())  # YAML reads 1e-4 as the string "1e-4"
            except ValueError:
                raise ValueError("a number") from None
        else:
            raise ValueError("a number")
        if not math.isfinite(number):
            raise ValueError("a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ValueError("a string")
        return value
    if tp is Path:
        if not isinstance(value, str | Path) or str(value).strip() == "" or "\x00" in str(value):
            raise ValueError("a path (non-empty, no NUL character)")
        return Path(value).expanduser()
    raise ValueError(f"a {_describe_type(tp)}")


def _check(name: str, value: Any, meta: dict) -> str | None:
    """The range / choice / existence checks of one coerced value; a message or None."""
    if value is None:
        return None
    low, high = meta.get("low"), meta.get("high")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if low is not None and value < low:
            return f"must be >= {low}"
        if high is not None and value > high:
            return f"must be <= {high}"
    if meta.get("choices") is not None:
        allowed = list(meta["choices"]())
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), allowed, n=1)
            return f"unknown value {value!r}; known: {', '.join(allowed)}" + (
                f" (did you mean {hint[0]!r}?)" if hint else ""
            )
    if meta.get("exists") and isinstance(value, Path) and not value.exists():
        return f"path does not exist: {value}"
    return None


def _check_device(device: str) -> str | None:
    import torch

    if device == "auto":
        return None
    try:
        dev = torch.device(device)
    except RuntimeError:
        return "expected cpu, cuda, cuda:N or auto"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return "CUDA was asked for but this machine has no CUDA device (use device='cpu' or 'auto')"
    if dev.type not in ("cpu", "cuda", "mps"):
        return f"unsupported device type {dev.type!r}"
    return None


def validate(values: typing.Mapping[str, Any], schema: type[RunParams] = RunParams) -> RunParams:
    """Coerce and check `values` against `schema`; one ConfigError listing every problem, or the params object."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    problems: list[str] = []
    coerced: dict[str, Any] = {}
    for name, value in values.items():
        if name not in fields:
            hint = difflib.get_close_matches(name, list(fields), n=1)
            problems.append(
                f"{name}: unknown parameter"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; {schema.__name__} knows: {', '.join(fields)}"
            )
            continue
        tp = hints[name]
        try:
            coerced[name] = _coerce(value, tp)
        except ValueError as e:
            problems.append(f"{name}: expected {e}, got {value!r} ({type(value).__name__})")
            continue
        message = _check(name, coerced[name], fields[name].metadata)
        if message:
            problems.append(f"{name}: {message}")
    if "device" in coerced and (message := _check_device(coerced["device"])):
        problems.append(f"device: {message}")
    if not problems:
        params = schema(**coerced)
        problems = params.problems()
    if problems:
        raise ConfigError(f"{len(problems)} bad parameter(s) for {schema.__name__}:\n  - " + "\n  - ".join(problems))
    return params


def load(namespace: typing.Mapping[str, Any], schema: type[RunParams] = RunParams) -> RunParams:
    """Validate the parameters a notebook cell defined (`load(locals(), Schema)`).

    Every public plain value in `namespace` (numbers, strings, bools, None, lists, dicts, paths) is taken as a
    parameter; modules, functions, classes and IPython's own names are not.
    """
    values = {
        name: value
        for name, value in namespace.items()
        if not name.startswith("_") and name not in _IPYTHON_NAMES and isinstance(value, _PLAIN_TYPES)
    }
    return validate(values, schema)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available else 'cpu'; other values unchanged."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def describe_params(schema: type[RunParams]) -> list[dict[str, str]]:
    """(name, type, default, meaning) of each parameter: the README's parameter tables are made from this."""
    hints = typing.get_type_hints(schema)
    return [
        {
            "name": f.name,
            "type": _describe_type(hints[f.name]),
            "default": repr(f.default),
            "doc": f.metadata.get("doc", ""),
        }
        for f in dataclasses.fields(schema)
    ]


def as_dict(params: RunParams) -> dict[str, Any]:
    """JSON-friendly dict of a params object (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(params).items()}


@dataclass(frozen=True)
class MaPPERParams(DataParams):
    """Notebook 03: MaPPER against full fine-tuning and generic PETL on frozen DINOv2 + BERT, and its ablations."""

    n_train: int = param(128, "SynthRef training samples", low=1)
    n_eval: int = param(40, "SynthRef samples per evaluation split", low=1)
    variants: str = param(
        "full,adapter,lora,adaptformer,frozen,dypa,loca,pgt,mapper,no-prior,release",
        "comma-separated runs, or all: full, adapter, lora, adaptformer (Figure 1's baselines), frozen, dypa, loca, "
        "pgt (each module alone), mapper, no-prior, release (MaPPER at the release's fidelity)",
    )
    n_seeds: int = param(1, "training seeds per variant: seed, seed + 1, ... (the data stay those of seed)", low=1)
    epochs: int = param(1, "training epochs of each variant (the release: 90; 180 on RefCOCO+)", low=1)
    batch_size: int = param(16, "training batch size per process (the release: 32 on each of 8 GPUs)", low=1)
    lr: float = param(5e-4, "learning rate of PGT, the projections, the fusion and the head (the release: 1e-4)", low=0)
    backbone_lr_scale: float = param(
        0.1, "learning rate inside the backbones (adapters, LoRA, fine-tuned weights) / lr (the release: 0.1)", low=0
    )
    schedule: Literal["cosine", "step"] = param(
        "cosine", "learning-rate schedule: cosine, or step (x 0.1 after lr_drop epochs, the release's)"
    )
    lr_drop: int = param(60, "step schedule: epochs before the learning rate drops x 0.1 (the release: 60)", low=1)
    warmup_steps: int = param(2, "linear warm-up optimiser steps (the release: none)", low=0)
    max_len: int = param(20, "expression tokens for BERT and the prior (the release: 20; 40 on RefCOCOg)", low=3)
    visual_backbone: str = param(
        "dinov2:vit_base_patch14_dinov2",
        "paper: the DINOv2 to build (the release trains from the reg4 weights: dinov2:vit_base_patch14_reg4_dinov2)",
    )
    visual_weights: Path | None = param(None, "paper: local DINOv2 ViT-B/14 weights file", exists=True)
    text_weights: Path | None = param(None, "paper: local BERT-base folder", exists=True)
    prior_weights: Path | None = param(None, "paper: local OpenAI CLIP ViT-B/16 weights (the prior)", exists=True)

    def variant_list(self) -> tuple[str, ...]:
        from vgstudy.mapper_study import parse_variants  # local import: config stays light

        return parse_variants(self.variants)

    def seeds(self) -> tuple[int, ...]:
        return tuple(range(self.seed, self.seed + self.n_seeds))

    def problems(self) -> list[str]:
        out = super().problems()
        try:
            chosen = self.variant_list()
        except ConfigError as error:
            out.append(f"variants: {error}")
            chosen = ()
        if self.lr <= 0:
            out.append(f"lr: must be > 0, got {self.lr}")
        if self.schedule == "step" and self.lr_drop > self.epochs:
            out.append(f"lr_drop: {self.lr_drop} epochs, but a run has epochs={self.epochs}; expected <= epochs")
        if "release" in chosen and self.max_len != 20:
            out.append(
                f"variants: 'release' needs max_len=20 (got {self.max_len}): the release's prior has a fixed 20-token "
                "causal mask, so it cannot run other lengths (RefCOCOg's 40 included); leave 'release' out"
            )
        if not self.visual_backbone.startswith("dinov2:"):
            out.append(f"visual_backbone: {self.visual_backbone!r}: expected a DINOv2 backbone name (dinov2:...)")
        if self.profile == "paper":
            for name in ("visual_weights", "text_weights", "prior_weights"):
                if getattr(self, name) is None:
                    out.append(f"{name}: required by the paper profile (no downloads: a local file)")
        return out


@dataclass(frozen=True)
class HiVGParams(DataParams):
    """Notebook 02: HiVG trained through its warm-up and HiLoRA stages, and the paper's ablations re-run beside it."""

    n_train: int = param(96, "SynthRef training samples", low=1)
    n_eval: int = param(100, "SynthRef samples per evaluation split", low=1)
    model_name: Literal["hivg-tiny", "hivg-b", "hivg-l"] = param(
        "hivg-tiny", "hivg-tiny (tiny/study: on the zoo's clip-tiny), hivg-b or hivg-l (paper: CLIP from clip_weights)"
    )
    stage_epochs: tuple[int, ...] = param(
        (1, 1, 1, 1), "epochs of the warm-up and of HiLoRA stages 1-3 (the release: 60, 20, 20, 20)"
    )
    stage_lrs: tuple[float, ...] = param(
        (1e-3, 5e-4, 2.5e-4, 1.25e-4), "learning rate of each stage (the release: 2.5e-4, 1e-4, 5e-5, 2.5e-5)"
    )
    batch_size: int = param(16, "training batch size per process (the release: 80, then 60, 60, 40 per GPU)", low=1)
    warmup_steps: int = param(0, "linear learning-rate warm-up at the start of each stage, optimiser steps", low=0)
    text_layout: Literal["fixed", "official"] = param(
        "fixed", "the bridge's text layout: fixed (paper) or official (the release's batch mis-pairing)"
    )
    hilora_merge: bool = param(
        True, "merge each stage's LoRA and train a fresh one (paper), or train one adapter throughout (release)"
    )
    ablations: str = param(
        "bridge-none,frozen",
        "comma-separated ablations re-run beside the reference, 'all' or 'none' (see vgstudy.hivg_study.ABLATIONS)",
    )
    n_seeds: int = param(1, "training seeds per run: seed, seed + 1, ... (the data stay seed's)", low=1, high=100)
    backbone_lr_scale: float = param(0.1, "full-finetune ablation: CLIP's learning rate / the stage's", low=0)
    clip_weights: Path | None = param(
        None, "paper: local weights of the model's CLIP (open_clip or OpenAI file, e.g. ViT-B-16.pt)", exists=True
    )

    def ablation_list(self) -> tuple[str, ...]:
        from vgstudy.hivg_study import ablation_names  # local import: config stays light

        return ablation_names(self.ablations)

    def seeds(self) -> tuple[int, ...]:
        return tuple(range(self.seed, self.seed + self.n_seeds))

    def problems(self) -> list[str]:
        from vgstudy.models.hilora import HILORA_SCHEDULE

        out = super().problems()
        try:
            chosen = self.ablation_list()
        except ConfigError as error:
            out.append(f"ablations: {error}")
            chosen = ()
        stages = len(HILORA_SCHEDULE)
        for name in ("stage_epochs", "stage_lrs"):
            if len(getattr(self, name)) != stages:
                out.append(f"{name}: {getattr(self, name)}: expected {stages} values (warm-up, HiLoRA stages 1-3)")
        if any(epochs < 1 for epochs in self.stage_epochs):
            out.append(f"stage_epochs: {self.stage_epochs}: expected integers >= 1")
        if any(lr <= 0 for lr in self.stage_lrs):
            out.append(f"stage_lrs: {self.stage_lrs}: expected numbers > 0")
        if "no-merge" in chosen and not self.hilora_merge:
            out.append("ablations: 'no-merge' compares with a merging reference; expected hilora_merge=True")
        if "official-layout" in chosen and self.text_layout == "official":
            out.append("ablations: 'official-layout' compares with the fixed layout; expected text_layout='fixed'")
        if self.profile == "paper":
            if self.model_name == "hivg-tiny":
                out.append("model_name: the paper profile trains hivg-b or hivg-l on a real CLIP")
            if self.clip_weights is None:
                out.append("clip_weights: required by the paper profile (no downloads: a local file)")
        elif self.model_name != "hivg-tiny":
            out.append(f"model_name: {self.model_name!r} needs real CLIP weights: profile='paper' (else hivg-tiny)")
        return out


# The weights each method reads in the paper profile (notebook 05).
_COMPARISON_WEIGHTS = {
    "transvg": ("detr_weights", "bert_weights"),
    "hivg": ("clip_weights",),
    "mapper": ("dinov2_weights", "bert_weights", "clip_weights"),
    "epmvg-r": ("detr_weights", "bert_weights", "clip_weights"),
}


@dataclass(frozen=True)
class ComparisonParams(DataParams):
    """Notebook 05: every method trained on the same data with the same budget, side by side with its costs."""

    n_train: int = param(128, "SynthRef training samples", low=1)
    n_eval: int = param(64, "SynthRef samples per evaluation split", low=1)
    methods: str = param("transvg,hivg,mapper,epmvg-r", "comma-separated methods: transvg, hivg, mapper, epmvg-r")
    n_seeds: int = param(1, "training seeds per method: seed, seed + 1, ... (the data stay those of seed)", low=1)
    epochs: int = param(4, "training epochs of every method (HiVG shares them among its 4 HiLoRA stages)", low=1)
    batch_size: int = param(16, "training batch size of every method", low=1)
    lr: float = param(
        5e-4, "base learning rate: each method's release rates x lr / 1e-4 (1e-4: the releases' own)", low=0
    )
    warmup_steps: int = param(2, "linear warm-up optimiser steps at the start of each training stage", low=0)
    freeze_backbones: bool = param(
        True, "freeze TransVG's and EpmVG-R's student's backbones (HiVG and MaPPER freeze theirs by design)"
    )
    measure_batch: int = param(8, "batch of the step-time, throughput, memory and FLOPs measurements", low=1)
    measure_steps: int = param(2, "timed steps per measurement, after one untimed warm-up", low=1)
    reuse_runs: bool = param(
        False, "load a finished training with the same parameters from out_dir/05_comparison/trained/ (else train)"
    )
    scene: int = param(0, "index of the first evaluation split's scene the interactive cell starts from", low=0)
    detr_weights: Path | None = param(None, "paper: local DETR-R50 checkpoint (TransVG, EpmVG-R)", exists=True)
    bert_weights: Path | None = param(None, "paper: local BERT-base folder (TransVG, MaPPER, EpmVG-R)", exists=True)
    clip_weights: Path | None = param(
        None, "paper: local OpenAI CLIP ViT-B/16 weights (HiVG, MaPPER's prior, EpmVG-R's teacher)", exists=True
    )
    dinov2_weights: Path | None = param(None, "paper: local DINOv2 ViT-B/14 weights (MaPPER)", exists=True)

    def method_list(self) -> tuple[str, ...]:
        from vgstudy.compare import parse_methods  # local import: config stays light

        return parse_methods(self.methods)

    def seeds(self) -> tuple[int, ...]:
        return tuple(range(self.seed, self.seed + self.n_seeds))

    def problems(self) -> list[str]:
        from vgstudy.compare import METHODS, min_epochs

        out = super().problems()
        try:
            chosen = self.method_list()
        except ConfigError as error:
            out.append(f"methods: {error}")
            chosen = ()
        if self.lr <= 0:
            out.append(f"lr: must be > 0, got {self.lr}")
        for key in chosen:
            if self.epochs < min_epochs(METHODS[key]):
                out.append(
                    f"epochs: {self.epochs}, but {METHODS[key].label} needs >= {min_epochs(METHODS[key])} "
                    "(one per training stage)"
                )
        if self.dataset == "synthref":
            if self.measure_batch > self.n_eval:
                out.append(f"measure_batch: {self.measure_batch} > n_eval={self.n_eval}; the batch is drawn from val")
            if self.scene >= self.n_eval:
                out.append(f"scene: {self.scene}, but a split has n_eval={self.n_eval} scenes (0 .. n_eval - 1)")
        if self.profile == "paper":
            needed = dict.fromkeys(name for key in chosen for name in _COMPARISON_WEIGHTS[key])
            for name in needed:
                if getattr(self, name) is None:
                    out.append(f"{name}: required by the paper profile's methods (no downloads: a local file)")
        return out


@dataclass(frozen=True)
class EpmVGParams(DataParams):
    """Notebook 04: EpmVG-R (reconstruction), the distillation grid A0..A9 beside TransVG (A0) and the baselines."""

    n_train: int = param(640, "SynthRef training samples", low=1)
    n_eval: int = param(100, "SynthRef samples per evaluation split (the modality gap is measured on val)", low=2)
    grid: str = param("A0,A7,A8", "comma-separated rows of the ablation grid to train, among A0..A9 (see the notebook)")
    n_seeds: int = param(1, "training seeds per grid row: seed, seed + 1, ... (the data stay those of seed)", low=1)
    weight_scales: tuple[float, ...] = param((0.25, 4.0), "A9's sweep: factors on every distillation weight of A7")
    distill_warmup: int = param(5, "optimiser steps over which the distillation weights ramp up from 0", low=0)
    epochs: int = param(1, "training epochs of each grid row", low=1)
    batch_size: int = param(32, "training batch size", low=2)
    lr: float = param(5e-4, "learning rate of the fusion, head and projections (the release: 1e-4)", low=0)
    backbone_lr_scale: float = param(0.1, "backbone learning rate / lr when not frozen (the release: 0.1)", low=0)
    freeze_backbones: bool = param(True, "freeze the student's backbones (tiny: only the fusion and projections train)")
    timing_steps: int = param(3, "training steps timed per configuration for the cost of distillation", low=1)
    teacher: str = param(
        "clip:ViT-B-16", "paper: the teacher CLIP's open_clip name (OpenAI's weights file: clip:ViT-B-16-quickgelu)"
    )
    detr_weights: Path | None = param(None, "paper: local DETR-R50 checkpoint (student, unimodal teacher)", exists=True)
    bert_weights: Path | None = param(None, "paper: local BERT-base folder (student, unimodal teacher)", exists=True)
    clip_weights: Path | None = param(None, "paper: local weights of the teacher CLIP", exists=True)

    def seeds(self) -> tuple[int, ...]:
        return tuple(range(self.seed, self.seed + self.n_seeds))

    def problems(self) -> list[str]:
        from vgstudy.epmvg_study import grid_runs  # local import: config must stay importable without torch work

        out = super().problems()
        try:
            grid_runs(self.grid, self.weight_scales)
        except ConfigError as e:
            out.append(f"grid / weight_scales: {e}")
        if not self.teacher.startswith("clip:"):
            out.append(f"teacher: {self.teacher!r}: expected a CLIP, clip:<open_clip name>")
        if self.profile == "paper":
            for name in ("detr_weights", "bert_weights", "clip_weights"):
                if getattr(self, name) is None:
                    out.append(f"{name}: required by the paper profile (no downloads: a local file)")
        return out
