"""The same checks on every registered strategy: determinism under a seed, failed and NaN
results, JSON state round trip, exhaustion, proposals within the budget.

"train" proposals are scored by a cheap deterministic function of the bits; any other task
(FracBits' one-shot search, MixQuant's float model) really runs, on the tiny synthetic set.
"""

import json
import math

import pytest

from qsearch import QSearchError
from qsearch.budget import parse_budget
from qsearch.space import SearchSpace
from qsearch.strategy import (
    FINISHED,
    GridStrategy,
    Proposal,
    Result,
    best_at_highest_fidelity,
    create_strategy,
    list_strategies,
)
from qsearch.tasks import TaskContext, get_task

BUDGET = parse_budget("6KB")
TINY_TRAIN = {"steps": 6, "batch_size": 32, "eval_every_steps": 6}


@pytest.fixture(scope="module")
def space():
    return SearchSpace("resnet20", "synthetic")


def evaluate(space, proposal: Proposal, *, fail: bool = False, nan: bool = False) -> Result:
    if proposal.task != "train":
        ctx = TaskContext(space=space, proposal=proposal, budget=BUDGET, train=TINY_TRAIN,
                          data={}, seed=0, device="cpu", report=lambda m, s=None: False)
        return get_task(proposal.task)(ctx)
    if fail:
        return Result("failed", error="injected failure")
    cand = proposal.candidate
    score = 0.9 - 0.02 * sum(abs(b - 3) for b in cand.w_bits[1:-1]) / len(cand.w_bits)
    return Result("ok", float("nan") if nan else score, cand, {"c_size": space.c_size(cand)})


def drive(strategy, space, n: int, **kw) -> list[dict]:
    out = []
    for i in range(n):
        p = strategy.ask(f"t{i}")
        if p == FINISHED:
            out.append({"finished": True})
            break
        assert p is not None, "nothing pending, so ask() must propose or finish"
        out.append(p.to_dict())
        strategy.tell(f"t{i}", evaluate(space, p, **kw))
    return out


@pytest.fixture(params=list_strategies())
def name(request):
    return request.param


def make(name, space, seed=0):
    return create_strategy(name, space, BUDGET, seed=seed)


def test_same_seed_same_proposals(name, space):
    assert drive(make(name, space), space, 5) == drive(make(name, space), space, 5)


def test_proposals_fit_the_budget(name, space):
    for p in drive(make(name, space), space, 6):
        if p.get("candidate"):
            cand = Proposal.from_dict(p).candidate
            assert space.c_size(cand) <= BUDGET.value


def test_failed_and_nan_results_are_handled(name, space):
    s = make(name, space)
    drive(s, space, 3, fail=True)
    drive(s, space, 3, nan=True)
    p = s.ask("after")
    assert p == FINISHED or isinstance(p, Proposal) or p is None


def test_state_round_trip(name, space):
    s = make(name, space)
    drive(s, space, 3)
    state = json.loads(json.dumps(s.state_dict()))
    again = make(name, space)
    again.load_state_dict(state)
    assert drive(again, space, 2) == drive(s, space, 2)


def test_exhaustion_is_final_and_endless_strategies_stay_valid(name, space):
    s = make(name, space)
    proposals = drive(s, space, 40)
    if proposals[-1].get("finished"):
        assert s.ask("again") == FINISHED and s.ask("and-again") == FINISHED
    else:
        assert len(proposals) == 40
    for p in proposals:
        if not p.get("finished") and p["candidate"]:
            assert math.isfinite(p["candidate"]["width"]) and p["candidate"]["width"] > 0


def test_unknown_strategy_lists_the_valid_ones(space):
    with pytest.raises(QSearchError, match="uniform"):
        create_strategy("nope", space, BUDGET)


def test_unknown_strategy_option_is_an_error(space):
    with pytest.raises(QSearchError, match="valid options"):
        create_strategy("uniform", space, BUDGET, colour="blue")
    with pytest.raises(QSearchError, match="^strategy 'uniform': got an unexpected keyword "
                                           "argument 'colour'; valid options: bits$"):
        create_strategy("uniform", space, BUDGET, bits=[2], colour="blue")


# ----- early-stopped results (a rung scheduler ended the trial) -------------------------
def stopped_early(space, proposal: Proposal) -> Result:
    """A ``train`` trial ended at its first rung, with a lower accuracy at 4 steps; other
    tasks are never stopped by a scheduler (they are off the ladder) and really run."""
    full = evaluate(space, proposal)
    if proposal.task != "train":
        return full
    return Result("stopped", full.val_acc - 0.2, full.candidate, {"step": 4}, fidelity=4)


def test_early_stopped_results_are_handled_and_survive_a_state_round_trip(name, space):
    s = make(name, space)
    for i in range(4):
        p = s.ask(f"s{i}")
        if p in (FINISHED, None):
            break
        s.tell(f"s{i}", stopped_early(space, p))
    state = json.loads(json.dumps(s.state_dict()))
    again = make(name, space)
    again.load_state_dict(state)
    assert drive(again, space, 3) == drive(s, space, 3)


def test_tpe_tells_a_stopped_trial_as_pruned_with_its_intermediate_values(space):
    from optuna.trial import TrialState

    s = make("tpe", space)
    p = s.ask("a")
    assert s.should_stop("a", {"step": 2, "val_acc": 0.3}) is False  # Tune's scheduler stops
    result = stopped_early(space, p)
    s.tell("a", result)
    (trial,) = s.study.get_trials(deepcopy=False)
    assert trial.state == TrialState.PRUNED
    assert trial.intermediate_values == {2: 0.3, 4: result.val_acc}
    again = make("tpe", space)
    again.load_state_dict(json.loads(json.dumps(s.state_dict())))
    (kept,) = again.study.get_trials(deepcopy=False)
    assert kept.state == TrialState.PRUNED
    assert kept.intermediate_values == trial.intermediate_values


def test_haq_rewards_only_full_length_episodes(space):
    s = make("haq", space)
    p, q = s.ask("a"), s.ask("b")
    s.tell("a", stopped_early(space, p))
    s.tell("b", evaluate(space, q))
    stopped, full = s.history
    assert stopped["reward"] is None and stopped["stopped_at_step"] == 4
    assert full["reward"] is not None


def test_grid_best_cell_is_the_best_at_the_highest_fidelity(space):
    s = make("uniform", space)
    for i, result in enumerate([Result("stopped", 0.9, fidelity=4),
                                Result("ok", 0.5, fidelity=36),
                                Result("stopped", 0.95, fidelity=12)]):
        s.ask(str(i))
        s.tell(str(i), result)
    assert [s.cell_status(i) for i in range(3)] == ["stopped", "ok", "stopped"]
    assert s.best_cell() == 1  # the only full-length cell, though less accurate
    s.done.pop(1)
    assert s.best_cell() == 2  # else the one stopped at the most steps
    restored = make("uniform", space)
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert restored.stopped_at == {0: 4, 2: 12}


def test_one_rule_picks_the_best_at_the_highest_fidelity():
    """The rule behind both GridStrategy.best_cell and the final stage's best_row."""
    items = [("a", 0.9, 4), ("b", 0.5, math.inf), ("c", 0.7, math.inf), ("d", 0.7, math.inf)]

    def pick(xs):
        return best_at_highest_fidelity(xs, accuracy=lambda x: x[1], fidelity=lambda x: x[2])

    assert pick(items)[0] == "c"  # full length beats stopped; the first on ties
    assert pick([items[0], ("e", 0.95, 2)])[0] == "a"  # else those stopped at the most steps
    assert pick([]) is None


# ----- GridStrategy's prelude hook ----------------------------------------------------
class Prelude(GridStrategy):
    """A grid planned from a prelude trial: the prelude reports ``n``, the cells are 0..n-1
    (at most ``max_trials - 1``, read when planning)."""

    name = "prelude-test"

    def __init__(self, space, budget, *, seed=0):
        super().__init__(space, budget, seed=seed)
        self.plans: list[Result | None] = []  # every call of plan(), to count them

    def prelude(self) -> Proposal:
        return Proposal(None, task="count")

    def plan(self, prelude):
        self.plans.append(prelude)
        if not prelude.ok:
            return []
        n = prelude.metrics["n"]
        return list(range(n if self.max_trials is None else min(n, self.max_trials - 1)))

    def propose(self, cell) -> Proposal:
        return Proposal(None, params={"cell": cell})


def test_grid_prelude_runs_first_and_plans_the_cells(space):
    s = Prelude(space, BUDGET)
    s.max_trials = 4  # as the runner does, before the first ask
    assert s.ask("p") == Proposal(None, task="count") and s.cells is None
    assert s.ask("x") is None  # nothing to propose until the prelude's result is in
    s.tell("p", Result("ok", 0.5, metrics={"n": 5}))
    assert s.cells == [0, 1, 2] and len(s.plans) == 1  # planned once, with the trial limit
    assert [s.ask(t).params["cell"] for t in "abc"] == [0, 1, 2]
    assert s.ask("d") == FINISHED

    failed = Prelude(space, BUDGET)
    failed.ask("p")
    failed.tell("p", Result("failed", error="no float model"))
    assert failed.cells == [] and failed.ask("q") == FINISHED


def test_grid_prelude_state_round_trip(space):
    s = Prelude(space, BUDGET)
    s.ask("p")
    in_flight = json.loads(json.dumps(s.state_dict()))  # saved while the prelude runs
    s.tell("p", Result("ok", 0.5, metrics={"n": 3}))
    s.ask("a")
    s.tell("a", Result("ok", 0.7))
    s.ask("b")  # left in flight
    state = json.loads(json.dumps(s.state_dict()))

    r = Prelude(space, BUDGET)
    r.load_state_dict(state)  # planned again from the saved result: no second prelude
    assert r.cells == [0, 1, 2] and r.plans[0].metrics == {"n": 3}
    assert r.inflight == {"b": 1} and r.ask("c").params == {"cell": 2}
    r.tell("b", Result("ok", 0.6))  # the runner replays the in-flight trial under its id
    r.tell("c", Result("failed", error="x"))
    assert r.ask("d") == FINISHED
    assert [(c, a) for c, a in r.results()][:2] == [(0, 0.7), (1, 0.6)]
    assert math.isnan(r.results()[2][1]) and r.errors == {2: "x"}

    q = Prelude(space, BUDGET)
    q.load_state_dict(in_flight)
    assert q.cells is None and q.ask("x") is None  # the prelude still runs: wait for it
    q.tell("p", Result("ok", 0.5, metrics={"n": 2}))
    assert q.cells == [0, 1] and q.ask("y").params == {"cell": 0}

    short = Prelude(space, BUDGET)
    short.max_trials = 2  # plans one cell, not the saved three
    with pytest.raises(QSearchError, match="same settings"):
        short.load_state_dict(state)
