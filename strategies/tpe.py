"""Optuna behind the strategy contract: TPE over bits, or NSGA-II over (accuracy, cost).

``objective="accuracy"`` (default): TPE (Bergstra et al., 2011; Optuna's ``TPESampler``)
proposes bits per free layer (``per="layer"``) or per layer group (``per="group"``:
depthwise / other, DualPrecision's two precisions) from ``space.bit_choices``; the width is
solved so every candidate fills the budget (width alignment), and TPE maximises validation
accuracy. A fixed-width model has no width to solve: sampled per-layer bits are lowered to
fit and raised to fill the budget (``Strategy.fill``), so no trial is infeasible and each
uses what its bits can of the budget; TPE models accuracy as a function of what it sampled.

``objective="pareto"``: NSGA-II (``NSGAIISampler``) over (validation accuracy, max;
cost, min), the cost being the budget's kind (C_size, Eq. 6 of DualPrecision, for a size
budget; BitOPs otherwise). The width is then a free parameter: ``width_scale`` times the
aligned width of the sampled bits, so ``width_scale > 1`` proposes models over the budget.
They run like any other and are flagged ``over_budget``; ``summary()`` returns the front.

Proposals are a pure function of (seed, trials so far): the sampler is re-seeded from
``(seed, number of trials in the study)`` before each ask, so a search restored from
``state_dict`` makes the same next proposal as one that was never interrupted. Optuna is
imported lazily (``qsearch --help`` does not pay for it).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from qsearch import QSearchError
from qsearch.budget import Budget
from qsearch.candidate import Candidate
from qsearch.space import SearchSpace
from qsearch.strategy import Proposal, Result, Strategy, register_strategy

if TYPE_CHECKING:
    import optuna

STATE_VERSION = 1
MAX_RESAMPLES = 100  # asks in a row whose bits cannot fit the budget before giving up


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _name(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip() != "")


_OPTIONS = {  # option -> (check, what it must be, example)
    "n_startup_trials": (_int_at_least(0), "an integer >= 0", "10"),
    "population_size": (_int_at_least(2), "an integer >= 2", "20"),
    "storage": (_name, "a storage URL", "sqlite:///study.db"),
    "study_name": (_name, "a non-empty name", "my-study"),
}


def _check_options(**options: Any) -> None:
    """Types and ranges of the options Optuna would otherwise reject mid-search."""
    for key, value in options.items():
        check, want, example = _OPTIONS[key]
        if not check(value):
            raise QSearchError(f"tpe {key}={value!r} not allowed: give {want}, e.g. "
                               f"--strategy-arg {key}={example}")


@register_strategy("tpe")
class TPE(Strategy):
    """Optuna ask/tell search over per-layer or per-group bits.

    Args:
        per: ``"layer"`` (one bit-width per free layer) or ``"group"`` (one per layer group).
        objective: ``"accuracy"`` (TPE, width aligned to the budget) or ``"pareto"``
            (NSGA-II over accuracy and cost, width free).
        width_range: bounds of ``width_scale``, the multiple of the aligned width that
            ``objective="pareto"`` samples (log scale).
        n_startup_trials: random trials before TPE models the history.
        population_size: NSGA-II population (``objective="pareto"``).
        storage: an Optuna storage URL (e.g. ``sqlite:///study.db``) so optuna-dashboard can
            open the study; a study of that name already in it is continued.
        study_name: default ``qsearch-<model>-<dataset>-<budget>-<objective>-<per>-seed<seed>``.
    """

    def __init__(self, space: SearchSpace, budget: Budget, *, seed: int = 0,
                 per: str = "layer", objective: str = "accuracy",
                 width_range: tuple[float, float] = (0.25, 2.0), n_startup_trials: int = 10,
                 population_size: int = 20, storage: str | None = None,
                 study_name: str | None = None):
        super().__init__(space, budget, seed=seed)
        import optuna

        if per not in ("layer", "group"):
            raise QSearchError(f"tpe per={per!r} not understood: use 'layer' (bits per free "
                               "layer) or 'group' (bits per depthwise/other group)")
        if objective not in ("accuracy", "pareto"):
            raise QSearchError(f"tpe objective={objective!r} not understood: use 'accuracy' "
                               "(TPE at the budget) or 'pareto' (NSGA-II, accuracy vs cost)")
        try:
            lo, hi = (float(w) for w in width_range)
        except (TypeError, ValueError):
            lo = hi = 0.0
        if not 0 < lo < hi < math.inf:
            raise QSearchError(f"tpe width_range {width_range!r} invalid: need "
                               "0 < min < max, e.g. [0.25, 2.0]")
        _check_options(n_startup_trials=n_startup_trials, population_size=population_size,
                       storage=storage, study_name=study_name)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.per, self.objective = per, objective
        self.width_range = (lo, hi)
        self.n_startup_trials, self.population_size = n_startup_trials, population_size
        if per == "layer":
            self.params = {f"w{i:02d}_{space.layers[i].name}": i for i in space.free_layers}
        else:
            self.params = {g: g for g in space.groups}
        self.choices = list(space.bit_choices)
        # The cheapest bits must fit, or no trial ever will: say so now.
        space.align(space.candidate(self.choices[0]), budget)

        self.storage = storage
        self.study_name = study_name or (
            f"qsearch-{space.model}-{space.dataset}-{budget}-{objective}-{per}-seed{seed}")
        self.study = self._new_study()
        self.trials: dict[str, int] = {}  # trial_id -> optuna trial number
        self._live: dict[str, optuna.trial.Trial] = {}

    # ----- optuna plumbing -------------------------------------------------------------
    def _new_study(self) -> optuna.Study:
        import optuna

        directions = ["maximize", "minimize"] if self.objective == "pareto" else ["maximize"]
        return optuna.create_study(storage=self.storage, study_name=self.study_name,
                                   directions=directions, sampler=self._sampler(0),
                                   load_if_exists=self.storage is not None)

    def _sampler(self, n_trials: int) -> optuna.samplers.BaseSampler:
        """A sampler seeded from (seed, trials so far): proposals depend on history only."""
        import optuna

        seed = int(np.random.SeedSequence([self.seed, n_trials]).generate_state(1)[0])
        if self.objective == "pareto":
            return optuna.samplers.NSGAIISampler(population_size=self.population_size,
                                                 seed=seed)
        return optuna.samplers.TPESampler(n_startup_trials=self.n_startup_trials, seed=seed)

    def _bits(self, trial: optuna.trial.Trial) -> dict[str, int] | list[int]:
        values = {name: trial.suggest_categorical(name, self.choices) for name in self.params}
        return values if self.per == "group" else list(values.values())

    def _place(self, bits: dict[str, int] | list[int]) -> Candidate:
        """Sampled bits as a candidate within the budget: width-aligned; on a fixed-width
        model, per-layer bits are repaired (lowered to fit, raised to fill: ``fill``) and
        per-group bits that do not fit raise (the trial is resampled)."""
        if self.space.family.fixed_width and self.per == "layer":
            return self.fill(bits, self.choices)
        return self.space.align(self.space.candidate(bits), self.budget).candidate

    # ----- contract --------------------------------------------------------------------
    def ask(self, trial_id: str) -> Proposal:
        from optuna.trial import TrialState

        for _ in range(MAX_RESAMPLES):
            self.study.sampler = self._sampler(len(self.study.get_trials(deepcopy=False)))
            trial = self.study.ask()
            try:
                cand = self._place(self._bits(trial))
            except QSearchError as e:  # these bits cannot fit at any allowed width
                trial.set_user_attr("infeasible", str(e))
                self.study.tell(trial, state=TrialState.FAIL)
                continue
            if self.objective == "pareto":
                scale = trial.suggest_float("width_scale", *self.width_range, log=True)
                w_lo, w_hi = self.space.width_bounds
                cand = cand.with_width(min(max(cand.width * scale, w_lo), w_hi))
            cost = self.space.cost(cand, self.budget.kind)
            trial.set_user_attr("candidate", cand.to_dict())
            trial.set_user_attr("cost", cost)
            trial.set_user_attr("budget_ratio", cost / self.budget.value)
            trial.set_user_attr("over_budget", cost > self.budget.value)
            self.trials[trial_id] = trial.number
            self._live[trial_id] = trial
            return Proposal(cand, params={"optuna_trial": trial.number})
        raise QSearchError(f"tpe: {MAX_RESAMPLES} proposals in a row do not fit the budget "
                           f"{self.budget}: raise the budget or drop the largest bit choices")

    def should_stop(self, trial_id: str, metrics: dict) -> bool:
        """Each evaluation of a running trial becomes an Optuna intermediate value
        (``Trial.report(val_acc, step)``); the stopping is left to the rung scheduler."""
        acc, step = metrics.get("val_acc"), metrics.get("step")
        if isinstance(acc, (int, float)) and math.isfinite(acc) and step:
            self._report(trial_id, float(acc), int(step))
        return False

    def _report(self, trial_id: str, acc: float, step: int) -> None:
        if self.objective != "accuracy" or trial_id not in self.trials:
            return  # Optuna keeps intermediate values for single-objective studies only
        frozen = self.study.get_trials(deepcopy=False)[self.trials[trial_id]]
        if step in frozen.intermediate_values:
            return
        import optuna

        # a trial continued after a resume has no live Trial object: make one for it
        trial = self._live.get(trial_id) or optuna.trial.Trial(self.study, frozen._trial_id)
        trial.report(acc, step)

    def tell(self, trial_id: str, result: Result) -> None:
        """A full-length result completes the Optuna trial; one a scheduler stopped early
        is told as PRUNED with its accuracy as the last intermediate value (Optuna's TPE
        ranks pruned trials below complete ones, by steps reached, then value)."""
        from optuna.trial import TrialState

        if trial_id not in self.trials:
            warnings.warn(f"tpe: result for unknown trial {trial_id!r} ignored", stacklevel=2)
            return
        if result.stopped:
            self._report(trial_id, float(result.val_acc), int(result.fidelity or 0))
            self._live.pop(trial_id, None)
            self.study.tell(self.trials.pop(trial_id), state=TrialState.PRUNED)
            return
        number = self.trials.pop(trial_id)
        trial = self._live.pop(trial_id, None)
        if not result.ok:
            if trial is not None:
                trial.set_user_attr("error", result.error or f"status {result.status}, "
                                    f"val_acc {result.val_acc}")
            self.study.tell(number, state=TrialState.FAIL)
            return
        values: Any = float(result.val_acc)
        if self.objective == "pareto":
            frozen = self.study.get_trials(deepcopy=False)[number]
            values = [values, frozen.user_attrs["cost"]]
        self.study.tell(number, values)

    # ----- state -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The trial map plus, for an in-memory study, every trial as JSON (a storage URL
        keeps the trials itself). Trials still running are saved as running, so a runner
        that continues them can tell their results after a resume."""
        from optuna.distributions import distribution_to_json

        state = {**super().state_dict(), "version": STATE_VERSION, "per": self.per,
                 "objective": self.objective, "params": list(self.params),
                 "study_name": self.study_name, "storage": self.storage,
                 "trials": dict(self.trials)}
        if self.storage is None:
            trials = self.study.get_trials(deepcopy=False)
            # Every trial samples from the same distributions: store them once, by name.
            state["distributions"] = {k: distribution_to_json(d) for t in trials
                                      for k, d in t.distributions.items()}
            state["history"] = [
                {"number": t.number, "state": t.state.name, "values": t.values,
                 "intermediate": [[k, v] for k, v in t.intermediate_values.items()],
                 "params": t.params, "user_attrs": t.user_attrs,
                 "system_attrs": t.system_attrs} for t in trials]
        return state

    def load_state_dict(self, state: dict) -> None:
        import optuna
        from optuna.distributions import json_to_distribution
        from optuna.trial import TrialState, create_trial

        mine = {"version": STATE_VERSION, "per": self.per, "objective": self.objective,
                "params": list(self.params)}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise QSearchError(f"tpe state was saved by a search with {theirs}; this one has "
                               f"{mine}: resume with the same space and tpe options")
        super().load_state_dict(state)
        self.study_name, self.storage = state["study_name"], state["storage"]
        if self.storage is not None:
            self.study = optuna.load_study(study_name=self.study_name, storage=self.storage,
                                           sampler=self._sampler(0))
        else:
            self.study = self._new_study()
            dists = {k: json_to_distribution(d) for k, d in state["distributions"].items()}
            for t in sorted(state["history"], key=lambda t: t["number"]):
                st = TrialState[t["state"]]
                self.study.add_trial(create_trial(
                    state=st, values=t["values"] if st == TrialState.COMPLETE else None,
                    intermediate_values={int(k): v for k, v in t.get("intermediate", [])},
                    params=t["params"], distributions={k: dists[k] for k in t["params"]},
                    user_attrs=t["user_attrs"], system_attrs=t["system_attrs"]))
        self.trials = {tid: int(n) for tid, n in state["trials"].items()}
        self._live = {}

    # ----- results ---------------------------------------------------------------------
    def _row(self, t: optuna.trial.FrozenTrial) -> dict:
        return {"number": t.number, "val_acc": t.values[0], "cost": t.user_attrs.get("cost"),
                "budget_ratio": t.user_attrs.get("budget_ratio"),
                "over_budget": t.user_attrs.get("over_budget"),
                "candidate": t.user_attrs.get("candidate")}

    def summary(self) -> dict:
        """Trial counts and the best trial, or (``objective="pareto"``) the Pareto front
        sorted by cost plus the most accurate trial within the budget."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        out: dict[str, Any] = {
            "study_name": self.study_name, "storage": self.storage,
            "objective": self.objective, "per": self.per, "n_complete": len(done),
            "n_failed": sum(t.state == TrialState.FAIL for t in trials),
            "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "n_infeasible": sum("infeasible" in t.user_attrs for t in trials)}
        if not done:
            return {**out, "best": None, **({"front": []} if self.objective == "pareto" else {})}
        if self.objective == "pareto":
            front = sorted((self._row(t) for t in self.study.best_trials),
                           key=lambda r: (r["cost"], -r["val_acc"]))
            within = [t for t in done if not t.user_attrs.get("over_budget")]
            best = self._row(max(within, key=lambda t: t.values[0])) if within else None
            return {**out, "front": front, "best": best}
        return {**out, "best": self._row(self.study.best_trial)}
