"""HAQ (Wang et al., CVPR 2019): a DDPG-style agent assigns weight bits layer by layer.

An episode walks the space's free layers (the pinned first and last layer keep their
bits). At layer k the agent sees the state of Sec. 3.2, every entry scaled to [0, 1]::

    (k, Cin, Cout, kernel, stride, feature map size, #params, depthwise, w/a flag, a_{k-1})

(fc layers: (k, in, out, 1, 0, 1, #params, 0, flag, a_{k-1})) and emits a continuous
action a in [0, 1], mapped to bits by HAQ's rule ``round(b_min - 0.5 + a (b_max - b_min + 1))``
(Sec. 3.1). The finished episode becomes one trial; its validation accuracy is the reward
``0.1 x (acc - acc_ref)`` (HAQ's code, accuracies in percent), given to every transition
of the episode.

The learner is stable-baselines3's TD3 (default) or DDPG (HAQ's): SB3's policy, replay
buffer and train step. Trials are evaluated outside the agent (Ray trials), so SB3's
``learn()`` loop is not used: ``ask`` rolls out one episode with the current actor plus
HAQ's truncated-normal exploration noise, ``tell`` pushes that episode's transitions into
``model.replay_buffer`` and calls ``model.train``. As in HAQ's ``ddpg.py``, a moving-average
baseline is subtracted from the sampled rewards. See :class:`HAQ` for the choices this
adaptation makes.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any

import gymnasium as gym
import numpy as np

from qsearch import QSearchError
from qsearch.budget import Budget
from qsearch.candidate import Candidate
from qsearch.space import SearchSpace
from qsearch.strategy import Proposal, Result, Strategy, register_strategy

STATE_FIELDS = ("k", "cin", "cout", "kernel", "stride", "feature_size", "params",
                "depthwise", "weight_or_act", "prev_action")
_BLOCK = 10  # episodes per entry of summary()["mean_reward_per_block"]


# ----- state, action and budget (pure functions, unit-tested) ---------------------------
def layer_states(space: SearchSpace) -> np.ndarray:
    """HAQ's state embedding of the free layers, one row per layer (columns: STATE_FIELDS).

    Raw values as traced at width 1 (the width multiplier scales Cin/Cout of every layer
    alike, so the normalised columns barely move with it); each column is divided by its
    maximum over the free layers (an all-zero column stays zero; HAQ's code scales
    min-max instead). Feature map size is the
    layer's input map, as in HAQ's code (``in_w * in_h``). Only weights get actions here
    (activation bits are one value for the whole space), so the w/a flag is 0 throughout and
    kept for fidelity to the paper's state. ``prev_action`` is filled in during an episode.
    """
    rows = []
    for i in space.free_layers:
        layer = space.layers[i]
        fc = layer.role == "fc"
        rows.append([layer.index, layer.cin, layer.cout,
                     1 if fc else layer.kernel[0], 0 if fc else layer.stride,
                     1 if fc else layer.in_hw[0] * layer.in_hw[1], layer.params,
                     float(layer.role == "depthwise"), 0.0, 0.0])
    states = np.array(rows, dtype=np.float64)
    top = states.max(axis=0)
    states /= np.where(top > 0, top, 1.0)
    return states.astype(np.float32)


def action_to_bits(action: float, levels: Sequence[int]) -> int:
    """HAQ's Sec. 3.1 rule on the allowed bit levels: ``round(-0.5 + a x n)`` indexes them.

    With contiguous levels b_min..b_max this is exactly ``round(b_min - 0.5 + a (b_max -
    b_min + 1))``: equal-width bins of [0, 1], one per level; out-of-range actions clip.
    """
    n = len(levels)
    index = int(np.clip(np.round(-0.5 + float(action) * n), 0, n - 1))
    return int(levels[index])


def lower_bits_to_fit(space: SearchSpace, bits: Sequence[int], width: float, budget: Budget,
                      levels: Sequence[int]) -> list[int]:
    """HAQ's ``_final_action_wall``: lower free layers one level at a time until it fits.

    HAQ's code walks the layers from the last to the first, taking one level off each layer
    above the minimum and stopping as soon as the model fits; it repeats the walk while the
    model is over budget. ``bits`` are per free layer; the width is fixed.
    """
    bits = [int(b) for b in bits]
    step_down = {b: levels[i - 1] for i, b in enumerate(levels) if i > 0}

    def fits() -> bool:
        cand = space.candidate(bits, width=width)
        return space.cost(cand, budget.kind) <= budget.value

    while not fits():
        lowered = False
        for j in reversed(range(len(bits))):
            if bits[j] in step_down:
                bits[j] = step_down[bits[j]]
                lowered = True
                if fits():
                    return bits
        if not lowered:
            raise QSearchError(
                f"budget {budget} is below {space.model} at width {width:g} with every free "
                f"layer at {levels[0]} bits: lower the width or raise the budget")
    return bits


def truncated_normal(rng: np.random.Generator, mean: float, sigma: float) -> float:
    """A sample of N(mean, sigma) truncated to [0, 1] (HAQ's exploration noise), by rejection."""
    if sigma <= 0:
        return float(np.clip(mean, 0.0, 1.0))
    for _ in range(1000):
        x = rng.normal(mean, sigma)
        if 0.0 <= x <= 1.0:
            return float(x)
    return float(np.clip(mean, 0.0, 1.0))  # mean far outside [0, 1] with a tiny sigma


class LayerEnv(gym.Env):
    """HAQ's environment over a layer inventory: one step per free layer, reward at the end.

    Observations are rows of :func:`layer_states` with the previous action filled in;
    actions live in SB3's preferred symmetric [-1, 1] box and are rescaled to HAQ's [0, 1].
    The agent drives episodes itself (rewards come from Ray trials), so ``reward_fn``
    (actions in [0, 1] -> reward) is only for standalone use such as ``check_env``.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, states: np.ndarray,
                 reward_fn: Callable[[np.ndarray], float] | None = None):
        self.states = np.asarray(states, dtype=np.float32)
        self.reward_fn = reward_fn
        self.observation_space = gym.spaces.Box(0.0, 1.0, (self.states.shape[1],), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.actions: list[float] = []

    def _obs(self) -> np.ndarray:
        k = min(len(self.actions), len(self.states) - 1)
        obs = self.states[k].copy()
        obs[-1] = self.actions[k - 1] if k > 0 else 0.0
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.actions = []
        return self._obs(), {}

    def step(self, action):
        a = float(np.clip((np.asarray(action, dtype=np.float64).reshape(-1)[0] + 1) / 2, 0, 1))
        self.actions.append(a)
        done = len(self.actions) == len(self.states)
        reward = 0.0
        if done and self.reward_fn is not None:
            reward = float(self.reward_fn(np.array(self.actions)))
        # the terminal observation repeats the last layer's state, as HAQ's env does
        return self._obs(), reward, done, False, {}


# ----- SB3 glue (imported lazily: `qsearch --help` must not import torch or SB3) --------
@cache
def _algorithm_class(name: str) -> type:
    """SB3's TD3 or DDPG, stepping actor and critic at HAQ's two rates.

    SB3 has one learning rate for both; HAQ's actor learns 10x slower than its critic
    (1e-4 vs 1e-3). At a shared 1e-3 the first updates, made on an untrained critic, drove
    the tanh actor into saturation (every layer at min_bits) in our runs.
    """
    from stable_baselines3 import DDPG, TD3
    from stable_baselines3.common.utils import update_learning_rate

    class TwoRates({"td3": TD3, "ddpg": DDPG}[name]):
        actor_lr: float

        def _update_learning_rate(self, optimizers) -> None:
            super()._update_learning_rate(optimizers)  # the critic's rate, lr_schedule
            update_learning_rate(self.actor.optimizer, self.actor_lr)

    TwoRates.__name__ = TwoRates.__qualname__ = f"{name.upper()}TwoRates"
    return TwoRates


@cache
def _centred_buffer_class() -> type:
    """SB3's ReplayBuffer with HAQ's moving-average baseline subtracted at sampling time."""
    from stable_baselines3.common.buffers import ReplayBuffer

    class CentredReplayBuffer(ReplayBuffer):
        """HAQ's ``ddpg.py``: each sampled batch updates ``baseline`` by
        ``b += 0.5 (mean(r_batch) - b)`` and the critic regresses on ``r - b``."""

        baseline: float | None = None
        alpha = 0.5

        def _get_samples(self, batch_inds, env=None):
            s = super()._get_samples(batch_inds, env)
            mean = float(s.rewards.mean())
            b = self.baseline
            self.baseline = mean if b is None else b + self.alpha * (mean - b)
            return s._replace(rewards=s.rewards - self.baseline)

    return CentredReplayBuffer


@contextmanager
def _torch_context(seed: int | None = None) -> Iterator[None]:
    """One torch thread, and (with ``seed``) seeded global generators, restored on exit.

    The nets are tiny and the driver shares its cores with running trials: on a loaded
    2-core machine two intra-op threads made a 40-episode run ~20x slower than one. SB3 samples
    its replay buffer from numpy's and torch's global generators, so training runs on
    generators seeded from the strategy's own rng, leaving the process-wide state as found.
    """
    import torch

    threads = torch.get_num_threads()
    saved = np.random.get_state()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
                np.random.seed(seed % 2**32)
            yield
    finally:
        np.random.set_state(saved)
        torch.set_num_threads(threads)


def _encode(obj: dict) -> str:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode(text: str) -> dict:
    import torch

    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)


_BUFFER_ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones",
                  "timeouts")


@register_strategy("haq")
class HAQ(Strategy):
    """HAQ's RL agent, width-aligned by default; ``mode="fixed"`` is HAQ as published.

    Args:
        mode: ``"align"`` (default) re-solves the width multiplier so every proposal fills
            the budget (the papers' matched-size comparison; the reward is plain accuracy).
            ``"fixed"`` is classic HAQ: the architecture stays at ``width`` and bits over
            budget are lowered layer by layer (:func:`lower_bits_to_fit`).
        width: fixed mode's width multiplier. Default: the width at which the uniform model
            at the median bit level fills the budget (5 bits for 2..8), so the budget binds
            the way HAQ's "as small as a uniform k-bit model" targets do. At the width where
            uniform ``max_bits`` fits (or at 1.0 with a roomy budget) every action fits,
            the constraint never binds and the agent only learns "all max bits".
        min_bits, max_bits: HAQ's action range (2..8 in the paper; 1 is allowed). The agent
            picks among the space's ``bit_choices`` inside this range, in equal action bins;
            with ``--bit-choices 1,2,3,4,5,6,7,8`` this is HAQ's integer mapping exactly.
        warmup: episodes of uniform random actions before the actor is used and trained.
            HAQ uses 20 of 600; 8 (160 transitions for resnet20, over two batches) leaves
            most of a tens-of-trials run to the learned policy; 4 learned less on 2 of our
            4 synthetic targets. A search of N trials caps it at max(2, N // 4), so the
            default 8-trial run learns from episode 3 on; with fewer trials than ~warmup +
            30 HAQ is still close to random search.
        noise_sigma, noise_decay: truncated-normal exploration, sigma decaying per episode
            after warm-up (HAQ: 0.5 and 0.99).
        reward_scale: lambda of ``lambda x (acc - acc_ref)`` (HAQ: 0.1, accuracies in %).
            acc_ref is the first successful episode's accuracy (HAQ uses the pretrained
            float model's; there is none here). Training subtracts HAQ's moving-average
            baseline anyway, so acc_ref only sets the zero of the reported rewards.
        algorithm: ``"td3"`` (default) or ``"ddpg"`` (HAQ's), both SB3's. On a synthetic
            per-layer target (8 bits for the first half of resnet20, 2 for the rest; 60
            episodes, 8 seeds) TD3's greedy policy scored 0.85 on average against DDPG's
            0.72: its twin critics and delayed actor updates cope better with the noise of
            one reward shared by every layer.
        net_arch: hidden sizes of actor and critic. HAQ uses 300x300 for 600 episodes; at
            tens of episodes 64x64 learned the synthetic targets as well or better (0.83 vs
            0.78 above) and trains 1.4-2x faster on CPU.
        actor_lr, critic_lr: Adam steps. HAQ uses 1e-4 and 1e-3; SB3 one rate for both.
            A shared 1e-3 saturated the tanh actor after the first updates; 3e-4 for the
            actor scored best above.
        batch_size, tau, gamma: HAQ's 64, 0.01 and discount 1 (every transition of an
            episode carries the episode's reward, the last one is terminal).
        buffer_episodes: replay capacity in episodes (HAQ: 128 per layer).
        gradient_steps: updates per told episode; default one per layer, HAQ's one update
            per stored transition.

    Concurrency: ``ask`` proposes from the current actor without waiting for results, so
    with N trials in flight an episode's policy is up to N-1 updates stale. DDPG is
    off-policy, so stale transitions are still valid training data. Results may arrive in
    any order. A trial whose training diverged scores chance accuracy (the bits caused it);
    a failed trial (an error, no accuracy) is dropped: no transitions, no update.

    Known limit: a DDPG-style tanh actor can saturate early, proposing one end of the bit
    range for every layer, and then learns slowly (small tanh gradient). On the split
    target above 1 seed in 8 did so within 50 episodes; exploration noise still searches
    around it, and the runner keeps the best trial whatever the policy does.
    """

    def __init__(self, space: SearchSpace, budget: Budget, *, seed: int = 0,
                 mode: str = "align", width: float | None = None, min_bits: int = 2,
                 max_bits: int = 8, warmup: int = 8, noise_sigma: float = 0.5,
                 noise_decay: float = 0.99, reward_scale: float = 0.1,
                 algorithm: str = "td3", net_arch: Sequence[int] = (64, 64),
                 actor_lr: float = 3e-4, critic_lr: float = 1e-3, batch_size: int = 64,
                 tau: float = 0.01, gamma: float = 1.0, buffer_episodes: int = 128,
                 gradient_steps: int | None = None):
        super().__init__(space, budget, seed=seed)
        if mode not in ("align", "fixed"):
            raise QSearchError(f"haq mode {mode!r} not understood: use 'align' (fill the "
                               "budget by width) or 'fixed' (HAQ's fixed architecture)")
        if algorithm not in ("td3", "ddpg"):
            raise QSearchError(f"haq algorithm {algorithm!r} not understood: use 'td3' or "
                               "'ddpg' (stable-baselines3's)")
        if width is not None and mode != "fixed":
            raise QSearchError("haq width is only used with mode='fixed': drop width or "
                               "add mode='fixed'")
        self.levels = [b for b in space.bit_choices if min_bits <= b <= max_bits]
        if not self.levels:
            raise QSearchError(f"haq bit range {min_bits}..{max_bits} holds none of the "
                               f"space's bit choices {list(space.bit_choices)}: widen "
                               "min_bits/max_bits or pass matching --bit-choices")
        for name, value, ok, rule in (
                ("warmup", warmup, warmup >= 0, ">= 0"),
                ("noise_sigma", noise_sigma, noise_sigma >= 0, ">= 0"),
                ("noise_decay", noise_decay, 0 < noise_decay <= 1, "in (0, 1]"),
                ("actor_lr", actor_lr, actor_lr > 0, "> 0"),
                ("critic_lr", critic_lr, critic_lr > 0, "> 0"),
                ("tau", tau, 0 < tau <= 1, "in (0, 1]"),
                ("gamma", gamma, 0 <= gamma <= 1, "in [0, 1]"),
                ("batch_size", batch_size, batch_size >= 1, ">= 1"),
                ("buffer_episodes", buffer_episodes, buffer_episodes >= 1, ">= 1")):
            if not ok:
                raise QSearchError(f"haq {name}={value} out of range: use a value {rule}, "
                                   f"e.g. --strategy-arg {name}=<value>")
        self.mode = mode
        self._warmup, self.noise_sigma, self.noise_decay = warmup, noise_sigma, noise_decay
        self.reward_scale, self.batch_size = reward_scale, batch_size
        self.states = layer_states(space)
        n_layers = len(self.states)
        self.gradient_steps = n_layers if gradient_steps is None else int(gradient_steps)

        # fail at construction, not mid-run, if even the lowest level cannot fit
        lowest = space.candidate([self.levels[0]] * n_layers)
        if space.min_cost(lowest, budget.kind) > budget.value:
            raise QSearchError(f"budget {budget} is below the narrowest {space.model} with "
                               f"every free layer at {self.levels[0]} bits: raise the budget")
        self.width = None
        if mode == "fixed":
            median = self.levels[(len(self.levels) - 1) // 2]
            self.width = float(width) if width is not None else self.align(
                [median] * n_layers).width
            lower_bits_to_fit(space, [self.levels[0]] * n_layers, self.width, budget,
                              self.levels)  # raises if the fixed width cannot fit at all

        self.env = LayerEnv(self.states)
        self.model = self._build_model(algorithm, net_arch=list(net_arch),
                                       learning_rate=critic_lr, tau=tau, gamma=gamma,
                                       buffer_size=buffer_episodes * n_layers)
        self.model.actor_lr = actor_lr
        self.proposed = 0  # episodes handed out (sets the noise schedule)
        self.pending: dict[str, dict] = {}  # trial id -> episode awaiting its result
        self.history: list[dict] = []  # told episodes: reward, accuracy, bits (failed: None)
        self.ref_acc: float | None = None

    def _build_model(self, algorithm: str, **kw: Any):
        import torch
        from stable_baselines3.common.logger import Logger

        # seed the initial weights without touching the process-wide torch generator, and
        # keep SB3 off the global seeding that its seed=... argument would do
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = _algorithm_class(algorithm)(
                "MlpPolicy", self.env, batch_size=self.batch_size, learning_starts=0,
                replay_buffer_class=_centred_buffer_class(), device="cpu",
                policy_kwargs={"net_arch": kw.pop("net_arch")}, **kw)
        model.set_logger(Logger(folder=None, output_formats=[]))  # no files, no /tmp/SB3-*
        return model

    # ----- the episode ------------------------------------------------------------------
    def sigma(self, episode: int | None = None) -> float:
        """HAQ's exploration width for an episode: sigma0 x decay^(episode - warmup)."""
        episode = self.proposed if episode is None else episode
        return self.noise_sigma * self.noise_decay ** max(0, episode - self.warmup)

    @property
    def warmup(self) -> int:
        """Warm-up episodes; a short search (``max_trials`` set by the runner) keeps at
        most a quarter of its trials (at least 2) random, so the agent learns within it."""
        if self.max_trials is None:
            return self._warmup
        return min(self._warmup, max(2, self.max_trials // 4))

    def _act(self, obs: np.ndarray, episode: int) -> float:
        """An action in [0, 1]: uniform during warm-up, else actor + truncated noise."""
        if episode < self.warmup:
            return float(self.rng.uniform(0.0, 1.0))
        mean = (float(self.model.predict(obs, deterministic=True)[0][0]) + 1) / 2
        return truncated_normal(self.rng, mean, self.sigma(episode))

    def _place(self, bits: list[int]) -> tuple[list[int], Candidate]:
        """Bits -> a candidate within budget, by width (align) or by lowering bits (fixed)."""
        if self.mode == "fixed":
            bits = lower_bits_to_fit(self.space, bits, self.width, self.budget, self.levels)
            return bits, self.space.candidate(bits, width=self.width)
        if self.space.min_cost(self.space.candidate(bits), self.budget.kind) > self.budget.value:
            # a tiny budget: too many bits even at the narrowest width, so HAQ's wall there
            bits = lower_bits_to_fit(self.space, bits, self.space.width_bounds[0],
                                     self.budget, self.levels)
        return bits, self.align(bits)

    def ask(self, trial_id: str) -> Proposal:
        episode = self.proposed
        obs, _ = self.env.reset()
        actions = []
        done = False
        with _torch_context():
            while not done:
                # SB3's [-1, 1] action space, stored as float32 as the replay buffer will
                actions.append(float(np.float32(2 * self._act(obs, episode) - 1)))
                obs, _, done, _, _ = self.env.step(np.array([actions[-1]], np.float32))
        bits, cand = self._place([action_to_bits(a, self.levels) for a in self.env.actions])
        self.proposed += 1
        self.pending[trial_id] = {"episode": episode, "bits": bits, "actions": actions}
        warm = episode < self.warmup
        return Proposal(cand, params={"episode": episode, "warmup": warm,
                                      "sigma": None if warm else self.sigma(episode)})

    def _accuracy(self, result: Result) -> float | None:
        """Accuracy in percent for the reward, or None to drop the episode."""
        if result.ok:
            return 100.0 * result.val_acc
        if result.status == "diverged":
            return 100.0 / self.space.info.num_classes  # chance level
        return None

    def tell(self, trial_id: str, result: Result) -> None:
        episode = self.pending.pop(trial_id, None)
        if episode is None:
            return  # not proposed by this agent (e.g. an id from before a cold restart)
        acc = self._accuracy(result)
        record = {"episode": episode["episode"], "bits": episode["bits"],
                  "accuracy": acc, "reward": None}
        self.history.append(record)
        if acc is None:
            return
        if self.ref_acc is None:
            self.ref_acc = acc
        reward = self.reward_scale * (acc - self.ref_acc)
        record["reward"] = reward

        act = np.asarray(episode["actions"], np.float32)[:, None]
        obs = self._observations(act)
        n = len(obs)
        buffer = self.model.replay_buffer
        for k in range(n):
            buffer.add(obs[k:k + 1], obs[min(k + 1, n - 1)][None], act[k:k + 1],
                       np.array([reward], np.float32), np.array([k == n - 1]), [{}])
        told = sum(r["reward"] is not None for r in self.history)
        if told >= max(self.warmup, 1) and self.gradient_steps > 0:
            with _torch_context(seed=int(self.rng.integers(2**63))):
                self.model.train(gradient_steps=self.gradient_steps,
                                 batch_size=self.batch_size)

    def _observations(self, actions: np.ndarray) -> np.ndarray:
        """The states an episode visited, replayed from its actions (the env is
        deterministic), so pending episodes need not store them."""
        obs, _ = self.env.reset()
        out = [obs]
        for a in actions[:-1]:
            obs, *_ = self.env.step(a)
            out.append(obs)
        return np.stack(out)

    # ----- state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        import torch

        buffer = self.model.replay_buffer
        filled = buffer.buffer_size if buffer.full else buffer.pos

        nets = {"policy": self.model.policy.state_dict(),
                "actor_optimizer": self.model.actor.optimizer.state_dict(),
                "critic_optimizer": self.model.critic.optimizer.state_dict(),
                "buffer": {name: torch.from_numpy(getattr(buffer, name)[:filled].copy())
                           for name in _BUFFER_ARRAYS}}
        return {**super().state_dict(), "version": 1, "proposed": self.proposed,
                "pending": self.pending, "history": self.history, "ref_acc": self.ref_acc,
                "baseline": buffer.baseline, "buffer_pos": int(buffer.pos),
                "buffer_full": bool(buffer.full), "n_updates": int(self.model._n_updates),
                "nets": _encode(nets)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise QSearchError(f"haq state version {state.get('version')} is not supported "
                               "(this qsearch reads version 1): start a new run")
        super().load_state_dict(state)
        nets = _decode(state["nets"])
        self.model.policy.load_state_dict(nets["policy"])
        self.model.actor.optimizer.load_state_dict(nets["actor_optimizer"])
        self.model.critic.optimizer.load_state_dict(nets["critic_optimizer"])
        buffer = self.model.replay_buffer
        filled = len(nets["buffer"]["rewards"])
        if filled > buffer.buffer_size:
            raise QSearchError(f"haq state holds {filled} transitions but the replay buffer "
                               f"takes {buffer.buffer_size}: resume with the same "
                               "buffer_episodes")
        for name in _BUFFER_ARRAYS:
            getattr(buffer, name)[:filled] = nets["buffer"][name].numpy()
        buffer.pos, buffer.full = state["buffer_pos"], state["buffer_full"]
        buffer.baseline = state["baseline"]
        self.model._n_updates = state["n_updates"]
        self.proposed, self.ref_acc = state["proposed"], state["ref_acc"]
        self.pending = {k: dict(v) for k, v in state["pending"].items()}
        self.history = [dict(r) for r in state["history"]]

    def summary(self) -> dict:
        rewards = [r["reward"] for r in self.history if r["reward"] is not None]
        best = max((r for r in self.history if r["reward"] is not None),
                   key=lambda r: r["reward"], default={})
        blocks = [float(np.mean(rewards[i:i + _BLOCK])) for i in range(0, len(rewards), _BLOCK)]
        return {"episodes": len(rewards), "dropped": len(self.history) - len(rewards),
                "in_flight": len(self.pending), "best_reward": best.get("reward"),
                "best_accuracy": best.get("accuracy"), "best_bits": best.get("bits"),
                "reference_accuracy": self.ref_acc, "block": _BLOCK,
                "mean_reward_per_block": blocks, "sigma": self.sigma(),
                "baseline": self.model.replay_buffer.baseline, "mode": self.mode,
                "width": self.width}
