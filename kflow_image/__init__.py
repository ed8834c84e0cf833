"""Latent image generation with K-Flow: codecs, datasets, DiT, sampling controls, FID."""
import kflow  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads)
