"""Datasets: metadata without loading, and loaders (embedded Fashion-MNIST, CIFAR, ImageFolder).

Small datasets (Fashion-MNIST, CIFAR-10/100, synthetic) take a fast path: the whole split
lives on the target device as ``uint8`` tensors and every batch is normalised and augmented
there in one gather, with no DataLoader and no workers (see ``benchmarks/bench_data.py``).
ImageFolder datasets (ImageNet, Imagenette) go through a DataLoader with the standard
transforms. Both kinds of split answer the same ``batches(...)`` call.

Validation is carved from the training set with a seeded, stratified draw; searches select on
it, and the test split is kept for the final evaluation.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from qsearch import QSearchError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DOWNLOAD_DIR = Path.home() / ".cache" / "qsearch" / "datasets"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    num_classes: int
    image_size: int


DATASETS = {
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 10, 28),
    "cifar10": DatasetInfo("cifar10", 3, 10, 32),
    "cifar100": DatasetInfo("cifar100", 3, 100, 32),
    "imagenet": DatasetInfo("imagenet", 3, 1000, 224),
    "imagefolder": DatasetInfo("imagefolder", 3, 0, 224),  # classes counted from the folder
    "synthetic": DatasetInfo("synthetic", 1, 4, 16),  # tiny, for fast tests only
}


def dataset_info(name: str, root: str | Path | None = None) -> DatasetInfo:
    """Shape metadata of a dataset, without loading it."""
    if name not in DATASETS:
        raise QSearchError(
            f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}"
        )
    info = DATASETS[name]
    if name == "imagefolder":
        if root is None:
            raise QSearchError("dataset 'imagefolder' needs a path: pass --data-root DIR")
        train = Path(root) / "train"
        classes = [p for p in train.iterdir() if p.is_dir()] if train.is_dir() else []
        if not classes:
            raise QSearchError(
                f"no class folders under {train}: ImageFolder expects DIR/train/<class>/*.jpg "
                "and DIR/val/<class>/*.jpg"
            )
        info = DatasetInfo(name, 3, len(classes), 224)
    return info


# Per-channel mean/std of the training images (0..1 scale) and the augmentation of the fast
# path: (padding of the random crop, horizontal flip). CIFAR: 4-pixel padding + flip, the
# standard recipe of the papers. Fashion-MNIST: 2 pixels (28 px images) + flip: every class
# (garments, bags, shoes) keeps its label when mirrored, and crop + flip is the baseline of
# Random Erasing's Fashion-MNIST runs (Zhong et al., AAAI 2020; they pad 4 px). To change it
# for one split, set ``split.pad`` / ``split.flip``.
_STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_AUGMENT = {"fashion-mnist": (2, True), "cifar10": (4, True), "cifar100": (4, True),
            "synthetic": (2, True)}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class Split(Protocol):
    """What the trainer needs from a split: its size and seeded batches on one device."""

    device: str

    def __len__(self) -> int: ...

    def batches(
        self, batch_size: int, *, shuffle: bool = False, augment: bool = False,
        generator=None, start: int = 0, drop_last: bool = False,
    ) -> Iterator[tuple]: ...


@dataclass
class Splits:
    """Train / validation / test splits of one dataset, and its shape metadata."""

    train: Split
    val: Split
    test: Split
    info: DatasetInfo


# ---------------------------------------------------------------------------- fast path


class TensorSplit:
    """A whole split held as ``uint8`` NCHW tensors on one device.

    ``batches`` normalises and (optionally) augments each batch on that device: a random
    crop from the zero-padded image and a horizontal flip, done for the whole batch by one
    index gather. Zero padding of the raw pixels is what torchvision's ``RandomCrop(padding=p)``
    does before ``Normalize``. Storing ``uint8`` keeps a split 4x smaller than float and, by
    measurement, costs nothing in speed (the conversion is fused with the gather's copy).
    """

    def __init__(
        self, images, labels, *, mean: Sequence[float], std: Sequence[float],
        pad: int = 0, flip: bool = False, device: str = "cpu",
    ):
        import torch

        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 NCHW, got {images.dtype} {tuple(images.shape)}")
        self.device = str(device)
        self.images = images.to(device)
        self.labels = labels.to(device=device, dtype=torch.long)
        c = images.shape[1]
        self._mean = torch.tensor(mean, device=device).view(1, c, 1, 1) * 255
        self._inv_std = 1 / (torch.tensor(std, device=device).view(1, c, 1, 1) * 255)
        self.pad, self.flip = pad, flip

    def __len__(self) -> int:
        return len(self.labels)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, augment: bool = False,
        generator=None, start: int = 0, drop_last: bool = False,
    ) -> Iterator[tuple]:
        """Yield ``(x float NCHW normalised, y long)`` on the split's device.

        Every random draw of the pass (order, crop offsets, flips) is taken from ``generator``
        (a CPU ``torch.Generator``) up front, so ``start=k`` skips k batches at no cost and
        yields exactly what an uninterrupted pass would have yielded from batch k on.
        """
        import torch

        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.device)
        if augment and (self.pad or self.flip):
            _, c, h, w = self.images.shape
            p = self.pad
            padded = torch.nn.functional.pad(self.images, (p, p, p, p)) if p else self.images
            oy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(self.device)
            ox = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(self.device)
            mirror = (torch.rand(n, generator=generator) < 0.5).to(self.device)
            mirror &= self.flip
            rows_base = torch.arange(h, device=self.device)
            cols_base = torch.arange(w, device=self.device)
            chans = torch.arange(c, device=self.device).view(1, c, 1, 1)
        stop = n - n % batch_size if drop_last else n
        for lo in range(start * batch_size, stop, batch_size):
            idx = order[lo:lo + batch_size]
            if augment and (self.pad or self.flip):
                rows = oy[lo:lo + batch_size, None] + rows_base
                cols = torch.where(mirror[lo:lo + batch_size, None], cols_base.flip(0), cols_base)
                cols = cols + ox[lo:lo + batch_size, None]
                x = padded[idx.view(-1, 1, 1, 1), chans, rows[:, None, :, None],
                           cols[:, None, None, :]]
            else:
                x = self.images[idx]
            yield (x.float() - self._mean) * self._inv_std, self.labels[idx]


def _read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): big-endian header, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype != 0x08:
        raise QSearchError(f"{path} is not a uint8 IDX file (bad magic number)")
    shape = np.frombuffer(raw, ">u4", ndim, 4).astype(int)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_fashion_mnist(root: Path) -> Path | None:
    """The directory holding the four IDX files under ``root``, in any known layout."""
    for d in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist"):
        if all(_idx_file(d, f) for pair in _FMNIST_FILES.values() for f in pair):
            return d
    return None


def _idx_file(d: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (d / name).is_file():
            return d / name
    return None


def load_fashion_mnist(root: str | Path | None = None, *, download: bool = False):
    """Fashion-MNIST as numpy arrays ``(x_train, y_train, x_test, y_test)``, x uint8 NHW.

    Looks in ``root`` (default: the Debian ``dataset-fashion-mnist`` directory); accepts
    the raw ``*-ubyte[.gz]`` files directly there or torchvision's ``FashionMNIST/raw``
    layout. ``download=True`` fetches the files with torchvision into ``root`` (default
    ``~/.cache/qsearch/datasets``) when they are not found.
    """
    base = Path(root) if root is not None else FASHION_MNIST_DIR
    found = _find_fashion_mnist(base)
    if found is None and download:
        target = Path(root) if root is not None else DEFAULT_DOWNLOAD_DIR
        _torchvision_download("FashionMNIST", target)
        found = _find_fashion_mnist(target)
    if found is None:
        raise QSearchError(
            f"Fashion-MNIST not found in {base} (looked for train-images-idx3-ubyte.gz and "
            "the three other IDX files there and in FashionMNIST/raw/): install it with "
            "`apt-get install dataset-fashion-mnist`, pass --data-root DIR holding the files, "
            "or pass download=True"
        )
    arrays = [_read_idx(_idx_file(found, f)) for pair in _FMNIST_FILES.values() for f in pair]
    return tuple(arrays)


def _torchvision_download(cls_name: str, root: Path) -> None:
    import torchvision

    try:
        getattr(torchvision.datasets, cls_name)(str(root), train=True, download=True)
        getattr(torchvision.datasets, cls_name)(str(root), train=False, download=True)
    except Exception as e:  # no network, disk full, mirror down: one clear message
        raise QSearchError(f"downloading {cls_name} into {root} failed: {e}") from e


@dataclass(frozen=True)
class _CifarFormat:
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: str
    title: str
    tarball: str


_CIFAR = {
    "cifar10": _CifarFormat("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                            ("test_batch",), "labels", "CIFAR-10", "cifar-10-python.tar.gz"),
    "cifar100": _CifarFormat("cifar-100-python", ("train",), ("test",), "fine_labels",
                             "CIFAR-100", "cifar-100-python.tar.gz"),
}


def load_cifar(name: str, root: str | Path | None, *, download: bool = False):
    """CIFAR-10/100 as numpy arrays ``(x_train, y_train, x_test, y_test)``, x uint8 NCHW.

    ``root`` holds the extracted python batches (``cifar-10-batches-py/``; the batch folder
    itself is accepted too), read as torchvision reads them (the files are pickles: load
    only copies you trust). ``download=True`` fetches them with torchvision.
    """
    fmt = _CIFAR[name]
    if root is None and not download:
        raise QSearchError(
            f"dataset {name!r} needs a path: pass --data-root DIR where DIR/{fmt.folder}/ "
            f"holds the {fmt.title} python batches (https://www.cs.toronto.edu/~kriz/cifar.html)"
        )
    base = Path(root) if root is not None else DEFAULT_DOWNLOAD_DIR
    if base.name == fmt.folder:
        base = base.parent
    d = base / fmt.folder
    missing = [f for f in fmt.train + fmt.test if not (d / f).is_file()]
    if missing and download:
        _torchvision_download("CIFAR10" if name == "cifar10" else "CIFAR100", base)
        missing = [f for f in fmt.train + fmt.test if not (d / f).is_file()]
    if missing:
        raise QSearchError(
            f"{fmt.title} not found: {d} lacks {', '.join(missing)}. Download {fmt.tarball} "
            f"from https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {base}, "
            "or pass download=True"
        )
    return (*_read_cifar(d, fmt.train, fmt.label_key), *_read_cifar(d, fmt.test, fmt.label_key))


def _read_cifar(d: Path, names: tuple[str, ...], label_key: str):
    xs, ys = [], []
    for name in names:
        try:
            with open(d / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry[label_key], dtype=np.int64))
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
            raise QSearchError(f"{d / name} is not a CIFAR python batch: {e!r}") from e
    return np.concatenate(xs), np.concatenate(ys)


def make_synthetic(seed: int = 0, n_train: int = 2000, n_test: int = 500):
    """A tiny learnable 4-class dataset of 16x16 grey images, for fast tests only.

    Classes: horizontal stripes, vertical stripes, a checkerboard, a bright square; each with
    a random phase/position, random contrast and Gaussian noise, so a small CNN must learn
    shift-invariant features (and cannot read the class off one pixel).
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    y = np.arange(n) % 4
    rng.shuffle(y)
    yy, xx = np.mgrid[0:16, 0:16]
    phase = rng.integers(0, 4, (n, 2))
    stripes_h = ((yy[None] + phase[:, :1, None]) // 2 % 2) * 2 - 1
    stripes_v = ((xx[None] + phase[:, 1:, None]) // 2 % 2) * 2 - 1
    pos = rng.integers(0, 11, (n, 2))
    square = (((yy[None] >= pos[:, :1, None]) & (yy[None] < pos[:, :1, None] + 6))
              & ((xx[None] >= pos[:, 1:, None]) & (xx[None] < pos[:, 1:, None] + 6))) * 2 - 1
    pattern = np.select([y[:, None, None] == k for k in range(4)],
                        [stripes_h, stripes_v, stripes_h * stripes_v, square])
    contrast = rng.uniform(0.15, 0.6, (n, 1, 1))  # low contrast + noise: ~97%, not 100%
    img = 128 + 80 * contrast * pattern + rng.normal(0, 50, (n, 16, 16))
    x = np.clip(img, 0, 255).astype(np.uint8)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


# ------------------------------------------------------------------------- split carving


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation whose every prefix holds each class in proportion.

    Each sample gets the key (rank within its class + jitter) / class size, ranks taken in a
    random order; sorting by key interleaves the classes evenly. Taking the first k indices
    is then a stratified draw of any size k, and smaller draws are prefixes of larger ones.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    lab = np.asarray(labels)[perm]
    _, lab = np.unique(lab, return_inverse=True)
    counts = np.bincount(lab)
    by_class = np.argsort(lab, kind="stable")
    rank = np.empty(len(lab))
    rank[by_class] = np.arange(len(lab)) - np.repeat(np.cumsum(counts) - counts, counts)
    key = (rank + rng.random(len(lab))) / counts[lab]
    return perm[np.argsort(key, kind="stable")]


def _count(value: float | int, n: int, what: str) -> int:
    """A fraction in [0, 1] (float) or a count (int) of ``n`` items, checked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise QSearchError(f"{what} {value!r} must be a fraction like 0.1 or a count like 5000")
    if isinstance(value, int) and value > 1 or value == 0:
        k = int(value)
    elif 0 < value <= 1:
        k = round(value * n)
    else:
        k = -1
    if not 0 <= k <= n:
        raise QSearchError(
            f"{what} {value!r} is out of range: use a fraction in (0, 1] or a count up to {n}"
        )
    return k


def carve(
    labels: np.ndarray, *, val_fraction: float | int, train_fraction: float | int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)`` of a training set: a seeded stratified validation split, then
    a stratified subset of the rest for short proxy trials.

    The validation split depends only on ``seed`` and ``val_fraction``, never on
    ``train_fraction``, so proxies of any length are compared on the same images.
    """
    n = len(labels)
    n_val = _count(val_fraction, n, "val_fraction")
    order = stratified_order(labels, seed)
    val, rest = order[:n_val], order[n_val:]
    n_train = _count(train_fraction, len(rest), "train_fraction")
    if n_train == 0:
        raise QSearchError(f"train_fraction {train_fraction!r} leaves no training images")
    sub = stratified_order(np.asarray(labels)[rest], seed + 1)[:n_train]
    return np.sort(rest[sub]), np.sort(val)


# -------------------------------------------------------------------------- ImageFolder


class _ImageList:
    """A map-style dataset over ``(path, label)`` pairs with one transform."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[i]
        return self.transform(default_loader(path)), label


class LoaderSplit:
    """A split of image files read by a DataLoader: standard ImageNet transforms.

    Train batches (``augment=True``): RandomResizedCrop(224) + horizontal flip; otherwise
    Resize(256) + CenterCrop(224). The order is drawn from ``generator`` (so ``start`` skips
    exactly), and so is the workers' base seed; with ``num_workers=0`` the transforms draw
    from torch's global RNG, which the trainer seeds and checkpoints.
    """

    def __init__(self, samples: list[tuple[str, int]], *, num_workers: int = 4,
                 device: str = "cpu", image_size: int = 224):
        from torchvision import transforms as T

        self.samples, self.num_workers, self.device = samples, num_workers, str(device)
        norm = [T.ToTensor(), T.Normalize(*IMAGENET_STATS)]
        self.train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
                                   *norm])
        self.eval_tf = T.Compose([T.Resize(round(image_size * 256 / 224)),
                                  T.CenterCrop(image_size), *norm])

    def __len__(self) -> int:
        return len(self.samples)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, augment: bool = False,
        generator=None, start: int = 0, drop_last: bool = False,
    ) -> Iterator[tuple]:
        import torch
        from torch.utils.data import DataLoader

        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        seed = int(torch.randint(2**62, (1,), generator=generator)) if generator else 0
        loader = DataLoader(
            _ImageList(self.samples, self.train_tf if augment else self.eval_tf),
            batch_size=batch_size, sampler=order[start * batch_size:].tolist(),
            num_workers=self.num_workers, drop_last=drop_last,
            pin_memory=self.device.startswith("cuda"),
            generator=torch.Generator().manual_seed(seed),
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _scan_folder(path: Path, classes: list[str] | None = None) -> tuple[list, list[str]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    if classes is None:
        classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    try:
        samples = make_dataset(str(path), index, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as e:
        raise QSearchError(f"cannot read images under {path}: {e}") from e
    return samples, classes


def _load_imagefolder(name, root, *, val_fraction, train_fraction, seed, device, num_workers):
    if root is None:
        raise QSearchError(
            f"dataset {name!r} needs a path: pass --data-root DIR with DIR/train/<class>/*.jpg "
            "and DIR/val/<class>/*.jpg"
        )
    info = dataset_info("imagefolder", root)
    if name == "imagenet":
        if info.num_classes != 1000:
            raise QSearchError(
                f"{root}/train has {info.num_classes} class folders, ImageNet has 1000: "
                "use dataset 'imagefolder' for other folder datasets (e.g. Imagenette)"
            )
        info = DATASETS["imagenet"]
    samples, classes = _scan_folder(Path(root) / "train")
    if not (Path(root) / "val").is_dir():
        raise QSearchError(f"no {Path(root) / 'val'} folder: the test split is read from "
                           "DIR/val/<class>/ (same class names as DIR/train/)")
    test, _ = _scan_folder(Path(root) / "val", classes)
    labels = np.array([y for _, y in samples])
    tr, va = carve(labels, val_fraction=val_fraction, train_fraction=train_fraction, seed=seed)
    kw = dict(num_workers=num_workers, device=device)
    return Splits(LoaderSplit([samples[i] for i in tr], **kw),
                  LoaderSplit([samples[i] for i in va], **kw), LoaderSplit(test, **kw), info)


# -------------------------------------------------------------------------------- entry


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    val_fraction: float | int = 0.1,
    train_fraction: float | int = 1.0,
    seed: int = 0,
    device: str = "cpu",
    download: bool = False,
    num_workers: int | None = None,
) -> Splits:
    """Load a dataset as train / validation / test splits.

    ``val_fraction`` (a fraction, or an int count) of the training set is held out, seeded
    and stratified, for model selection; ``train_fraction`` (fraction or count) of the rest
    is used for training, for short proxy trials. The official test split is untouched.
    Small datasets are held whole on ``device``; ``num_workers`` (default: up to 4 CPUs)
    only matters for ImageFolder datasets.
    """
    info = dataset_info(name, root if name == "imagefolder" else None)
    if name in ("imagenet", "imagefolder"):
        workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        return _load_imagefolder(name, root, val_fraction=val_fraction,
                                 train_fraction=train_fraction, seed=seed, device=device,
                                 num_workers=workers)
    if name == "fashion-mnist":
        x, y, xt, yt = load_fashion_mnist(root, download=download)
        mean, std = _STATS[name]
    elif name in _CIFAR:
        x, y, xt, yt = load_cifar(name, root, download=download)
        mean, std = _STATS[name]
    else:  # synthetic: fixed content, the seed only picks the splits
        x, y, xt, yt = make_synthetic()
        mean, std = (float(x.mean()) / 255,), (float(x.std()) / 255,)
    return _tensor_splits(info, x, y, xt, yt, mean=mean, std=std, val_fraction=val_fraction,
                          train_fraction=train_fraction, seed=seed, device=device)


def _tensor_splits(info, x, y, xt, yt, *, mean, std, val_fraction, train_fraction, seed,
                   device) -> Splits:
    import torch

    if x.ndim == 3:  # NHW -> N1HW
        x, xt = x[:, None], xt[:, None]
    tr, va = carve(y, val_fraction=val_fraction, train_fraction=train_fraction, seed=seed)
    pad, flip = _AUGMENT[info.name]

    def split(images, labels, idx=None):
        if idx is not None:
            images, labels = images[idx], labels[idx]
        return TensorSplit(torch.from_numpy(np.array(images, order="C")),  # own, writable
                           torch.from_numpy(np.asarray(labels, dtype=np.int64)),
                           mean=mean, std=std, pad=pad, flip=flip, device=device)

    return Splits(split(x, y, tr), split(x, y, va), split(xt, yt), info)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches ``batches(batch_size, drop_last=...)`` yields for ``n`` images."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)
