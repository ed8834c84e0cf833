"""K-Flow core: K-amplitude transforms, band schedules, the path, the solver and the training loop.

No hydra, no molecules, no images: both applications build on these pieces.
"""
import os as _os

# torch's OpenMP threads busy-wait by default; on small or shared CPU machines that makes the many tiny ops
# of rigid-body models 10-50x slower. Only takes effect if set before torch is first imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .path import KPath, PathSample
from .schedule import BandSchedule, KappaWarp, make_grid
from .solver import Solution, solve
from .transforms import (FourierTransform, GraphSpectralTransform, IdentityTransform, KTransform, PCATransform,
                         WaveletTransform)

__version__ = "0.1.0"

__all__ = ["KPath", "PathSample", "BandSchedule", "KappaWarp", "make_grid", "solve", "Solution", "KTransform",
           "IdentityTransform", "FourierTransform", "WaveletTransform", "PCATransform", "GraphSpectralTransform"]
