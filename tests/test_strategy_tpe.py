"""Optuna TPE / NSGA-II behind the strategy contract, on synthetic objectives (no training)."""

from __future__ import annotations

import json
import math

import optuna
import pytest
from optuna.trial import TrialState

from qsearch import QSearchError
from qsearch.budget import Budget, parse_budget
from qsearch.space import SearchSpace
from qsearch.strategy import Result, create_strategy, run_local

BUDGET = parse_budget("124KB")


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace("resnet20", "fashion-mnist")


def target(i: int) -> int:
    """The bits the synthetic objective rewards at free layer ``i``: 1, 2, 4, 8, 1, ..."""
    return 2 ** (i % 4)


def synthetic(space: SearchSpace):
    """val_acc in [0, 1]: 1 when every free layer has its target bits (known optimum)."""
    def evaluate(proposal) -> Result:
        c = proposal.candidate
        err = sum((math.log2(c.w_bits[i]) - math.log2(target(i))) ** 2
                  for i in space.free_layers) / (9 * len(space.free_layers))
        return Result("ok", 1.0 - err, c)
    return evaluate


def accuracy_vs_size(proposal) -> Result:
    """More bits and more width help, with diminishing returns: a real trade-off."""
    c = proposal.candidate
    return Result("ok", 1 - math.exp(-c.width * sum(math.log2(2 * b) for b in c.w_bits) / 40), c)


def run(space, n, *, seed=0, evaluate=None, **kw):
    tpe = create_strategy("tpe", space, BUDGET, seed=seed, **kw)
    return tpe, run_local(tpe, evaluate or synthetic(space), max_trials=n)


def bits_of(history) -> list[tuple]:
    return [(p.candidate.w_bits, p.candidate.width) for p, _ in history]


def test_every_proposal_is_width_aligned_and_valid(space):
    tpe, history = run(space, 12)
    for proposal, _ in history:
        c = proposal.candidate
        assert c.w_bits[0] == c.w_bits[-1] == 8
        assert {c.w_bits[i] for i in space.free_layers} <= set(space.bit_choices)
        assert c == space.align(c, BUDGET).candidate  # exactly the space's alignment
        assert space.c_size(c) <= BUDGET.value
    assert len(tpe.study.trials) == 12


def test_same_seed_same_proposals_other_seed_differs(space):
    _, a = run(space, 15, seed=3)
    _, b = run(space, 15, seed=3)
    _, c = run(space, 15, seed=4)
    assert bits_of(a) == bits_of(b)
    assert bits_of(a) != bits_of(c)


def test_tpe_learns_beyond_its_random_start(space):
    _, history = run(space, 80, seed=0)
    acc = [r.val_acc for _, r in history]
    start, late = acc[:10], acc[-20:]  # the first 10 are TPE's random startup trials
    assert sum(late) / len(late) > sum(start) / len(start) + 0.05
    assert max(acc) > max(start)


def test_per_group_proposes_one_bitwidth_per_group(space):
    tpe, history = run(space, 6, per="group")
    assert list(tpe.study.trials[0].params) == ["other"]
    for proposal, _ in history:
        assert len({proposal.candidate.w_bits[i] for i in space.free_layers}) == 1


def test_failed_and_nan_results_are_failed_trials(space):
    outcomes = iter([Result("failed", error="boom"), Result("ok", float("nan")),
                     Result("diverged", float("inf")), Result("ok", 0.5)])
    tpe, _ = run(space, 4, evaluate=lambda p: next(outcomes))
    states = [t.state for t in tpe.study.trials]
    assert states == [TrialState.FAIL] * 3 + [TrialState.COMPLETE]
    assert tpe.study.trials[0].user_attrs["error"] == "boom"
    s = tpe.summary()
    assert (s["n_failed"], s["n_complete"], s["best"]["val_acc"]) == (3, 1, 0.5)


def test_infeasible_bits_are_failed_and_resampled(space):
    lo = space.width_bounds[0]
    one = space.c_size(space.candidate(1, width=lo))
    eight = space.c_size(space.candidate(8, width=lo))
    budget = Budget("size", (one + eight) / 2)  # all-8-bit layers cannot fit at any width
    tpe = create_strategy("tpe", space, budget, per="group")
    history = run_local(tpe, synthetic(space), max_trials=8)
    assert len(history) == 8
    assert all(space.c_size(p.candidate) <= budget.value for p, _ in history)
    assert tpe.summary()["n_infeasible"] >= 1
    with pytest.raises(QSearchError, match="raise the budget"):
        create_strategy("tpe", space, Budget("size", one / 2))


def test_bad_options_are_errors(space):
    with pytest.raises(QSearchError, match="'layer'"):
        create_strategy("tpe", space, BUDGET, per="block")
    with pytest.raises(QSearchError, match="'pareto'"):
        create_strategy("tpe", space, BUDGET, objective="size")
    with pytest.raises(QSearchError, match="width_range"):
        create_strategy("tpe", space, BUDGET, objective="pareto", width_range=(2, 1))


def dominates(a: dict, b: dict) -> bool:
    return (a["val_acc"] >= b["val_acc"] and a["cost"] <= b["cost"]
            and (a["val_acc"] > b["val_acc"] or a["cost"] < b["cost"]))


def test_pareto_front_is_non_dominated(space):
    tpe, history = run(space, 60, objective="pareto", per="group", evaluate=accuracy_vs_size)
    s = tpe.summary()
    front = s["front"]
    assert front and [r["cost"] for r in front] == sorted(r["cost"] for r in front)
    everyone = [{"val_acc": r.val_acc, "cost": space.c_size(p.candidate)} for p, r in history]
    for point in front:
        assert not any(dominates(other, point) for other in everyone)
    assert any(r["over_budget"] for r in front) or any(
        space.c_size(p.candidate) > BUDGET.value for p, _ in history)  # over budget allowed
    assert s["best"]["over_budget"] is False and s["best"]["cost"] <= BUDGET.value
    ratios = [space.c_size(p.candidate) / BUDGET.value for p, _ in history]
    assert min(ratios) < 0.5 and max(ratios) > 1.5  # width_scale spans [0.25, 2] x aligned


@pytest.mark.parametrize("objective", ["accuracy", "pareto"])
def test_resume_makes_the_same_proposals_as_an_uninterrupted_run(space, objective):
    evaluate = synthetic(space) if objective == "accuracy" else accuracy_vs_size
    kw = {"objective": objective, "seed": 7}
    straight = create_strategy("tpe", space, BUDGET, **kw)
    first = run_local(straight, evaluate, max_trials=15)
    pending = straight.ask("15")  # in flight at the checkpoint
    state = json.loads(json.dumps(straight.state_dict(), allow_nan=False))

    resumed = create_strategy("tpe", space, BUDGET, **kw)
    resumed.load_state_dict(state)
    assert len(resumed.study.trials) == 16
    assert [t.params for t in resumed.study.trials] == [t.params for t in straight.study.trials]
    for s in (straight, resumed):  # the in-flight trial is told after the resume
        s.tell("15", evaluate(pending))
    tail = [[s.ask(f"t{i}") for s in (straight, resumed)] for i in range(10)]
    for i, (a, b) in enumerate(tail):
        assert a == b
        for s, p in zip((straight, resumed), (a, b)):
            s.tell(f"t{i}", evaluate(p))
    assert resumed.summary()["n_complete"] == len(first) + 1 + 10
    assert resumed.summary()["best"] == straight.summary()["best"]


def test_state_from_other_options_is_rejected(space):
    state = create_strategy("tpe", space, BUDGET, per="group").state_dict()
    with pytest.raises(QSearchError, match="same space and tpe options"):
        create_strategy("tpe", space, BUDGET).load_state_dict(state)


def test_storage_url_for_optuna_dashboard(space, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    tpe, _ = run(space, 5, storage=url, study_name="demo")
    pending = tpe.ask("5")
    state = json.loads(json.dumps(tpe.state_dict()))
    assert "history" not in state  # the database holds the trials
    study = optuna.load_study(study_name="demo", storage=url)  # what the dashboard opens
    assert len(study.trials) == 6
    resumed = create_strategy("tpe", space, BUDGET, storage=url, study_name="demo")
    resumed.load_state_dict(state)
    resumed.tell("5", synthetic(space)(pending))
    run_local(resumed, synthetic(space), max_trials=2)
    trials = optuna.load_study(study_name="demo", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
