"""The experiment spec: one typed, versioned record from a YAML recipe and/or CLI flags.

CLI flags override YAML. Unknown keys and wrong types are errors, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from qsearch import QSearchError

if TYPE_CHECKING:
    from qsearch.space import SearchSpace

SPEC_VERSION = 1

# Trial length of a search trial: short proxy training (see README "Trial length").
DEFAULT_TRAIN = {"steps": 300, "batch_size": 128}


@dataclass
class Spec:
    """Everything that defines an experiment. ``train`` holds TrainConfig fields; ``data``
    holds load_dataset options (root, val_fraction, train_fraction)."""

    strategy: str = "uniform"
    budget: str = "32KB"
    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    proxy_budget: str | None = "auto"  # "auto", a budget string, or None for "never"
    strategy_kwargs: dict[str, Any] = field(default_factory=dict)
    trials: int = 8
    train: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_TRAIN))
    data: dict[str, Any] = field(default_factory=dict)
    a_bits: int = 4
    bit_choices: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    pin_bits: int | None = 8
    width_min: float = 0.05
    width_max: float = 32.0
    seed: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    concurrency: int | None = None  # default: as many as the cluster's CPUs allow
    max_failures: int = 2
    address: str | None = None
    out: str | None = None
    final_seeds: int = 0  # retrain the final candidate at the target with this many seeds
    final_train: dict[str, Any] = field(default_factory=lambda: {"epochs": 1.0})
    name: str | None = None
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            want = {"str": str, "int": int, "float": (int, float), "bool": bool,
                    "dict": dict, "list": list}
            base = f.type.split(" | ")[0].split("[")[0]
            ok = want.get(base)
            if ok and (not isinstance(value, ok) or (ok is int and isinstance(value, bool))):
                raise QSearchError(f"spec key {f.name!r} = {value!r} has the wrong type: "
                                   f"expected {f.type}")
        if self.version != SPEC_VERSION:
            raise QSearchError(f"spec version {self.version} not supported: this qsearch "
                               f"reads version {SPEC_VERSION}")
        if self.final_seeds < 0:
            raise QSearchError(f"final_seeds = {self.final_seeds}: must be 0 (no final "
                               "retrain) or more, e.g. --final-seeds 3")
        if self.trials < 1:
            raise QSearchError(f"trials = {self.trials}: must be at least 1, e.g. --trials 8")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise QSearchError(f"resources per trial invalid (cpus {self.cpus_per_trial}, "
                               f"gpus {self.gpus_per_trial}): cpus > 0, gpus >= 0")
        if self.concurrency is not None and self.concurrency < 1:
            raise QSearchError(f"concurrency = {self.concurrency}: must be at least 1")
        if self.width_min >= self.width_max or self.width_min <= 0:
            raise QSearchError(f"width bounds min {self.width_min} >= max {self.width_max}:"
                               " need 0 < --width-min < --width-max")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "spec") -> Spec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QSearchError(f"unknown key(s) {unknown} in {source}: valid keys are "
                               f"{', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> Spec:
        return Spec.from_dict({**self.to_dict(), **overrides})

    def hash(self) -> str:
        """Identifies what was searched (excluding where and how it ran)."""
        keep = {k: v for k, v in self.to_dict().items()
                if k not in ("address", "out", "name", "concurrency", "cpus_per_trial",
                             "gpus_per_trial", "max_failures")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def expand_matrix(base: dict[str, Any], strategies: list[str]) -> list[dict[str, Any]]:
    """A recipe's ``matrix`` becomes one spec dict per combination, each with its own
    ``out`` below the recipe's ``out``. The matrix maps spec keys to lists of values (their
    product is taken; ``strategy: all`` means every registered strategy), or is a list of
    mappings, one per experiment."""
    base = dict(base)
    matrix = base.pop("matrix", None)
    if matrix is None:
        return [base]
    usage = ("recipe key 'matrix' must map spec keys to lists, e.g. {strategy: all, budget: "
             "[16KB, 48KB]}, or list one mapping per experiment")
    if isinstance(matrix, list) and matrix and all(isinstance(m, dict) for m in matrix):
        combos = [tuple(m.items()) for m in matrix]
    elif isinstance(matrix, dict) and matrix:
        axes = []
        for key, values in matrix.items():
            if key == "strategy" and values == "all":
                values = strategies
            if not isinstance(values, list) or not values:
                raise QSearchError(f"matrix key {key!r} must be a non-empty list, got "
                                   f"{values!r}")
            axes.append([(key, v) for v in values])
        combos = list(itertools.product(*axes))
    else:
        raise QSearchError(usage)
    root = base.get("out") or "runs/recipe"
    specs = []
    for combo in combos:
        d = {**base, **dict(combo)}
        d["out"] = str(Path(root) / "-".join(str(v) for _, v in combo))
        specs.append(d)
    return specs


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe as a dict (safe loader only); errors name the file and the fix."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise QSearchError(f"recipe {str(p)!r} not found: give a path to a YAML file, e.g. "
                           "experiments/leaderboard-fmnist.yaml")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise QSearchError(f"recipe {str(p)!r} is not valid YAML{where}: "
                           f"{getattr(e, 'problem', e)}; fix the file") from None
    if not isinstance(data, dict):
        raise QSearchError(f"recipe {str(p)!r} must be a mapping of spec keys, "
                           f"got {type(data).__name__}")
    return data


def space_from_spec(spec: Spec) -> SearchSpace:
    """The search space a spec describes (cached: building one traces the model)."""
    return _space(spec.model, spec.dataset, spec.data.get("root"), spec.a_bits,
                  tuple(spec.bit_choices), spec.pin_bits, spec.width_min, spec.width_max)


@lru_cache(maxsize=8)
def _space(model, dataset, root, a_bits, bit_choices, pin_bits, wmin, wmax) -> SearchSpace:
    from qsearch.space import SearchSpace  # imports torch: only when a space is needed

    return SearchSpace(model, dataset, data_root=root, a_bits=a_bits, bit_choices=bit_choices,
                       pin_bits=pin_bits, width_bounds=(wmin, wmax))
