"""Sampling controls: noise splitting, class drop, restoration, CDR and PNG grids."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kflow.schedule import BandSchedule
from kflow_image.codecs import make_codec
from kflow_image.dit import DiT
from kflow_image.sampling import (
    cdr,
    class_drop_grid,
    class_drop_labels,
    degrade,
    guidance_grid,
    make_grid,
    noise_split_grid,
    psnr,
    restoration_hook,
    restore,
    save_grid,
    split_noise,
)
from kflow_image.task import ImageFlowTask, band_mask, build_transform

SHAPE = (2, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(channels=2, size=8, classes=4):
    torch.manual_seed(0)
    m = DiT(in_channels=channels, input_size=size, patch_size=2, hidden_size=32, depth=1, num_heads=4,
            num_classes=classes)
    with torch.no_grad():  # leave the zero init so the output depends on the inputs
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("name", ["fourier", "wavelet"])
def test_split_noise_shares_exactly_the_chosen_bands(name):
    t = build_transform(name, SHAPE).double()
    x_0, mask = split_noise(t, 5, SHAPE, kappa_min=0.5, kappa_max=1.0, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(0))
    c = t(x_0)
    m = mask.expand_as(c).bool()
    assert m.any() and (~m).any()
    shared, own = c[:, m[0]], c[:, ~m[0]]
    torch.testing.assert_close(shared, shared[:1].expand_as(shared), atol=1e-12, rtol=0)
    # elsewhere every pair of samples differs on every coefficient
    assert (own[0] - own[1]).abs().min() > 0


def test_class_drop_labels_switch_at_k_drop():
    y = torch.tensor([3, 1, 2])
    assert class_drop_labels(y, torch.full((3,), 0.29), 0.3, 10).tolist() == [3, 1, 2]
    assert class_drop_labels(y, torch.full((3,), 0.30), 0.3, 10).tolist() == [10, 10, 10]
    assert class_drop_labels(y, torch.tensor([0.1, 0.5, 0.2]), 0.3, 10).tolist() == [3, 10, 2]


class Recorder(torch.nn.Module):
    """Records (k, labels) of every call; predicts zeros."""

    def __init__(self, null):
        super().__init__()
        self.null, self.calls = null, []
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_k, k, y=None):
        y = torch.full((len(x_k),), self.null) if y is None else y
        self.calls.append((float(k[0]), y.tolist()))
        return torch.zeros_like(x_k)

    def forward_with_cfg(self, x_k, k, y, s):
        return self.forward(x_k, k, y)


def test_sampler_drops_the_class_after_the_chosen_fraction():
    task = ImageFlowTask(build_transform("fourier", SHAPE), BandSchedule(0.5), num_classes=4)
    rec = Recorder(4)
    task.sample(rec, y=torch.tensor([0, 2]), x_0=torch.randn(2, *SHAPE), steps=10, class_drop_at=0.3,
                cfg_scale=2.0)
    assert len(rec.calls) == 10
    for k, labels in rec.calls:
        assert labels == ([0, 2] if k < 0.3 else [4, 4]), (k, labels)


@pytest.mark.parametrize("name", ["fourier", "wavelet"])
def test_restoration_keeps_the_observed_coarse_bands(name):
    task = ImageFlowTask(build_transform(name, SHAPE), BandSchedule(0.5), num_classes=4)
    model = _model()
    obs = torch.randn(3, *SHAPE)
    x_0 = torch.randn(3, *SHAPE)
    hook = restoration_hook(task, x_0, obs, kappa_max=0.4)
    out = task.sample(model, y=torch.tensor([0, 1, 2]), x_0=x_0, steps=6, hook=hook).x_1
    mask = band_mask(task.transform, 0.0, 0.4).expand(3, *SHAPE).bool()
    c_out, c_obs = task.transform(out), task.transform(obs)
    torch.testing.assert_close(c_out[mask], c_obs[mask], atol=1e-5, rtol=0)
    assert (c_out[~mask] - c_obs[~mask]).abs().mean() > 0.1  # the fine bands are generated


def test_restore_end_to_end_with_pixel_codec():
    codec = make_codec("identity", channels=1)
    task = ImageFlowTask(build_transform("fourier", (1, 16, 16)), BandSchedule(0.5), num_classes=4)
    model = _model(channels=1, size=16)
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 1, 16, 16, generator=g)
    low = degrade(clean, "downsample", factor=4)
    images, lat = restore(task, model, codec, low, y=torch.tensor([0, 1]), kappa_max=0.2, steps=5, generator=g)
    assert images.shape == clean.shape and images.min() >= 0 and images.max() <= 1
    mask = band_mask(task.transform, 0.0, 0.2).expand_as(lat).bool()
    torch.testing.assert_close(task.transform(lat)[mask], task.transform(codec.encode(low))[mask],
                               atol=1e-5, rtol=0)


def test_degrade_and_psnr():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    for kind in ("downsample", "blur"):
        d = degrade(x, kind)
        assert d.shape == x.shape and 0 <= d.min() and d.max() <= 1
        assert (psnr(d, x) < 40).all()
    assert (psnr(x, x) > 100).all()
    with pytest.raises(ValueError, match="divisible"):
        degrade(x, "downsample", factor=3)
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(x, "jpeg")


def test_cdr_definition():
    out = cdr({0: 10.0, 1: 20.0}, {0: 15.0, 1: 20.0})
    assert out["cdr"] == pytest.approx(1.25) and out["per_class"] == {0: 1.5, 1: 1.0}
    assert cdr([2.0], [4.0])["cdr"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        cdr({0: 1.0}, {1: 1.0})


def test_grids_are_written_as_png(tmp_path):
    imgs = torch.rand(5, 3, 8, 10)
    arr = make_grid(imgs, nrow=3, pad=2)
    assert arr.shape == (2 * 10 + 2, 3 * 12 + 2, 3) and arr.dtype == np.uint8
    p = save_grid(torch.rand(4, 1, 8, 8), tmp_path / "g.png", nrow=2, scale=2)
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (2 * (2 * 10 + 2), 2 * (2 * 10 + 2))
    codec = make_codec("identity", channels=1)
    task = ImageFlowTask(build_transform("wavelet", (1, 8, 8)), BandSchedule(0.5), num_classes=4)
    model = _model(channels=1)
    assert guidance_grid(task, model, codec, tmp_path / "cfg.png", classes=[0, 1], scales=(1.0, 3.0),
                         n_per=1, steps=2).is_file()
    assert class_drop_grid(task, model, codec, tmp_path / "drop.png", classes=[0, 1], n_per=1, steps=2).is_file()
    assert noise_split_grid(task, model, codec, tmp_path / "split.png", kappa_min=0.5, n=3, rows=2,
                            steps=2).is_file()


def test_exact_step_with_estimated_source_is_a_convex_step_towards_the_prediction():
    """The division by 1 - mu in the source re-estimation cancels in the exact increment.

    ``c' = c_k + (mu' - mu) / (1 - mu) * (c1_hat - c_k)`` with ``0 <= (mu' - mu)/(1 - mu) <= 1``: no coefficient
    moves past the prediction, however close to revealed it is (Euler with the same source does overshoot).
    """
    from kflow.path import KPath
    from kflow.schedule import BandSchedule
    from kflow.transforms import FourierTransform

    torch.manual_seed(0)
    t = FourierTransform((1, 8, 8))
    path = KPath(t, BandSchedule(0.3, "smoothstep"))
    x_k, x1_hat, x_0 = torch.randn(3, 4, 1, 8, 8).unbind(0)
    for k, k_next in [(0.2, 0.25), (0.69, 0.7), (0.95, 0.999), (0.5, 1.0)]:
        kb, kn = torch.full((4,), k), torch.full((4,), k_next)
        src = path.estimate_source(x_k, x1_hat, kb, x_0)
        step = path.increment(src, x1_hat, kb, kn)
        mu, _ = path.weights(kb, x_k)
        mu2, _ = path.weights(kn, x_k)
        safe = (1 - mu) > 1e-4
        r = torch.where(safe, (mu2 - mu) / (1 - mu).clamp_min(1e-4), torch.zeros_like(mu))
        assert float(r.min()) >= 0 and float(r.max()) <= 1 + 1e-6
        expect = t.inverse(torch.where(safe, r * (t(x1_hat) - t(x_k)), (mu2 - mu) * (t(x1_hat) - t(x_0))))
        assert torch.allclose(step, expect, atol=1e-5)
        if k_next == 1.0:  # the last step lands on the prediction on every not-yet-revealed coefficient
            out = t(x_k + step)
            assert torch.allclose(out[safe.expand_as(out)], t(x1_hat)[safe.expand_as(out)], atol=1e-5)


def test_restoration_bands_are_the_task_transform_or_fourier_for_identity():
    from kflow.transforms import FourierTransform
    from kflow_image.sampling import restoration_bands

    kf = ImageFlowTask(build_transform("fourier", SHAPE), BandSchedule(0.5), num_classes=4)
    assert restoration_bands(kf) is kf.transform
    base = ImageFlowTask(build_transform("identity", SHAPE), BandSchedule(1.0), num_classes=4)
    bt = restoration_bands(base, SHAPE)
    assert isinstance(bt, FourierTransform) and bt.event_shape == SHAPE


def test_baseline_restoration_pins_fourier_bands_on_the_straight_path():
    from kflow.transforms import FourierTransform

    task = ImageFlowTask(build_transform("identity", SHAPE), BandSchedule(1.0), num_classes=4)
    model, obs, x_0 = _model(), torch.randn(3, *SHAPE), torch.randn(3, *SHAPE)
    out = task.sample(model, y=torch.tensor([0, 1, 2]), x_0=x_0, steps=6,
                      hook=restoration_hook(task, x_0, obs, kappa_max=0.4)).x_1
    f = FourierTransform(SHAPE)
    mask = band_mask(f, 0.0, 0.4).expand(3, *SHAPE).bool()
    c_out, c_obs = f(out), f(obs)
    torch.testing.assert_close(c_out[mask], c_obs[mask], atol=1e-5, rtol=0)
    assert (c_out[~mask] - c_obs[~mask]).abs().mean() > 0.1  # not simply the observation


class Oracle(torch.nn.Module):
    """Predicts a fixed endpoint; records the k of every call."""

    def __init__(self, target):
        super().__init__()
        self.target, self.ks = target, []
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_k, k, y=None):
        self.ks.append(float(k[0]))
        return self.target.to(x_k)


@pytest.mark.parametrize("name", ["identity", "fourier"])
def test_sdedit_starts_at_k_start_and_lands_on_a_perfect_prediction(name):
    from kflow.solver import SolverConfig
    from kflow_image.sampling import sdedit

    codec = make_codec("identity", channels=1)
    shape = (1, 16, 16)
    window = 1.0 if name == "identity" else 0.4
    task = ImageFlowTask(build_transform(name, shape), BandSchedule(window), num_classes=4)
    g = torch.Generator().manual_seed(0)
    obs = torch.rand(2, *shape, generator=g)
    truth = codec.encode(torch.rand(2, *shape, generator=g))
    oracle = Oracle(truth)
    img, lat = sdedit(task, oracle, codec, obs, k_start=0.6, generator=g, solver=SolverConfig(steps=10))
    assert len(oracle.ks) == 4 and abs(oracle.ks[0] - 0.6) < 1e-6  # 10 steps over [0, 1] -> 4 over [0.6, 1]
    # coefficients not yet fully revealed at k_start land on the prediction; those already revealed (K-Flow's
    # coarse bands) keep the observation's value
    mu, _ = task.path.weights(torch.full((2,), 0.6), obs)
    done = (1 - mu).expand_as(lat) <= 1e-4
    assert done.any() == (name == "fourier") and (~done).any()
    t = task.transform
    torch.testing.assert_close(t(lat)[~done], t(truth)[~done], atol=1e-5, rtol=0)
    torch.testing.assert_close(t(lat)[done], t(codec.encode(obs))[done], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="k_start"):
        sdedit(task, oracle, codec, obs, k_start=1.0)
