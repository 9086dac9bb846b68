"""The same checks on every registered strategy: determinism under a seed, failed and NaN
results, JSON state round trip, exhaustion, proposals within the budget.

"train" proposals are scored by a cheap deterministic function of the bits; any other task
(FracBits' one-shot search, MixQuant's float model) really runs, on the tiny synthetic set.
"""

import json
import math

import pytest

from qsearch.budget import parse_budget
from qsearch.space import SearchSpace
from qsearch.strategy import FINISHED, Proposal, Result, create_strategy, list_strategies
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
    from qsearch import QSearchError

    with pytest.raises(QSearchError, match="uniform"):
        create_strategy("nope", space, BUDGET)


def test_unknown_strategy_option_is_an_error(space):
    from qsearch import QSearchError

    with pytest.raises(QSearchError, match="valid options"):
        create_strategy("uniform", space, BUDGET, colour="blue")
