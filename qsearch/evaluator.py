"""``--evaluator supernet``: the weight-sharing evaluator's trials and stages, Ray-free.

An experiment with this evaluator runs three stages before its final one, each a Ray Tune
trial (or several) of the runner like any other:

1. ``supernet``: :class:`SupernetTraining` trains the space's supernet at the search budget
   (:mod:`qsearch.supernet`) with ``spec.supernet_train``, checkpointed and resumable, and
   saves its weights in the cache (``spec.supernet_cache``, keyed by everything the weights
   depend on). A later search of the same space finds them there and trains nothing.
2. ``search``: the strategy's ``train`` trials become ``supernet-eval`` trials: cut the
   candidate out, recalibrate BatchNorm, validate - seconds instead of minutes. An
   evaluation is deterministic, so it is kept beside the supernet (``evals/``): a candidate
   proposed again, by this search or a later one, is looked up instead of recomputed.
3. ``topk``: :class:`TopK` retrains the ``spec.top_k`` best distinct candidates by supernet
   accuracy stand-alone with the search's trial recipe; the final stage takes the best of
   those, so no supernet number reaches the leaderboard.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from qsearch import QSearchError
from qsearch.budget import Budget
from qsearch.candidate import Candidate
from qsearch.space import SearchSpace
from qsearch.spec import Spec
from qsearch.strategy import GridStrategy, Proposal, Result
from qsearch.tasks import TaskContext, cost_metrics, register_task

EVALUATORS = ("train", "supernet")
WEIGHTS_FILE = "supernet.pt"
INFO_FILE = "supernet.json"
EVALS_DIR = "evals"


def supernet_dir(spec: Spec, space: SearchSpace, budget: Budget) -> Path:
    """Where the supernet of this space and budget, trained with this spec's supernet
    recipe, seed and data, lives in the cache (an absolute path: trials run elsewhere)."""
    from qsearch.supernet import Supernet

    key = json.dumps({"supernet": Supernet(space, budget).describe(),
                      "train": spec.supernet_train, "seed": spec.seed, "data": spec.data},
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = space.model.replace(":", "_").replace("/", "_")
    return Path(spec.supernet_cache).resolve() / f"{name}-{digest}"


def cached_info(directory: Path) -> dict | None:
    """The record of a finished supernet in ``directory`` (None: not trained yet)."""
    info = directory / INFO_FILE
    if not info.exists() or not (directory / WEIGHTS_FILE).exists():
        return None
    return json.loads(info.read_text())


class SupernetTraining(GridStrategy):
    """One cell: train the supernet and save it in ``directory``."""

    name = "supernet"

    def __init__(self, space: SearchSpace, budget: Budget, *, directory: str, seed: int = 0):
        super().__init__(space, budget, seed=seed)
        self.directory, self.cells = directory, [0]

    def propose(self, cell: int) -> Proposal:
        return Proposal(None, task="supernet-train", params={"supernet": self.directory})


class TopK(GridStrategy):
    """The ``k`` best distinct candidates of the search's rows by supernet accuracy, each
    retrained once stand-alone (the ``train`` task)."""

    name = "topk"

    def __init__(self, space: SearchSpace, budget: Budget, *, rows: list[dict], k: int,
                 seed: int = 0):
        super().__init__(space, budget, seed=seed)
        scored = sorted((r for r in rows if r["status"] == "ok" and r["candidate"]
                         and math.isfinite(r["val_acc"])), key=lambda r: -r["val_acc"])
        cells: list[str] = []
        for r in scored:
            if r["candidate"] not in cells and len(cells) < k:
                cells.append(r["candidate"])
        self.cells = cells

    def propose(self, cell: str) -> Proposal:
        return Proposal(Candidate.from_json(cell), params={"evaluator": "supernet-topk"})


_LOADED: dict = {}  # path -> (mtime, Supernet, model): one supernet per worker process


def _load(directory: str, ctx: TaskContext):
    import torch

    from qsearch.supernet import Supernet

    path = Path(directory) / WEIGHTS_FILE
    if not path.exists():
        raise QSearchError(f"no trained supernet in {directory}: run the search again "
                           "(its supernet stage trains one)")
    key = (str(path), path.stat().st_mtime, str(ctx.budget), ctx.device)
    if _LOADED.get("key") != key:
        supernet = Supernet(ctx.space, ctx.budget)
        model = supernet.build()
        model.load_state_dict(torch.load(path, map_location=ctx.device, weights_only=True))
        _LOADED.update(key=key, supernet=supernet, model=model.to(ctx.device).eval())
    return _LOADED["supernet"], _LOADED["model"]


def _eval_file(directory: str, cand: Candidate, device: str) -> Path:
    """Where the evaluation of ``cand`` on the supernet in ``directory`` is kept, keyed by
    everything it depends on beyond the directory's own key: the candidate, the weights
    file's time, the device and the evaluation settings."""
    from qsearch.supernet import EVAL_IMAGES, RECAL_BATCHES

    weights = Path(directory) / WEIGHTS_FILE
    key = json.dumps([cand.to_json(), weights.stat().st_mtime_ns, device, RECAL_BATCHES,
                      EVAL_IMAGES])
    return Path(directory) / EVALS_DIR / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def kept_evaluation(directory: str, cand: Candidate, evaluate: Callable[[], tuple],
                    *, device: str = "cpu") -> tuple[float, float, bool]:
    """(validation accuracy, loss, looked up) of ``cand`` on the supernet in ``directory``:
    the kept result when this evaluation was made before, else ``evaluate()`` (which loads
    what it needs only then), kept (written whole: concurrent trials never read half a
    file)."""
    kept = _eval_file(directory, cand, device)
    if kept.exists():
        acc, loss = json.loads(kept.read_text())
        return acc, loss, True
    acc, loss = evaluate()
    kept.parent.mkdir(exist_ok=True)
    tmp = kept.with_name(f".{kept.name}.{os.getpid()}")
    tmp.write_text(json.dumps([acc, loss]))
    os.replace(tmp, kept)
    return acc, loss, False


@register_task("supernet-eval")
def supernet_eval(ctx: TaskContext) -> Result:
    """Validation accuracy of the proposed candidate cut out of the trained supernet, or
    the kept result of the same evaluation (``eval_cached``: nothing loaded)."""
    from qsearch.supernet import evaluate_candidate

    cand, directory = ctx.proposal.candidate, ctx.proposal.params["supernet"]
    start = time.perf_counter()

    def evaluate() -> tuple[float, float]:
        supernet, model = _load(directory, ctx)
        return evaluate_candidate(supernet, model, cand, ctx.splits(), device=ctx.device)

    acc, loss, cached = kept_evaluation(directory, cand, evaluate, device=ctx.device)
    return Result("ok", acc, cand, {**cost_metrics(ctx.space, cand, ctx.budget),
                                    "val_loss": loss, "evaluator": "supernet",
                                    "eval_cached": cached,
                                    "eval_seconds": time.perf_counter() - start})


@register_task("supernet-train")
def supernet_train(ctx: TaskContext) -> Result:
    """Train the supernet (sandwich rule) for the stage's recipe; save it in the cache."""
    import torch

    from qsearch.supernet import SandwichHooks, Supernet

    directory = Path(ctx.proposal.params["supernet"])
    supernet = Supernet(ctx.space, ctx.budget)
    torch.manual_seed(ctx.seed)
    model = supernet.build().to(ctx.device)
    res = ctx.train_model(model, hooks=SandwichHooks(supernet))
    last = res.history[-1] if res.history else {}
    metrics = {k: v for k, v in last.items() if k.startswith("val_acc_")}
    metrics.update(train_seconds=res.train_seconds, steps=res.steps, evaluator="supernet",
                   resumed_from_step=(ctx.restored or {}).get("step", 0))
    if res.status == "ok" and ctx.lead:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{WEIGHTS_FILE}.{os.getpid()}"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, directory / WEIGHTS_FILE)  # readers never see half a file
        (directory / INFO_FILE).write_text(json.dumps({
            **supernet.describe(), "train_seconds": res.train_seconds, "steps": res.steps,
            "val_acc": res.val_acc, **metrics}, indent=2, default=float))
    acc = float("nan") if res.val_acc is None else res.val_acc
    return Result(res.status, acc, None, metrics, fidelity=res.steps)
