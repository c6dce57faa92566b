"""Models: backbones by name, the shared grounding head and output type, and the methods, built by name.

Names are imported on first use, so `vgstudy.models.base` does not pull in open_clip, timm and transformers.
"""

import importlib

_EXPORTS = {
    "BACKBONES": "vgstudy.models.backbones",
    "build_backbone": "vgstudy.models.backbones",
    "Output": "vgstudy.models.base",
    "describe": "vgstudy.models.base",
    "GroundingHead": "vgstudy.models.head",
    "build": "vgstudy.models.registry",
    "model_names": "vgstudy.models.registry",
    "register": "vgstudy.models.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vgstudy.models' has no attribute {name!r}")
