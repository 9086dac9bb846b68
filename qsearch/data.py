"""Datasets: metadata without loading, on-device splits, split carving and ``load_dataset``.

Small datasets (Fashion-MNIST, CIFAR-10/100, synthetic) take a fast path: the whole split
lives on the target device as ``uint8`` tensors and every batch is normalised and augmented
there in one gather, with no DataLoader and no workers (see ``benchmarks/bench_data.py``).
ImageFolder datasets (ImageNet, Imagenette) go through a DataLoader with the standard
transforms (``qsearch.imagefolder``). Both kinds of split answer the same ``batches(...)``
call. The files are read by ``qsearch.readers``.

Validation is carved from the training set with a seeded, stratified draw; searches select on
it, and the test split is kept for the final evaluation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from qsearch import QSearchError
from qsearch.readers import CIFAR_FORMATS, load_cifar, load_fashion_mnist, make_synthetic


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
        generator=None, start: int = 0, drop_last: bool = False, shard=None,
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
        generator=None, start: int = 0, drop_last: bool = False, shard=None,
    ) -> Iterator[tuple]:
        """Yield ``(x float NCHW normalised, y long)`` on the split's device.

        Every random draw of the pass (order, crop offsets, flips) is taken from ``generator``
        (a CPU ``torch.Generator``) up front, so ``start=k`` skips k batches at no cost and
        yields exactly what an uninterrupted pass would have yielded from batch k on. With a
        ``shard`` (:class:`qsearch.parallel.Shard`) each batch is that worker's slice of the
        global batch of ``batch_size``: the workers' slices make up the unsharded batch.
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
        first, size = shard.part(batch_size) if shard else (0, batch_size)
        for lo in range(start * batch_size + first, stop, batch_size):
            hi = min(lo + size, stop)
            idx = order[lo:hi]
            if augment and (self.pad or self.flip):
                rows = oy[lo:hi, None] + rows_base
                cols = torch.where(mirror[lo:hi, None], cols_base.flip(0), cols_base)
                cols = cols + ox[lo:hi, None]
                x = padded[idx.view(-1, 1, 1, 1), chans, rows[:, None, :, None],
                           cols[:, None, None, :]]
            else:
                x = self.images[idx]
            yield (x.float() - self._mean) * self._inv_std, self.labels[idx]


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
    pin_memory: bool = False,
) -> Splits:
    """Load a dataset as train / validation / test splits.

    ``val_fraction`` (a fraction, or an int count) of the training set is held out, seeded
    and stratified, for model selection; ``train_fraction`` (fraction or count) of the rest
    is used for training, for short proxy trials. The official test split is untouched.
    Small datasets are held whole on ``device``; ``num_workers`` (default: up to 4 CPUs)
    and ``pin_memory`` (page-locked host batches, for a GPU ``device``) only matter for
    ImageFolder datasets.
    """
    info = dataset_info(name, root if name == "imagefolder" else None)
    if name in ("imagenet", "imagefolder"):
        from qsearch.imagefolder import load_imagefolder  # imports this module: load lazily

        workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        return load_imagefolder(name, root, val_fraction=val_fraction,
                                train_fraction=train_fraction, seed=seed, device=device,
                                num_workers=workers, pin_memory=pin_memory)
    if name == "fashion-mnist":
        x, y, xt, yt = load_fashion_mnist(root, download=download)
        mean, std = _STATS[name]
    elif name in CIFAR_FORMATS:
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
