"""ImageFolder datasets (ImageNet, Imagenette): image files read by a DataLoader.

Train / validation are carved from ``DIR/train/<class>/``; the test split is ``DIR/val/``.
torchvision is imported only when a split is built or read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from qsearch import QSearchError
from qsearch.data import DATASETS, IMAGENET_STATS, Splits, carve, dataset_info


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
    from torch's global RNG, which the trainer seeds and checkpoints. ``pin_memory`` loads
    batches into page-locked memory for a GPU ``device`` (opt-in: see bench_gpu.py).
    """

    def __init__(self, samples: list[tuple[str, int]], *, num_workers: int = 4,
                 device: str = "cpu", image_size: int = 224, pin_memory: bool = False):
        from torchvision import transforms as T

        self.samples, self.num_workers, self.device = samples, num_workers, str(device)
        self.pin_memory = pin_memory and self.device.startswith("cuda")
        norm = [T.ToTensor(), T.Normalize(*IMAGENET_STATS)]
        self.train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
                                   *norm])
        self.eval_tf = T.Compose([T.Resize(round(image_size * 256 / 224)),
                                  T.CenterCrop(image_size), *norm])

    def __len__(self) -> int:
        return len(self.samples)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, augment: bool = False,
        generator=None, start: int = 0, drop_last: bool = False, shard=None,
    ) -> Iterator[tuple]:
        """Batches from ``start`` on; with a ``shard`` (:class:`qsearch.parallel.Shard`),
        that worker's slice of each global batch of ``batch_size`` (drawn with a seed of its
        own, so workers do not repeat each other's augmentations)."""
        import torch
        from torch.utils.data import DataLoader

        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        seed = int(torch.randint(2**62, (1,), generator=generator)) if generator else 0
        order = order[start * batch_size:]
        if shard is not None:  # the worker's slice of every global batch, in order
            first, size = shard.part(batch_size)
            full = len(order) - len(order) % batch_size
            order = order[:full].view(-1, batch_size)[:, first:first + size].reshape(-1)
            batch_size, seed = size, seed + shard.rank
        loader = DataLoader(
            _ImageList(self.samples, self.train_tf if augment else self.eval_tf),
            batch_size=batch_size, sampler=order.tolist(),
            num_workers=self.num_workers, drop_last=drop_last, pin_memory=self.pin_memory,
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


def load_imagefolder(name, root, *, val_fraction, train_fraction, seed, device, num_workers,
                     pin_memory=False):
    """Splits of an ImageFolder tree: train/val carved from ``root/train``, test ``root/val``."""
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
    kw = dict(num_workers=num_workers, device=device, pin_memory=pin_memory)
    return Splits(LoaderSplit([samples[i] for i in tr], **kw),
                  LoaderSplit([samples[i] for i in va], **kw), LoaderSplit(test, **kw), info)
