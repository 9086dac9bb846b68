"""Dataset file readers: Fashion-MNIST IDX files, CIFAR python batches, synthetic data.

Each reader returns numpy arrays ``(x_train, y_train, x_test, y_test)`` with ``uint8`` images;
``qsearch.data`` turns them into on-device splits. Downloads go through torchvision, imported
only when asked.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qsearch import QSearchError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DOWNLOAD_DIR = Path.home() / ".cache" / "qsearch" / "datasets"


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


CIFAR_FORMATS = {
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
    fmt = CIFAR_FORMATS[name]
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
