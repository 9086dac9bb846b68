"""Post-training trials (``--trial-mode ptq``): a candidate is the checkpoint's float weights
quantized at its bits, its activation ranges (and BatchNorm statistics) calibrated on a few
training batches, and its validation accuracy measured - no training, seconds per candidate,
the flow of AIMET's AMP and MixQuant (Sec. 3, which evaluates candidates post-training).

Calibration choices, stated once: ``CALIB_BATCHES`` batches in a fixed order, no gradient;
each EMA activation quantizer takes its range from them; BatchNorm statistics are
re-estimated on the same batches as an exact average (quantized weights shift every layer's
output statistics, and the float model's running statistics no longer match them: see
docs/results/pretrained.md for the measured effect). The final stage still fine-tunes and
tests the winner with quantization-aware training.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from qsearch.strategy import Result
from qsearch.tasks import TaskContext, cost_metrics, register_task

if TYPE_CHECKING:
    import torch.nn as nn

CALIB_BATCHES = 8


@contextmanager
def estimating(model: nn.Module, *, batchnorm: bool, act_ranges: bool) -> Iterator[None]:
    """``model`` in eval mode except the statistics being estimated: BatchNorm (reset, then
    an exact cumulative average) and/or the EMA activation quantizers' ranges. Eval mode on
    exit, BatchNorm momenta restored."""
    import torch
    import torch.nn as nn

    from qsearch.actquant import EMAActQuant

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] \
        if batchnorm else []
    acts = [m for m in model.modules() if isinstance(m, EMAActQuant)] if act_ranges else []
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    for m in (*bns, *acts):
        m.train()
    try:
        with torch.no_grad():
            yield
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.eval()


def calibrate(model: nn.Module, batches: Iterable, n: int, device: str, *,
              batchnorm: bool = True) -> None:
    """Activation ranges (and, with ``batchnorm``, BatchNorm statistics) from ``n`` batches."""
    with estimating(model, batchnorm=batchnorm, act_ranges=True):
        for x, _ in itertools.islice(batches, n):
            model(x.to(device))


def quantized_from(ctx: TaskContext, cand, weights: str, *, scheme: str = "dualprecision",
                   batches: int = CALIB_BATCHES) -> nn.Module:
    """The float ``weights`` (a state_dict file) quantized at ``cand``'s bits with ``scheme``
    and calibrated on ``batches`` training batches of the trial's order: the model of a
    post-training trial (this module's ``ptq`` and MixQuant's)."""
    import torch

    from qsearch.pretrained import load_pretrained
    from qsearch.qlayers import quantize_model

    torch.manual_seed(ctx.seed)
    model = ctx.space.build(cand)
    load_pretrained(model, weights, ctx.space.model)
    quantize_model(model, ctx.space.layer_bits(cand), cand.a_bits, scheme=scheme)
    model.to(ctx.device)
    order = torch.Generator().manual_seed(ctx.seed)
    calibrate(model, ctx.splits().train.batches(ctx.train_config().batch_size, shuffle=True,
                                                generator=order), batches, ctx.device)
    return model


@register_task("ptq")
def ptq_task(ctx: TaskContext) -> Result:
    """The proposed candidate as the checkpoint quantized post-training: validation accuracy."""
    from qsearch.train import evaluate

    cand = ctx.proposal.candidate
    start = time.perf_counter()
    model = quantized_from(ctx, cand, ctx.checkpoint)
    acc, loss = evaluate(model, ctx.splits().val, batch_size=ctx.train_config().eval_batch_size,
                         device=ctx.device)
    return Result("ok", acc, cand, {**cost_metrics(ctx.space, cand, ctx.budget),
                                    "val_loss": loss, "trial_mode": "ptq",
                                    "task_seconds": time.perf_counter() - start})
