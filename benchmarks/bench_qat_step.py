"""Cost of a QAT train step: ResNet-20, float vs qsearch fake quantization vs torch.ao.

One train step = forward + backward + SGD step, batch 128, 28x28x1 input, 10 classes, on one
CPU thread by default. The quantized variants keep the first conv and the last Linear at 8
bits and the other layers at 4 bits, as the papers do. The torch.ao baseline wraps the same
weights in a per-channel symmetric ``FakeQuantize`` (moving-average min/max observer) via a
parametrization. Variants run interleaved, round by round, so load on the machine hits all
of them alike; the median over rounds is reported.

    python benchmarks/bench_qat_step.py [--steps 30] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn
from torch.ao.quantization import FakeQuantize, MovingAveragePerChannelMinMaxObserver
from torch.nn.utils import parametrize

from qsearch.qlayers import quantize_model
from qsearch.quant import dp_quantize
from qsearch.spaces import get_family


def resnet20() -> nn.Module:
    fam = get_family("resnet20")
    return fam.build(fam.plan(1.0), in_channels=1, num_classes=10)


def layer_bits(model: nn.Module, bits: int = 4) -> dict[str, int]:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    first = names[0]  # first Conv2d in named_modules order
    last = next(n for n in reversed(names) if isinstance(model.get_submodule(n), nn.Linear))
    return {n: 8 if n in (first, last) else bits for n in names}


class AOFakeQuantWeight(nn.Module):
    """torch.ao per-channel symmetric FakeQuantize, as a weight parametrization."""

    def __init__(self, bits: int):
        super().__init__()
        self.fq = FakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver,
            quant_min=-(2 ** (bits - 1)),
            quant_max=2 ** (bits - 1) - 1,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
        )()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.fq(w)


def torch_ao(model: nn.Module, bits: dict[str, int]) -> nn.Module:
    for name, b in bits.items():
        parametrize.register_parametrization(
            model.get_submodule(name), "weight", AOFakeQuantWeight(b)
        )
    return model


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    model.train()

    def step() -> float:
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step


def ste_forms(model: nn.Module, reps: int = 200) -> dict[str, float]:
    """Per-step cost of quantizing all ResNet-20 weights at 4 bits, fwd + bwd, two STE forms."""
    ws = [
        m.weight.detach().clone().requires_grad_()
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]

    def detach_form(w: torch.Tensor) -> torch.Tensor:
        return w + (dp_quantize(w.detach(), 4) - w).detach()

    out = {}
    for label, fn in (
        ("autograd.Function", lambda w: dp_quantize(w, 4)),
        ("w + (q - w).detach()", detach_form),
    ):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            sum(fn(w).sum() for w in ws).backward()
            times.append(time.perf_counter() - t0)
        out[label] = statistics.median(times[reps // 5 :])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed rounds (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)

    base = resnet20()
    bits = layer_bits(base)
    variants = {
        "float": copy.deepcopy(base),
        "qsearch W4 (dualprecision)": quantize_model(copy.deepcopy(base), bits),
        "torch.ao FakeQuantize W4": torch_ao(copy.deepcopy(base), bits),
        "qsearch W4A4": quantize_model(copy.deepcopy(base), bits, a_bits=4),
    }
    x = torch.randn(128, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (128,), device=dev)
    steps = {k: make_step(m.to(dev), x, y) for k, m in variants.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.steps):
        for k, step in steps.items():
            times[k].append(step())

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"ResNet-20, batch 128, 1x28x28, {args.device}, {torch.get_num_threads()} thread(s), "
        f"median of {args.steps} steps after {args.warmup} warm-up, torch {torch.__version__}"
    )
    print(f"{'variant':<30}{'ms/step':>10}{'vs float':>10}")
    for k, v in med.items():
        print(f"{k:<30}{1e3 * v:>10.1f}{v / med['float']:>9.3f}x")
    print(
        f"ratios side by side: qsearch W4 {med['qsearch W4 (dualprecision)'] / med['float']:.3f}x"
        f" | torch.ao W4 {med['torch.ao FakeQuantize W4'] / med['float']:.3f}x"
        f" | qsearch W4A4 {med['qsearch W4A4'] / med['float']:.3f}x"
    )
    if dev.type == "cpu":
        forms = ste_forms(base)
        print(
            "STE form, all ResNet-20 weights at 4 bits, fwd+bwd: "
            + ", ".join(f"{k} {1e3 * v:.3f} ms" for k, v in forms.items())
        )


if __name__ == "__main__":
    main()
