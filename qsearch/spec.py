"""The experiment spec: one typed, versioned record from a YAML recipe and/or CLI flags.

CLI flags override YAML. Unknown keys and wrong types are errors, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsearch import QSearchError

if TYPE_CHECKING:
    from qsearch.space import SearchSpace

SPEC_VERSION = 1
MAX_WIDTH = 64.0  # widest multiplier a search may build (resnet20 at 64x: ~1e9 weights)
MAX_SEED = 2**32 - 1  # numpy and torch seeds
MAX_EXPERIMENTS = 1000  # experiments one recipe's matrix may expand to
# host or IPv4 address, optional port: what `ray start --head` prints
_ADDRESS = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::(\d{1,5}))?$")
_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
          "dict": (dict,), "list": (list,)}

# Where and how an experiment runs, not what it searches: ``Spec.hash`` leaves them out and
# ``qsearch resume`` may change them.
RUN_SETTINGS = ("address", "concurrency", "cpus_per_trial", "gpus_per_trial", "max_failures",
                "time_budget", "workers_per_trial", "cpus_per_worker", "gpus_per_worker",
                "bf16", "channels_last", "pin_memory")

# Trial length of a search trial: short proxy training (see README "Trial length").
DEFAULT_TRAIN = {"steps": 300, "batch_size": 128}


def check_type(what: str, value: Any, annotation: str) -> None:
    """``value`` fits the annotation text (``"float | None"``, ``"int"``, ...): bools are
    not numbers and floats are finite. ``what`` names the setting in the message."""
    if value is None and "None" in annotation:
        return
    want = _TYPES.get(annotation.split(" | ")[0].split("[")[0])
    if want is None:
        return
    number = bool not in want and isinstance(value, bool)
    if number or not isinstance(value, want):
        raise QSearchError(f"{what} = {value!r} has the wrong type: expected {annotation}")
    if isinstance(value, float) and not math.isfinite(value):
        raise QSearchError(f"{what} = {value!r} must be a finite number")


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
    workers_per_trial: int = 1  # >1: a Ray Train TorchTrainer of that many DDP workers
    cpus_per_worker: float | None = None  # each worker's CPUs (default 1)
    gpus_per_worker: float | None = None  # each worker's GPUs (default 0: gloo on CPU)
    bf16: bool = False  # autocast training steps to bfloat16 (opt-in until measured)
    channels_last: bool = False  # NHWC memory order (opt-in until measured)
    pin_memory: bool = False  # ImageFolder batches in page-locked memory (opt-in)
    concurrency: int | None = None  # default: as many as the cluster's CPUs allow
    max_failures: int = 2
    time_budget: str | None = None  # e.g. "90m": stop this sitting after that long
    scheduler: str = "none"  # "asha" or "hyperband": Ray Tune's rung schedulers
    min_steps: int | None = None  # first rung (default: trial length / reduction_factor**2)
    reduction_factor: int = 3  # rungs at min_steps * reduction_factor**k
    address: str | None = None
    out: str | None = None
    final_seeds: int = 0  # retrain the final candidate at the target with this many seeds
    final_train: dict[str, Any] = field(default_factory=lambda: {"epochs": 1.0})
    evaluator: str = "train"  # "supernet": weight-sharing evaluations (qsearch.evaluator)
    supernet_train: dict[str, Any] = field(default_factory=lambda: {"epochs": 2.0})
    supernet_cache: str = "runs/supernets"  # trained supernets, reused by later searches
    top_k: int = 3  # candidates the supernet ranks first, retrained stand-alone
    width_mode: str = "auto"  # "fixed": bits only, at the model's own channels
    checkpoint: str | None = None  # float state_dict the trials start from (fixed width)
    trial_mode: str = "train"  # "ptq": quantize the checkpoint, calibrate, validate
    pin: dict[str, int] = field(default_factory=dict)  # layer pattern -> bits, left alone
    keep_float: list[str] = field(default_factory=list)  # layer patterns kept float
    name: str | None = None
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        for f in fields(self):
            check_type(f"spec key {f.name!r}", getattr(self, f.name), f.type)
        if self.version != SPEC_VERSION:
            raise QSearchError(f"spec version {self.version} not supported: this qsearch "
                               f"reads version {SPEC_VERSION}")
        for ok, problem in self._rules():
            if not ok:
                raise QSearchError(problem)
        from qsearch.schedule import check_spec

        check_spec(self)

    def _rules(self) -> list[tuple[bool, str]]:
        """(holds, what to say when it does not) for every value check of a spec."""
        bits, address = self.bit_choices, self.address
        return [
            (self.final_seeds >= 0, f"final_seeds = {self.final_seeds}: must be 0 (no final "
             "retrain) or more, e.g. --final-seeds 3"),
            (self.trials >= 1, f"trials = {self.trials}: must be at least 1, e.g. --trials 8"),
            (0 <= self.seed <= MAX_SEED, f"seed = {self.seed}: use an integer from 0 to "
             f"{MAX_SEED}, e.g. --seed 0"),
            (self.cpus_per_trial > 0 and self.gpus_per_trial >= 0, "resources per trial "
             f"invalid (cpus {self.cpus_per_trial}, gpus {self.gpus_per_trial}): cpus > 0, "
             "gpus >= 0"),
            *self._worker_rules(),
            (self.concurrency is None or self.concurrency >= 1,
             f"concurrency = {self.concurrency}: must be at least 1"),
            (self.max_failures >= 0, f"max_failures = {self.max_failures}: retries of a "
             "failed trial must be 0 or more (Ray reads a negative number as retrying "
             "forever), e.g. --max-failures 2"),
            (0 < self.width_min < self.width_max, f"width bounds min {self.width_min}, max "
             f"{self.width_max} invalid: need 0 < --width-min < --width-max"),
            (self.width_max <= MAX_WIDTH, f"width_max = {self.width_max}: the widest "
             f"multiplier qsearch builds is {MAX_WIDTH:g}, e.g. --width-max 32"),
            (bool(bits) and all(isinstance(b, int) and not isinstance(b, bool) for b in bits),
             f"bit_choices {bits!r} must be a list of integers, e.g. --bit-choices 1,2,4,8"),
            (self.time_budget is None or _seconds_or_none(self.time_budget) is not None,
             f"time budget {str(self.time_budget)[:40]!r} not understood: give a positive "
             "duration with its unit, e.g. --time-budget 90m (s, m or h)"),
            (address is None or _address_ok(address), f"address {address!r} not "
             "understood: give the Ray head node as host:port (port 6379 by default), e.g. "
             "--address 10.0.0.5:6379"),
            (self.out is None or self.out.strip() != "", f"out {self.out!r} is empty: give "
             "a directory, e.g. --out runs/exp1, or leave it out for runs/<strategy>-<time>"),
            (self.name is None or self.name.strip() != "", f"name {self.name!r} is empty: "
             "give an id, e.g. --name fmnist-32KB, or leave it out for the directory name"),
            *self._evaluator_rules(),
            *self._pretrained_rules(),
        ]

    def _pretrained_rules(self) -> list[tuple[bool, str]]:
        """Checks of fixed-width, checkpoint and post-training settings."""
        ptq = self.trial_mode == "ptq"
        return [
            (self.width_mode in ("auto", "fixed"), f"width mode {self.width_mode!r} not "
             "known: use auto (a width family's width is aligned to the budget) or fixed "
             "(bits only, at the model's own channels), e.g. --width fixed"),
            (self.trial_mode in ("train", "ptq"), f"trial mode {self.trial_mode!r} not known:"
             " use train (quantization-aware training) or ptq (post-training quantization "
             "of --checkpoint), e.g. --trial-mode ptq"),
            (not ptq or self.checkpoint is not None, "--trial-mode ptq needs the float "
             "weights it quantizes: add --checkpoint FILE (a state_dict of the model)"),
            (self.checkpoint is None or self.evaluator == "train", "--checkpoint with "
             "--evaluator supernet: the supernet is trained from scratch; use --evaluator "
             "train (fine-tuning trials) or --trial-mode ptq"),
            (not ptq or self.scheduler == "none", f"--scheduler {self.scheduler} with "
             "--trial-mode ptq: a post-training trial trains nothing, so it has no rungs; "
             "use --scheduler none"),
            (all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                 for k, v in self.pin.items()), f"pin {self.pin!r}: map layer patterns to "
             "integer bits, e.g. --pin 'layer3.*=8'"),
            (all(isinstance(k, str) for k in self.keep_float), f"keep_float "
             f"{self.keep_float!r}: list layer patterns, e.g. --keep-float 'fc'"),
            (self.checkpoint is None or self.checkpoint.strip() != "", "checkpoint is empty:"
             " give a state_dict file, e.g. --checkpoint runs/float/resnet20.pt"),
        ]

    @property
    def fixed_width(self) -> bool:
        """Bits only, at the model's own channels: asked for, or implied by a checkpoint."""
        return self.width_mode == "fixed" or self.checkpoint is not None

    def pins(self) -> dict[str, int]:
        """``pin`` and ``keep_float`` as one layer pattern -> bits mapping (32: float)."""
        from qsearch.pins import parse_pins

        return {**self.pin, **parse_pins(keep_float=self.keep_float)}

    def _evaluator_rules(self) -> list[tuple[bool, str]]:
        """Checks of the evaluator settings (see :mod:`qsearch.evaluator`)."""
        supernet = self.evaluator == "supernet"
        return [
            (self.evaluator in ("train", "supernet"), f"evaluator {self.evaluator!r} not "
             "known: use train (each candidate trained, the default) or supernet (cut out "
             "of one weight-sharing network), e.g. --evaluator supernet"),
            (self.top_k >= 1, f"top_k = {self.top_k}: retrain at least 1 of the candidates "
             "the supernet ranks first, e.g. --top-k 3"),
            (not supernet or self.scheduler == "none", f"--scheduler {self.scheduler} with "
             "--evaluator supernet: a supernet evaluation trains nothing, so it has no rungs; "
             "use --scheduler none"),
            (not supernet or self.workers_per_trial == 1, "--evaluator supernet with "
             f"--workers-per-trial {self.workers_per_trial}: supernet training changes its "
             "sub-network every step and runs in one process; use --workers-per-trial 1"),
            (self.supernet_cache.strip() != "", "supernet_cache is empty: give a directory, "
             "e.g. --supernet-cache runs/supernets"),
        ]

    def _worker_rules(self) -> list[tuple[bool, str]]:
        """Checks of the data-parallel settings (see :meth:`worker_resources`)."""
        n, cpus, gpus = self.workers_per_trial, self.cpus_per_worker, self.gpus_per_worker
        given = [f"--{k.replace('_', '-')} {v:g}" for k, v in
                 (("cpus_per_worker", cpus), ("gpus_per_worker", gpus)) if v is not None]
        single = [f"--{k.replace('_', '-')} {v:g}" for k, v, default in
                  (("cpus_per_trial", self.cpus_per_trial, 1.0),
                   ("gpus_per_trial", self.gpus_per_trial, 0.0)) if v != default]
        return [
            (n >= 1, f"workers_per_trial = {n}: a trial runs on 1 worker (one process, the "
             "default) or more (DDP), e.g. --workers-per-trial 2"),
            (n > 1 or not given, f"{' and '.join(given)} need{'s' * (len(given) == 1)} "
             "--workers-per-trial 2 or more: a single-process trial takes --cpus-per-trial / "
             "--gpus-per-trial"),
            (n == 1 or not single, f"{' and '.join(single)} with --workers-per-trial {n}: "
             "each worker's resources are --cpus-per-worker / --gpus-per-worker (e.g. "
             "--gpus-per-worker 1); --cpus/--gpus-per-trial are for single-process trials"),
            ((cpus is None or cpus > 0) and (gpus is None or gpus >= 0), "resources per "
             f"worker invalid (cpus {cpus}, gpus {gpus}): cpus > 0, gpus >= 0, e.g. "
             "--cpus-per-worker 4 --gpus-per-worker 1"),
            (gpus is None or gpus <= 0 or float(gpus).is_integer(), f"gpus_per_worker = "
             f"{gpus}: DDP workers (NCCL) cannot share a GPU; give 0 (CPU workers, gloo) or "
             "a whole number, e.g. --gpus-per-worker 1 (to share GPUs between trials, use "
             "--gpus-per-trial 0.25 with --workers-per-trial 1)"),
        ]

    def worker_resources(self) -> tuple[float, float]:
        """CPUs and GPUs of each worker of a data-parallel trial (defaults 1 and 0)."""
        return (1.0 if self.cpus_per_worker is None else self.cpus_per_worker,
                0.0 if self.gpus_per_worker is None else self.gpus_per_worker)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "spec") -> Spec:
        if not isinstance(d, dict):
            raise QSearchError(f"{source} must be a mapping of spec keys, got "
                               f"{type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known, key=str)
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
                if k not in ("out", "name", *RUN_SETTINGS)}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def duration_seconds(text: str) -> float:
    """``"90m"``, ``"1.5h"``, ``"45s"`` in seconds (the spec checked it already)."""
    seconds = _seconds_or_none(text)
    if seconds is None:
        raise QSearchError(f"duration {text[:40]!r} not understood: e.g. 90m, 1.5h or 45s")
    return seconds


def _seconds_or_none(text: str) -> float | None:
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh])\s*", text)
    if not m or float(m.group(1)) <= 0:
        return None
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def _address_ok(address: str) -> bool:
    m = _ADDRESS.match(address)
    return m is not None and 1 <= int(m.group(1) or 6379) <= 65535


def read_spec(path: Path) -> Spec:
    """The spec stored in an experiment directory (``spec.json``), checked."""
    try:
        d = json.loads(path.read_bytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QSearchError(f"{str(path)!r} is corrupted ({e}): restore it from a backup or "
                           "start a new experiment") from None
    if not isinstance(d, dict):
        raise QSearchError(f"{str(path)!r} is corrupted: it holds a {type(d).__name__}, not "
                           "a spec (a JSON object); restore it or start a new experiment")
    return Spec.from_dict(d, source=str(path))


def expand_matrix(base: dict[str, Any], strategies: list[str]) -> list[dict[str, Any]]:
    """A recipe's ``matrix`` becomes one spec dict per combination, each with its own
    ``out`` below the recipe's ``out``. The matrix maps spec keys to lists of values (their
    product is taken; ``strategy: all`` means every search strategy), or is a list of
    mappings, one per experiment; an experiment's directory joins its values, or is its
    ``name`` where a mapping gives one. Two experiments may not share a directory."""
    base = dict(base)
    matrix = base.pop("matrix", None)
    if matrix is None:
        return [base]
    root = base.get("out") or "runs/recipe"
    specs: dict[str, dict[str, Any]] = {}
    for combo in _combinations(matrix, strategies):
        out = str(Path(str(root)) / _directory_name(combo))
        if out in specs:
            raise QSearchError(f"matrix gives two experiments the directory {out!r} "
                               f"({dict(combo)!r} twice): list each value once, or name each "
                               "experiment (name: ...)")
        specs[out] = {**base, **dict(combo), "out": out}
    return list(specs.values())


def _directory_name(combo: tuple[tuple[Any, Any], ...]) -> str:
    """An experiment's directory below the recipe's ``out``: its ``name``, else its values."""
    name = dict(combo).get("name")
    if name is None:
        return "-".join(str(v) for _, v in combo)
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or \
            any(c in name for c in "/\\"):
        raise QSearchError(f"matrix name {name!r} must be a directory name (no '/', not "
                           "'.' or '..'), e.g. name: uniform-1b-16KB")
    return name


def _combinations(matrix: Any, strategies: list[str]) -> list[tuple[tuple[Any, Any], ...]]:
    """The (key, value) pairs of each experiment of a matrix, at most MAX_EXPERIMENTS."""
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
        n = math.prod(len(a) for a in axes)
        combos = list(itertools.product(*axes)) if n <= MAX_EXPERIMENTS else []
    else:
        raise QSearchError("recipe key 'matrix' must map spec keys to lists, e.g. {strategy: "
                           "all, budget: [16KB, 48KB]}, or list one mapping per experiment")
    if not 0 < len(combos) <= MAX_EXPERIMENTS:
        raise QSearchError(f"matrix expands to more than {MAX_EXPERIMENTS} experiments: "
                           "split the recipe")
    return combos


def space_from_spec(spec: Spec) -> SearchSpace:
    """The search space a spec describes (cached: building one traces the model)."""
    return _space(spec.model, spec.dataset, spec.data.get("root"), spec.a_bits,
                  tuple(spec.bit_choices), spec.pin_bits, spec.width_min, spec.width_max,
                  spec.fixed_width, tuple(spec.pins().items()))


@lru_cache(maxsize=8)
def _space(model, dataset, root, a_bits, bit_choices, pin_bits, wmin, wmax, fixed,
           pins) -> SearchSpace:
    from qsearch.space import SearchSpace  # imports torch: only when a space is needed

    return SearchSpace(model, dataset, data_root=root, a_bits=a_bits, bit_choices=bit_choices,
                       pin_bits=pin_bits, width_bounds=(wmin, wmax), fixed_width=fixed,
                       pins=dict(pins))
