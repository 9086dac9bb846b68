"""MixQuant's model-side pieces: reading a float checkpoint, and the two trial tasks.

``mixquant_float`` trains the float model and reports its QE table (the strategy's prelude
trial); ``mixquant_ptq`` quantizes those float weights after training, calibrates the
activation ranges and re-estimates BatchNorm (:func:`qsearch.ptq.calibrate`), and evaluates
(``mode="ptq"``). :mod:`.mixquant` imports this module,
which registers the tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from qsearch import QSearchError
from qsearch.space import SearchSpace
from qsearch.strategies._qe import qe_table
from qsearch.strategy import Result
from qsearch.tasks import TaskContext, cost_metrics, register_task

if TYPE_CHECKING:
    from torch import Tensor


# ----- a float checkpoint -------------------------------------------------------------
def load_checkpoint(space: SearchSpace, path: str,
                     width: float | None) -> tuple[float, list[Tensor]]:
    """Width and per-layer weights (inventory order) of a float state_dict file."""
    from qsearch.pretrained import matched, read_state_dict

    state = read_state_dict(path)
    if width is None:
        width = 1.0 if space.family.fixed_width else _infer_width(space, state)
    model = space.build(float(width))
    tensors, _ = matched(model, state, path, f"{space.model} at width {width:.4g} (pass "
                         "checkpoint_width=W for the width it was trained at)")
    model.load_state_dict(tensors, strict=False)
    modules = dict(model.named_modules())
    return float(width), [modules[layer.name].weight.detach() for layer in space.layers]


def _infer_width(space: SearchSpace, state: dict) -> float:
    """The width whose layer shapes hold as many weights as the checkpoint (bisection)."""
    try:
        target = sum(int(state[f"{layer.name}.weight"].numel()) for layer in space.layers)
    except KeyError as e:
        raise QSearchError(f"mixquant checkpoint has no weight {e.args[0]!r} of {space.model}: "
                           "is it a state_dict of this space's model?") from None
    lo, hi = space.width_bounds
    total = lambda w: float(space.params(w).sum())  # noqa: E731
    if not total(lo) <= target <= total(hi):
        raise QSearchError(f"mixquant checkpoint ({target} weights) fits no {space.model} width "
                           f"in {space.width_bounds}: pass checkpoint_width=W")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if total(mid) == target:
            return mid
        lo, hi = (mid, hi) if total(mid) < target else (lo, mid)
    return hi

# ----- trial tasks --------------------------------------------------------------------
@register_task("mixquant_float")
def float_task(ctx: TaskContext) -> Result:
    """Train the float model for the trial length; report its QE table (and save weights)."""
    import torch

    p = ctx.proposal.params
    start = time.perf_counter()
    torch.manual_seed(ctx.seed)
    model = ctx.space.build(float(p["width"])).to(ctx.device)
    res = ctx.train_model(model)
    if res.status == "diverged":
        return Result("diverged", error=res.reason, metrics={"steps": res.steps})
    modules = dict(model.named_modules())
    weights = [modules[layer.name].weight for layer in ctx.space.layers]
    t0 = time.perf_counter()
    table = qe_table(weights, p["bits"], quantizer=p["quantizer"], per_channel=p["per_channel"])
    qe_seconds = time.perf_counter() - t0
    path = None
    if p.get("weights_dir"):
        path = _save_weights(model, Path(p["weights_dir"]), ctx)
    acc = float("nan") if res.val_acc is None else float(res.val_acc)
    return Result("ok", acc, None, {
        "qe_table": table.tolist(), "qe_bits": list(p["bits"]), "width": float(p["width"]),
        "weights_path": path, "float_val_acc": res.val_acc, "qe_seconds": qe_seconds,
        "train_seconds": res.train_seconds, "steps": res.steps,
        "task_seconds": time.perf_counter() - start})


def _save_weights(model, directory: Path, ctx: TaskContext) -> str:
    """``state_dict`` file under ``directory``, named by what produced it (a retried trial
    overwrites its own file); written atomically."""
    import torch

    key = json.dumps({"space": ctx.space.describe(), "params": ctx.proposal.params,
                      "train": ctx.train, "data": ctx.data, "seed": ctx.seed},
                     sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"mixquant-float-{ctx.space.model}-{ctx.space.dataset}-{digest}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return str(path)


@register_task("mixquant_ptq")
def ptq_task(ctx: TaskContext) -> Result:
    """Post-training quantization of the float weights at the proposal's bits, then eval."""
    from qsearch.ptq import quantized_from
    from qsearch.train import evaluate

    cand, p = ctx.proposal.candidate, ctx.proposal.params
    start = time.perf_counter()
    model = quantized_from(ctx, cand, p["weights_path"], scheme=p["scheme"],
                           batches=p["calib_batches"])  # BN re-estimated, as ptq trials
    splits, config = ctx.splits(), ctx.train_config()
    ptq_acc, ptq_loss = evaluate(model, splits.val, batch_size=config.eval_batch_size,
                                 device=ctx.device)
    metrics = {**cost_metrics(ctx.space, cand, ctx.budget), "qem": p["qem"],
               "ptq_val_acc": ptq_acc, "ptq_val_loss": ptq_loss,
               "finetune_steps": p["finetune_steps"]}
    acc, status, error = ptq_acc, "ok", None
    if p["finetune_steps"]:
        ft = ctx.train_config(epochs=None, steps=p["finetune_steps"], lr=p["finetune_lr"])
        res = ctx.train_model(model, ft, splits=splits)
        status = res.status
        acc = float("nan") if res.val_acc is None else res.val_acc
        error = res.reason if status == "diverged" else None
        metrics.update(train_seconds=res.train_seconds, steps=res.steps)
    metrics["task_seconds"] = time.perf_counter() - start
    return Result(status, acc, cand, metrics, error=error)
