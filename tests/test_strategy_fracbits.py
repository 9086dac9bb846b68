"""FracBits: cost model, penalty gradient, discretisation, the training task, resume, state.

Cost and discretisation tests need no training. Task tests train a 0.25x ResNet-20 on the
tiny ``synthetic`` dataset for a few steps, calling the task directly with a hand-built
``TaskContext`` (what the runner does inside a Ray trial).
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from qsearch import QSearchError
from qsearch.budget import Budget
from qsearch.space import SearchSpace
from qsearch.strategies._fracbits_cost import FracCost, discretise
from qsearch.strategies.fracbits import (
    UNIT,
    FracBits,
    FracBitsConfig,
    FracBitsRun,
    fracbits_task,
)
from qsearch.strategy import FINISHED, Proposal, Result, create_strategy, list_strategies, run_local
from qsearch.tasks import TaskContext, get_task

TRAIN = {"steps": 12, "batch_size": 32, "eval_every_steps": 4, "eval_batch_size": 500}


@pytest.fixture(scope="module")
def fmnist() -> SearchSpace:
    return SearchSpace("resnet20", "fashion-mnist")


@pytest.fixture(scope="module")
def tiny() -> SearchSpace:
    return SearchSpace("resnet20", "synthetic")


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add overhead
    yield
    torch.set_num_threads(n)


def budget_at(space: SearchSpace, kind: str, bits: int = 4, width: float = 0.25) -> Budget:
    a_bits = bits if kind == "bitops" else None
    return Budget(kind, space.cost(space.candidate(bits, width=width, a_bits=a_bits), kind))


def context(space, budget, params=None, *, train=None, report=None, restored=None):
    proposal = Proposal(None, task="fracbits", params=params or {})
    return TaskContext(space=space, proposal=proposal, budget=budget, train=train or TRAIN,
                       data={}, seed=0, device="cpu",
                       report=report or (lambda m, s: False), restored=restored)


def unit_bits(space, cost: FracCost, layer_bits) -> np.ndarray:
    """Per-layer bits of the free layers, repeated over each layer's units."""
    return np.repeat([layer_bits[i] for i in space.free_layers], cost.units_per_layer)


# ----- cost model ---------------------------------------------------------------------------
@pytest.mark.parametrize("kernel_wise", [False, True])
@pytest.mark.parametrize("kind", ["size", "bitops"])
@pytest.mark.parametrize("width", [0.37, 1.0, 2.3])
def test_fractional_cost_equals_space_cost_at_integer_bits(fmnist, kind, kernel_wise, width):
    rng = np.random.default_rng(0)
    for _ in range(5):
        free_bits = rng.integers(1, 9, len(fmnist.free_layers))
        a_bits = int(rng.integers(2, 9))
        cand = fmnist.candidate(free_bits.tolist(), width=width, a_bits=a_bits)
        cost = FracCost(fmnist, cand.width, kind, kernel_wise=kernel_wise)
        w = unit_bits(fmnist, cost, cand.w_bits).astype(float)
        a = float(a_bits) if kind == "bitops" else None
        expected = fmnist.cost(cand, kind)
        assert cost(w, a) == pytest.approx(expected, rel=1e-12)
        as_torch = cost(torch.tensor(w), None if a is None else torch.tensor(a))
        assert float(as_torch) == pytest.approx(expected, rel=1e-12)


def test_fractional_cost_interpolates_linearly_and_bilinearly(fmnist):
    """Eq. (6a) is linear in each bit-width; Eq. (6b) is bilinear in weight and act bits."""
    size = FracCost(fmnist, 1.0, "size")
    n = size.n_units
    lo, hi, mid = np.full(n, 3.0), np.full(n, 4.0), np.full(n, 3.25)
    assert size(mid) == pytest.approx(0.75 * size(lo) + 0.25 * size(hi))
    ops = FracCost(fmnist, 1.0, "bitops")
    corners = {(w, a): ops(np.full(n, w), a) for w in (3.0, 4.0) for a in (3.0, 4.0)}
    blend = sum(corners[(w, a)] * (0.75 if w == 3 else 0.25) * (0.5 if a == 3 else 0.5)
                for w, a in corners)
    assert ops(mid, 3.5) == pytest.approx(blend)


def test_uniform_bits_recovers_the_reference_bits(fmnist):
    for kind in ("size", "bitops"):
        b = budget_at(fmnist, kind, bits=3, width=1.0)
        assert FracCost(fmnist, 1.0, kind).uniform_bits(b.value, 1, 8) == pytest.approx(3.0)


def current_cost(run: FracBitsRun) -> float:
    w, a = run.unit_bits()
    return float(run.cost(w, a))


# ----- penalty gradient ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["size", "bitops"])
@pytest.mark.parametrize("kernel_wise", [False, True])
def test_penalty_gradient_moves_bits_toward_target(tiny, kind, kernel_wise):
    budget = budget_at(tiny, kind)
    # kappa such that the penalty is 10 x |cost / start - 1|, whatever the unit and model size
    kappa = 10 * UNIT[kind] / FracBitsRun(context(tiny, budget), FracBitsConfig()).target
    cfg = FracBitsConfig(kappa=kappa, kernel_wise=kernel_wise)
    for direction, scale in ((-1, 0.8), (+1, 1.2)):  # target below / above the start cost
        run = FracBitsRun(context(tiny, budget), cfg)
        start = current_cost(run)
        run.target = start * scale
        # the shared activation bit-width sees every layer's BitOPs: smaller steps; a filter
        # sees 1/Cout of its layer's cost: larger steps (same layer-mean speed as layer-wise)
        lr = 0.25 if kind == "size" else 0.02
        opt = torch.optim.SGD([{"params": [p], "lr": lr * p.numel()} for p in run.bit_params()])
        opt.zero_grad()
        run.penalty().backward()
        for p in run.bit_params():
            assert torch.all(torch.sign(p.grad) == -direction), "every bit-width moves"
        costs = [start]
        for _ in range(40):
            opt.zero_grad()
            run.penalty().backward()
            opt.step()
            run.clamp_()
            costs.append(current_cost(run))
        # L1 penalty: the cost walks to the target, then hovers within one step of it
        crossed = next(i for i, c in enumerate(costs) if direction * (c - run.target) >= 0)
        assert all(direction * (b - a) > 0 for a, b in zip(costs[:crossed], costs[1:crossed]))
        step = max(abs(b - a) for a, b in zip(costs, costs[1:]))
        assert all(abs(c - run.target) <= step for c in costs[crossed:])
        assert step < 0.2 * abs(start - run.target)  # so "one step" is a tight bound


def test_classification_loss_reaches_the_bit_widths(tiny):
    """Eq. (2): dQ/dlambda = Q_ceil - Q_floor, so the task loss alone has a bit gradient."""
    run = FracBitsRun(context(tiny, budget_at(tiny, "bitops")), FracBitsConfig())
    x = torch.randn(8, 1, 16, 16)
    torch.nn.functional.cross_entropy(run.model(x), torch.arange(8) % 4).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in run.bit_params())
    assert any(float(p.grad.abs().sum()) > 0 for p in run.bit_params())


# ----- discretisation ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["size", "bitops"])
@pytest.mark.parametrize("kernel_wise", [False, True])
def test_discretisation_lands_within_one_percent_below_target(fmnist, kind, kernel_wise):
    rng = np.random.default_rng(1)
    cost = FracCost(fmnist, 1.0, kind, kernel_wise=kernel_wise)
    lo = 2 if kind == "bitops" else 1
    for ratio in (0.55, 0.7, 0.85, 0.95, 1.0, 1.1):
        lam = rng.uniform(lo, 8, cost.n_units)
        a = float(rng.uniform(3, 6)) if kind == "bitops" else None
        target = ratio * cost(lam, a)
        w_int, a_int, c = discretise(cost, lam, a, target, lo, 8)
        assert w_int.dtype.kind == "i" and lo <= w_int.min() and w_int.max() <= 8
        assert c == cost(w_int.astype(float), a_int)
        assert 0.99 * target <= c <= target, (ratio, c / target)
        floor = cost(np.floor(lam), None if a is None else math.floor(a))
        ceil = cost(np.ceil(lam), None if a is None else math.ceil(a))
        if not floor <= target <= ceil:
            continue
        # a threshold in [0, 1): units round to floor or ceil (weights: unless the top-up
        # had to go further after the coarse activation step)
        if kind == "bitops":
            assert a_int in (math.floor(a), math.ceil(a))
        else:
            assert np.all((w_int == np.floor(lam)) | (w_int == np.ceil(lam)))


def test_discretisation_is_the_paper_threshold_when_granularity_allows():
    """Equal-cost units: the result is ceil for fractions above one threshold, else floor."""
    space = SearchSpace("resnet20", "fashion-mnist", pin_bits=None)
    cost = FracCost(space, 1.0, "size")
    cost._coef["first"][:] = 0.0  # a toy cost model: every unit weighs 1
    cost._coef["rest"][:] = 1.0
    lam = np.linspace(3.05, 3.95, cost.n_units)
    for k in range(cost.n_units + 1):  # target = k units rounded up
        w_int, _, c = discretise(cost, lam, None, 3.0 * cost.n_units + k, 1, 8)
        assert c == 3 * cost.n_units + k
        assert np.array_equal(w_int, np.where(np.arange(cost.n_units) >= cost.n_units - k,
                                              4, 3))


def test_discretisation_refuses_an_impossible_budget(fmnist):
    cost = FracCost(fmnist, 1.0, "size")
    floor = cost(np.ones(cost.n_units))
    with pytest.raises(QSearchError, match="no integer model fits"):
        discretise(cost, np.full(cost.n_units, 4.5), None, 0.9 * floor, 1, 8)


# ----- strategy contract --------------------------------------------------------------------
def test_strategy_proposes_one_fracbits_trial_and_round_trips_state(fmnist):
    budget = Budget("size", 124e3 * 8)
    strat = create_strategy("fracbits", fmnist, budget, kappa=2.0, kernel_wise=True)
    assert "fracbits" in list_strategies() and get_task("fracbits") is fracbits_task
    proposal = strat.ask("t0")
    assert proposal.task == "fracbits"
    assert Proposal.from_dict(json.loads(json.dumps(proposal.to_dict()))) == proposal
    ref = proposal.candidate
    assert set(ref.w_bits[i] for i in fmnist.free_layers) == {4}
    assert 0.99 <= fmnist.c_size(ref) / budget.value <= 1.0  # b_t = ref_bits fills the budget
    cfg = FracBitsConfig.from_dict(proposal.params)
    assert cfg.kappa == 2.0 and cfg.kernel_wise and cfg.search_fraction == 0.8
    assert strat.ask("t1") == FINISHED

    # resume while the trial is in flight, then tell the result to the restored strategy
    restored = FracBits(fmnist, budget, kappa=2.0, kernel_wise=True)
    restored.load_state_dict(json.loads(json.dumps(strat.state_dict())))
    assert restored.ask("t2") == FINISHED
    result = Result("ok", 0.9, ref, {"c_size": fmnist.c_size(ref), "budget_ratio": 0.99})
    restored.tell("t0", result)
    again = FracBits(fmnist, budget, kappa=2.0, kernel_wise=True)
    again.load_state_dict(json.loads(json.dumps(restored.state_dict())))
    assert again.summary()["result"]["candidate"] == ref.to_dict()
    assert again.summary()["result"]["val_acc"] == 0.9
    assert again.ask("t3") == FINISHED


def test_strategy_rejects_bad_options(fmnist):
    budget = Budget("size", 124e3 * 8)
    with pytest.raises(QSearchError, match="search_fraction"):
        create_strategy("fracbits", fmnist, budget, search_fraction=0.0)
    with pytest.raises(QSearchError, match="bit_range"):
        create_strategy("fracbits", fmnist, budget, bit_range=(4, 2))
    with pytest.raises(QSearchError, match="valid options"):
        create_strategy("fracbits", fmnist, budget, kapa=1.0)
    with pytest.raises(QSearchError, match="lower `width`"):
        create_strategy("fracbits", fmnist, budget, width=4.0)
    with pytest.raises(QSearchError, match="unknown fracbits options"):
        FracBitsConfig.from_dict({"kappa": 1.0, "epochs": 3})


# ----- the task -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind,kernel_wise", [("size", False), ("bitops", False),
                                              ("bitops", True)])
def test_task_returns_a_discretised_candidate_within_budget(tiny, kind, kernel_wise):
    budget = budget_at(tiny, kind)
    strat = FracBits(tiny, budget, kernel_wise=kernel_wise, search_fraction=0.5)
    reports = []

    def evaluate(proposal):
        ctx = context(tiny, budget, proposal.params,
                      report=lambda m, s: reports.append((m, s)) and False)
        return get_task(proposal.task)(ctx)

    (_, result), = run_local(strat, evaluate, max_trials=3)
    assert result.ok and 0 <= result.val_acc <= 1
    cand = result.candidate
    assert 0.99 * budget.value <= tiny.cost(cand, kind) <= budget.value
    assert result.metrics["budget_ratio"] == pytest.approx(tiny.cost(cand, kind) / budget.value)
    assert cand.width == strat.reference.width
    m = result.metrics
    assert m["search_steps"] == 6 and m["steps"] == 12
    assert m["bits_steps"] == [0, 4, 8, 12]
    assert len(m["bits_history"]) == 4
    assert all(len(row) == len(tiny.layers) for row in m["bits_history"])
    assert m["bits_history"][0][1] == pytest.approx(4.5)  # b_t + 0.5
    assert m["bits_history"][-1] == [float(b) for b in cand.w_bits] or kernel_wise
    assert [r[0]["phase"] for r in reports] == ["search", "finetune", "finetune"]
    assert all(callable(s) for _, s in reports)
    if kind == "bitops":
        assert m["a_bits_history"][-1] == cand.a_bits
    if kernel_wise:
        assert 0.99 <= m["kernel_budget_ratio"] <= 1.0
        assert [len(k) for k in m["kernel_bits"]] == [
            int(c) for c in tiny.shapes(cand.width)[1][tiny.free_layers]]
    json.dumps(m)  # the runner stores metrics as JSON
    assert strat.summary()["result"]["candidate"] == cand.to_dict()


@pytest.mark.parametrize("resume_at", [4, 8])  # during the search / during fine-tuning
def test_task_resumes_exactly_from_a_reported_state(tiny, resume_at):
    budget = budget_at(tiny, "bitops")
    params = {"search_fraction": 0.5}
    states = {}

    def keep(m, state_fn):
        states[m["step"]] = state_fn()
        return False

    full = fracbits_task(context(tiny, budget, params, report=keep))
    buf = io.BytesIO()  # the runner's checkpoint: torch.save, then a weights-only load
    torch.save(states[resume_at], buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = fracbits_task(context(tiny, budget, params, restored=saved))
    assert resumed.candidate == full.candidate
    assert resumed.val_acc == full.val_acc
    assert resumed.metrics["bits_history"] == full.metrics["bits_history"]
    with pytest.raises(QSearchError, match="cannot resume"):
        fracbits_task(context(tiny, budget, {"search_fraction": 0.75},
                              restored=states[resume_at]))
    # a state of the loop FracBits had before it used train() (STATE_VERSION 1)
    old = {"version": 1, "signature": {}, "step": resume_at, "discrete": None, "bits": [],
           "model": saved["model"], "optimizer": saved["optimizer"], "rng": torch.get_rng_state()}
    with pytest.raises(QSearchError, match="cannot resume"):
        fracbits_task(context(tiny, budget, params, restored=old))
    stale = {**saved, "hooks": {**saved["hooks"], "version": 1}}
    with pytest.raises(QSearchError, match="cannot resume this fracbits trial"):
        fracbits_task(context(tiny, budget, params, restored=stale))


def test_task_stopped_during_search_still_returns_a_fitting_model(tiny):
    budget = budget_at(tiny, "size")
    result = fracbits_task(context(tiny, budget, {}, report=lambda m, s: True))
    assert result.stopped and result.fidelity == 4 and result.metrics["steps"] == 4
    assert tiny.c_size(result.candidate) <= budget.value


def test_task_reports_divergence(tiny, monkeypatch):
    def nan_loss(self, x, y):
        return x.sum() * float("nan")

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", nan_loss)
    result = fracbits_task(context(tiny, budget_at(tiny, "size")))
    assert result.status == "diverged" and not result.ok
    assert "loss nan at step 0" in result.error
