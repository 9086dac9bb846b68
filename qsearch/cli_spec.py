"""How ``qsearch run``'s recipe and flags become specs: flags override the recipe, one spec
per experiment of its matrix, and the argument types the parser uses."""

from __future__ import annotations

import argparse
import fnmatch
from pathlib import Path

from qsearch import QSearchError
from qsearch.spec import RUN_SETTINGS


def bits_list(text: str) -> list[int]:
    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        bits = []
    if not bits:
        raise QSearchError(f"bit list {text!r} not understood: use comma-separated integers "
                           "such as 1,2,4,8")
    return bits


def key_value(text: str) -> tuple[str, object]:
    from qsearch.recipe_yaml import parse_yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} must look like key=value, e.g. "
                                         "--strategy-arg qems=[8,32,128]")
    try:  # QSearchError is a ValueError, which argparse would replace by "invalid value"
        return key, parse_yaml(value, f"value {value!r} of {key!r}",
                               fix="write a YAML value, e.g. --strategy-arg 'bits=[2,4]'")
    except QSearchError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_RUN_FLAGS = (  # flags that set the spec key of their name (flags override the recipe)
    "strategy", "budget", "model", "dataset", "proxy_budget", "trials", "seed", "out",
    "a_bits", "final_seeds", "name", "scheduler", "min_steps", "reduction_factor",
    "width_min", "width_max", "evaluator", "supernet_cache", "top_k", "width_mode",
    "checkpoint", "trial_mode", *RUN_SETTINGS)


def specs_from_args(args):
    """One spec per experiment: the recipe (expanded over its matrix) with flags on top."""
    from qsearch.models import portable_name
    from qsearch.planning import search_defaults
    from qsearch.recipe_yaml import load_yaml
    from qsearch.spec import Spec, expand_matrix
    from qsearch.strategy import get_strategy, list_strategies

    base = load_yaml(args.recipe) if args.recipe else {}
    matrix = bool(base.get("matrix"))
    if matrix and args.out is not None:  # the recipe's experiments go below --out
        base = {**base, "out": args.out}
    strategies = list_strategies(search_only=True) if matrix else []
    if base.get("evaluator") == "supernet":  # `strategy: all` then means those it can serve
        strategies = [n for n in strategies if get_strategy(n).train_trials]
    flags = {key for key in _RUN_FLAGS if getattr(args, key) is not None}
    recipes = only_experiments(expand_matrix(base, strategies), args.only, matrix=matrix)
    specs = [_apply_flags(Spec.from_dict(d, source=args.recipe or "spec"), args)
             for d in recipes]
    if matrix:  # each its own directory, not --out itself
        specs = [s.replace(out=d["out"]) for s, d in zip(specs, recipes, strict=True)]
    # trials run in other directories (a Ray worker's, another node's): absolute paths
    specs = [s.replace(model=portable_name(s.model), checkpoint=s.checkpoint and str(
        Path(s.checkpoint).expanduser().resolve())) for s in specs]
    return [search_defaults(s, set(d) | flags) for s, d in zip(specs, recipes)]


def only_experiments(recipes: list[dict], only: str | None, *, matrix: bool) -> list[dict]:
    """The experiments of a recipe's matrix that ``--only`` selects: those whose directory name
    matches one of its comma-separated shell patterns (``'*-s1,uniform-*'``). Two processes
    given disjoint selections run one recipe side by side."""
    if only is None:
        return recipes
    if not matrix:
        raise QSearchError(f"--only {only!r} selects experiments of a recipe's matrix and this "
                           "run has none: drop --only, or give a recipe with a matrix")
    names = [Path(r["out"]).name for r in recipes]
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    chosen = [r for r, name in zip(recipes, names, strict=True)
              if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not chosen:
        listed = ", ".join(names[:10]) + (f" (+{len(names) - 10} more)" if len(names) > 10 else "")
        raise QSearchError(f"--only {only!r} matches none of the recipe's experiments: "
                           f"{listed}; use their names or shell patterns, e.g. --only "
                           f"'{names[0]}'")
    return chosen


def _apply_flags(spec, args):
    from qsearch.pins import parse_pins

    over = {key: getattr(args, key) for key in _RUN_FLAGS if getattr(args, key) is not None}
    if args.bit_choices is not None:
        over["bit_choices"] = bits_list(args.bit_choices)
    train, steps = dict(spec.train), _trial_steps(args)
    if steps is not None and args.epochs is not None:
        raise QSearchError("--steps and --epochs both given: a trial length is one of them")
    if steps is not None:
        train.pop("epochs", None)
        train["steps"] = steps
    if args.epochs is not None:
        train.pop("steps", None)
        train["epochs"] = args.epochs
    if args.batch_size is not None:
        train["batch_size"] = args.batch_size
    over["train"] = train
    data = dict(spec.data)
    for flag, key in (("data_root", "root"), ("train_fraction", "train_fraction")):
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    over["data"] = data
    for flag, key in (("final_epochs", "final_train"), ("supernet_epochs", "supernet_train")):
        if getattr(args, flag) is not None:
            over[key] = {**getattr(spec, key), "epochs": getattr(args, flag)}
    if args.strategy_arg:
        over["strategy_kwargs"] = {**spec.strategy_kwargs, **dict(args.strategy_arg)}
    if args.pin:
        over["pin"] = {**spec.pin, **parse_pins(args.pin)}
    if args.keep_float:
        over["keep_float"] = [*spec.keep_float, *args.keep_float]
    return spec.replace(**over)


def _trial_steps(args) -> int | None:
    """The trial length in steps: --steps, or its alias --max-steps (the name under a rung
    scheduler); both given must agree."""
    if args.max_steps is None:
        return args.steps
    if args.steps not in (None, args.max_steps):
        raise QSearchError(f"--steps {args.steps} and --max-steps {args.max_steps} both "
                           "give the trial length: give one of them")
    return args.max_steps
