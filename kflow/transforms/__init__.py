"""K-amplitude transforms: orthonormal maps with a scale ``kappa`` per coefficient."""
from .base import KTransform
from .fourier import FourierTransform, radial_frequency
from .graph import GraphSpectralTransform, gaussian_weights
from .identity import IdentityTransform
from .pca import PCATransform
from .wavelet import WaveletTransform

__all__ = ["KTransform", "IdentityTransform", "FourierTransform", "WaveletTransform", "PCATransform",
           "GraphSpectralTransform", "gaussian_weights", "radial_frequency"]
