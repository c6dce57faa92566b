"""The error types vgstudy raises for bad input.

Each message names *what* was wrong (file, index, parameter) and *what was expected*, so a user can fix the input
without reading a traceback into torch.
"""


class VGStudyError(Exception):
    """Base class of every error vgstudy raises on purpose."""


class ConfigError(VGStudyError, ValueError):
    """A parameter has the wrong type, is out of range, or names something unknown."""


class DataError(VGStudyError, ValueError):
    """A data file, image, box or expression cannot be used as it is."""


class CheckpointError(VGStudyError):
    """A checkpoint is missing, corrupt, unsafe, or does not fit the model."""
