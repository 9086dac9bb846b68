"""HAQ (Wang et al., CVPR 2019): an RL agent assigns weight bits layer by layer.

The learner is stable-baselines3's TD3 (default) or DDPG (HAQ's): SB3's policy, replay
buffer and train step. Trials are evaluated outside the agent (Ray trials), so SB3's
``learn()`` loop is not used: ``ask`` rolls out one episode with the current actor plus
HAQ's truncated-normal exploration noise, ``tell`` adds that episode's transitions to
``model.replay_buffer`` and calls ``model.train``. As in HAQ's ``ddpg.py``, a moving-average
baseline is subtracted from the sampled rewards. The environment and HAQ's rules live in
``_haq_env``, the SB3 glue in ``_haq_learner``; measured notes on the defaults in
docs/haq.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from qsearch import QSearchError
from qsearch.budget import Budget
from qsearch.candidate import Candidate
from qsearch.space import SearchSpace
from qsearch.strategy import Proposal, Result, Strategy, register_strategy

from ._haq_env import (
    STATE_FIELDS,
    LayerEnv,
    action_to_bits,
    layer_states,
    lower_bits_to_fit,
    truncated_normal,
)
from ._haq_learner import decode, encode, make_model, refill_order, torch_context
from ._sb3_adapter import set_update_count, update_count

__all__ = ["HAQ", "STATE_FIELDS", "LayerEnv", "action_to_bits", "layer_states",
           "lower_bits_to_fit"]

STATE_VERSION = 2  # 2: the replay buffer is stored as its episodes (1 held SB3's raw arrays)
_BLOCK = 10  # episodes per entry of summary()["mean_reward_per_block"]


@register_strategy("haq")
class HAQ(Strategy):
    """HAQ's RL agent, width-aligned by default; ``mode="fixed"`` is HAQ as published.

    Wang, Liu, Lin, Lin, Han, "HAQ: Hardware-Aware Automated Quantization with Mixed
    Precision", CVPR 2019. An episode walks the space's free layers (the pinned first and
    last layer keep their bits). At layer k the agent sees the layer's state embedding
    (Sec. 3.2, :func:`layer_states`) with its previous action, and emits a continuous
    action in [0, 1] that becomes bits (Sec. 3.1, :func:`action_to_bits`). The finished
    episode is one trial; its accuracy is the reward, given to every transition of the
    episode. The budget is enforced by construction rather than by the reward: ``align``
    re-solves the width multiplier so the proposal fills it, ``fixed`` lowers bits layer by
    layer as HAQ does (:func:`lower_bits_to_fit`); on a fixed-width model (its own channels)
    they are then raised to the closest cost below the budget (qsearch's addition,
    :meth:`SearchSpace.raise_to_fill`: no episode leaves budget its layers could take).
    After ``warmup`` random episodes the agent explores with truncated-normal noise around
    its actor, decaying per episode.

    Args:
        mode: ``"align"`` (default) re-solves the width multiplier so every proposal fills
            the budget (the papers' matched-size comparison; the reward is plain accuracy).
            ``"fixed"`` is classic HAQ: the architecture stays at ``width`` and bits over
            budget are lowered layer by layer (:func:`lower_bits_to_fit`).
        width: fixed mode's width multiplier. Default: the width at which the uniform model
            at the median bit level fills the budget (5 bits for 2..8), so the budget binds
            the way HAQ's "as small as a uniform k-bit model" targets do. Where uniform
            ``max_bits`` fits, the constraint never binds and the agent only learns "all
            max bits".
        min_bits, max_bits: HAQ's action range (2..8 in the paper; 1 is allowed). The agent
            picks among the space's ``bit_choices`` inside this range, in equal action bins;
            with ``--bit-choices 1,2,3,4,5,6,7,8`` this is HAQ's integer mapping exactly.
        warmup: episodes of uniform random actions before the actor is used and trained
            (HAQ: 20 of 600). A search of N trials caps it at max(2, N // 4), so a short
            search still leaves most of its trials to the learned policy.
        noise_sigma, noise_decay: truncated-normal exploration, sigma decaying per episode
            after warm-up (HAQ: 0.5 and 0.99).
        reward_scale: lambda of ``lambda x (acc - acc_ref)`` (HAQ: 0.1, accuracies in %).
            acc_ref is the first successful episode's accuracy (HAQ uses the pretrained
            float model's; there is none here). Training subtracts HAQ's moving-average
            baseline anyway, so acc_ref only sets the zero of the reported rewards.
        algorithm: ``"td3"`` (default) or ``"ddpg"`` (HAQ's), both SB3's. TD3's twin
            critics and delayed actor updates cope better with the noise of one reward
            shared by every layer.
        net_arch: hidden sizes of actor and critic (HAQ: 300x300 for 600 episodes; a
            smaller net suits the tens of episodes of a search here and trains faster).
        actor_lr, critic_lr: Adam steps (HAQ: 1e-4 and 1e-3). SB3 has one rate for both;
            the actor's is pinned separately, since a shared 1e-3 saturated the tanh actor.
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
    range for every layer, and then learns slowly (small tanh gradient). Exploration noise
    still searches around it, and the runner keeps the best trial whatever the policy does.
    """

    # on the supernet evaluator: the paper's length, 600 episodes with 100 of warm-up, and
    # its 300x300 actor and critic
    supernet_trials = 600
    supernet_kwargs = {"warmup": 100, "net_arch": [300, 300]}

    def __init__(self, space: SearchSpace, budget: Budget, *, seed: int = 0,
                 mode: str = "align", width: float | None = None, min_bits: int = 2,
                 max_bits: int = 8, warmup: int = 8, noise_sigma: float = 0.5,
                 noise_decay: float = 0.99, reward_scale: float = 0.1,
                 algorithm: str = "td3", net_arch: Sequence[int] = (64, 64),
                 actor_lr: float = 3e-4, critic_lr: float = 1e-3, batch_size: int = 64,
                 tau: float = 0.01, gamma: float = 1.0, buffer_episodes: int = 128,
                 gradient_steps: int | None = None):
        super().__init__(space, budget, seed=seed)
        if space.family.fixed_width:  # no width to align: HAQ as published, at width 1
            mode, width = "fixed", 1.0
        self.levels = _check_options(
            space, mode=mode, algorithm=algorithm, width=width, min_bits=min_bits,
            max_bits=max_bits, warmup=warmup, noise_sigma=noise_sigma, noise_decay=noise_decay,
            actor_lr=actor_lr, critic_lr=critic_lr, tau=tau, gamma=gamma,
            batch_size=batch_size, buffer_episodes=buffer_episodes)
        self.mode = mode
        self._warmup, self.noise_sigma, self.noise_decay = warmup, noise_sigma, noise_decay
        self.reward_scale, self.batch_size = reward_scale, batch_size
        self.buffer_episodes = buffer_episodes
        self.states = layer_states(space)
        n_layers = len(self.states)
        self.gradient_steps = n_layers if gradient_steps is None else int(gradient_steps)

        # fail at construction, not mid-run, if even the lowest level cannot fit
        lowest = space.candidate([self.levels[0]] * n_layers)
        if space.min_cost(lowest, budget.kind) > budget.value:
            raise QSearchError(f"budget {budget} is below the narrowest {space.model} with "
                               f"every free layer at {self.levels[0]} bits: raise the budget")
        self.width = self._fixed_width(width) if mode == "fixed" else None

        self.env = LayerEnv(self.states)
        self.model = make_model(algorithm, self.env, seed=self.seed, net_arch=net_arch,
                                actor_lr=actor_lr, critic_lr=critic_lr, batch_size=batch_size,
                                tau=tau, gamma=gamma, buffer_size=buffer_episodes * n_layers)
        self.proposed = 0  # episodes handed out (sets the noise schedule)
        self.pending: dict[str, dict] = {}  # trial id -> episode awaiting its result
        self.history: list[dict] = []  # told episodes: reward, accuracy, bits (failed: None)
        self.replay: list[list] = []  # [actions, reward] of the episodes in the replay buffer
        self.ref_acc: float | None = None

    def _fixed_width(self, width: float | None) -> float:
        """Fixed mode's width: given, or where the uniform median level fills the budget."""
        n_layers = len(self.states)
        median = self.levels[(len(self.levels) - 1) // 2]
        width = float(width) if width is not None else self.align([median] * n_layers).width
        lower_bits_to_fit(self.space, [self.levels[0]] * n_layers, width, self.budget,
                          self.levels)  # raises if the fixed width cannot fit at all
        return width

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
            cand = self.space.candidate(bits, width=self.width)
            if self.space.family.fixed_width:  # its own channels: raised to fill the budget
                cand = self.space.raise_to_fill(cand, self.budget, self.levels)
                bits = [cand.w_bits[i] for i in self.space.free_layers]
            return bits, cand
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
        with torch_context():
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
        """Accuracy in percent for the reward, or None to drop the episode. Only
        full-length results are rewarded: an episode a scheduler stopped early has an
        accuracy at fewer steps, not comparable with the others (HAQ's reward is the
        accuracy difference between episodes), so it teaches the agent nothing."""
        if result.ok:
            return 100.0 * result.val_acc
        if result.status == "diverged":
            return 100.0 / self.space.info.num_classes  # chance level
        return None

    def tell(self, trial_id: str, result: Result) -> None:
        episode = self.pending.pop(trial_id, None)
        if episode is None:  # not proposed by this agent (e.g. an id from a cold restart)
            warnings.warn(f"{self.name}: result for unknown trial {trial_id!r} ignored",
                          stacklevel=2)
            return
        acc = self._accuracy(result)
        record = {"episode": episode["episode"], "bits": episode["bits"],
                  "accuracy": acc, "reward": None}
        if result.stopped:
            record["stopped_at_step"] = result.fidelity
        self.history.append(record)
        if acc is None:
            return
        if self.ref_acc is None:
            self.ref_acc = acc
        reward = self.reward_scale * (acc - self.ref_acc)
        record["reward"] = reward
        self._store(episode["actions"], reward)
        self.replay = (self.replay + [[episode["actions"], reward]])[-self.buffer_episodes:]
        told = sum(r["reward"] is not None for r in self.history)
        if told >= max(self.warmup, 1) and self.gradient_steps > 0:
            with torch_context(seed=int(self.rng.integers(2**63))):
                self.model.train(gradient_steps=self.gradient_steps,
                                 batch_size=self.batch_size)

    def _store(self, actions: list[float], reward: float) -> None:
        """An episode's transitions into the replay buffer, all with the episode's reward.
        The states are replayed from the actions (the env is deterministic), so pending
        episodes and the saved state need not hold them."""
        act = np.asarray(actions, np.float32)[:, None]
        obs, _ = self.env.reset()
        obs = [obs]
        for a in act[:-1]:
            obs.append(self.env.step(a)[0])
        n = len(obs)
        for k in range(n):
            self.model.replay_buffer.add(
                obs[k][None], obs[min(k + 1, n - 1)][None], act[k:k + 1],
                np.array([reward], np.float32), np.array([k == n - 1]), [{}])

    # ----- state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "version": STATE_VERSION, "proposed": self.proposed,
                "pending": self.pending, "history": self.history, "ref_acc": self.ref_acc,
                "replay": self.replay, "buffer_episodes": self.buffer_episodes,
                "baseline": self.model.replay_buffer.baseline,
                "n_updates": update_count(self.model),
                "nets": encode(self.model.get_parameters())}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise QSearchError(f"haq state version {state.get('version')} is not supported "
                               f"(this qsearch reads version {STATE_VERSION}): start a new run")
        if state["buffer_episodes"] != self.buffer_episodes:
            raise QSearchError(f"haq state holds a replay buffer of {state['buffer_episodes']} "
                               f"episodes but this agent's takes {self.buffer_episodes}: "
                               "resume with the same buffer_episodes")
        super().load_state_dict(state)
        self.model.set_parameters(decode(state["nets"]), exact_match=True)
        set_update_count(self.model, state["n_updates"])
        self.proposed, self.ref_acc = state["proposed"], state["ref_acc"]
        self.pending = {k: dict(v) for k, v in state["pending"].items()}
        self.history = [dict(r) for r in state["history"]]
        self.replay = [[list(a), r] for a, r in state["replay"]]
        buffer = self.model.replay_buffer
        buffer.reset()
        told = sum(r["reward"] is not None for r in self.history)
        for actions, reward in refill_order(self.replay, told, self.buffer_episodes):
            self._store(actions, reward)
        buffer.baseline = state["baseline"]

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


def _check_options(space: SearchSpace, *, mode: str, algorithm: str, width: float | None,
                   min_bits: int, max_bits: int, **ranged: float) -> list[int]:
    """HAQ's options checked, each error naming the fix; returns the allowed bit levels."""
    if mode not in ("align", "fixed"):
        raise QSearchError(f"haq mode {mode!r} not understood: use 'align' (fill the "
                           "budget by width) or 'fixed' (HAQ's fixed architecture)")
    if algorithm not in ("td3", "ddpg"):
        raise QSearchError(f"haq algorithm {algorithm!r} not understood: use 'td3' or "
                           "'ddpg' (stable-baselines3's)")
    if width is not None and mode != "fixed":
        raise QSearchError("haq width is only used with mode='fixed': drop width or "
                           "add mode='fixed'")
    levels = [b for b in space.bit_choices if min_bits <= b <= max_bits]
    if not levels:
        raise QSearchError(f"haq bit range {min_bits}..{max_bits} holds none of the "
                           f"space's bit choices {list(space.bit_choices)}: widen "
                           "min_bits/max_bits or pass matching --bit-choices")
    rules = {"warmup": (lambda v: v >= 0, ">= 0"), "noise_sigma": (lambda v: v >= 0, ">= 0"),
             "noise_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
             "actor_lr": (lambda v: v > 0, "> 0"), "critic_lr": (lambda v: v > 0, "> 0"),
             "tau": (lambda v: 0 < v <= 1, "in (0, 1]"),
             "gamma": (lambda v: 0 <= v <= 1, "in [0, 1]"),
             "batch_size": (lambda v: v >= 1, ">= 1"),
             "buffer_episodes": (lambda v: v >= 1, ">= 1")}
    for name, (ok, rule) in rules.items():
        if not ok(ranged[name]):
            raise QSearchError(f"haq {name}={ranged[name]} out of range: use a value {rule}, "
                               f"e.g. --strategy-arg {name}=<value>")
    return levels
