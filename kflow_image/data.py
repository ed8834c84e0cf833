"""Image datasets (PIL + numpy only) and a pre-encoded latent cache.

Every dataset returns ``(image, label)`` with ``image`` a float tensor ``(C, H, W)`` in ``[0, 1]`` and
``label`` an int, and has an ``identity()`` string used to key on-disk caches.

- :class:`ImageFolderDataset`: ``root/<class>/<image>`` (any size: shorter side resized, centre crop).
- :class:`MNISTDataset`: the MNIST test set shipped in ``datasets/mnist`` (idx ``.gz``), padded 28 -> 32.
- :class:`TarImageDataset`: an ``ImageFolder`` tar (e.g. the Tiny-ImageNet 10-class benchmark tar with
  ``train/``, ``val/`` and ``classes.tsv``), extracted once into a cache directory.
- :func:`encode_latents`: encode a dataset once with a codec and cache the raw latents on disk.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

MNIST_FILES = {
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
}
#: md5 of the shipped MNIST test files (the official ones)
MNIST_MD5 = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$KFLOW_CACHE`` or ``~/.cache/kflow``: where extracted archives and latent caches go."""
    return Path(os.environ.get("KFLOW_CACHE", Path.home() / ".cache" / "kflow")).expanduser()


def datasets_dir() -> Path:
    """The directory that holds the shipped data sets.

    ``$KFLOW_DATA`` if set, else the checkout's ``datasets/`` (editable install), else the wheel's copy.
    """
    from kflow.utils import resource_dir

    env = os.environ.get("KFLOW_DATA")
    if env:
        return Path(env).expanduser()
    return resource_dir("datasets") or Path(__file__).resolve().parents[1] / "datasets"


def pil_to_tensor(img: Image.Image, channels: int = 3) -> torch.Tensor:
    """PIL image -> uint8 tensor (C, H, W) with ``channels`` in {1, 3}."""
    img = img.convert("L" if channels == 1 else "RGB")
    arr = np.array(img, dtype=np.uint8, copy=True)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to ``resolution`` (bicubic; box pre-filter when shrinking a lot) and crop the centre.

    Args:
        img: any PIL image.
        resolution: output side length.

    Returns:
        PIL image of size ``resolution x resolution``.
    """
    w, h = img.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        new = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        img = img.resize(new, Image.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)
        w, h = img.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    return img


def load_image(path: str | Path, resolution: int, channels: int = 3) -> torch.Tensor:
    """Read an image file as a uint8 tensor (C, resolution, resolution); errors name the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_tensor(resize_center_crop(img, resolution), channels)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")


# ----------------------------------------------------------------------------------------------------
# folder of class sub-folders
# ----------------------------------------------------------------------------------------------------
class ImageFolderDataset(Dataset):
    """Images in class sub-folders ``root/<class>/*.{jpg,png,...}``; class names sorted -> labels 0..K-1.

    Images of any size are resized (shorter side) and centre-cropped to ``resolution``. With
    ``in_memory=True`` (default) every image is decoded once at construction and kept as uint8; files
    that cannot be decoded are skipped, listed in ``self.skipped`` and reported with a warning.

    Args:
        root: the folder with one sub-folder per class.
        resolution: output side length in pixels.
        channels: 1 (grayscale) or 3 (RGB).
        in_memory: decode everything up front (else decode lazily; bad files then raise in ``__getitem__``).
        class_names: optional mapping folder name -> readable name (e.g. from ``classes.tsv``).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no readable image found.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        channels: int = 3,
        in_memory: bool = True,
        class_names: dict[str, str] | None = None,
    ) -> None:
        _check_channels(channels)
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.resolution, self.channels, self.in_memory = int(resolution), channels, in_memory
        self.classes = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not self.classes:
            raise ValueError(f"{self.root}: no class sub-folders (expected root/<class>/<image files>)")
        self.class_names = [(class_names or {}).get(c, c) for c in self.classes]
        files: list[tuple[Path, int]] = []
        for label, cls in enumerate(self.classes):
            for f in sorted((self.root / cls).rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append((f, label))
        self.skipped: list[tuple[Path, str]] = []
        images: list[torch.Tensor] = []
        good: list[tuple[Path, int]] = []
        for f, label in files:
            try:
                if in_memory:
                    images.append(load_image(f, self.resolution, channels))
                else:
                    with Image.open(f) as img:  # no decode: cheap validation
                        img.verify()
            except (ValueError, OSError, UnidentifiedImageError) as exc:
                self.skipped.append((f, str(exc)))
                continue
            good.append((f, label))
        if self.skipped:
            shown = "; ".join(f"{p}: {why}" for p, why in self.skipped[:5])
            more = f" (and {len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
            warnings.warn(f"{self.root}: skipped {len(self.skipped)} unreadable image(s): {shown}{more}")
        if not good:
            raise ValueError(
                f"{self.root}: no readable images with extensions {IMAGE_EXTENSIONS} in {len(self.classes)} "
                "class folder(s)"
            )
        self.files = [f for f, _ in good]
        self.labels = torch.tensor([lab for _, lab in good], dtype=torch.long)
        self._images = torch.stack(images) if in_memory else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._images is not None:
            img = self._images[i]
        else:
            img = load_image(self.files[i], self.resolution, self.channels)
        return img.float() / 255.0, int(self.labels[i])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def identity(self) -> str:
        """Cache key: root, file list (names + sizes), resolution and channels."""
        h = hashlib.sha1()
        for f in self.files:
            h.update(f"{f.relative_to(self.root)}:{f.stat().st_size}\n".encode())
        return f"imagefolder:{self.root.resolve()}:{len(self)}:{h.hexdigest()[:16]}:r{self.resolution}:c{self.channels}"


# ----------------------------------------------------------------------------------------------------
# MNIST
# ----------------------------------------------------------------------------------------------------
def _read_idx(path: Path, expect_ndim: int) -> np.ndarray:
    """Read an idx file (optionally gzipped) of unsigned bytes; errors name the file."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read MNIST file {path}: {exc}") from exc
    if len(raw) < 4:
        raise ValueError(f"MNIST file {path} is truncated ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expect_ndim:
        raise ValueError(
            f"MNIST file {path}: bad idx header (dtype 0x{dtype_code:02x}, {ndim} dims; expected ubyte, "
            f"{expect_ndim} dims)"
        )
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"MNIST file {path}: header says {dims} but holds {data.size} values")
    return data.reshape(dims)


def md5sum(path: str | Path) -> str:
    """md5 hex digest of a file."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


class MNISTDataset(Dataset):
    """MNIST from idx ``.gz`` files (the 10,000-image test set ships in ``datasets/mnist``).

    28x28 digits are zero-padded by 2 pixels to 32x32 (a power of two, as the wavelet / Fourier transforms
    want); other resolutions resize the padded 32x32 image (bicubic, antialiased).

    Args:
        dir: folder with the idx files; default ``datasets_dir() / "mnist"`` (``$KFLOW_DATA`` or the repo's
            ``datasets/``).
        split: ``"test"`` (shipped) or ``"train"`` (if you put the train files there).
        resolution: output side length (32 keeps the digits pixel-exact).
        channels: 1, or 3 to repeat the gray channel.

    Raises:
        FileNotFoundError: a file is missing (the message names it).
        ValueError: a file is malformed, or the image and label counts differ.
    """

    def __init__(
        self, dir: str | Path | None = None, split: str = "test", resolution: int = 32, channels: int = 1
    ):
        _check_channels(channels)
        if split not in MNIST_FILES:
            raise ValueError(f"MNIST split must be one of {sorted(MNIST_FILES)}, got {split!r}")
        self.dir = Path(dir) if dir is not None else datasets_dir() / "mnist"
        img_path, lab_path = (self.dir / n for n in MNIST_FILES[split])
        for p in (img_path, lab_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"MNIST file not found: {p} (set dir=... or KFLOW_DATA=<datasets dir>)"
                )
        images = _read_idx(img_path, 3)
        labels = _read_idx(lab_path, 1)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"MNIST: {img_path} has {images.shape[0]} images but {lab_path} {labels.shape[0]} labels"
            )
        if labels.max(initial=0) > 9:
            raise ValueError(f"MNIST file {lab_path}: labels outside 0..9")
        self.split, self.resolution, self.channels = split, int(resolution), channels
        self.paths = (img_path, lab_path)
        x = torch.from_numpy(images.copy())
        pad_h, pad_w = 32 - x.shape[1], 32 - x.shape[2]
        if pad_h >= 0 and pad_w >= 0:  # centre the 28x28 digit in 32x32
            x = torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        if x.shape[1:] != (self.resolution, self.resolution):  # square -> square: no crop needed
            x = (
                torch.nn.functional.interpolate(
                    x[:, None].float(),
                    size=(self.resolution,) * 2,
                    mode="bicubic",
                    antialias=True,
                    align_corners=False,
                )[:, 0]
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
            )
        self._images = x.unsqueeze(1)  # (N, 1, H, W) uint8
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.classes = [str(i) for i in range(10)]
        self.class_names = list(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self._images[i].float() / 255.0
        if self.channels == 3:
            img = img.expand(3, -1, -1).contiguous()
        return img, int(self.labels[i])

    @property
    def num_classes(self) -> int:
        return 10

    def identity(self) -> str:
        sizes = ":".join(str(p.stat().st_size) for p in self.paths)
        return f"mnist:{self.split}:{self.dir.resolve()}:{sizes}:r{self.resolution}:c{self.channels}"


# ----------------------------------------------------------------------------------------------------
# tar archives (Tiny-ImageNet benchmark subset)
# ----------------------------------------------------------------------------------------------------
def extract_tar(tar_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Extract an image tar once into ``cache_dir/<name>-<hash>/`` and return that folder.

    A marker file records a finished extraction, so an interrupted one is redone. Members that would
    escape the target folder (absolute paths, ``..``, links) are refused.

    Raises:
        FileNotFoundError: the tar does not exist.
        ValueError: the tar cannot be read or holds unsafe members.
    """
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise FileNotFoundError(f"image archive not found: {tar_path}")
    st = tar_path.stat()
    key = hashlib.sha1(f"{tar_path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:10]
    stem = tar_path.name.split(".tar")[0]
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "images"
    out = out / f"{stem}-{key}"
    marker = out / ".extracted"
    if marker.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tar_path) as tf:
            members = tf.getmembers()
            for m in members:
                p = Path(m.name)
                if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
                    raise ValueError(f"{tar_path}: refusing unsafe member {m.name!r}")
            if sys.version_info >= (3, 12):
                tf.extractall(out, members=members, filter="data")
            else:
                tf.extractall(out, members=members)
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"cannot extract image archive {tar_path}: {exc}") from exc
    marker.write_text(f"{tar_path.resolve()}\n")
    return out


def read_classes_tsv(path: str | Path) -> dict[str, str]:
    """``wnid<TAB>readable name`` lines -> dict (empty if the file is absent)."""
    path = Path(path)
    if not path.is_file():
        return {}
    names = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t", 1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected '<folder name>\\t<readable name>', got {line!r}")
        names[parts[0].strip()] = parts[1].strip()
    return names


class TarImageDataset(ImageFolderDataset):
    """An image-folder tar (``<split>/<class>/<image>`` plus optional ``classes.tsv``), extracted once.

    Made for ``shared/data/images/tiny-imagenet-64-10class.tar`` (10 classes, 500 train / 50 val each,
    64x64 JPEG). The archive itself is benchmark data and does not ship with the package.

    Args:
        tar_path: the ``.tar`` file (or an already extracted folder).
        split: sub-folder to use (``"train"`` or ``"val"``).
        resolution: output side length.
        channels: 1 or 3.
        cache_dir: where to extract (default ``$KFLOW_CACHE/images`` or ``~/.cache/kflow/images``).
        in_memory: see :class:`ImageFolderDataset`.
    """

    def __init__(
        self,
        tar_path: str | Path,
        split: str = "train",
        resolution: int = 64,
        channels: int = 3,
        cache_dir: str | Path | None = None,
        in_memory: bool = True,
    ) -> None:
        tar_path = Path(tar_path)
        base = tar_path if tar_path.is_dir() else extract_tar(tar_path, cache_dir)
        root = base / split
        if not root.is_dir():
            splits = sorted(p.name for p in base.iterdir() if p.is_dir())
            raise ValueError(f"{tar_path}: no split {split!r}; available: {splits}")
        self.split = split
        super().__init__(
            root, resolution, channels, in_memory, class_names=read_classes_tsv(base / "classes.tsv")
        )


# ----------------------------------------------------------------------------------------------------
# latent cache
# ----------------------------------------------------------------------------------------------------
def _dataset_identity(dataset: Dataset) -> str:
    ident = getattr(dataset, "identity", None)
    if callable(ident):
        return ident()
    raise TypeError(
        f"{type(dataset).__name__} has no identity() method; pass an explicit cache file and cache_key"
    )


@torch.no_grad()
def encode_latents(
    dataset: Dataset,
    codec: torch.nn.Module,
    cache_path: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
    cache_key: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode a whole dataset once with ``codec.encode_raw`` and cache the result on disk.

    The cache holds *raw* (unstandardised) latents, so it stays valid whatever statistics the codec is
    later fitted with: call ``codec.fit_stats(latents)`` on the training latents, then
    ``codec.standardize(latents)``.

    Args:
        dataset: yields ``(image (C, H, W) in [0, 1], label)``; needs ``identity()`` unless ``cache_key``.
        codec: a :class:`kflow_image.codecs.Codec` (its device is used for encoding).
        cache_path: a ``.pt`` file, or a directory (a file name derived from the key is used there);
            ``None`` disables caching.
        batch_size: images per encoder call.
        progress: show a tqdm bar.
        cache_key: overrides the key derived from ``dataset.identity()`` and ``codec.identity()``.

    Returns:
        ``(latents (N, C_lat, h, w) float32 on CPU, labels (N,) int64)``.
    """
    if cache_key is None:
        cache_key = f"{_dataset_identity(dataset)}|{codec.identity()}"
    digest = hashlib.sha1(cache_key.encode()).hexdigest()[:16]
    path = None
    if cache_path is not None:
        path = Path(cache_path)
        if path.suffix != ".pt":
            path = path / f"latents-{getattr(codec, 'name', 'codec')}-{digest}.pt"
        if path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
            except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
                warnings.warn(f"latent cache {path} unreadable ({exc}); re-encoding")  # recompute, don't fail
                blob = None
            if not isinstance(blob, dict):
                blob = None
            if blob is not None and blob.get("key") == cache_key:
                return blob["latents"], blob["labels"]
            if blob is not None:
                warnings.warn(f"latent cache {path} was made for another dataset/codec; re-encoding")

    n = len(dataset)
    if n == 0:
        raise ValueError("encode_latents: the dataset is empty")
    device = next((b.device for b in codec.buffers()), torch.device("cpu"))
    was_training = codec.training
    codec.eval()
    chunks, labels = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"encoding with {getattr(codec, 'name', 'codec')}", unit="img")
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        x = torch.stack([im for im, _ in items]).to(device)
        chunks.append(codec.encode_raw(x).float().cpu())
        labels.extend(int(lab) for _, lab in items)
        if bar is not None:
            bar.update(len(items))
    if bar is not None:
        bar.close()
    codec.train(was_training)
    latents = torch.cat(chunks)
    label_t = torch.tensor(labels, dtype=torch.long)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"key": cache_key, "latents": latents, "labels": label_t}, tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache
    return latents, label_t
