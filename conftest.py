"""Test-wide settings, for the unit tests and for nbval's runs of the notebooks (their kernels inherit them)."""

import os

# Quiet progress bars, no hub access, stable hashing in kernels.
for key, value in {
    "TQDM_DISABLE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONHASHSEED": "0",
}.items():
    os.environ.setdefault(key, value)
