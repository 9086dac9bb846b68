"""HAQ agent: state embedding, action mapping, HAQ's budget wall, SB3 env, save/restore,
the SB3 glue and its one private hook, learning on a synthetic reward, concurrent trials."""

from __future__ import annotations

import glob
import json
import tempfile

import numpy as np
import pytest
import torch

from qsearch import QSearchError
from qsearch.budget import parse_budget
from qsearch.space import SearchSpace
from qsearch.strategies._haq_learner import refill_order, torch_context
from qsearch.strategies._sb3_adapter import set_update_count, update_count
from qsearch.strategies.haq import (
    HAQ,
    STATE_FIELDS,
    LayerEnv,
    action_to_bits,
    layer_states,
    lower_bits_to_fit,
)
from qsearch.strategy import Proposal, Result, create_strategy, run_local

BUDGET = parse_budget("12MB")


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace("resnet20", bit_choices=range(1, 9))


def free_bits(space: SearchSpace, proposal: Proposal) -> np.ndarray:
    return np.array([proposal.candidate.w_bits[i] for i in space.free_layers])


def ok(proposal: Proposal, acc: float) -> Result:
    return Result("ok", acc, proposal.candidate)


# ----- state ---------------------------------------------------------------------------
def test_state_vector_resnet20_by_hand():
    """resnet20 on Fashion-MNIST (28x28), free layers 1..20. Column maxima: k 20, Cin 64,
    Cout 64, kernel 3, stride 2, input map 28x28 = 784, params 64x64x3x3 = 36864."""
    s = layer_states(SearchSpace("resnet20"))
    assert s.shape == (20, len(STATE_FIELDS)) and s.dtype == np.float32
    col = {f: i for i, f in enumerate(STATE_FIELDS)}
    # layer 1, 3.body.0: 16->16, 3x3, stride 1, 28x28 input, 2304 weights
    assert s[0] == pytest.approx([1 / 20, 16 / 64, 16 / 64, 1, 1 / 2, 1, 2304 / 36864, 0, 0, 0])
    # layer 9, 6.shortcut.0: 1x1 pointwise 16->32, stride 2 on 28x28, 512 weights
    assert s[8] == pytest.approx([9 / 20, 16 / 64, 32 / 64, 1 / 3, 1, 1, 512 / 36864, 0, 0, 0])
    # layer 15, 9.body.3: 64->64, 3x3, stride 1, 7x7 input
    assert s[14] == pytest.approx([15 / 20, 1, 1, 1, 1 / 2, 49 / 784, 1, 0, 0, 0])
    assert s[:, col["depthwise"]].max() == 0 and s[:, col["weight_or_act"]].max() == 0
    assert s.min() >= 0 and s.max() <= 1


def test_state_vector_fc_and_depthwise():
    """fc: (k, in, out, 1, 0, 1, #params, 0, flag, prev); depthwise layers flag 1."""
    s = layer_states(SearchSpace("resnet20", pin_bits=None))
    # layer 21, the fc 64->10 (stride 0, kernel 1, feature size 1); maxima as above, k 21
    assert s[21] == pytest.approx([1, 1, 10 / 64, 1 / 3, 0, 1 / 784, 640 / 36864, 0, 0, 0])
    mb = SearchSpace("mobilenetv2-cifar")
    s = layer_states(mb)
    dw = [mb.layers[i].role == "depthwise" for i in mb.free_layers]
    assert any(dw) and s[:, STATE_FIELDS.index("depthwise")].tolist() == [float(d) for d in dw]


# ----- action -> bits ------------------------------------------------------------------
@pytest.mark.parametrize("lo, hi", [(2, 8), (1, 8), (3, 5)])
def test_action_to_bits_covers_range_and_clips(lo, hi):
    levels = list(range(lo, hi + 1))
    got = [action_to_bits(a, levels) for a in np.linspace(0, 1, 1001)]
    assert sorted(set(got)) == levels
    assert got == sorted(got)  # monotone
    assert action_to_bits(-0.7, levels) == lo and action_to_bits(1.6, levels) == hi
    for a in np.random.default_rng(0).uniform(0, 1, 200):  # HAQ's formula, Sec. 3.1
        assert action_to_bits(a, levels) == round(lo - 0.5 + a * (hi - lo + 1))


def test_action_to_bits_on_space_levels():
    """The default space allows 1, 2, 4, 8: HAQ's 2..8 range picks among 2, 4, 8."""
    agent = HAQ(SearchSpace("resnet20"), BUDGET)
    assert agent.levels == [2, 4, 8]
    assert [action_to_bits(a, agent.levels) for a in (0.1, 0.5, 0.9)] == [2, 4, 8]


# ----- HAQ's budget wall ---------------------------------------------------------------
@pytest.mark.parametrize("budget", ["200KB", "120KB", "80KB", "70KB", "68.3KB"])
def test_fixed_mode_lowering_ends_within_budget(space, budget):
    """At width 1, resnet20 is 270.6KB at 8 bits and 68.24KB at 2 bits (pinned at 8)."""
    b = parse_budget(budget)
    levels = list(range(2, 9))
    rng = np.random.default_rng(0)
    for _ in range(30):
        bits = rng.integers(2, 9, size=len(space.free_layers)).tolist()
        lowered = lower_bits_to_fit(space, bits, 1.0, b, levels)
        cand = space.candidate(lowered, width=1.0)
        assert space.c_size(cand) <= b.value
        assert all(lo <= hi and lo in levels for lo, hi in zip(lowered, bits))
        if space.c_size(space.candidate(bits, width=1.0)) <= b.value:
            assert lowered == bits  # nothing to do when it already fits
    with pytest.raises(QSearchError, match="raise the budget"):
        lower_bits_to_fit(space, [8] * 20, 1.0, parse_budget("60KB"), levels)


def test_fixed_mode_agent(space):
    agent = HAQ(space, BUDGET, mode="fixed", warmup=2)
    # default width: the uniform median level (5 bits) fills the budget, 8 bits does not
    five, eight = (space.candidate(b, width=agent.width) for b in (5, 8))
    assert space.c_size(five) <= BUDGET.value < space.c_size(eight)
    for i in range(6):
        p = agent.ask(str(i))
        assert p.candidate.width == agent.width and space.c_size(p.candidate) <= BUDGET.value
        agent.tell(str(i), ok(p, 0.5 + 0.01 * i))
    tight = HAQ(space, parse_budget("80KB"), mode="fixed", width=1.0, seed=3)
    for i in range(5):
        p = tight.ask(str(i))
        assert space.c_size(p.candidate) <= 80e3 * 8 and p.candidate.width == 1.0
    with pytest.raises(QSearchError, match="raise the budget"):
        HAQ(space, parse_budget("60KB"), mode="fixed", width=1.0)
    with pytest.raises(QSearchError, match="mode='fixed'"):
        HAQ(space, BUDGET, width=1.0)


def test_align_mode_fills_budget(space):
    agent = HAQ(space, BUDGET, warmup=1)
    p = agent.ask("0")
    ratio = space.c_size(p.candidate) / BUDGET.value
    assert 0.98 <= ratio <= 1.0 and p.task == "train"
    assert list(free_bits(space, p)) == agent.pending["0"]["bits"]


# ----- SB3 -----------------------------------------------------------------------------
def test_check_env(space):
    from stable_baselines3.common.env_checker import check_env

    env = LayerEnv(layer_states(space), reward_fn=lambda a: -float(np.abs(a - 0.5).mean()))
    check_env(env, warn=True)
    obs, _ = env.reset(seed=0)
    total, steps, done = 0.0, 0, False
    while not done:
        obs, r, done, truncated, _ = env.step(np.array([1.0], np.float32))
        total, steps = total + r, steps + 1
        assert obs[-1] == 1.0 and not truncated  # the previous action, rescaled to [0, 1]
    assert steps == 20 and total == pytest.approx(-0.5)


def test_state_round_trip(space):
    kw = {"seed": 7, "warmup": 3}
    agent = create_strategy("haq", space, BUDGET, **kw)
    for i in range(6):
        p = agent.ask(str(i))
        agent.tell(str(i), ok(p, float(free_bits(space, p).mean()) / 10))
    agent.ask("pending")  # in flight across the save
    state = json.loads(json.dumps(agent.state_dict()))
    clone = create_strategy("haq", space, BUDGET, **kw)
    clone.load_state_dict(state)
    for a in (agent, clone):  # the restored agent goes on exactly as the original
        a.tell("pending", Result("ok", 0.42))
    assert agent.ask("next").to_dict() == clone.ask("next").to_dict()
    for a in (agent, clone):
        a.tell("next", Result("ok", 0.43))
    assert agent.ask("after").to_dict() == clone.ask("after").to_dict()
    assert agent.summary() == clone.summary()


def test_state_round_trip_with_wrapped_replay_buffer(space):
    """Episodes stored past the buffer's capacity overwrite the oldest: a restored agent has
    the same transitions in the same slots and the same write position."""
    kw = {"seed": 2, "warmup": 1, "buffer_episodes": 3, "gradient_steps": 3}
    agent = HAQ(space, BUDGET, **kw)
    for i in range(8):  # 8 episodes in a ring of 3: the next write goes to slot 8 % 3 = 2
        p = agent.ask(str(i))
        agent.tell(str(i), ok(p, 0.5 + 0.01 * i))
    state = json.loads(json.dumps(agent.state_dict()))
    clone = HAQ(space, BUDGET, **kw)
    clone.load_state_dict(state)
    for step in range(2):  # sampling the same slots; then one more episode overwrites one
        samples = []
        for a in (agent, clone):
            assert a.model.replay_buffer.size() == 3 * len(space.free_layers)
            with torch_context(seed=11):
                samples.append(a.model.replay_buffer.sample(64))
        for x, y in zip(*samples):
            assert x is None and y is None or torch.equal(x, y)
        assert [a.ask(f"more{step}").to_dict() for a in (agent, clone)].count(None) == 0
        assert agent.pending == clone.pending
        for a in (agent, clone):
            a.tell(f"more{step}", Result("ok", 0.6))
    assert agent.summary() == clone.summary()
    with pytest.raises(QSearchError, match="same buffer_episodes"):
        HAQ(space, BUDGET, **{**kw, "buffer_episodes": 4}).load_state_dict(state)
    with pytest.raises(QSearchError, match="start a new run"):
        clone.load_state_dict({**state, "version": 1})


@pytest.mark.parametrize("total, capacity, expected", [
    (2, 3, ["a", "b"]), (3, 3, ["a", "b", "c"]),
    (4, 3, ["d", "b", "c", "d"]),  # b c d kept in slots 1 2 0; write position 1
    (8, 3, ["c", "d", "b", "c", "d"]),  # b c d kept in slots 2 0 1; write position 2
])
def test_refill_order(total, capacity, expected):
    kept = ["a", "b", "c"][:min(total, capacity)] if total <= capacity else ["b", "c", "d"]
    assert refill_order(kept, total, capacity) == expected


def test_sb3_glue_two_rates_and_centred_rewards(space):
    """SB3's train step runs the actor at actor_lr and the critic at critic_lr, and samples
    through the buffer's baseline (both rely on SB3's public API only)."""
    agent = HAQ(space, BUDGET, warmup=1, actor_lr=2e-4, critic_lr=7e-4)
    assert agent.model.replay_buffer.baseline is None
    p = agent.ask("0")
    agent.tell("0", ok(p, 0.5))  # the first told episode trains once warm-up is over
    assert agent.model.actor.optimizer.param_groups[0]["lr"] == 2e-4
    assert agent.model.critic.optimizer.param_groups[0]["lr"] == 7e-4
    assert agent.model.replay_buffer.baseline == pytest.approx(0.0)  # reward 0 (ref acc)
    with torch_context(seed=0):
        rewards = agent.model.replay_buffer.sample(8).rewards
    assert torch.all(rewards == 0.0)


def test_sb3_update_counter_adapter(space):
    """The one SB3 internal in use (strategies/_sb3_adapter.py). Fails when the installed
    stable-baselines3 renames the counter or TD3's delayed actor update stops reading it."""
    agent = HAQ(space, BUDGET, warmup=1, gradient_steps=1)  # TD3, policy_delay 2
    p = agent.ask("0")
    agent.tell("0", ok(p, 0.5))
    assert update_count(agent.model) == 1 and agent.model.policy_delay == 2
    for count, actor_steps in ((0, False), (1, True)):  # the next update is number count+1
        set_update_count(agent.model, count)
        before = [t.clone() for t in agent.model.actor.parameters()]
        with torch_context(seed=0):
            agent.model.train(gradient_steps=1, batch_size=8)
        assert update_count(agent.model) == count + 1
        after = list(agent.model.actor.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, after)) == actor_steps
    with pytest.raises(RuntimeError, match="_sb3_adapter.py"):
        set_update_count(object(), 3)


def test_seeded_and_leaves_global_rngs_alone(space):
    np.random.seed(123)
    torch.manual_seed(123)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    before = set(glob.glob(f"{tempfile.gettempdir()}/SB3-*"))
    runs = []
    for _ in range(2):
        agent = HAQ(space, BUDGET, seed=5, warmup=2)
        history = run_local(agent, lambda p: ok(p, 1 - free_bits(space, p).mean() / 8),
                            max_trials=5)
        runs.append([p.to_dict() for p, _ in history])
    assert runs[0] == runs[1]
    assert (np.random.get_state()[1] == np_state).all()
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert set(glob.glob(f"{tempfile.gettempdir()}/SB3-*")) == before


# ----- learning ------------------------------------------------------------------------
def test_learns_synthetic_per_layer_target(space):
    """Accuracy peaks when the first half of the layers get 8 bits and the rest 3: the best
    action depends on the layer's state, and the untrained actor (~5 bits everywhere) is
    far from it. The first 10 of 40 episodes (8 of them warm-up) must score clearly below
    the last 10. Over seeds 0-7 the gap was 0.09 to 0.17 (mean accuracy 0.56 -> 0.69)."""
    n = len(space.free_layers)
    target = np.array([8 if i < n // 2 else 3 for i in range(n)])

    def evaluate(p: Proposal) -> Result:
        return ok(p, 1 - np.abs(free_bits(space, p) - target).mean() / 6)

    agent = HAQ(space, BUDGET, seed=0)
    acc = np.array([r.val_acc for _, r in run_local(agent, evaluate, max_trials=40)])
    assert acc[-10:].mean() > acc[:10].mean() + 0.05
    summary = agent.summary()
    assert summary["episodes"] == 40 and len(summary["mean_reward_per_block"]) == 4
    assert summary["mean_reward_per_block"][-1] > summary["mean_reward_per_block"][0]
    assert summary["sigma"] == pytest.approx(0.5 * 0.99 ** (40 - agent.warmup))


# ----- concurrency and failures --------------------------------------------------------
def test_concurrent_trials_told_in_reverse(space):
    agent = HAQ(space, BUDGET, warmup=1, seed=1)
    a, b = agent.ask("a"), agent.ask("b")
    assert a.params["episode"] == 0 and b.params["episode"] == 1
    assert set(agent.pending) == {"a", "b"}
    agent.tell("b", ok(b, 0.8))
    agent.tell("a", ok(a, 0.7))
    assert agent.pending == {} and [r["episode"] for r in agent.history] == [1, 0]
    assert agent.model.replay_buffer.size() == 2 * len(space.free_layers)
    c, d = agent.ask("c"), agent.ask("d")  # policy episodes, same actor, different noise
    assert not c.params["warmup"] and c.to_dict() != d.to_dict()
    agent.tell("d", ok(d, 0.9))
    agent.tell("c", ok(c, 0.6))
    assert agent.summary()["episodes"] == 4


def test_failed_dropped_diverged_penalised(space):
    agent = HAQ(space, BUDGET, warmup=1)
    p = [agent.ask(str(i)) for i in range(4)]
    agent.tell("0", ok(p[0], 0.9))
    agent.tell("1", Result("failed", error="worker lost"))
    agent.tell("2", Result("ok", float("nan")))
    assert agent.model.replay_buffer.size() == len(space.free_layers)  # both dropped
    agent.tell("3", Result("diverged"))
    assert agent.history[-1]["accuracy"] == pytest.approx(10.0)  # chance, 10 classes
    assert agent.history[-1]["reward"] == pytest.approx(0.1 * (10.0 - 90.0))
    with pytest.warns(UserWarning, match="haq: result for unknown trial 'unknown' ignored"):
        agent.tell("unknown", ok(p[0], 0.5))  # not ours: ignored
    summary = agent.summary()
    assert summary["episodes"] == 2 and summary["dropped"] == 2
    assert summary["best_accuracy"] == pytest.approx(90.0)


def test_bad_options(space):
    with pytest.raises(QSearchError, match="align"):
        HAQ(space, BUDGET, mode="classic")
    with pytest.raises(QSearchError, match="bit choices"):
        HAQ(SearchSpace("resnet20"), BUDGET, min_bits=5, max_bits=7)
    with pytest.raises(QSearchError, match="td3"):
        HAQ(space, BUDGET, algorithm="sac")
    with pytest.raises(QSearchError, match="valid options"):
        create_strategy("haq", space, BUDGET, sigma=0.1)
    with pytest.raises(QSearchError, match=r"noise_decay=1.5 out of range: .* in \(0, 1\]"):
        HAQ(space, BUDGET, noise_decay=1.5)
