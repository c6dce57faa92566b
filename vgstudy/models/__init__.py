"""Models: the shared grounding head and output type; the methods (one module each) register themselves by name."""

from vgstudy.models.base import Output, describe
from vgstudy.models.head import GroundingHead

__all__ = ["GroundingHead", "Output", "describe"]
