"""The GPU path measured: images/s of QAT trials through qsearch's one training loop.

1. ResNet-20, W4A4 (first conv and last Linear at 8 bits), CIFAR-shaped data (3x32x32, 10
   classes) held on the GPU as qsearch holds small datasets, batch 128: 1, 2 and 4
   concurrent trials on one GPU (what ``--gpus-per-trial 1 / 0.5 / 0.25`` packs; separate
   processes, started together), images/s of all of them together. Each device switch of
   ``qsearch.train.Execution`` is measured with and without: ``--bf16``,
   ``--channels-last``, both.
2. ResNet-18, W4A4, ImageNet-shaped synthetic data (3x224x224, 1000 classes), batch 128, one
   trial on the GPU: with the data on the GPU (the compute ceiling; the same switches), and
   read from synthetic JPEG files by the ImageFolder loader (RandomResizedCrop, flip) with
   ``--pin-memory`` off and on.

Trials run ``--warmup`` steps first (cuDNN autotuning, allocator); images/s are those of the
``--steps`` steps after. The switches are opt-in in qsearch until this benchmark shows a
gain on the GPU at hand: run it there and turn on what helps.

    python benchmarks/bench_gpu.py [--steps 100] [--warmup 20] [--workers 8]

Without a CUDA GPU it says so and exits 0 (``--device cpu`` runs the harness on the CPU, as
a smoke test whose figures say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

VARIANTS = {"fp32": (False, False), "bf16": (True, False), "channels_last": (False, True),
            "bf16+channels_last": (True, True)}


def _model(kind: str):
    """A W4A4 QAT model as a search trial builds it (width 1)."""
    from qsearch.qlayers import quantize_model
    from qsearch.space import SearchSpace

    space = SearchSpace(*(("resnet18", "imagenet") if kind == "resnet18" else
                          ("resnet20", "cifar10")), a_bits=4)
    cand = space.candidate(4, width=1.0)
    model = space.build(cand)
    return quantize_model(model, space.layer_bits(cand), cand.a_bits)


def _resident(kind: str, n: int, device: str, n_val: int):
    """Random images held on ``device`` as qsearch's fast path holds small datasets (a
    validation split of ``n_val``: evaluations are outside the timed window anyway)."""
    import torch

    from qsearch.data import DATASETS, Splits, TensorSplit

    size, classes = (224, 1000) if kind == "resnet18" else (32, 10)
    g = torch.Generator().manual_seed(0)

    def split(count: int) -> TensorSplit:
        images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=g)
        return TensorSplit(images, torch.randint(0, classes, (count,), generator=g),
                           mean=(0.5,) * 3, std=(0.25,) * 3, pad=4 if size == 32 else 0,
                           flip=True, device=device)

    val = split(n_val)
    return Splits(split(n), val, val, DATASETS["cifar10" if size == 32 else "imagenet"])


def _trial(job: dict, barrier, results) -> None:
    """One trial process: build, wait for the others, train, report images/s."""
    import torch

    from qsearch.train import Execution, TrainConfig, train

    torch.manual_seed(0)
    device = job["device"]
    if job.get("folder"):
        from qsearch.data import load_dataset

        splits = load_dataset("imagefolder", root=job["folder"], device=device,
                              val_fraction=job["batch"], num_workers=job["workers"],
                              pin_memory=job["pin_memory"])
    else:
        splits = _resident(job["kind"], job["images"], device, job["batch"])
    model = _model(job["kind"])
    warm, steps = job["warmup"], job["steps"]
    config = TrainConfig(steps=warm + steps, batch_size=job["batch"], eval_steps=(warm,),
                         eval_batch_size=job["batch"])
    barrier.wait()
    res = train(model, splits, config, device=device,
                execution=Execution(bf16=job["bf16"], channels_last=job["channels_last"]))
    results.put(res.history[-1]["images_per_s"])  # the window after the warm-up evaluation


def measure(job: dict, trials: int = 1) -> float:
    """Images/s of ``trials`` concurrent trial processes of ``job``, all together."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(trials), ctx.Queue()
    procs = [ctx.Process(target=_trial, args=(job, barrier, results)) for _ in range(trials)]
    for p in procs:
        p.start()
    rates = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a trial process failed (exit code {p.exitcode})")
    return sum(rates)


def _jpeg_folder(root: str, n: int, classes: int = 10) -> str:
    """``n`` synthetic 256x256 JPEGs in ImageFolder layout (train/ and val/): smooth random
    images (upsampled 32x32 noise), about the size of an ImageNet JPEG at that scale."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", classes)):
        for i in range(count):
            d = os.path.join(root, split, f"c{i % classes}")
            os.makedirs(d, exist_ok=True)
            small = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            small.resize((256, 256), Image.BILINEAR).save(os.path.join(d, f"{i}.jpg"),
                                                          quality=90)
    return root


def resnet20_table(args, base: dict) -> None:
    counts = [int(c) for c in args.concurrency.split(",")]
    print(f"\nResNet-20 W4A4, 3x32x32 on the device, batch {args.batch}: images/s of all "
          "concurrent trials together")
    print(f"{'variant':<20}" + "".join(f"{f'{c} trial(s)':>14}" for c in counts))
    for name, (bf16, cl) in VARIANTS.items():
        job = {**base, "kind": "resnet20", "images": 4096, "bf16": bf16, "channels_last": cl}
        rates = [measure(job, c) for c in counts]
        print(f"{name:<20}" + "".join(f"{r:>14.0f}" for r in rates), flush=True)


def resnet18_table(args, base: dict) -> None:
    print(f"\nResNet-18 W4A4, 3x224x224, batch {args.batch}, one trial: images/s")
    fp32 = None
    for name, (bf16, cl) in VARIANTS.items():
        job = {**base, "kind": "resnet18", "images": 2 * args.batch, "bf16": bf16,
               "channels_last": cl}
        rate = measure(job)
        fp32 = fp32 or rate
        print(f"  data on the device, {name:<20}{rate:>10.0f}  ({rate / fp32:.2f}x fp32)",
              flush=True)
    warm, steps = args.loader_steps
    with tempfile.TemporaryDirectory() as d:  # one epoch covers every step: no loader restart
        folder = _jpeg_folder(d, args.batch * (warm + steps + 2))
        plain = None
        for pin in (False, True):
            job = {**base, "kind": "resnet18", "folder": folder, "workers": args.workers,
                   "pin_memory": pin, "bf16": False, "channels_last": False,
                   "warmup": warm, "steps": steps}
            rate = measure(job)
            plain = plain or rate
            print(f"  JPEG ImageFolder, {args.workers} loader workers, pin_memory {pin!s:<5}"
                  f"{rate:>10.0f}  ({rate / plain:.2f}x unpinned)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="timed steps per trial")
    ap.add_argument("--warmup", type=int, default=20, help="steps before the timed ones")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--concurrency", default="1,2,4", help="trials per GPU to measure")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="ImageFolder loader processes")
    ap.add_argument("--loader-steps", type=lambda t: tuple(int(v) for v in t.split(",")),
                    default=(10, 40), help="warm-up,timed steps of the JPEG runs (the "
                    "files of every step are written first)")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke run")
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU on this machine (torch.cuda.is_available() is False): "
              "nothing measured. Run it on a GPU machine.")
        return
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(f"bench_gpu on {where}, torch {torch.__version__}, {args.warmup} warm-up + "
          f"{args.steps} timed steps per trial")
    base = {"device": args.device, "batch": args.batch, "warmup": args.warmup,
            "steps": args.steps, "pin_memory": False}
    t0 = time.perf_counter()
    resnet20_table(args, base)
    resnet18_table(args, base)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
