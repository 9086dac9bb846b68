"""Images/s of one augmented Fashion-MNIST epoch: qsearch's fast path vs a DataLoader loop.

Both sides do the same work per image: random crop with 2-pixel zero padding, horizontal
flip, conversion to float and normalisation, batches of 128 in a shuffled order. The
baseline is what torchvision's ``FashionMNIST`` + ``transforms`` does (a PIL image per item,
``RandomCrop(28, padding=2)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``),
read by a DataLoader with 0 and 1 worker processes. A third row stores the split as
pre-normalised float instead of uint8, to check that choice.

    python benchmarks/bench_data.py [--images N] [--root DIR] [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from qsearch.data import _STATS, TensorSplit, load_dataset

MEAN, STD = _STATS["fashion-mnist"]


class PILDataset(Dataset):
    """torchvision's FashionMNIST ``__getitem__``: uint8 tensor -> PIL image -> transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i, 0].numpy(), mode="L")
        return self.transform(img), int(self.labels[i])


def timed(batches) -> tuple[float, int]:
    """Seconds to draw every batch, and the number of images."""
    t, n, cuda = time.perf_counter(), 0, False
    for x, y in batches:
        n, cuda = n + len(y), x.is_cuda
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t, n


def float_storage_epoch(split: TensorSplit, batch_size: int, g: torch.Generator):
    """The fast path's gather on a pre-normalised float copy (padding = normalised 0)."""
    images = (split.images.float() - split._mean) * split._inv_std
    n, c, h, w = images.shape
    zero = float(-split._mean.view(-1)[0] * split._inv_std.view(-1)[0])  # raw 0, normalised
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), value=zero)
    dev = images.device
    order = torch.randperm(n, generator=g).to(dev)
    oy = torch.randint(0, 5, (n,), generator=g).to(dev)
    ox = torch.randint(0, 5, (n,), generator=g).to(dev)
    mirror = (torch.rand(n, generator=g) < 0.5).to(dev)
    base = torch.arange(h, device=dev)
    chans = torch.arange(c, device=dev).view(1, c, 1, 1)
    for lo in range(0, n, batch_size):
        idx = order[lo:lo + batch_size]
        rows = oy[lo:lo + batch_size, None] + base
        cols = torch.where(mirror[lo:lo + batch_size, None], base.flip(0), base)
        cols = cols + ox[lo:lo + batch_size, None]
        x = padded[idx.view(-1, 1, 1, 1), chans, rows[:, None, :, None], cols[:, None, None, :]]
        yield x, split.labels[idx]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=60000, help="images per epoch (<= 60000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--root", default=None, help="Fashion-MNIST files (default: Debian's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    splits = load_dataset("fashion-mnist", root=args.root, val_fraction=0,
                          train_fraction=args.images, device=args.device)
    train = splits.train
    bs = args.batch_size
    print(f"Fashion-MNIST, {len(train)} images, batch {bs}, crop(pad 2) + flip, "
          f"device {args.device}, {args.threads} torch thread(s)")
    g = torch.Generator().manual_seed(0)
    list(train.batches(bs, shuffle=True, augment=True, generator=g))  # warm-up
    rows = {
        "fast path (uint8 on device, batched gather)":
            timed(train.batches(bs, shuffle=True, augment=True, generator=g)),
        "fast path, float storage":
            timed(float_storage_epoch(train, bs, g)),
    }
    tf = T.Compose([T.RandomCrop(28, padding=2), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(MEAN, STD)])
    ds = PILDataset(train.images.cpu(), train.labels.cpu(), tf)
    for workers in (0, 1):
        loader = DataLoader(ds, batch_size=bs, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(0))
        rows[f"DataLoader + PIL transforms, num_workers={workers}"] = timed(
            (x.to(args.device), y) for x, y in loader)

    fast = None
    for name, (seconds, n) in rows.items():
        rate = n / seconds
        fast = fast or rate
        print(f"{name:52s} {seconds:7.2f} s  {rate:10,.0f} images/s  "
              f"(fast path is {fast / rate:5.1f}x)")


if __name__ == "__main__":
    main()
