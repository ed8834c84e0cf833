"""Codecs: the map between images in ``[0, 1]`` and the space the flow runs in.

A :class:`Codec` has ``encode(images) -> latents`` and ``decode(latents) -> images``. Latents are
standardised per channel with statistics fitted on the training set (``fit_stats``); the statistics are
buffers, so they travel with any ``state_dict`` that contains the codec. The frozen network weights of a
pretrained codec ship with the package and are left out of the ``state_dict`` (checkpoints stay small).

Typical use::

    codec = make_codec("taef2")
    z_raw = codec.encode_raw(train_images)      # (N, 32, H/8, W/8)
    codec.fit_stats(z_raw)                      # training set only
    z = codec.standardize(z_raw)                # what the flow model sees
    images = codec.decode(z_generated)          # (N, 3, H, W) in [0, 1]
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from kflow_image import taef2

_RANGE_TOL = 1e-3


class Codec(nn.Module):
    """Base class: images ``(B, C, H, W)`` in ``[0, 1]`` <-> latents ``(B, C_lat, H/f, W/f)``.

    Subclasses implement ``encode_raw``, ``decode_raw`` and set ``image_channels``, ``latent_channels``
    and ``downscale`` (``f``). The base class owns the per-channel standardisation.

    Args:
        latent_channels: number of latent channels.
        standardize: apply the fitted per-channel statistics in ``encode`` / ``decode``.
    """

    name: str = "codec"
    image_channels: int = 3
    latent_channels: int = 3
    downscale: int = 1

    def __init__(self, latent_channels: int, standardize: bool = True) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.use_stats = standardize
        self.register_buffer("latent_mean", torch.zeros(1, latent_channels, 1, 1))
        self.register_buffer("latent_std", torch.ones(1, latent_channels, 1, 1))
        self.register_buffer("stats_fitted", torch.tensor(False))

    # --- to implement -------------------------------------------------------------------------------
    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> unstandardised latents (B, C_lat, H/f, W/f)."""
        raise NotImplementedError

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Unstandardised latents (B, C_lat, h, w) -> images (B, image_channels, f*h, f*w) in [0, 1]."""
        raise NotImplementedError

    def identity(self) -> str:
        """A string that changes whenever the raw latents of the same images would change (cache key)."""
        return f"{self.name}:c{self.image_channels}"

    # --- shared -------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> standardised latents (B, C_lat, H/f, W/f)."""
        return self.standardize(self.encode_raw(images))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Standardised latents (B, C_lat, h, w) -> images (B, image_channels, f*h, f*w) in [0, 1]."""
        return self.decode_raw(self.unstandardize(latents))

    def standardize(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents -> per-channel zero mean / unit std (identity until ``fit_stats`` ran)."""
        self._check_latents(latents)
        if not self.use_stats:
            return latents
        return (latents - self.latent_mean) / self.latent_std

    def unstandardize(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`standardize`."""
        self._check_latents(latents)
        if not self.use_stats:
            return latents
        return latents * self.latent_std + self.latent_mean

    @torch.no_grad()
    def fit_stats(self, latents: torch.Tensor, eps: float = 1e-6) -> None:
        """Fit the per-channel mean / std on *raw* training latents ``(N, C_lat, h, w)`` (from ``encode_raw``)."""
        self._check_latents(latents)
        x = latents.detach().to(torch.float64).transpose(0, 1).reshape(self.latent_channels, -1)
        if x.shape[1] < 2:
            raise ValueError("fit_stats needs at least two latent values per channel")
        mean, std = x.mean(1), x.std(1).clamp_min(eps)
        self.latent_mean.copy_(mean.view(1, -1, 1, 1).to(self.latent_mean))
        self.latent_std.copy_(std.view(1, -1, 1, 1).to(self.latent_std))
        self.stats_fitted.fill_(True)

    def latent_shape(self, image_shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        """Latent shape for an image shape ``(H, W)``, ``(C, H, W)`` or ``(B, C, H, W)``.

        Returns ``(C_lat, h, w)`` (or ``(B, C_lat, h, w)`` for a 4-D input).
        """
        shape = tuple(int(s) for s in image_shape)
        if len(shape) not in (2, 3, 4):
            raise ValueError(f"image shape must be (H, W), (C, H, W) or (B, C, H, W), got {shape}")
        h, w = shape[-2:]
        self._check_size(h, w)
        lat = (self.latent_channels, h // self.downscale, w // self.downscale)
        return (shape[0], *lat) if len(shape) == 4 else lat

    # --- validation ---------------------------------------------------------------------------------
    def _check_size(self, h: int, w: int) -> None:
        f = self.downscale
        if h % f or w % f or h < f or w < f:
            raise ValueError(
                f"{self.name} codec: image size {h}x{w} is not a positive multiple of {f}; "
                f"resize or crop the images to a multiple of {f} (e.g. {max(f, h - h % f)}x{max(f, w - w % f)})"
            )

    def _check_images(self, images: torch.Tensor, allowed_channels: tuple[int, ...]) -> None:
        if not torch.is_tensor(images) or images.ndim != 4:
            raise ValueError(
                f"{self.name} codec: expected images of shape (B, C, H, W), got "
                f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}"
            )
        if images.shape[1] not in allowed_channels:
            raise ValueError(
                f"{self.name} codec: images have {images.shape[1]} channels, expected one of {allowed_channels}"
            )
        self._check_size(*images.shape[-2:])
        if not images.is_floating_point():
            raise ValueError(f"{self.name} codec: images must be float in [0, 1], got dtype {images.dtype}")
        if images.numel():
            lo, hi = float(images.min()), float(images.max())
            if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
                raise ValueError(
                    f"{self.name} codec: images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
                    "(images in [-1, 1] or [0, 255] must be rescaled first)"
                )

    def _check_latents(self, latents: torch.Tensor) -> None:
        if not torch.is_tensor(latents) or latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(
                f"{self.name} codec: expected latents (B, {self.latent_channels}, h, w), got {got}"
            )

    def extra_repr(self) -> str:
        return (
            f"image_channels={self.image_channels}, latent_channels={self.latent_channels}, "
            f"downscale={self.downscale}, standardize={self.use_stats}, fitted={bool(self.stats_fitted)}"
        )


class IdentityCodec(Codec):
    """Pixel space: ``[0, 1] -> [-1, 1]`` and back (``decode`` clamps to ``[0, 1]``).

    Args:
        channels: image channels, 1 or 3.
        standardize: also standardise per channel with fitted statistics (off by default: ``[-1, 1]`` pixels
            are already well scaled).
    """

    name = "identity"

    def __init__(self, channels: int = 3, standardize: bool = False) -> None:
        if channels not in (1, 3):
            raise ValueError(f"identity codec: channels must be 1 or 3, got {channels}")
        super().__init__(channels, standardize=standardize)
        self.image_channels = channels

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images, (self.image_channels,))
        return images * 2 - 1

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        return ((latents + 1) / 2).clamp(0, 1)


def _file_digest(paths: list[Path]) -> str:
    h = hashlib.sha1()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


class TAEF2Codec(Codec):
    """TAEF2 latent space: 32 channels at 1/8 resolution (32x8x8 latents for 64 px images).

    Grayscale inputs are repeated to 3 channels; with ``image_channels=1`` the decoder output is averaged
    back to one channel. The encoder/decoder are frozen and not part of the ``state_dict`` (only the
    latent statistics are); they are loaded from the shipped weights.

    Args:
        image_channels: channels of the images this codec decodes to (1 or 3); encode accepts 1 or 3.
        standardize: use the fitted per-channel statistics.
        encoder_path: alternative encoder weights (default: shipped ``weights/taef2_encoder.pth``).
        decoder_path: alternative decoder weights.
    """

    name = "taef2"
    downscale = taef2.DOWNSCALE

    def __init__(
        self,
        image_channels: int = 3,
        standardize: bool = True,
        encoder_path: str | Path | None = None,
        decoder_path: str | Path | None = None,
    ) -> None:
        if image_channels not in (1, 3):
            raise ValueError(f"taef2 codec: image_channels must be 1 or 3, got {image_channels}")
        super().__init__(taef2.LATENT_CHANNELS, standardize=standardize)
        self.image_channels = image_channels
        self._paths = [
            Path(encoder_path) if encoder_path else taef2.WEIGHTS_DIR / "taef2_encoder.pth",
            Path(decoder_path) if decoder_path else taef2.WEIGHTS_DIR / "taef2_decoder.pth",
        ]
        self.encoder = taef2.load_encoder(self._paths[0])
        self.decoder = taef2.load_decoder(self._paths[1])
        self._digest: str | None = None
        # frozen, shipped weights: keep them out of checkpoints, accept checkpoints without them
        self.register_state_dict_post_hook(_drop_net_keys)
        self.register_load_state_dict_pre_hook(_fill_net_keys)

    def train(self, mode: bool = True) -> TAEF2Codec:
        super().train(mode)
        self.encoder.eval()  # frozen networks stay in eval mode
        self.decoder.eval()
        return self

    def identity(self) -> str:
        if self._digest is None:
            self._digest = _file_digest(self._paths)
        return f"{self.name}:c{self.image_channels}:{self._digest}"

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images, (1, 3))
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.encoder(images)

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        images = self.decoder(latents).clamp(0, 1)
        if self.image_channels == 1:
            images = images.mean(1, keepdim=True)
        return images


_NETS = ("encoder.", "decoder.")


def _drop_net_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(tuple(prefix + n for n in _NETS))]:
        del state_dict[key]


def _fill_net_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for net in ("encoder", "decoder"):
        for name, tensor in getattr(module, net).state_dict().items():
            state_dict.setdefault(f"{prefix}{net}.{name}", tensor)


CODECS: dict[str, Callable[..., Codec]] = {"identity": IdentityCodec, "taef2": TAEF2Codec}


def make_codec(name: str, **kwargs) -> Codec:
    """Build a codec by name (``identity``, ``taef2``); ``kwargs`` go to its constructor."""
    try:
        factory = CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; available: {sorted(CODECS)}") from None
    return factory(**kwargs)
