"""TAEF2: a tiny distilled autoencoder for the FLUX.2 VAE latent space, rebuilt in plain PyTorch.

The architecture is reconstructed from the shipped state-dict key listing (the integer prefixes of the
keys are ``nn.Sequential`` positions). Weights: ``kflow_image/weights/taef2_{encoder,decoder}.pth``
(fp16 state dicts, MIT licence, see ``weights/LICENSE``), converted to float32 on load.

Images are in ``[0, 1]``; latents have 32 channels at 1/8 of the image resolution.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
LATENT_CHANNELS = 32
DOWNSCALE = 8
_WIDTH = 64


def _conv(n_in: int, n_out: int, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp ``tanh(x / 3) * 3``: keeps out-of-range latents from blowing up the decoder."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block ``ReLU(conv-ReLU-conv-ReLU-conv(x) + x)``, optionally with a mid-block term.

    The mid-block term (``pool``) is added to the input first: ``x + (1x1 conv -> GroupNorm(4) -> ReLU ->
    1x1 conv)(x)``. GroupNorm normalises over the whole feature map, which gives the block global context.

    Args:
        channels: feature width (64 for TAEF2).
        mid: whether this block carries the mid-block term.
    """

    def __init__(self, channels: int = _WIDTH, mid: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(channels, channels),
            nn.ReLU(),
            _conv(channels, channels),
            nn.ReLU(),
            _conv(channels, channels),
        )
        self.pool = (
            nn.Sequential(
                nn.Conv2d(channels, 4 * channels, 1, bias=False),
                nn.GroupNorm(4, 4 * channels),
                nn.ReLU(),
                nn.Conv2d(4 * channels, channels, 1, bias=False),
            )
            if mid
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + x)


def build_encoder() -> nn.Sequential:
    """TAEF2 encoder: (B, 3, H, W) in [0, 1] -> (B, 32, H/8, W/8)."""
    w = _WIDTH
    return nn.Sequential(
        _conv(3, w),
        Block(w),
        _conv(w, w, bias=False, stride=2),
        Block(w), Block(w), Block(w),
        _conv(w, w, bias=False, stride=2),
        Block(w), Block(w), Block(w),
        _conv(w, w, bias=False, stride=2),
        Block(w, mid=True), Block(w, mid=True), Block(w, mid=True),
        _conv(w, LATENT_CHANNELS),
    )  # fmt: skip


def build_decoder() -> nn.Sequential:
    """TAEF2 decoder: (B, 32, h, w) -> (B, 3, 8h, 8w), approximately in [0, 1] (not clamped)."""
    w = _WIDTH
    return nn.Sequential(
        Clamp(),
        _conv(LATENT_CHANNELS, w),
        nn.ReLU(),
        Block(w, mid=True), Block(w, mid=True), Block(w, mid=True),
        nn.Upsample(scale_factor=2), _conv(w, w, bias=False),
        Block(w), Block(w), Block(w),
        nn.Upsample(scale_factor=2), _conv(w, w, bias=False),
        Block(w), Block(w), Block(w),
        nn.Upsample(scale_factor=2), _conv(w, w, bias=False),
        Block(w),
        _conv(w, 3),
    )  # fmt: skip


def _load(build, path: Path) -> nn.Module:
    if not path.is_file():
        raise FileNotFoundError(f"TAEF2 weights not found: {path} (they ship in kflow_image/weights/)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / truncated file, git-lfs pointer, ...
        raise RuntimeError(f"cannot read TAEF2 weights {path}: {exc}") from exc
    state = {k: v.float() for k, v in state.items()}
    with torch.device("meta"):  # skip the random initialisation: every tensor comes from the file
        module = build()
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise RuntimeError(f"TAEF2 weights {path} do not match the architecture: {exc}") from exc
    return module.float().eval().requires_grad_(False)


def load_encoder(path: str | Path | None = None) -> nn.Sequential:
    """Encoder with the shipped (or given) weights, float32, eval mode, frozen."""
    return _load(build_encoder, Path(path) if path else WEIGHTS_DIR / "taef2_encoder.pth")


def load_decoder(path: str | Path | None = None) -> nn.Sequential:
    """Decoder with the shipped (or given) weights, float32, eval mode, frozen."""
    return _load(build_decoder, Path(path) if path else WEIGHTS_DIR / "taef2_decoder.pth")
