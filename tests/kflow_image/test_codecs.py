"""Codecs: identity and TAEF2 (shipped weights) — shapes, reconstruction quality, standardisation."""

from __future__ import annotations

import copy
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from kflow_image import taef2
from kflow_image.codecs import Codec, IdentityCodec, TAEF2Codec, make_codec
from kflow_image.data import MNISTDataset
from kflow_image.metrics import psnr

# measured on the shipped MNIST test set (every 50th image, n=200): mean PSNR 30.5 dB at 64 px
# (32x8x8 latents), 24.4 dB at 32 px (32x4x4 latents); floors below leave about 2 dB of margin
MNIST_PSNR_FLOOR = {64: 28.5, 32: 22.5}
# measured on Tiny-ImageNet val (500 images, 64 px): mean 22.3 dB; shared/README says ~22 dB
TINY_IMAGENET_PSNR_FLOOR = 20.5


@pytest.fixture(scope="module")
def codec() -> TAEF2Codec:
    return make_codec("taef2")


def _mnist_batch(resolution: int, n: int = 8) -> torch.Tensor:
    ds = MNISTDataset(resolution=resolution)
    return torch.stack([ds[i][0] for i in range(0, 10_000, 10_000 // n)][:n])


# ---------------------------------------------------------------------------------------------- identity
def test_identity_codec_round_trip_and_range():
    for c in (1, 3):
        codec = make_codec("identity", channels=c)
        x = torch.rand(4, c, 8, 8)
        z = codec.encode(x)
        assert z.min() >= -1 and z.max() <= 1 and z.shape == x.shape
        torch.testing.assert_close(z, x * 2 - 1)
        torch.testing.assert_close(codec.decode(z), x)
        assert codec.latent_shape((c, 8, 8)) == (c, 8, 8)
    with pytest.raises(ValueError, match="3 channels, expected one of \\(1,\\)"):
        IdentityCodec(channels=1).encode(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        IdentityCodec(channels=2)


def test_make_codec_unknown_name():
    with pytest.raises(ValueError, match="unknown codec 'vqgan'.*identity.*taef2"):
        make_codec("vqgan")


# ------------------------------------------------------------------------------------------------- TAEF2
def test_taef2_weights_load_strictly_as_float32(codec):
    enc_keys = set(taef2.build_encoder().state_dict())
    state = torch.load(taef2.WEIGHTS_DIR / "taef2_encoder.pth", weights_only=True)
    assert set(state) == enc_keys and all(v.dtype == torch.float16 for v in state.values())
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in codec.parameters())
    n_params = sum(p.numel() for p in codec.encoder.parameters())
    assert 1.2e6 < n_params < 1.5e6  # 1.34 M per network (shared/README)


def test_taef2_shapes_and_errors(codec):
    assert isinstance(codec, Codec)
    assert codec.latent_shape((3, 64, 64)) == (32, 8, 8)
    assert codec.latent_shape((5, 1, 32, 64)) == (5, 32, 4, 8)
    x = torch.rand(2, 3, 64, 64)
    z = codec.encode(x)
    assert z.shape == (2, 32, 8, 8)
    assert codec.decode(z).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="60x64 is not a positive multiple of 8"):
        codec.encode(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match="not a positive multiple of 8"):
        codec.latent_shape((3, 36, 36))
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        codec.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    with pytest.raises(ValueError, match="expected latents \\(B, 32, h, w\\)"):
        codec.decode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="\\(B, C, H, W\\)"):
        codec.encode(torch.rand(3, 64, 64))


@pytest.mark.parametrize("resolution", [64, 32])
def test_taef2_reconstructs_mnist(codec, resolution):
    x = _mnist_batch(resolution)  # (8, 1, r, r): grayscale is repeated to RGB
    with torch.no_grad():
        y = codec.decode(codec.encode(x))
    assert y.shape == (len(x), 3, resolution, resolution)
    value = psnr(x.expand(-1, 3, -1, -1), y).mean().item()
    assert value > MNIST_PSNR_FLOOR[resolution], f"PSNR {value:.2f} dB at {resolution}px"
    # a destroyed latent must not reconstruct: the test can fail
    with torch.no_grad():
        y_bad = codec.decode(torch.zeros(4, 32, resolution // 8, resolution // 8))
    assert psnr(x[:4].expand(-1, 3, -1, -1), y_bad).mean().item() < value - 8


def test_taef2_grayscale_codec_decodes_one_channel():
    codec = TAEF2Codec(image_channels=1)
    x = _mnist_batch(32, n=4)
    with torch.no_grad():
        y = codec.decode(codec.encode(x))
    assert y.shape == (4, 1, 32, 32)
    assert psnr(x, y).mean() > MNIST_PSNR_FLOOR[32]


def test_taef2_reconstructs_tiny_imagenet(shared_dir, codec):
    tar_path = shared_dir / "data/images/tiny-imagenet-64-10class.tar"
    if not tar_path.is_file():
        pytest.skip(f"{tar_path} not found")
    images = []
    per_class: dict[str, int] = {}
    with tarfile.open(tar_path) as tf:  # 2 val images per class, read straight from the tar
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and parts[0] == "val" and per_class.get(parts[1], 0) < 2:
                per_class[parts[1]] = per_class.get(parts[1], 0) + 1
                img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)
    x = torch.stack(images)
    assert x.shape == (20, 3, 64, 64)
    with torch.no_grad():
        z = codec.encode(x)
        y = codec.decode(z)
    assert z.shape == (20, 32, 8, 8)
    value = psnr(x, y).mean().item()
    assert value > TINY_IMAGENET_PSNR_FLOOR, f"PSNR {value:.2f} dB"


def test_standardisation_and_state_dict_round_trip(codec):
    fresh = copy.deepcopy(codec)  # cheaper than reloading the weights
    fresh.stats_fitted.fill_(False)
    x = _mnist_batch(32, n=16)  # 32 px keeps this fast: 32x4x4 latents
    with torch.no_grad():
        raw = fresh.encode_raw(x)
        assert not bool(fresh.stats_fitted)
        torch.testing.assert_close(fresh.standardize(raw), raw)  # identity until fitted
        fresh.fit_stats(raw)
        z = fresh.standardize(raw)
        torch.testing.assert_close(fresh.encode(x[:2]), z[:2], atol=1e-4, rtol=1e-4)
    per_channel = z.transpose(0, 1).reshape(32, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(32), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(32), atol=1e-4, rtol=0)
    torch.testing.assert_close(fresh.unstandardize(z), raw, atol=1e-4, rtol=1e-5)
    # decode undoes the standardisation
    with torch.no_grad():
        torch.testing.assert_close(fresh.decode(z[:2]), fresh.decode_raw(raw[:2]), atol=1e-4, rtol=0)

    # statistics travel with the state_dict; the frozen network weights do not
    sd = fresh.state_dict()
    assert set(sd) == {"latent_mean", "latent_std", "stats_fitted"}
    other = copy.deepcopy(codec)
    other.load_state_dict(sd)
    assert bool(other.stats_fitted)
    torch.testing.assert_close(other.latent_mean, fresh.latent_mean)
    torch.testing.assert_close(other.latent_std, fresh.latent_std)
    # nested inside a model, strict loading still works
    model, model2 = (
        torch.nn.ModuleDict({"codec": fresh}),
        torch.nn.ModuleDict({"codec": copy.deepcopy(codec)}),
    )
    assert set(model.state_dict()) == {"codec.latent_mean", "codec.latent_std", "codec.stats_fitted"}
    model2.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(model2["codec"].latent_std, fresh.latent_std)
    torch.testing.assert_close(model2["codec"].standardize(raw), z)


def test_taef2_architecture_matches_key_listing(shared_dir):
    listing_dir = shared_dir / "weights/taef2"
    for name, build in (("encoder", taef2.build_encoder), ("decoder", taef2.build_decoder)):
        listing = listing_dir / f"{name}_keys.txt"
        if not listing.is_file():
            pytest.skip(f"{listing} not found")
        expected = {}
        for line in listing.read_text().splitlines():
            key, shape, _dtype = line.split("\t")
            expected[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        got = {k: tuple(v.shape) for k, v in build().state_dict().items()}
        assert got == expected
