"""HAQ's environment over a layer inventory (Wang et al., CVPR 2019, Sec. 3.1-3.2).

The state embedding of each free layer, HAQ's action -> bits rule, its budget wall
(``_final_action_wall``), its truncated-normal exploration noise, and the gymnasium env an
episode walks. Pure functions of the space, unit-tested in ``tests/test_strategy_haq.py``;
:mod:`qsearch.strategies.haq` re-exports them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from qsearch.budget import Budget
from qsearch.space import SearchSpace

STATE_FIELDS = ("k", "cin", "cout", "kernel", "stride", "feature_size", "params",
                "depthwise", "weight_or_act", "prev_action")


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
    """HAQ's ``_final_action_wall`` on per-free-layer ``bits`` at a fixed ``width``: lower
    free layers one level at a time, last first, until it fits
    (:meth:`SearchSpace.lower_to_fit`)."""
    fitted = space.lower_to_fit(space.candidate(bits, width=width), budget, levels)
    return [fitted.w_bits[i] for i in space.free_layers]


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
