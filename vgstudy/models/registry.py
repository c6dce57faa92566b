"""Models by name: `build("transvg-tiny")`. Each method module registers its configurations here."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable

from torch import nn

from vgstudy.errors import ConfigError

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
# Modules that register models when imported; `build` imports them on first use.
_METHOD_MODULES = (
    "vgstudy.models.transvg",
    "vgstudy.models.hivg",
    "vgstudy.models.mapper",
    "vgstudy.models.petl",
    "vgstudy.models.epmvg",
)


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: `@register("transvg-tiny")` on a function (**overrides) -> model."""

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _FACTORIES:
            raise ValueError(f"model name {name!r} is registered twice")
        _FACTORIES[name] = factory
        return factory

    return add


def _import_methods() -> None:
    for module in _METHOD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # a real import error inside an existing method module
                raise


def model_names() -> list[str]:
    """Every registered model name."""
    _import_methods()
    return sorted(_FACTORIES)


def build(name: str, **overrides) -> nn.Module:
    """Build a registered model; full-size names get random weights unless weight paths are passed."""
    names = model_names()
    if name not in _FACTORIES:
        hint = difflib.get_close_matches(name, names, n=1)
        raise ConfigError(
            f"unknown model {name!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; known: {', '.join(names)}"
        )
    return _FACTORIES[name](**overrides)
