"""The one stable-baselines3 internal qsearch relies on: the off-policy update counter.

TD3 steps its actor and target nets on every ``policy_delay``-th gradient step, counted by
``_n_updates``, which ``TD3.train`` reads and increments. HAQ resumed from a ``state_dict``
must restore the count, or it steps the actor on the other parity and stops repeating the
original run. SB3 has no public setter: its ``save``/``load`` restore the count only by
rebuilding the whole model from a pickled archive. ``test_sb3_update_counter_adapter`` in
``tests/test_strategy_haq.py`` fails when the installed SB3 renames or stops reading it.
"""

from __future__ import annotations

from typing import Any

_COUNTER = "_n_updates"  # OffPolicyAlgorithm's gradient steps so far (stable-baselines3 2.x)


def update_count(model: Any) -> int:
    """Gradient steps ``model.train`` has taken (TD3 and DDPG)."""
    return int(_counter(model))


def set_update_count(model: Any, n: int) -> None:
    """Restore the count :func:`update_count` saved, so delayed updates keep their phase."""
    _counter(model)  # never create an attribute SB3 would not read
    setattr(model, _COUNTER, int(n))


def _counter(model: Any) -> Any:
    try:
        return getattr(model, _COUNTER)
    except AttributeError:
        import stable_baselines3

        raise RuntimeError(
            f"stable-baselines3 {stable_baselines3.__version__}: {type(model).__name__} has no "
            f"{_COUNTER}; update qsearch/strategies/_sb3_adapter.py to this SB3's update "
            "counter") from None
