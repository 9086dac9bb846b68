"""Datasets: embedded Fashion-MNIST, seeded splits, on-device augmentation, clear errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from qsearch import QSearchError
from qsearch.data import carve, load_dataset, stratified_order
from qsearch.readers import FASHION_MNIST_DIR, _find_fashion_mnist, load_fashion_mnist

needs_fmnist = pytest.mark.skipif(
    _find_fashion_mnist(FASHION_MNIST_DIR) is None,
    reason=f"Fashion-MNIST not in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic")


@needs_fmnist
def test_fashion_mnist_loads_with_validation_carved_from_train():
    s = load_dataset("fashion-mnist", val_fraction=0.1)
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    assert s.train.images.shape == (54000, 1, 28, 28)
    assert s.train.images.dtype == torch.uint8
    assert s.info.num_classes == 10
    assert np.bincount(s.val.labels.numpy()).tolist() == [600] * 10  # stratified
    x, y = next(s.train.batches(128))
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    # normalised with the dataset's mean/std: roughly zero mean, unit std over the split
    xs = torch.cat([b for b, _ in s.val.batches(2000)])
    assert abs(float(xs.mean())) < 0.05 and abs(float(xs.std()) - 1) < 0.05


@needs_fmnist
def test_fashion_mnist_subset_for_proxies():
    s = load_dataset("fashion-mnist", train_fraction=0.1, val_fraction=5000)
    assert (len(s.train), len(s.val)) == (5500, 5000)


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("layout", ["flat-gz", "torchvision-raw"])
def test_fashion_mnist_from_user_root(tmp_path, layout):
    d = tmp_path if layout == "flat-gz" else tmp_path / "FashionMNIST" / "raw"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 20)):
        _write_idx(d / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)),
                   layout == "flat-gz")
        _write_idx(d / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, layout == "flat-gz")
    x, y, xt, yt = load_fashion_mnist(tmp_path)
    assert x.shape == (50, 28, 28) and y.tolist()[:3] == [0, 1, 2] and xt.shape == (20, 28, 28)
    s = load_dataset("fashion-mnist", root=tmp_path, val_fraction=10)
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 20)


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10", "cifar100"])
def test_missing_root_names_the_path_and_the_fix(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(QSearchError, match="nowhere") as err:
        load_dataset(name, root=missing)
    assert "download=True" in str(err.value)
    if name == "fashion-mnist":
        assert "apt-get install dataset-fashion-mnist" in str(err.value)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_python_batches(tmp_path, name):
    import pickle

    folder, train, test, key = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                    "test_batch", "labels"),
        "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels"),
    }[name]
    (tmp_path / folder).mkdir()
    rng = np.random.default_rng(0)
    for f in [*train, test]:
        entry = {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                 key: list(range(10)) * 2}
        (tmp_path / folder / f).write_bytes(pickle.dumps(entry))
    n_train = 20 * len(train)
    for root in (tmp_path, tmp_path / folder):  # the batch folder itself is accepted too
        s = load_dataset(name, root=root, val_fraction=10)
        assert (len(s.train), len(s.val), len(s.test)) == (n_train - 10, 10, 20)
        assert s.train.images.shape[1:] == (3, 32, 32) and s.info.in_channels == 3
    x, _ = next(s.train.batches(8, augment=True, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (8, 3, 32, 32)
    (tmp_path / folder / test).write_bytes(b"not a pickle")
    with pytest.raises(QSearchError, match="not a CIFAR python batch"):
        load_dataset(name, root=tmp_path)


def test_imagefolder_without_root_or_folders(tmp_path):
    with pytest.raises(QSearchError, match="--data-root"):
        load_dataset("imagenet")
    with pytest.raises(QSearchError, match="class folders"):
        load_dataset("imagefolder", root=tmp_path)


def test_imagefolder_batches(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    s = load_dataset("imagefolder", root=tmp_path, val_fraction=2, num_workers=0)
    assert s.info.num_classes == 2
    assert (len(s.train), len(s.val), len(s.test)) == (10, 2, 4)
    g = torch.Generator().manual_seed(0)
    x, y = next(s.train.batches(4, shuffle=True, augment=True, generator=g))
    assert x.shape == (4, 3, 224, 224) and y.dtype == torch.long
    x, y = next(s.test.batches(8))
    assert x.shape == (4, 3, 224, 224) and y.tolist() == [0, 0, 1, 1]
    with pytest.raises(QSearchError, match="1000"):
        load_dataset("imagenet", root=tmp_path)


def test_split_is_seeded_disjoint_and_stratified():
    labels = np.repeat(np.arange(5), [100, 200, 300, 150, 250])
    tr, va = carve(labels, val_fraction=0.1, train_fraction=1.0, seed=3)
    assert len(va) == 100 and len(tr) == 900
    assert not set(tr) & set(va) and len(set(tr) | set(va)) == 1000
    assert np.bincount(labels[va]).tolist() == [10, 20, 30, 15, 25]
    tr2, va2 = carve(labels, val_fraction=0.1, train_fraction=1.0, seed=3)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    _, va3 = carve(labels, val_fraction=0.1, train_fraction=1.0, seed=4)
    assert not np.array_equal(va, va3)


def test_train_fraction_keeps_validation_and_nests():
    labels = np.arange(2000) % 4
    small, va_small = carve(labels, val_fraction=0.2, train_fraction=0.1, seed=0)
    big, va_big = carve(labels, val_fraction=0.2, train_fraction=0.5, seed=0)
    assert np.array_equal(va_small, va_big)  # proxies of any length validate on the same set
    assert len(small) == 160 and len(big) == 800 and set(small) <= set(big)
    assert np.bincount(labels[small]).tolist() == [40] * 4


def test_stratified_prefixes_are_proportional():
    labels = np.repeat([0, 1], [300, 100])
    order = stratified_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(400))
    for k in (4, 40, 100, 399):
        assert abs(np.sum(labels[order[:k]] == 1) - k / 4) <= 1


@pytest.mark.parametrize(
    "kw", [{"val_fraction": 1.5}, {"val_fraction": -0.1}, {"val_fraction": 10**6},
           {"train_fraction": 0}, {"val_fraction": "10%"}],
)
def test_bad_fractions_are_rejected(kw):
    with pytest.raises(QSearchError, match="fraction"):
        load_dataset("synthetic", **kw)


def test_augmentation_keeps_shapes_and_is_a_padded_crop_or_flip(synthetic):
    split = synthetic.train
    g = torch.Generator().manual_seed(0)
    plain = next(split.batches(64))[0]
    aug, y = next(split.batches(64, augment=True, generator=g))
    assert aug.shape == plain.shape == (64, 1, 16, 16)
    assert not torch.equal(aug, plain)
    assert torch.equal(y, split.labels[:64])
    # Every augmented image is one of the (2p+1)^2 crops of the zero-padded raw image, or
    # its mirror image: undo the normalisation and search them all.
    raw = split.images[:64].float()
    padded = torch.nn.functional.pad(raw, (2, 2, 2, 2))
    pixels = aug / split._inv_std + split._mean
    crops = [padded[..., dy:dy + 16, dx:dx + 16] for dy in range(5) for dx in range(5)]
    crops += [c.flip(-1) for c in crops]
    found = torch.stack([(c - pixels).abs().amax(dim=(1, 2, 3)) < 1e-3 for c in crops])
    assert found.any(0).all()
    assert found[25:].any(0).sum() > 10  # some are flipped
    assert not found[12].all()  # not all centre crops


def test_batches_are_seeded_and_resumable(synthetic):
    split = synthetic.train

    def run(start: int = 0):
        g = torch.Generator().manual_seed(7)
        return list(split.batches(100, shuffle=True, augment=True, generator=g, start=start))

    full, again, tail = run(), run(), run(start=5)
    assert len(full) == 18  # 1800 images, last batch kept
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, again, strict=True))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(full[5:], tail, strict=True))
    labels = torch.cat([y for _, y in full])
    assert sorted(labels.tolist()) == sorted(split.labels.tolist())  # a permutation
    assert len(list(split.batches(100, drop_last=True))) == 18
    assert len(list(split.batches(128, drop_last=True))) == 14


def test_synthetic_is_fixed_and_the_seed_picks_the_split():
    a, b = load_dataset("synthetic", seed=0), load_dataset("synthetic", seed=1)
    assert torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.val.labels, b.val.labels) or not torch.equal(
        a.val.images, b.val.images)
    assert a.info.num_classes == 4 and a.train.images.shape[1:] == (1, 16, 16)
