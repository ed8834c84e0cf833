import pytest
import torch

from kflow.schedule import BandSchedule
from kflow.testing import assert_orthonormal, assert_round_trip
from kflow.transforms import (FourierTransform, GraphSpectralTransform, IdentityTransform, PCATransform,
                              WaveletTransform)

torch.manual_seed(0)


def transforms():
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    return {
        "identity": (IdentityTransform(event_dims=3), x),
        "fourier": (FourierTransform((3, 8, 8)), x),
        "fourier-odd": (FourierTransform((2, 5, 7), dims=(-2, -1)), torch.randn(4, 2, 5, 7, dtype=torch.float64)),
        "fourier-1d": (FourierTransform((12,), dims=(0,)), torch.randn(4, 12, dtype=torch.float64)),
        "haar": (WaveletTransform((3, 8, 8), "haar"), x),
        "db2": (WaveletTransform((3, 8, 8), "db2", levels=1), x),
        "db2-16": (WaveletTransform((1, 16, 16), "db2", levels=2), torch.randn(3, 1, 16, 16, dtype=torch.float64)),
        "pca": (PCATransform((3, 8, 8)).fit(torch.randn(40, 3, 8, 8)), x),  # fewer samples than dims
        "graph": (GraphSpectralTransform.from_distances(torch.cdist(*(2 * [torch.randn(5, 7, 3, dtype=torch.float64)]))),
                  torch.randn(5, 7, 6, dtype=torch.float64)),
    }


@pytest.mark.parametrize("name", list(transforms()))
def test_round_trip_and_parseval(name):
    t, x = transforms()[name]
    assert_round_trip(t, x)
    assert_orthonormal(t, x)
    kap = t.kappa
    assert kap.shape[0] in (1, x.shape[0]) and kap.dim() == x.dim()
    torch.broadcast_shapes(kap.shape, x.shape)


def test_fourier_kappa_conjugate_pairs_and_range():
    t = FourierTransform((6, 6))
    kap = t.kappa[0]
    assert kap[0, 0] == 0 and torch.isclose(kap.max(), torch.tensor(1.0))
    for u in range(6):
        for v in range(6):
            assert kap[u, v] == kap[(-u) % 6, (-v) % 6]


def test_fourier_coefficient_localised_in_frequency():
    # a pure cosine of frequency (1, 2) only lights up coefficients with that radial frequency
    n = 8
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    x = torch.cos(2 * torch.pi * (1 * i + 2 * j).double() / n)[None]
    t = FourierTransform((n, n))
    c = t(x)[0]
    on = c.abs() > 1e-9
    assert on.any()
    assert torch.allclose(t.kappa[0][on], t.kappa[0][1, 2].expand(int(on.sum())).float())


def test_wavelet_guards_filter_length():
    with pytest.raises(ValueError, match="allows at most"):
        WaveletTransform((1, 8, 8), "db6")
    with pytest.raises(ValueError, match="allows at most"):
        WaveletTransform((1, 32, 32), "db6", levels=3)
    assert WaveletTransform((1, 32, 32), "db6").levels == 2


def test_wavelet_kappa_levels():
    t = WaveletTransform((1, 8, 8), "haar", levels=3)
    assert sorted(torch.unique(t.kappa).tolist()) == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert t.kappa[0, 0, 0, 0] == 0 and t.kappa[0, 0, 7, 7] == 1


def test_pca_orders_by_variance_and_saves_basis():
    x = torch.randn(500, 6, dtype=torch.float64) * torch.tensor([0.1, 3.0, 1.0, 0.5, 2.0, 0.2], dtype=torch.float64)
    t = PCATransform((6,)).fit(x)
    assert torch.all(t.variance[:-1] >= t.variance[1:])
    u = PCATransform((6,))
    u.load_state_dict(t.state_dict())
    assert torch.equal(u.basis, t.basis)


def _graph_case():
    pts = torch.randn(2, 9, 3, dtype=torch.float64)
    return pts, torch.cdist(pts, pts), torch.randn(2, 9, 4, dtype=torch.float64)


def test_graph_eigenvalues_in_range_and_relabelling_equivariant():
    pts, d, x = _graph_case()
    t = GraphSpectralTransform.from_distances(d)
    assert t.evals.min() >= 0 and t.evals.max() <= 2
    mu = BandSchedule(0.3, "smoothstep")(torch.full((2, 1, 1), 0.4, dtype=torch.float64), t.kappa)[0]
    out = t.mix(x, mu)
    perm = torch.randperm(9)
    tp = GraphSpectralTransform.from_distances(d[:, perm][:, :, perm])
    mup = BandSchedule(0.3, "smoothstep")(torch.full((2, 1, 1), 0.4, dtype=torch.float64), tp.kappa)[0]
    assert torch.allclose(tp.mix(x[:, perm], mup), out[:, perm], atol=1e-10)


def test_graph_mix_invariant_to_eigenvector_signs_and_degenerate_bases():
    # a regular graph (equal distances) has a degenerate spectrum; rotate within eigenspaces and flip signs
    d = torch.ones(1, 5, 5, dtype=torch.float64) - torch.eye(5, dtype=torch.float64)
    t = GraphSpectralTransform.from_distances(d)
    x = torch.randn(1, 5, 3, dtype=torch.float64)
    mu = torch.rand(1, 5, 1, dtype=torch.float64)
    mu = BandSchedule(0.5)(torch.full((1, 1, 1), 0.6, dtype=torch.float64), t.kappa)[0]
    ref = t.mix(x, mu)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))  # the 4 eigenvalue-1.25 vectors
    evecs = t.evecs.clone()
    evecs[0, :, 1:] = evecs[0, :, 1:] @ q
    evecs[0, :, 0] *= -1
    t2 = GraphSpectralTransform(t.evals, evecs)
    assert torch.allclose(t2.mix(x, mu), ref, atol=1e-12)


def test_graph_padding_mask_carries_no_signal():
    pts = torch.randn(1, 6, 3, dtype=torch.float64)
    d_small = torch.cdist(pts[:, :4], pts[:, :4])
    d = torch.zeros(1, 6, 6, dtype=torch.float64)
    d[:, :4, :4] = d_small
    mask = torch.tensor([[True] * 4 + [False] * 2])
    t_pad = GraphSpectralTransform.from_distances(d, mask)
    t = GraphSpectralTransform.from_distances(d_small)
    x = torch.randn(1, 6, 2, dtype=torch.float64)
    x[:, 4:] = 0
    sch = BandSchedule(0.4)
    k = torch.full((1, 1, 1), 0.35, dtype=torch.float64)
    out_pad = t_pad.mix(x, sch(k, t_pad.kappa)[0])
    out = t.mix(x[:, :4], sch(k, t.kappa)[0])
    assert torch.allclose(out_pad[:, :4], out, atol=1e-12)
    assert torch.all(out_pad[:, 4:] == 0)


def test_heat_kernel_diagonal_matches_matrix_exponential():
    _, d, _ = _graph_case()
    t = GraphSpectralTransform.from_distances(d, knn=3)
    hk = t.heat_kernel_diagonal([0.5, 2.0])
    w = t.evecs @ torch.diag_embed(t.evals) @ t.evecs.transpose(1, 2)
    ref = torch.diagonal(torch.linalg.matrix_exp(-2.0 * w), dim1=1, dim2=2)
    assert torch.allclose(hk[..., 1], ref, atol=1e-10)
