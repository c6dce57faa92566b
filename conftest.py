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

# Property-based tests: a few deterministic examples by default (`make test`), many with VGSTUDY_FUZZ=long
# (`make test-long`).
from hypothesis import settings

settings.register_profile("fast", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("long", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("VGSTUDY_FUZZ", "fast"))
