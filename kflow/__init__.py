"""K-Flow core: K-amplitude transforms, band schedules, the path, the solver and the training loop.

No hydra, no molecules, no images: both applications build on these pieces. The names below are imported
on first use, so ``import kflow`` (and with it the CLIs' ``--help`` and argument errors) does not load torch.
"""
import importlib as _importlib
import os as _os

# torch's OpenMP threads busy-wait by default; on small or shared CPU machines that makes the many tiny ops
# of rigid-body models 10-50x slower. Only takes effect if set before torch is first imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_EXPORTS = {
    "KPath": "path", "PathSample": "path",
    "BandSchedule": "schedule", "KappaWarp": "schedule", "make_grid": "schedule",
    "Solution": "solver", "solve": "solver",
    "KTransform": "transforms", "IdentityTransform": "transforms", "FourierTransform": "transforms",
    "WaveletTransform": "transforms", "PCATransform": "transforms", "GraphSpectralTransform": "transforms",
}  # fmt: skip

__all__ = ["KPath", "PathSample", "BandSchedule", "KappaWarp", "make_grid", "solve", "Solution", "KTransform",
           "IdentityTransform", "FourierTransform", "WaveletTransform", "PCATransform", "GraphSpectralTransform"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(_importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'kflow' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
