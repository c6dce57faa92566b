"""vgstudy: a reproducible study of visual grounding (HiVG, MaPPER, EpmVG-R) with TransVG as the baseline.

The notebooks import this thin library; everything a notebook runs that is more than a few lines lives here.
"""

from vgstudy import config
from vgstudy.errors import CheckpointError, ConfigError, DataError, VGStudyError
from vgstudy.notebook import show_source
from vgstudy.seeding import seed_everything

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "VGStudyError",
    "__version__",
    "config",
    "seed_everything",
    "show_source",
]
