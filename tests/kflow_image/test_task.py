"""Image K-Flow task: transforms, loss, and the sampler."""
from __future__ import annotations

import pytest
import torch

from kflow.schedule import BandSchedule
from kflow.transforms import FourierTransform, IdentityTransform, PCATransform, WaveletTransform
from kflow_image.dit import DiT
from kflow_image.task import ImageFlowTask, build_transform, fit_energy_warp, unpack_batch

SHAPE = (2, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _templates(n: int = 64, seed: int = 0):
    """A tiny class-conditional data set: 4 fixed latent templates plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, *SHAPE, generator=g)
    y = torch.arange(n) % 4
    return base[y] + 0.05 * torch.randn(n, *SHAPE, generator=g), y


@pytest.mark.parametrize("name,cls", [("identity", IdentityTransform), ("fourier", FourierTransform),
                                      ("wavelet", WaveletTransform), ("pca", PCATransform)])
def test_build_transform_round_trip(name, cls):
    x, _ = _templates()
    t = build_transform(name, SHAPE, fit_data=x if name == "pca" else None)
    assert isinstance(t, cls)
    z = torch.randn(3, *SHAPE, dtype=torch.float64)
    t = t.double()
    torch.testing.assert_close(t.inverse(t(z)), z, atol=1e-10, rtol=0)
    assert t.kappa.shape[0] == 1 and t.kappa.dim() == 4


def test_build_transform_errors():
    with pytest.raises(ValueError, match="fitted"):
        build_transform("pca", SHAPE)
    with pytest.raises(ValueError, match="level"):
        build_transform("wavelet", SHAPE, wave="db2", levels=3)  # 8x8 takes at most 2 db2 levels
    with pytest.raises(ValueError, match="unknown image transform"):
        build_transform("dct", SHAPE)


@pytest.mark.parametrize("transform,window,prediction", [("fourier", 0.5, "endpoint"),
                                                         ("identity", 1.0, "endpoint"),
                                                         ("wavelet", 0.5, "velocity")])
def test_loss_decreases_on_tiny_problem(transform, window, prediction):
    torch.manual_seed(0)
    x, y = _templates(32)
    task = ImageFlowTask(build_transform(transform, SHAPE), BandSchedule(window, "linear"), num_classes=4,
                         label_dropout=0.1, prediction=prediction)
    model = DiT(in_channels=2, input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=4, num_classes=4)

    def held_out() -> float:  # the same noise, k and label dropout every time
        torch.manual_seed(123)
        with torch.no_grad():
            return task.loss(model, (x, y))[0].item()

    before = held_out()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(40):
        torch.manual_seed(step)
        loss, _ = task.loss(model, (x, y))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out()
    # the velocity target keeps the unpredictable x_0 part, so its loss cannot fall as far
    assert after < (0.7 if prediction == "endpoint" else 0.9) * before, (before, after)


def test_unrevealed_weighting_and_logit_normal():
    torch.manual_seed(0)
    x, y = _templates(16)
    task = ImageFlowTask(build_transform("fourier", SHAPE), BandSchedule(0.5), num_classes=4,
                         k_sampling="logit_normal", loss_weighting="unrevealed")
    model = DiT(in_channels=2, input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=4, num_classes=4)
    loss, m = task.loss(model, (x, y))
    # the zero-initialised model predicts 0, so both losses are the data's energy (weighted differently)
    assert torch.isfinite(loss) and loss > 0 and "mse_endpoint" in m
    k = task.draw_k(10000)
    assert 0 < k.min() and k.max() < 1 and abs(k.mean().item() - 0.5) < 0.02
    with pytest.raises(ValueError):
        ImageFlowTask(IdentityTransform(3), BandSchedule(1.0), k_sampling="beta")


class Oracle(torch.nn.Module):
    """Predicts the true endpoint of the sample it was built for (nearest template by label)."""

    def __init__(self, x_1):
        super().__init__()
        self.x_1 = x_1
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_k, k, y=None):
        return self.x_1.to(x_k.dtype)


@pytest.mark.parametrize("x0_mode", ["estimate", "fixed"])
@pytest.mark.parametrize("transform,window", [("fourier", 0.3), ("wavelet", 0.5), ("identity", 1.0)])
def test_oracle_endpoint_sampler_lands_on_x1(transform, window, x0_mode):
    x, _ = _templates(5)
    x = x.double()
    task = ImageFlowTask(build_transform(transform, SHAPE).double(), BandSchedule(window, "smoothstep"),
                         num_classes=0)
    x_0 = torch.randn(5, *SHAPE, dtype=torch.float64)
    for kind in ("uniform", "band"):
        sol = task.sample(Oracle(x), x_0=x_0, steps=7, grid_kind=kind, x0_mode=x0_mode)
        torch.testing.assert_close(sol.x_1, x, atol=1e-9, rtol=0)


def test_reestimated_source_samples_the_data_and_fixed_source_averages():
    """Two-point data x_1 in {-1, +1} (per pixel), identity transform, w = 1, Bayes-optimal endpoint.

    E[x_1 | x_k] = tanh(k x_k / (1 - k)^2). Re-estimating x_0 each step (DDIM) reaches +-1; keeping the
    starting noise fixed returns an average of the predictions along k, far from the data.
    """
    class Posterior(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x_k, k, y=None):
            kk = k.reshape(-1, 1, 1, 1).to(x_k.dtype)
            return torch.tanh(x_k * kk / (1 - kk).clamp_min(1e-9) ** 2)

    task = ImageFlowTask(IdentityTransform(3).double(), BandSchedule(1.0), num_classes=0)
    x_0 = torch.randn(64, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    est = task.sample(Posterior(), x_0=x_0, steps=50, x0_mode="estimate").x_1
    fixed = task.sample(Posterior(), x_0=x_0, steps=50, x0_mode="fixed").x_1
    assert (est.abs() - 1).abs().max() < 1e-3
    assert (fixed.abs() - 1).abs().mean() > 0.2


def test_sample_shapes_guidance_and_velocity_model():
    torch.manual_seed(0)
    model = DiT(in_channels=2, input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=4, num_classes=4)
    task = ImageFlowTask(build_transform("fourier", SHAPE), BandSchedule(0.5), num_classes=4)
    y = torch.tensor([0, 1, 2])
    for method in ("exact", "euler", "heun"):
        sol = task.sample(model, y=y, steps=3, cfg_scale=2.0, method=method, class_drop_at=0.5)
        assert sol.x_1.shape == (3, *SHAPE) and torch.isfinite(sol.x_1).all()
    vtask = ImageFlowTask(build_transform("fourier", SHAPE), BandSchedule(0.5), num_classes=4,
                          prediction="velocity")
    sol = vtask.sample(model, n=2, steps=3, return_trajectory=True)
    assert sol.trajectory.shape == (4, 2, *SHAPE)
    with pytest.raises(ValueError, match="labels"):
        task.sample(model, y=torch.tensor([0, 1]), x_0=torch.randn(3, *SHAPE))


def test_energy_warp_and_unpack():
    x, y = _templates()
    t = build_transform("fourier", SHAPE)
    warp = fit_energy_warp(t, x)
    assert warp(t.kappa).shape == t.kappa.shape
    assert float(warp(torch.zeros(1))) == 0.0 and abs(float(warp(torch.ones(1))) - 1.0) < 1e-6
    assert unpack_batch((x, y))[0] is x and unpack_batch({"x": x, "y": y})[1] is y
    assert unpack_batch(x)[1] is None


def test_guidance_interval():
    """Guidance only on [k_lo, k_hi): plain conditional outside, full guidance inside, mixed per sample."""
    torch.manual_seed(0)
    model = DiT(in_channels=2, input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=4, num_classes=4)
    for p in model.parameters():  # adaLN-Zero starts at zero output: make the label matter
        torch.nn.init.normal_(p, std=0.2)
    task = ImageFlowTask(build_transform("fourier", SHAPE), BandSchedule(0.5), num_classes=4)
    x, y = torch.randn(3, *SHAPE), torch.tensor([0, 1, 2])
    fn = task.model_fn(model, y, cfg_scale=3.0, cfg_interval=(0.3, 1.0))
    with torch.no_grad():
        cond, guided = model(x, torch.full((3,), 0.1), y=y), model.forward_with_cfg(x, torch.full((3,), 0.5), y, 3.0)
        assert torch.allclose(fn(x, torch.full((3,), 0.1)), cond, atol=1e-5)
        assert torch.allclose(fn(x, torch.full((3,), 0.5)), guided, atol=1e-5)
        assert not torch.allclose(cond, model(x, torch.full((3,), 0.1), y=None), atol=1e-3)  # the label matters
        mixed = fn(x, torch.tensor([0.1, 0.5, 0.1]))
        assert torch.allclose(mixed[1], guided[1], atol=1e-5) and torch.allclose(mixed[0], cond[0], atol=1e-5)
    sol = task.sample(model, y=y, steps=3, cfg_scale=2.0, cfg_interval=(0.3, 1.0))
    assert torch.isfinite(sol.x_1).all()
