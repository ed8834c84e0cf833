"""K-Flow core: K-amplitude transforms, band schedules, the path, the solver and the training loop.

No hydra, no molecules, no images: both applications build on these pieces.
"""
from .path import KPath, PathSample
from .schedule import BandSchedule, KappaWarp, make_grid
from .solver import Solution, solve
from .transforms import (FourierTransform, GraphSpectralTransform, IdentityTransform, KTransform, PCATransform,
                         WaveletTransform)

__version__ = "0.1.0"

__all__ = ["KPath", "PathSample", "BandSchedule", "KappaWarp", "make_grid", "solve", "Solution", "KTransform",
           "IdentityTransform", "FourierTransform", "WaveletTransform", "PCATransform", "GraphSpectralTransform"]
