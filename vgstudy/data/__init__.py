"""Data: the SynthRef synthetic data set, the real split files, grounding-aware transforms and tokenisers.

Names are imported on first use, so `import vgstudy.data.sample` stays light (no tokeniser or torchvision set-up).
"""

import importlib

_EXPORTS = {
    "Sample": "vgstudy.data.sample",
    "SynthRef": "vgstudy.data.synthref",
    "DATASETS": "vgstudy.data.refer",
    "load_split": "vgstudy.data.refer",
    "GroundingTransform": "vgstudy.data.transforms",
    "TransformConfig": "vgstudy.data.transforms",
    "TransformedDataset": "vgstudy.data.transforms",
    "RememberedItems": "vgstudy.data.transforms",
    "collate": "vgstudy.data.transforms",
    "TokenBatch": "vgstudy.data.tokenizers",
    "build_tokenizer": "vgstudy.data.tokenizers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vgstudy.data' has no attribute {name!r}")
