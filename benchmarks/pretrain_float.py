"""Train a float model of a space once and save its ``state_dict``: the pretrained starting
point that ``qsearch run --checkpoint FILE`` fine-tunes from (``--trial-mode ptq`` quantizes it
without training).

The model is the space's network at ``--width`` (default 1, the fixed width a checkpoint
search uses), float weights and activations, trained with qsearch's one training loop and its
dataset recipe (SGD, cosine schedule, warm-up) for ``--epochs``. It prints the validation and
test accuracy and writes the file atomically.

Example (the checkpoint of docs/results/pretrained.md)::

    python benchmarks/pretrain_float.py --model resnet20 --epochs 3 \\
        --out runs/float/resnet20-fashion-mnist.pt
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from qsearch.data import load_dataset
from qsearch.space import SearchSpace
from qsearch.train import evaluate, set_threads, train
from qsearch.train_config import TrainConfig


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data-root")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    space = SearchSpace(args.model, args.dataset, data_root=args.data_root)
    splits = load_dataset(args.dataset, root=args.data_root, seed=args.seed)
    torch.manual_seed(args.seed)
    model = space.build(args.width)
    config = TrainConfig.recipe(args.dataset, epochs=args.epochs, seed=args.seed)
    start = time.perf_counter()
    res = train(model, splits, config, callback=_progress)
    test_acc, _ = evaluate(model, splits.test)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, out)
    print(f"{args.model} width {args.width:g} float, {args.epochs:g} epochs ({res.steps} steps, "
          f"{time.perf_counter() - start:.0f} s): val {res.val_acc:.2%}, test {test_acc:.2%}"
          f" -> {out}")


def _progress(metrics: dict, _state) -> bool:
    print(f"  step {metrics['step']}: val {metrics.get('val_acc', float('nan')):.2%}", flush=True)
    return False


if __name__ == "__main__":
    main()
