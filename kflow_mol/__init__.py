"""Molecular assembly with K-Flow: CIF -> 17-molecule clusters, rigid spectral K-path, equivariant model."""
import kflow  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads)
