"""HAQ's learner on stable-baselines3's public API: TD3 or DDPG with HAQ's two learning
rates and moving-average reward baseline, and the helpers that keep it seeded and resumable.

Torch and SB3 are imported inside the functions: ``qsearch --help`` must not import them.
The one SB3 internal HAQ needs is in ``_sb3_adapter``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any

import numpy as np


def make_model(algorithm: str, env: Any, *, seed: int, net_arch: Sequence[int],
               actor_lr: float, critic_lr: float, batch_size: int, tau: float, gamma: float,
               buffer_size: int) -> Any:
    """SB3's TD3 or DDPG over ``env`` with a :func:`centred_buffer_class` replay buffer.

    Initial weights are seeded without touching the process-wide torch generator, and SB3's
    ``seed=`` (which seeds the global generators) is not used. No log files are written.
    """
    import torch
    from stable_baselines3 import DDPG, TD3
    from stable_baselines3.common.logger import Logger

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = {"td3": TD3, "ddpg": DDPG}[algorithm](
            "MlpPolicy", env, learning_rate=critic_lr, batch_size=batch_size,
            learning_starts=0, tau=tau, gamma=gamma, buffer_size=buffer_size,
            replay_buffer_class=centred_buffer_class(), device="cpu",
            policy_kwargs={"net_arch": list(net_arch)})
    model.set_logger(Logger(folder=None, output_formats=[]))  # no files, no /tmp/SB3-*
    pin_learning_rate(model.actor.optimizer, actor_lr)
    return model


def pin_learning_rate(optimizer: Any, lr: float) -> None:
    """Step ``optimizer`` at ``lr`` whatever rate SB3's schedule sets before each update.

    SB3 has one learning rate for actor and critic; HAQ's actor learns 10x slower than its
    critic (1e-4 vs 1e-3). A shared 1e-3 drove the tanh actor into saturation (every layer
    at min_bits) after the first updates (docs/haq.md). A torch step pre-hook overrides the
    rate SB3 writes at the start of ``train``.
    """
    def hook(opt: Any, args: Any, kwargs: Any) -> None:
        for group in opt.param_groups:
            group["lr"] = lr

    optimizer.register_step_pre_hook(hook)


@cache
def centred_buffer_class() -> type:
    """SB3's ReplayBuffer with HAQ's moving-average baseline subtracted from sampled rewards."""
    from stable_baselines3.common.buffers import ReplayBuffer

    class CentredReplayBuffer(ReplayBuffer):
        """HAQ's ``ddpg.py``: each sampled batch updates ``baseline`` by
        ``b += 0.5 (mean(r_batch) - b)`` and the critic regresses on ``r - b``."""

        baseline: float | None = None
        alpha = 0.5

        def sample(self, batch_size: int, env: Any = None) -> Any:
            s = super().sample(batch_size, env)
            mean = float(s.rewards.mean())
            b = self.baseline
            self.baseline = mean if b is None else b + self.alpha * (mean - b)
            return s._replace(rewards=s.rewards - self.baseline)  # NamedTuple's public API

    return CentredReplayBuffer


def refill_order(episodes: list, total: int, capacity: int) -> list:
    """The order in which to re-add stored episodes so SB3's ring buffer ends as it was.

    ``episodes`` are the last ``min(total, capacity)`` of ``total`` episodes added, oldest
    first, to a buffer holding ``capacity`` episodes (its size is a whole number of
    episodes, so each episode fills one slot). Re-adding them to an empty buffer with
    ``ReplayBuffer.add`` in this order puts every episode back in its slot and leaves the
    write position where it was: same samples, same overwrites.
    """
    if total <= capacity:
        return list(episodes)
    if len(episodes) != capacity:
        raise ValueError(f"{len(episodes)} episodes stored for a full buffer of {capacity}")
    pos = total % capacity  # the next write slot, which holds the oldest episode
    by_slot = episodes[capacity - pos:] + episodes[:capacity - pos]
    return by_slot + by_slot[:pos]  # a full pass ends at slot 0; rewrite 0..pos-1 to move on


@contextmanager
def torch_context(seed: int | None = None) -> Iterator[None]:
    """One torch thread, and (with ``seed``) seeded global generators, restored on exit.

    The nets are tiny and the driver shares its cores with running trials, where extra
    intra-op threads slowed training many times over (docs/haq.md). SB3 samples its replay
    buffer from numpy's and torch's global generators, so training runs on generators
    seeded from the strategy's own rng, leaving the process-wide state as found.
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


def encode(obj: dict) -> str:
    """Tensors (e.g. ``model.get_parameters()``) as JSON-safe text."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode(text: str) -> dict:
    """:func:`encode`'s inverse; loads tensors and plain containers only (no pickled code)."""
    import torch

    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)
