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
    detr_weights: Path | None = param(
        None, "paper: local DETR-R50 checkpoint for the unimodal visual branch", exists=True
    )
    bert_weights: Path | None = param(None, "paper: local BERT-base folder for the unimodal text branch", exists=True)
    clip_weights: Path | None = param(None, "paper: local open_clip ViT-B-16 weights for the clip variant", exists=True)

    def variant_list(self) -> tuple[str, ...]:
        return tuple(v.strip() for v in self.variants.split(",") if v.strip())

    def problems(self) -> list[str]:
        out = super().problems()
        unknown = [v for v in self.variant_list() if v not in BACKBONE_VARIANTS]
        if unknown or not self.variant_list():
            out.append(f"variants: {self.variants!r}: expected a comma-separated subset of {BACKBONE_VARIANTS}")
        if self.profile == "paper":
            for name in ("detr_weights", "bert_weights", "clip_weights"):
                if getattr(self, name) is None:
                    out.append(f"{name}: required by the paper profile (no downloads: a local file)")
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
