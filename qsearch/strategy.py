"""The strategy contract: ask for a trial, tell its result, save and restore state.

Strategies never import Ray: :mod:`qsearch.ray_tune` adapts any strategy into a Ray Tune
``Searcher``, so a strategy is unit-tested with a plain loop (see ``run_local``).

A :class:`Proposal` names a *task* (how the trial runs, see :mod:`qsearch.tasks`) and its
inputs. Most strategies propose ``task="train"`` with a width-aligned candidate; a strategy
whose search is itself a training run (FracBits) or that needs a trained float model first
(MixQuant) registers its own task beside its own file, so the runner has no special cases.
:class:`GridStrategy` proposes a fixed list of cells, optionally planned from the result of
a first "prelude" trial (MixQuant's float model).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import pkgutil
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from qsearch import QSearchError
from qsearch.budget import Budget
from qsearch.candidate import Candidate
from qsearch.space import SearchSpace

T = TypeVar("T")
FINISHED = "FINISHED"  # ask() returns this when the strategy has nothing more to propose


@dataclass(frozen=True)
class Proposal:
    """One trial to run: a task name, its candidate (if any) and JSON-able parameters."""

    candidate: Candidate | None
    task: str = "train"
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"task": self.task, "params": self.params,
                "candidate": self.candidate.to_dict() if self.candidate else None}

    @classmethod
    def from_dict(cls, d: dict) -> Proposal:
        cand = Candidate.from_dict(d["candidate"]) if d.get("candidate") else None
        return cls(cand, d.get("task", "train"), dict(d.get("params") or {}))


@dataclass(frozen=True)
class Result:
    """What a trial produced. ``candidate`` is the network it evaluated (for FracBits the
    discretised one); ``metrics`` carries everything else the task reported.

    ``fidelity`` is the number of training steps behind ``val_acc`` (None for a trial that
    trains nothing, or did not say). Status ``"stopped"``: a rung scheduler or the
    strategy's ``should_stop`` ended the trial early, and ``val_acc`` is its accuracy at
    that lower fidelity, not comparable with full-length results as is.
    """

    status: str  # "ok" | "stopped" | "failed" | "diverged"
    val_acc: float = float("nan")
    candidate: Candidate | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    fidelity: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and math.isfinite(self.val_acc)

    def to_dict(self) -> dict:  # NaN is not JSON: a missing accuracy is stored as null
        acc = float(self.val_acc)
        return {"status": self.status, "val_acc": acc if math.isfinite(acc) else None,
                "candidate": self.candidate.to_dict() if self.candidate else None,
                "metrics": self.metrics, "error": self.error, "fidelity": self.fidelity}

    @classmethod
    def from_dict(cls, d: dict) -> Result:
        cand = Candidate.from_dict(d["candidate"]) if d.get("candidate") else None
        acc = float("nan") if d.get("val_acc") is None else float(d["val_acc"])
        return cls(d["status"], acc, cand, dict(d.get("metrics") or {}), d.get("error"),
                   d.get("fidelity"))

    @property
    def stopped(self) -> bool:
        """Ended early with an accuracy at its (lower) fidelity."""
        return self.status == "stopped" and math.isfinite(self.val_acc)


class Strategy(ABC):
    """Base class. Subclasses implement ``ask`` and ``tell``; the rest is optional.

    Args (keyword-only past ``space`` and ``budget``; subclasses add their own):
        space: the search space (layers, groups, costs, width alignment).
        budget: the budget this search runs at (a proxy budget when the runner uses one).
        seed: same seed, same proposals.
    """

    name: ClassVar[str]
    # False for a measurement tool (``fidelity``): left out of a recipe's ``strategy: all``
    searches: ClassVar[bool] = True
    # False when its trials are not the ``train`` task (FracBits, MixQuant): the supernet
    # evaluator (``--evaluator supernet``) stands in for ``train`` trials only
    train_trials: ClassVar[bool] = True
    # with the supernet evaluator a trial takes seconds: the default search length then
    # (unless the recipe or a flag sets ``trials``), and strategy options for that length
    supernet_trials: ClassVar[int] = 200
    supernet_kwargs: ClassVar[dict[str, Any]] = {}
    # a strategy whose trials are its own (MixQuant): the option that takes ``--checkpoint``,
    # and the options of its post-training mode (``--trial-mode ptq``); other strategies'
    # ``train`` trials fine-tune from the checkpoint, or become ``ptq`` trials
    checkpoint_kwarg: ClassVar[str | None] = None
    ptq_kwargs: ClassVar[dict[str, Any] | None] = None

    def __init__(self, space: SearchSpace, budget: Budget, *, seed: int = 0):
        self.space, self.budget, self.seed = space, budget, seed
        self.rng = np.random.default_rng(seed)
        # The search's trial limit, which the runner assigns before the first ask. A plain
        # attribute: a strategy that sizes its plan by it reads it when it plans.
        self.max_trials: int | None = None

    @abstractmethod
    def ask(self, trial_id: str) -> Proposal | None | str:
        """A proposal, ``None`` (nothing right now: ask again later) or ``FINISHED``."""

    @abstractmethod
    def tell(self, trial_id: str, result: Result) -> None:
        """The result of the trial proposed under ``trial_id`` (failures included)."""

    def state_dict(self) -> dict:
        """JSON-serialisable state from which ``load_state_dict`` resumes the search.

        It includes trials in flight: on resume the runner continues them under the same
        trial ids and calls ``tell`` with their results.
        """
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]

    def should_stop(self, trial_id: str, metrics: dict) -> bool:
        """Asked at each intermediate report of a running trial (``metrics``: step, epoch,
        val_acc, ...); True stops it at that evaluation, and its task returns what it has
        (stored with status ``stopped``). Default: never."""
        return False

    def summary(self) -> dict:
        """Extra results worth showing (e.g. DualPrecision's grid table); plain data."""
        return {}

    def summary_text(self) -> str:
        """Lines for the end-of-run summary on the console (default: none)."""
        return ""

    def expected_trials(self) -> int | None:
        """How many trials this search will run, when it knows (progress ETA); default
        the trial limit."""
        return self.max_trials

    def expected_steps(self) -> int | None:
        """The training steps of all this search's trials together, when its trials differ
        in length and it knows them (the progress ETA then counts steps, not trials);
        default None: the trials are alike."""
        return None

    def align(self, bits, a_bits: int | None = None) -> Candidate:
        """Bits (any form ``SearchSpace.candidate`` takes) width-aligned to the budget; on a
        fixed-width model, lowered until they fit (HAQ's rule, ``SearchSpace.lower_to_fit``)
        since there is no width to solve."""
        return self.space.fit(self.space.candidate(bits, a_bits=a_bits), self.budget)

    def fill(self, bits, levels: Sequence[int] | None = None) -> Candidate:
        """:meth:`align`, and on a fixed-width model also raised to the closest cost below
        the budget that raising its bits to larger ``levels`` (default: the space's bit
        choices) can reach (:meth:`SearchSpace.raise_to_fill`)."""
        cand = self.align(bits)
        if self.space.family.fixed_width:
            cand = self.space.raise_to_fill(cand, self.budget, levels)
        return cand


def bit_subset(strategy: str, bits: object, space: SearchSpace) -> list[int]:
    """A strategy's ``bits`` option: a non-empty list of the space's bit choices (default:
    all of them), in the given order."""
    if bits is None:
        return list(space.bit_choices)
    ok = isinstance(bits, (list, tuple)) and bits and all(
        isinstance(b, int) and not isinstance(b, bool) and b in space.bit_choices for b in bits)
    if not ok:
        raise QSearchError(f"{strategy} bits={bits!r} not allowed: give a list from the "
                           f"space's bit choices {list(space.bit_choices)}, e.g. "
                           "--strategy-arg bits=[2,4] (or widen --bit-choices)")
    return list(bits)


def best_at_highest_fidelity(items: Iterable[T], *, accuracy: Callable[[T], float],
                             fidelity: Callable[[T], float]) -> T | None:
    """The most accurate of ``items`` at the highest fidelity among them (the first on
    ties), None when there are none. The one rule for picking a search's best: a trial a
    scheduler stopped early is compared only with those stopped at as many steps, and a
    full-length one (fidelity ``math.inf``) beats any stopped one. Accuracies at different
    fidelities are never compared. ``items`` are those with a finite accuracy."""
    items = list(items)
    if not items:
        return None
    top = max(fidelity(x) for x in items)
    return max((x for x in items if fidelity(x) == top), key=accuracy)


def failure_reason(result: Result) -> str:
    return result.error or (f"status {result.status}" if result.status != "ok"
                            else "val_acc is not finite")


def record_result(done: dict[int, float], errors: dict[int, str], i: int,
                  result: Result) -> None:
    """Cell ``i``'s accuracy into ``done`` (NaN when failed, with the reason in ``errors``);
    a cell stopped early keeps its accuracy at its fidelity."""
    usable = result.ok or result.stopped
    done[i] = float(result.val_acc) if usable else float("nan")
    if usable:
        errors.pop(i, None)
    else:
        errors[i] = failure_reason(result)


class GridStrategy(Strategy):
    """Proposes each cell of a list once, then FINISHED.

    Subclasses implement ``propose(cell)`` and set ``self.cells`` (JSON-able values) in
    ``__init__``. A grid that depends on an earlier trial's outcome (MixQuant's candidates
    come from the QE table of a trained float model) leaves ``self.cells`` None and
    implements ``plan``: the first ask runs the ``prelude()`` trial, if it gives one (asks
    return None while it runs), and its result, failed or not, goes to ``plan``, which
    returns the cells. ``plan`` runs once, when the prelude's result arrives or, without a
    prelude, at the first ask, so it may read what the runner set before asking
    (``max_trials``).

    Cells in flight are part of the state: on resume the runner continues those trials
    under the same ids and tells their results. ``done`` maps a cell index to its
    accuracy (NaN = failed, with the reason in ``errors``). The prelude's result is saved
    too: a resumed grid is planned again from it, never by running the prelude again.
    A cell a scheduler stopped early keeps its accuracy, with its fidelity (steps trained)
    in ``stopped_at``; the best cell is the best at the highest fidelity (``best_cell``).
    """

    def __init__(self, space: SearchSpace, budget: Budget, *, seed: int = 0):
        super().__init__(space, budget, seed=seed)
        self.cells: list | None = None  # set by the subclass, or by plan() after the prelude
        self.done: dict[int, float] = {}
        self.errors: dict[int, str] = {}
        self.stopped_at: dict[int, int] = {}  # cells stopped early -> steps trained
        self.inflight: dict[str, int] = {}
        self.prelude_trial: str | None = None  # the prelude's trial id, once proposed
        self.prelude_result: Result | None = None
        self.planned = False  # whether plan() made the cells (a resume makes them again)

    @abstractmethod
    def propose(self, cell) -> Proposal: ...

    def expected_trials(self) -> int | None:
        if self.cells is None:  # not planned yet
            return self.max_trials
        n = len(self.cells) + (self.prelude_trial is not None)
        return n if self.max_trials is None else min(n, self.max_trials)

    def prelude(self) -> Proposal | None:
        """The trial whose result ``plan`` needs; None (default) to plan at once."""
        return None

    def plan(self, prelude: Result | None) -> list:
        """The cells, from the prelude's result (None when ``prelude`` gave no trial)."""
        raise NotImplementedError(f"{type(self).__name__} leaves self.cells None: set them "
                                  "in __init__ or implement plan()")

    def _plan(self, prelude: Result | None) -> None:
        self.prelude_result = prelude
        self.cells, self.planned = list(self.plan(prelude)), True

    def ask(self, trial_id: str) -> Proposal | None | str:
        if self.cells is None:
            if self.prelude_trial is not None:
                return None  # the prelude is running: ask again later
            proposal = self.prelude()
            if proposal is not None:
                self.prelude_trial = trial_id
                return proposal
            self._plan(None)
        busy = set(self.done) | set(self.inflight.values())
        todo = [i for i in range(len(self.cells)) if i not in busy]
        if not todo:
            return FINISHED
        self.inflight[trial_id] = todo[0]
        return self.propose(self.cells[todo[0]])

    def tell(self, trial_id: str, result: Result) -> None:
        if trial_id == self.prelude_trial and self.cells is None:
            self._plan(result)
            return
        if trial_id not in self.inflight:
            warnings.warn(f"{self.name}: result for unknown trial {trial_id!r} ignored",
                          stacklevel=2)
            return
        i = self.inflight.pop(trial_id)
        record_result(self.done, self.errors, i, result)
        self.stopped_at.pop(i, None)
        if result.stopped:
            self.stopped_at[i] = int(result.fidelity or 0)

    def state_dict(self) -> dict:  # NaN is not JSON: failed cells are stored as null
        result = self.prelude_result
        return {**super().state_dict(), "inflight": dict(self.inflight),
                "done": {str(i): a if math.isfinite(a) else None for i, a in self.done.items()},
                "errors": {str(i): e for i, e in self.errors.items()},
                "stopped_at": {str(i): n for i, n in self.stopped_at.items()},
                "prelude": {"trial": self.prelude_trial, "planned": self.planned,
                            "result": result.to_dict() if result else None,
                            "cells": self.cells if self.planned else None}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.done = {int(i): float("nan") if a is None else a for i, a in state["done"].items()}
        self.errors = {int(i): e for i, e in state.get("errors", {}).items()}
        self.stopped_at = {int(i): n for i, n in state.get("stopped_at", {}).items()}
        self.inflight = dict(state["inflight"])
        prelude = state.get("prelude") or {}
        self.prelude_trial = prelude.get("trial")
        if prelude.get("planned"):
            result = prelude.get("result")
            self._plan(Result.from_dict(result) if result else None)
            if json.loads(json.dumps(self.cells)) != prelude["cells"]:
                raise QSearchError(
                    f"{self.name}: this search plans other cells than the saved one "
                    f"({len(self.cells)} cells, {len(prelude['cells'])} saved): resume with "
                    "the same settings, the trial limit included")

    def cell_status(self, i: int) -> str:
        """Where cell ``i`` stands: "ok", "stopped", "failed", "running" or "pending"."""
        if i in self.done:
            if not math.isfinite(self.done[i]):
                return "failed"
            return "stopped" if i in self.stopped_at else "ok"
        return "running" if i in self.inflight.values() else "pending"

    def best_cell(self) -> int | None:
        """The most accurate finished cell at the highest fidelity reached: full-length
        cells if any, else those stopped at the most steps; the first in grid order on
        ties. None when no cell has an accuracy."""
        scored = [i for i in sorted(self.done) if math.isfinite(self.done[i])]
        return best_at_highest_fidelity(scored, accuracy=self.done.__getitem__,
                                        fidelity=lambda i: self.stopped_at.get(i, math.inf))

    def results(self) -> list[tuple[Any, float]]:
        """(cell, accuracy) for every finished cell, in grid order (NaN = failed)."""
        return [(self.cells[i], self.done[i]) for i in sorted(self.done)]


# ----- registry -----------------------------------------------------------------------
_STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    def deco(cls: type[Strategy]) -> type[Strategy]:
        if name in _STRATEGIES:
            raise ValueError(f"strategy {name!r} is registered twice")
        cls.name = name
        _STRATEGIES[name] = cls
        return cls
    return deco


def _load_all() -> None:
    import qsearch.strategies as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"qsearch.strategies.{mod.name}")


def list_strategies(*, search_only: bool = False) -> list[str]:
    """Registered strategy names; ``search_only`` leaves out measurement tools."""
    _load_all()
    return sorted(n for n, cls in _STRATEGIES.items() if cls.searches or not search_only)


def get_strategy(name: str) -> type[Strategy]:
    _load_all()
    if name not in _STRATEGIES:
        raise QSearchError(f"unknown strategy {name!r}: choose one of "
                           f"{', '.join(sorted(_STRATEGIES))} (see `qsearch strategies`)")
    return _STRATEGIES[name]


def create_strategy(name: str, space: SearchSpace, budget: Budget, *, seed: int = 0,
                    **kwargs: Any) -> Strategy:
    """Instantiate a registered strategy; unknown keyword arguments are an error."""
    cls = get_strategy(name)
    signature = inspect.signature(cls.__init__)
    try:  # checked before constructing: a TypeError inside __init__ stays a TypeError
        signature.bind(None, space, budget, seed=seed, **kwargs)
    except TypeError as e:
        valid = [p for p in signature.parameters if p not in ("self", "space", "budget", "seed")]
        raise QSearchError(f"strategy {name!r}: {e}; valid options: "
                           f"{', '.join(valid) or 'none'}") from None
    return cls(space, budget, seed=seed, **kwargs)


def run_local(strategy: Strategy, evaluate: Callable[[Proposal], Result], *,
              max_trials: int) -> list[tuple[Proposal, Result]]:
    """Drive a strategy sequentially without Ray (tests, analytic checks), telling it the
    trial limit as the runner does."""
    strategy.max_trials = max_trials
    history = []
    for i in range(max_trials):
        proposal = strategy.ask(str(i))
        if proposal == FINISHED:
            break
        if proposal is None:
            raise RuntimeError(f"{strategy.name} returned None with no trial pending")
        result = evaluate(proposal)
        strategy.tell(str(i), result)
        history.append((proposal, result))
    return history
