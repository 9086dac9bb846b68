"""Planning a run before anything is written: the search budget (target or proxy) and the
settings checks. Ray-free and torch-free until a space or a dataset is needed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsearch import QSearchError
from qsearch.budget import Budget, format_cost, parse_budget
from qsearch.spec import MAX_WIDTH, Spec, check_type, space_from_spec

if TYPE_CHECKING:
    from qsearch.space import SearchSpace

PROXY_REFERENCE = (8, 0.5)  # auto proxy: the size of the 8-bit model at width 0.5
DATA_KEYS = ("root", "val_fraction", "train_fraction")
# Trial lengths beyond these are typos, not plans (the papers train 300 ImageNet epochs,
# ~1.5e6 steps): refused before a run that would never end starts.
MAX_STEPS = 10**7
MAX_EPOCHS = 10_000


@dataclass(frozen=True)
class Budgets:
    target: Budget
    search: Budget
    reason: str | None  # why a proxy is used (None: the search runs at the target)


def plan_budgets(spec: Spec, space: SearchSpace) -> Budgets:
    """The search budget: the target, or a proxy when the target is too large to train.

    Auto rule: search trials train at most the size of the family's 8-bit model at width
    0.5 (DualPrecision ran its grid at the 0.25x 8-bit size; 0.5x keeps short CPU trials
    meaningful). A larger target is searched at that proxy and the winner is re-aligned.
    """
    target = parse_budget(spec.budget)
    if space.family.fixed_width:
        return _fixed_width_budgets(spec, space, target)
    space.align(space.candidate(min(space.bit_choices)), target)  # errors if below minimum
    _check_reachable(spec, space, target)
    if spec.proxy_budget in (None, "none", "off"):
        return Budgets(target, target, None)
    if spec.proxy_budget == "auto":
        bits, width = PROXY_REFERENCE
        ref = space.cost(space.candidate(bits, width=width), target.kind)
        if target.value <= ref:
            return Budgets(target, target, None)
        return Budgets(target, Budget(target.kind, ref),
                       f"target {target} is larger than the auto proxy limit (the {bits}-bit "
                       f"{space.model} at width {width}); set --proxy-budget to change it")
    proxy = parse_budget(spec.proxy_budget)
    if proxy.kind != target.kind:
        raise QSearchError(f"proxy budget {spec.proxy_budget!r} is a {proxy.kind} budget but "
                           f"the target {spec.budget!r} is a {target.kind} budget: use one kind")
    if proxy.value > target.value:
        raise QSearchError(f"proxy budget {spec.proxy_budget} exceeds the target "
                           f"{spec.budget}: a proxy must be smaller")
    space.align(space.candidate(min(space.bit_choices)), proxy)
    return Budgets(target, proxy, "set by --proxy-budget")


def _fixed_width_budgets(spec: Spec, space: SearchSpace, target: Budget) -> Budgets:
    """A fixed-width model meets its budget through the bits alone, so it is searched at the
    target: a proxy's winner is re-aligned by its width, which this model does not have."""
    bits = min(space.bit_choices)
    floor = space.cost(space.candidate(bits), target.kind)
    if floor > target.value:
        raise QSearchError(
            f"budget {spec.budget!r} is below the smallest {spec.model} with these bits: every "
            f"free layer at {bits} bits costs {format_cost(floor, target.kind)} (pinned "
            f"layers at {space.pin_bits}): raise the budget to at least that, or lower "
            "--pin-bits")
    if spec.proxy_budget not in (None, "none", "off", "auto"):
        raise QSearchError(
            f"--proxy-budget {spec.proxy_budget} with the fixed-width model {spec.model}: a "
            "proxy's winner is re-aligned to the target by its width, which this model does "
            "not have; leave --proxy-budget out")
    return Budgets(target, target, None)


def _check_reachable(spec: Spec, space: SearchSpace, target: Budget) -> None:
    """A budget above the widest model the bounds allow, at the largest bits, cannot be
    filled: every candidate would stop at the width limit, far below the target."""
    bits, width = max(space.bit_choices), space.width_bounds[1]
    largest = space.cost(space.candidate(bits, width=width), target.kind)
    if target.value > largest:
        raise QSearchError(
            f"budget {spec.budget!r} is above the largest {space.model} model the width "
            f"bounds allow ({format_cost(largest, target.kind)}: {bits}-bit weights at width "
            f"{width:g}): lower the budget, or raise --width-max (at most {MAX_WIDTH:g})")


def budget_text(b: Budget) -> str:
    """A budget as an exact string that ``parse_budget`` reads back (trial configs, rows)."""
    return f"{b.value!r}{'bits' if b.kind == 'size' else 'bitops'}"


def validate_run_settings(spec: Spec, *, load_data: bool = True) -> None:
    """Training and data settings are checked on the driver, before anything is written;
    ``load_data=False`` (the dry run) checks everything but the dataset's files."""
    from qsearch.train_config import TrainConfig

    for key in ("train", "final_train", "supernet_train"):
        check_train_settings(getattr(spec, key), key)
        try:
            TrainConfig.from_dict({**getattr(spec, key), "seed": spec.seed})
        except QSearchError as e:
            raise QSearchError(f"{key}: {e}") from None
        batch = TrainConfig.recipe(spec.dataset, **getattr(spec, key)).batch_size
        check_global_batch(batch, spec.workers_per_trial, key)
    check_data_settings(spec.data)
    check_evaluator(spec)
    check_checkpoint(spec)
    if load_data and spec.dataset in ("fashion-mnist", "cifar10", "cifar100", "synthetic"):
        from qsearch.data import load_dataset

        load_dataset(spec.dataset, **spec.data)


def search_defaults(spec: Spec, given: Collection[str]) -> Spec:
    """The spec with what its evaluator and trial mode imply for the strategy, under the
    user's own ``strategy_kwargs``: with the supernet evaluator a trial is an evaluation, so
    the strategy's ``supernet_trials`` (HAQ: the paper's 600 episodes) unless ``trials`` is
    in ``given`` (the keys a recipe or a flag set) and its ``supernet_kwargs``; a strategy
    with trials of its own takes ``--checkpoint`` and ``--trial-mode ptq`` as its options
    (``checkpoint_kwarg``, ``ptq_kwargs``)."""
    from qsearch.strategy import get_strategy

    cls = get_strategy(spec.strategy)
    kwargs = dict(cls.supernet_kwargs) if spec.evaluator == "supernet" else {}
    if spec.checkpoint and cls.checkpoint_kwarg:
        kwargs[cls.checkpoint_kwarg] = spec.checkpoint
    if spec.trial_mode == "ptq" and cls.ptq_kwargs:
        kwargs.update(cls.ptq_kwargs)
    over: dict = {"strategy_kwargs": {**kwargs, **spec.strategy_kwargs}}
    if spec.evaluator == "supernet" and "trials" not in given:
        over["trials"] = cls.supernet_trials
    return spec.replace(**over)


def check_evaluator(spec: Spec) -> None:
    """The supernet evaluator and post-training trials stand in for ``train`` trials: refuse
    strategies without (MixQuant has a post-training mode of its own)."""
    from qsearch.strategy import get_strategy, list_strategies

    if spec.evaluator == "supernet" and not get_strategy(spec.strategy).train_trials:
        usable = [n for n in list_strategies(search_only=True) if get_strategy(n).train_trials]
        raise QSearchError(f"--evaluator supernet with --strategy {spec.strategy}: its trials "
                           "are not plain candidate trainings the supernet can stand in for; "
                           f"use it with {', '.join(usable)}, or --evaluator train")
    cls = get_strategy(spec.strategy)
    if spec.trial_mode == "ptq" and not (cls.train_trials or cls.ptq_kwargs):
        usable = [n for n in list_strategies(search_only=True)
                  if get_strategy(n).train_trials or get_strategy(n).ptq_kwargs]
        raise QSearchError(f"--trial-mode ptq with --strategy {spec.strategy}: its trials are "
                           "its own training, which has no post-training form; use it with "
                           f"{', '.join(usable)}, or --trial-mode train")


def check_checkpoint(spec: Spec) -> None:
    """A ``--checkpoint`` fits the space's model (or is adapted as
    :func:`qsearch.pretrained.matched` says), checked before anything is written."""
    if not spec.checkpoint:
        return
    from qsearch.pretrained import matched, read_state_dict

    space = space_from_spec(spec)
    matched(space.build(1.0), read_state_dict(spec.checkpoint), spec.checkpoint, spec.model)


def check_global_batch(batch_size: int, workers: int, what: str = "train") -> None:
    """The batch size is the global batch of one step: it must split evenly over the
    workers of a data-parallel trial (see :mod:`qsearch.parallel`)."""
    if batch_size % workers:
        fix = max(workers, batch_size // workers * workers)
        raise QSearchError(f"{what} batch size {batch_size} does not split over "
                           f"--workers-per-trial {workers}: the batch size is the global batch "
                           f"of one step, each worker trains 1/{workers} of it; use a multiple "
                           f"of {workers}, e.g. --batch-size {fix}")


def check_train_settings(train: dict[str, Any], what: str = "train") -> None:
    """Types of TrainConfig fields (a string is not a step count, a bool not a rate) and a
    sane trial length; the value ranges are TrainConfig's own checks."""
    from qsearch.train_config import TrainConfig

    types = {f.name: f.type for f in fields(TrainConfig)}
    for key, value in train.items():
        if key in types:
            check_type(f"{what} setting {key!r}", value, types[key])
    for key, limit in (("steps", MAX_STEPS), ("epochs", MAX_EPOCHS)):
        value = train.get(key)
        if value is not None and value > limit:
            raise QSearchError(f"{what} setting {key} = {value:g} is beyond any useful trial "
                               f"length (at most {limit:g}): e.g. --{key} 300")


def check_data_settings(data: dict[str, Any]) -> None:
    """Names and types of the data settings (their values against the dataset's size are
    checked when it loads)."""
    unknown = sorted(set(data) - set(DATA_KEYS), key=str)
    if unknown:
        raise QSearchError(f"unknown data settings {unknown}: valid ones are "
                           f"{', '.join(DATA_KEYS)}")
    root = data.get("root")
    if root is not None and (not isinstance(root, str) or not root.strip()):
        raise QSearchError(f"data setting root = {root!r} must be a directory path, e.g. "
                           "--data-root ~/data")
    for key in ("val_fraction", "train_fraction"):
        value = data.get(key, 1)
        count = isinstance(value, int) and not isinstance(value, bool)
        low = 1 if key == "train_fraction" else 0  # no validation images is allowed
        fraction = isinstance(value, float) and (0 < value <= 1 or value == low)
        if not (count and value >= low or fraction):
            raise QSearchError(f"data setting {key} = {value!r} not understood: use a "
                               f"fraction in (0, 1] like 0.1, or a count of images like 5000")


def check_writable(path: str | Path, *, directory: bool, what: str, flag: str,
                   example: str) -> None:
    """``path`` can be created and written, checked before anything is written or trained.

    Permission bits do not tell (root passes them everywhere, /proc is not a file system
    of files), so an empty probe file is created and removed in the nearest existing
    directory on the way to ``path``."""
    text = str(path)
    if not text.strip():
        raise QSearchError(f"{flag} {text!r} is empty: give the {what}, e.g. {flag} "
                           f"{example}")
    p = Path(text)
    if p.exists() and p.is_dir() != directory:
        kind, want = ("a directory", "file name") if p.is_dir() else ("a file", "directory")
        raise QSearchError(f"{what} {text!r} is {kind}: give a {want}, e.g. {flag} {example}")
    parent = p if directory else p.parent
    while not parent.exists():
        parent = parent.parent
    try:
        if p.exists() and not os.access(p, os.W_OK):
            raise PermissionError(f"{p} is read-only")
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".qsearch-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise QSearchError(f"{what} {text!r} is not writable ({parent}: "
                           f"{e.strerror or e}): choose another {flag}") from None
