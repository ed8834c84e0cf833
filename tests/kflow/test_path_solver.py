import pytest
import torch

from kflow.path import KPath
from kflow.schedule import PROFILES, BandSchedule, KappaWarp, make_grid
from kflow.solver import solve
from kflow.testing import (assert_oracle_sampler_exact, assert_path_boundaries, assert_rectified_flow,
                           assert_velocity_is_derivative)
from kflow.transforms import (FourierTransform, GraphSpectralTransform, IdentityTransform, PCATransform,
                              WaveletTransform)

torch.manual_seed(1)
X0 = torch.randn(3, 2, 8, 8, dtype=torch.float64)
X1 = torch.randn(3, 2, 8, 8, dtype=torch.float64)


def make(name):
    if name == "identity":
        return IdentityTransform(3), X0, X1
    if name == "fourier":
        return FourierTransform((2, 8, 8)), X0, X1
    if name == "wavelet":
        return WaveletTransform((2, 8, 8), "db2", 1), X0, X1
    if name == "pca":
        return PCATransform((2, 8, 8)).fit(torch.randn(300, 2, 8, 8)), X0, X1
    pts = torch.randn(3, 17, 3, dtype=torch.float64) * 4
    t = GraphSpectralTransform.from_distances(torch.cdist(pts, pts))
    return t, torch.randn(3, 17, 6, dtype=torch.float64), torch.randn(3, 17, 6, dtype=torch.float64)


NAMES = ["identity", "fourier", "wavelet", "pca", "graph"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("window,profile", [(1.0, "linear"), (0.3, "smoothstep"), (0.05, "cosine"), (0.5, "linear")])
def test_boundaries_derivative_and_oracle_sampler(name, window, profile):
    t, x0, x1 = make(name)
    path = KPath(t, BandSchedule(window, profile))
    assert_path_boundaries(path, x0, x1)
    # away from window edges of the linear profile (kinks); smooth profiles are C1 everywhere
    assert_velocity_is_derivative(path, x0, x1, ks=[0.0137, 0.2871, 0.5123, 0.7719, 0.9431], atol=1e-5)
    grids = [make_grid(1), make_grid(7), make_grid(25),
             make_grid(12, "band", path.schedule, t.distinct_kappa()),
             torch.sort(torch.cat([torch.tensor([0.0, 1.0]), torch.rand(9)])).values.double()]
    assert_oracle_sampler_exact(path, x0, x1, grids, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_w1_is_rectified_flow(name):
    t, x0, x1 = make(name)
    assert_rectified_flow(t, x0, x1, atol=1e-12 if name == "identity" else 1e-10)


def test_identity_w1_equals_rectified_flow_exactly():
    path = KPath(IdentityTransform(3), BandSchedule(1.0))
    k = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    s = path.sample(X0, X1, k)
    kk = k.reshape(-1, 1, 1, 1)
    assert torch.equal(s.dx_k, X1 - X0)
    assert torch.allclose(s.x_k, (1 - kk) * X0 + kk * X1, atol=1e-15, rtol=0)


@pytest.mark.parametrize("profile", PROFILES)
def test_schedule_monotone_bounded_and_derivative(profile):
    sch = BandSchedule(0.2, profile)
    kappa = torch.linspace(0, 1, 11, dtype=torch.float64)[None]
    ks = torch.linspace(0, 1, 4001, dtype=torch.float64)[:, None]
    mu, dmu = sch(ks, kappa)
    assert torch.all(mu[0] == 0) and torch.all(mu[-1] == 1)
    assert torch.all(mu[1:] >= mu[:-1]) and torch.all(dmu >= 0)
    # trapezoid integral of dmu recovers mu
    integral = torch.cumsum(0.5 * (dmu[1:] + dmu[:-1]) * (ks[1:] - ks[:-1]), 0)
    assert torch.allclose(integral[-1], torch.ones(11, dtype=torch.float64), atol=2e-3)


def test_localisation_only_active_band_moves():
    t = WaveletTransform((1, 8, 8), "haar", 3)
    path = KPath(t, BandSchedule(0.2))
    s = path.sample(X0[:, :1], X1[:, :1], torch.full((3,), 0.05, dtype=torch.float64))
    coeff = t(s.dx_k)
    # only the approximation is revealed at k=0.05 (float64 round-off of the haar filters: 2e-16 with PyWavelets 1.9)
    assert coeff[..., t.kappa[0, 0] > 0].abs().max() < 1e-12
    assert coeff[..., t.kappa[0, 0] == 0].abs().sum() > 0


def test_energy_warp_gives_high_energy_bands_more_time():
    bands = torch.tensor([0.0, 0.5, 1.0])
    warp = KappaWarp(bands, torch.tensor([8.0, 1.0, 1.0]))
    assert torch.allclose(warp(bands.double()), torch.tensor([0.0, 8 / 9, 1.0], dtype=torch.float64))
    warp2 = KappaWarp.from_coefficients(torch.tensor([[0.0, 0.5, 0.5, 1.0]]), torch.tensor([[4.0, 0.5, 0.5, 1.0]]))
    assert torch.allclose(warp2.warped, torch.tensor([0.0, 0.8, 1.0], dtype=torch.float64))
    t, x0, x1 = make("wavelet")
    energy = (t(X1 - X0) ** 2).mean(0, keepdim=True)
    path = KPath(t, BandSchedule(0.3, "smoothstep", KappaWarp.from_coefficients(t.kappa, energy)))
    assert_path_boundaries(path, x0, x1)
    assert_oracle_sampler_exact(path, x0, x1)


def test_band_grid_puts_more_steps_on_coarse_bands():
    sch = BandSchedule(0.2)
    g = make_grid(40, "band", sch, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]), coarse_weight=4.0)
    assert g[0] == 0 and g[-1] == 1 and torch.all(g[1:] > g[:-1])
    first, last = (g < 0.4).sum(), (g > 0.6).sum()
    assert first > last
    assert torch.allclose(make_grid(10, "band", BandSchedule(1.0), torch.tensor([0.0, 1.0]), 1.0),
                          make_grid(10), atol=1e-3)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_velocity_samplers_converge_to_oracle(method):
    t, x0, x1 = make("fourier")
    path = KPath(t, BandSchedule(0.4, "smoothstep"))
    errs = []
    for n in (10, 40):
        out = solve(path, x0, lambda x, k: x1, make_grid(n), method=method).x_1
        errs.append((out - x1).abs().max().item())
    # endpoint predictions converted to velocities: integration error falls with the step
    assert errs[1] < errs[0]
    # rectified flow velocities are constant: Euler is exact
    rf = KPath(t, BandSchedule(1.0))
    out = solve(rf, x0, lambda x, k: x1 - x0, make_grid(3), method=method, prediction="velocity").x_1
    assert torch.allclose(out, x1, atol=1e-12)


def test_solver_hook_and_trajectory():
    t, x0, x1 = make("identity")
    seen = []
    sol = solve(KPath(t, BandSchedule(1.0)), x0, lambda x, k: x1, make_grid(4), hook=lambda i, k, x: seen.append(i),
                return_trajectory=True)
    assert seen == [0, 1, 2, 3] and sol.trajectory.shape == (5, *x0.shape) and sol.evaluations == 4
    with pytest.raises(ValueError):
        solve(KPath(t, BandSchedule(1.0)), x0, lambda x, k: x1, make_grid(4), method="exact", prediction="velocity")


@pytest.mark.parametrize("name", ["identity", "fourier", "wavelet"])
def test_estimated_source_oracle_exact_and_sharp_for_posterior_mean(name):
    t, x0, x1 = make(name)
    path = KPath(t, BandSchedule(0.5 if name != "identity" else 1.0, "smoothstep"))
    for grid in (make_grid(1), make_grid(9)):
        out = solve(path, x0, lambda x, k: x1, grid, method="exact", source="estimate").x_1
        assert torch.allclose(out, x1, atol=1e-10)
    # data +-1 per entry, rectified flow: the posterior mean E[x_1 | x_k] = tanh(k x / (1-k)^2).
    # Re-estimating the source reaches +-1; keeping the drawn x_0 averages the predictions along k.
    rf = KPath(IdentityTransform(3), BandSchedule(1.0))
    post = lambda x, k: torch.tanh(k.reshape(-1, 1, 1, 1) * x / (1 - k.reshape(-1, 1, 1, 1)) ** 2)  # noqa: E731
    g = make_grid(200)[:-1]  # stop just before k = 1 where the posterior is a sign function
    sharp = solve(rf, X0, post, g, source="estimate").x_1.abs()
    blurry = solve(rf, X0, post, g, source="fixed").x_1.abs()
    assert sharp.mean() > 0.95 and blurry.mean() < 0.8
