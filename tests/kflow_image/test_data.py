"""Image datasets (MNIST shipped files, image folders, tar archives) and the latent cache."""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from kflow_image.codecs import IdentityCodec
from kflow_image.data import (
    MNIST_MD5,
    ImageFolderDataset,
    MNISTDataset,
    TarImageDataset,
    datasets_dir,
    encode_latents,
    extract_tar,
    md5sum,
    resize_center_crop,
)


# ------------------------------------------------------------------------------------------------- MNIST
def test_shipped_mnist_md5(repo_dir):
    d = repo_dir / "datasets" / "mnist"
    assert md5sum(d / "t10k-images-idx3-ubyte.gz").startswith("9fb629c4")
    assert md5sum(d / "t10k-labels-idx1-ubyte.gz").startswith("ec29112d")
    for name, md5 in MNIST_MD5.items():
        assert md5sum(d / name) == md5
    assert any(p.name.upper().startswith(("LICENSE", "README")) for p in d.iterdir())


def test_mnist_loads_10000_padded_digits():
    ds = MNISTDataset()
    assert len(ds) == 10_000
    assert torch.equal(torch.unique(ds.labels), torch.arange(10))
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert isinstance(y, int) and y == 7  # the first test digit is a 7
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.9
    # 28 -> 32 by zero padding: a 2-pixel empty border, content inside
    assert x[:, :2].abs().sum() == 0 and x[:, -2:].abs().sum() == 0
    assert x[:, :, :2].abs().sum() == 0 and x[:, :, -2:].abs().sum() == 0
    counts = torch.bincount(ds.labels, minlength=10)
    assert counts.sum() == 10_000 and counts.min() > 850


def test_mnist_resolution_and_channels():
    ds = MNISTDataset(resolution=64, channels=3)
    x, _ = ds[3]
    assert x.shape == (3, 64, 64)
    torch.testing.assert_close(x[0], x[2])
    assert "r64" in ds.identity() and ds.identity() != MNISTDataset().identity()


def test_mnist_explicit_dir_env_and_errors(tmp_path, monkeypatch, repo_dir):
    src = repo_dir / "datasets" / "mnist"
    d = tmp_path / "data" / "mnist"
    d.mkdir(parents=True)
    for name in MNIST_MD5:
        shutil.copy(src / name, d / name)
    assert len(MNISTDataset(dir=d)) == 10_000
    monkeypatch.setenv("KFLOW_DATA", str(tmp_path / "data"))
    assert datasets_dir() == tmp_path / "data"
    assert len(MNISTDataset()) == 10_000
    # missing file: named
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        MNISTDataset(dir=d)
    # malformed file: named, with the reason
    with gzip.open(d / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(b"\x00\x00\x08\x03" + b"\x00" * 12)
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.*bad idx header"):
        MNISTDataset(dir=d)
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="cannot read MNIST file .*t10k-labels"):
        MNISTDataset(dir=d)
    with pytest.raises(ValueError, match="split"):
        MNISTDataset(dir=d, split="validation")


# ------------------------------------------------------------------------------------------ image folder
def _write_png(path, size, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_resize_center_crop_keeps_centre():
    img = Image.new("RGB", (90, 30), (255, 0, 0))
    img.paste((0, 0, 255), (30, 0, 60, 30))  # blue middle third
    out = np.array(resize_center_crop(img, 16))
    assert out.shape == (16, 16, 3)
    assert (out[4:12, 4:12, 2] > 200).all() and (out[4:12, 4:12, 0] < 50).all()


def test_image_folder_any_size_sorted_classes_and_bad_files(tmp_path):
    _write_png(tmp_path / "zebra" / "a.png", (50, 80), (10, 20, 30))
    _write_png(tmp_path / "apple" / "b.png", (100, 40), (200, 100, 0))
    _write_png(tmp_path / "apple" / "c.png", (16, 16), (0, 0, 0))
    (tmp_path / "apple" / "broken.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image.*broken.png"):
        ds = ImageFolderDataset(tmp_path, resolution=16)
    assert ds.classes == ["apple", "zebra"]
    assert len(ds) == 3 and [p.name for p, _ in ds.skipped] == ["broken.png"]
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y == 0
    torch.testing.assert_close(x[:, 8, 8], torch.tensor([200, 100, 0]) / 255.0, atol=2 / 255, rtol=0)
    assert ds[2][1] == 1
    with pytest.warns(UserWarning, match="broken.png"):
        gray = ImageFolderDataset(tmp_path, resolution=8, channels=1, in_memory=False)
    assert gray[0][0].shape == (1, 8, 8)
    # lazy mode: a file broken after the scan raises naming it
    (tmp_path / "zebra" / "a.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read image .*a.png"):
        gray[2]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolderDataset(tmp_path / "nope", 32)
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path, 32)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "x.jpg").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no readable images"):
        ImageFolderDataset(tmp_path, 32)


# -------------------------------------------------------------------------------------------------- tar
def _make_tar(path, unsafe: bool = False):
    with tarfile.open(path, "w") as tf:

        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        add("classes.tsv", b"n01\tcat\nn02\tdog\n")
        for split, n in (("train", 3), ("val", 1)):
            for cls, color in (("n01", (255, 0, 0)), ("n02", (0, 255, 0))):
                for i in range(n):
                    buf = io.BytesIO()
                    Image.new("RGB", (64, 64), color).save(buf, format="JPEG")
                    add(f"{split}/{cls}/{cls}_{i}.JPEG", buf.getvalue())
        if unsafe:
            add("../evil.txt", b"x")


def test_tar_dataset_extracts_once(tmp_path):
    tar_path = tmp_path / "mini.tar"
    _make_tar(tar_path)
    cache = tmp_path / "cache"
    train = TarImageDataset(tar_path, "train", resolution=32, cache_dir=cache)
    val = TarImageDataset(tar_path, "val", resolution=32, cache_dir=cache)
    assert (len(train), len(val)) == (6, 2)
    assert train.classes == ["n01", "n02"] and train.class_names == ["cat", "dog"]
    x, y = val[1]
    assert x.shape == (3, 32, 32) and y == 1 and x[1].mean() > 0.9
    root = extract_tar(tar_path, cache)
    marker_time = (root / ".extracted").stat().st_mtime_ns
    assert extract_tar(tar_path, cache) == root
    assert (root / ".extracted").stat().st_mtime_ns == marker_time
    with pytest.raises(ValueError, match="no split 'test'; available: \\['train', 'val'\\]"):
        TarImageDataset(tar_path, "test", cache_dir=cache)


def test_tar_refuses_unsafe_members(tmp_path):
    tar_path = tmp_path / "evil.tar"
    _make_tar(tar_path, unsafe=True)
    with pytest.raises(ValueError, match="unsafe member '../evil.txt'"):
        extract_tar(tar_path, tmp_path / "cache")
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(FileNotFoundError, match="image archive not found"):
        extract_tar(tmp_path / "missing.tar", tmp_path / "cache")


def test_tiny_imagenet_tar(shared_dir, tmp_path_factory):
    tar_path = shared_dir / "data/images/tiny-imagenet-64-10class.tar"
    if not tar_path.is_file():
        pytest.skip(f"{tar_path} not found")
    val = TarImageDataset(tar_path, "val", resolution=64, cache_dir=tmp_path_factory.mktemp("tin"))
    assert len(val) == 500 and val.num_classes == 10
    assert torch.equal(torch.bincount(val.labels), torch.full((10,), 50))
    assert val.class_names[val.classes.index("n07747607")] == "orange"
    assert val[0][0].shape == (3, 64, 64)


# ----------------------------------------------------------------------------------------- latent cache
class _Tiny(torch.utils.data.Dataset):
    def __init__(self, n=10, tag="a"):
        g = torch.Generator().manual_seed(0)
        self.x, self.tag = torch.rand(n, 1, 8, 8, generator=g), tag

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 3

    def identity(self):
        return f"tiny:{self.tag}:{len(self)}"


def test_encode_latents_caches_atomically(tmp_path, monkeypatch):
    ds, codec = _Tiny(), IdentityCodec(channels=1)
    z, y = encode_latents(ds, codec, tmp_path, batch_size=4, progress=False)
    torch.testing.assert_close(z, ds.x * 2 - 1)
    assert y.tolist() == [i % 3 for i in range(10)]
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temp file left behind
    blob = torch.load(files[0], weights_only=True)
    assert blob["key"] == f"{ds.identity()}|{codec.identity()}"

    # the second call reads the cache and does not encode
    def boom(*a, **k):
        raise AssertionError("encoded again")

    monkeypatch.setattr(codec, "encode_raw", boom)
    z2, y2 = encode_latents(ds, codec, tmp_path, progress=False)
    torch.testing.assert_close(z2, z) and torch.testing.assert_close(y2, y)
    # another dataset gets another cache file
    monkeypatch.undo()
    encode_latents(_Tiny(n=5, tag="b"), codec, tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 2
    # an explicit file made for other data is recomputed, not silently reused
    f = tmp_path / "explicit.pt"
    encode_latents(ds, codec, f, progress=False)
    with pytest.warns(UserWarning, match="another dataset"):
        z3, _ = encode_latents(_Tiny(n=5, tag="b"), codec, f, progress=False)
    assert len(z3) == 5


def test_encode_latents_with_taef2_on_mnist(tmp_path):
    from kflow_image.codecs import TAEF2Codec

    ds = torch.utils.data.Subset(MNISTDataset(), range(6))
    codec = TAEF2Codec()
    with pytest.raises(TypeError, match="identity"):
        encode_latents(ds, codec, tmp_path, progress=False)
    z, y = encode_latents(ds, codec, tmp_path, batch_size=4, progress=False, cache_key="mnist-first6")
    assert z.shape == (6, 32, 4, 4) and z.dtype == torch.float32
    assert y.tolist() == [int(MNISTDataset().labels[i]) for i in range(6)]
