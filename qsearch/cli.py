"""The ``qsearch`` command line. Heavy libraries (torch, ray) are imported inside commands,
so ``qsearch --help`` stays instant."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from qsearch import QSearchError, __version__
from qsearch.cli_spec import bits_list, key_value, specs_from_args


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not a usage dump
        raise QSearchError(f"{message} (see `{self.prog} --help`)")


# ----- qsearch space show ------------------------------------------------------------------
def cmd_space_show(args) -> None:
    from qsearch.budget import parse_budget
    from qsearch.pins import parse_pin_bits
    from qsearch.space import SearchSpace

    space = SearchSpace(args.model, args.dataset, data_root=args.data_root, a_bits=args.a_bits,
                        pin_bits=parse_pin_bits(args.pin_bits), fixed_first=args.fixed_first,
                        fixed_last=args.fixed_last, count_bias=args.count_bias)
    bits = bits_list(args.bits)
    cand = space.candidate(bits[0] if len(bits) == 1 else bits, width=args.width)
    aligned = None
    if args.budget:
        aligned = space.align(cand, parse_budget(args.budget))
        cand = aligned.candidate
    from qsearch.tables import space_table

    print(space_table(space, cand, aligned))


# ----- run / resume / results / strategies ---------------------------------------------
def cmd_run(args) -> None:
    from qsearch.experiment import dry_run

    specs = specs_from_args(args)
    failed, skipped, recipe = [], [], len(specs) > 1 or args.only is not None
    for i, spec in enumerate(specs):
        if recipe:
            print(f"== experiment {i + 1}/{len(specs)}: {spec.out}")
        if args.dry_run:
            dry_run(spec)
            continue
        runner = _run_one(spec, recipe)
        if runner is None:
            skipped.append(spec.out)
        elif runner.best() is None and not runner.unfinished():
            failed.append(str(runner.out))
    if skipped:
        print(f"skipped {len(skipped)} experiment{'s' * (len(skipped) > 1)} another process "
              f"is busy with: {', '.join(skipped)} (the same command again takes them up)")
    if failed:
        raise SystemExit(f"qsearch: no trial succeeded in {', '.join(failed)}: see "
                         "`qsearch results DIR` for the errors")


def _run_one(spec, recipe: bool):
    """Run or, in a recipe re-run, continue (with this command's run settings) one
    experiment. A recipe skips an experiment another process drives (None): two processes
    running one recipe share its experiments."""
    from qsearch.experiment import (
        RESUME_OVERRIDES,
        ExperimentBusy,
        resume_experiment,
        run_experiment,
    )
    from qsearch.files import SPEC_FILE

    try:
        if recipe and (Path(spec.out) / SPEC_FILE).exists():
            return resume_experiment(Path(spec.out), overrides={
                k: getattr(spec, k) for k in RESUME_OVERRIDES})
        return run_experiment(spec)
    except ExperimentBusy as e:
        if not recipe:
            raise
        print(f"skipped: {e}")
        return None


def cmd_resume(args) -> None:
    from qsearch.experiment import RESUME_OVERRIDES, resume_experiment

    overrides = {k: getattr(args, k) for k in RESUME_OVERRIDES if getattr(args, k) is not None}
    runner = resume_experiment(Path(args.dir), overrides=overrides)
    if runner.best() is None and not runner.unfinished():
        raise SystemExit(f"qsearch: no trial succeeded in {args.dir}: see `qsearch results "
                         f"{args.dir}` for the errors")


def cmd_strategies(args) -> None:
    from qsearch.strategy import get_strategy, list_strategies

    for name in list_strategies():
        doc = (get_strategy(name).__doc__ or sys.modules[get_strategy(name).__module__].__doc__
               or "").strip().splitlines()[0]
        print(f"{name:<14} {doc}")


def cmd_results(args) -> None:
    from qsearch.files import RESULTS_FILE as FILENAME
    from qsearch.store import ResultsStore

    d = Path(args.dir)
    if not (d / FILENAME).exists():
        raise QSearchError(f"no {FILENAME} in {str(d)!r}: give the --out directory of a "
                           "`qsearch run`")
    rows = sorted(ResultsStore(d).rows,
                  key=lambda r: (r["stage"] != "search", r["trial_index"]))
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return
    from qsearch.tables import trials_table

    print(trials_table(rows))


def cmd_export(args) -> None:
    from qsearch.export import check_export_format, export_experiment, export_report
    from qsearch.planning import check_train_settings, check_writable

    check_export_format(args.format)
    if args.steps is not None and args.epochs is not None:
        raise QSearchError("--steps and --epochs both given: the training length is one of "
                           "them")
    train = {}
    if args.steps is not None:
        train = {"steps": args.steps, "epochs": None}
    elif args.epochs is not None:
        train = {"epochs": args.epochs, "steps": None}
    check_train_settings(train, "export")
    # checked before the minutes of training, not after them
    name = f"model.{args.format}"
    output = Path(args.dir) / name if args.output is None else args.output
    check_writable(output, directory=False, what="export file", flag="-o", example=name)
    r = export_experiment(args.dir, args.output, train=train, fmt=args.format)
    text, ok = export_report(r)
    print(text)
    if not ok:
        raise SystemExit(1)


def cmd_leaderboard(args) -> None:
    from qsearch.leaderboard import format_leaderboard, leaderboard, load_experiments

    entries = leaderboard(load_experiments(args.dirs), tolerance=fill_rule(args.min_fill))
    print(format_leaderboard(entries, args.format))


def cmd_report(args) -> None:
    from qsearch.report import build_report

    path = build_report(args.dirs, args.output, tolerance=fill_rule(args.min_fill))
    print(f"report written to {path}")


def fill_rule(min_fill: float) -> tuple[float, float]:
    """The cost range, as fractions of the budget, within which entries are ranked."""
    if not 0 < min_fill <= 1:
        raise QSearchError(f"--min-fill {min_fill} out of range: give the smallest fraction "
                           "of the budget a ranked entry fills, in (0, 1], e.g. 0.98")
    return min_fill, 1.0


# ----- qsearch fidelity ----------------------------------------------------------------
def cmd_fidelity(args) -> None:
    from qsearch.fidelity import experiment_report

    if args.format not in ("table", "md"):
        raise QSearchError(f"--format {args.format!r} not known: use table or md")
    if args.report or args.compare:
        given = [f for f in ("budget", "steps", "epochs", "out", "address")
                 if getattr(args, f) is not None]
        if given or (args.report and args.compare):
            what = f"--{given[0]} starts a run" if given else "--compare reads two"
            raise QSearchError(f"--report reads an existing directory; {what}: give one "
                               "or the other")
        if args.compare:
            from qsearch.fidelity import compare_report

            print(compare_report(*args.compare))
        else:
            print(experiment_report(args.report, args.format))
        return
    from qsearch.experiment import run_experiment
    from qsearch.fidelity import fidelity_spec

    spec = fidelity_spec(args.budget, candidates=args.candidates, steps=args.steps,
                         epochs=args.epochs, seeds=args.seeds, batch_size=args.batch_size,
                         data_root=args.data_root, mixes=args.mixes,
                         **{k: getattr(args, k) for k in (
                             "model", "dataset", "proxy_budget", "seed", "cpus_per_trial",
                             "gpus_per_trial", "concurrency", "address", "out")})

    runner = run_experiment(spec)
    print()
    print(experiment_report(runner.out, args.format))


def _add_run_settings(p: argparse.ArgumentParser) -> None:
    """Where and how trials run (``spec.RUN_SETTINGS``): the same flags for `run` and for
    `resume`, which may change them."""
    p.add_argument("--address", help="join an existing Ray cluster (host:port)")
    p.add_argument("--cpus-per-trial", type=float)
    p.add_argument("--gpus-per-trial", type=float, help="fractions allowed, e.g. 0.25")
    p.add_argument("--workers-per-trial", type=int, help="run each trial as a Ray Train "
                   "TorchTrainer of N DDP workers (default 1: one process); --batch-size "
                   "stays the global batch")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs of each worker (default 1)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs of each worker (default 0: "
                   "CPU workers, gloo; 1: NCCL)")
    for flag, what in (("bf16", "autocast training steps to bfloat16"),
                       ("channels-last", "NHWC memory order"),
                       ("pin-memory", "ImageFolder batches in page-locked memory")):
        p.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None,
                       help=f"{what} (GPU path; off by default until measured)")
    p.add_argument("--concurrency", type=int, help="trials at once (default: CPUs / cpus "
                   "per trial)")
    p.add_argument("--max-failures", type=int, help="retries of a failed trial (default 2)")
    p.add_argument("--time-budget", help="stop this sitting after this long, e.g. 90m; "
                   "trials cut short continue with `qsearch resume DIR`")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qsearch", description="Find the most accurate quantized CNN that fits "
                "a model-size or BitOPs budget.")
    p.add_argument("--version", action="version", version=f"qsearch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a search (flags override the recipe)")
    run.add_argument("recipe", nargs="?", help="YAML recipe in experiments/")
    run.add_argument("--dry-run", action="store_true", help="print the planned trials, "
                     "budgets and candidate costs; train nothing")
    run.add_argument("--only", metavar="NAMES", help="run only these experiments of the "
                     "recipe's matrix: names or shell patterns, comma-separated ('*-s1')")
    run.add_argument("--strategy", help="search strategy (see `qsearch strategies`)")
    run.add_argument("--budget", help="target budget: 12MB, 512KiB, 96Mbit, 20GBitOPs ...")
    run.add_argument("--proxy-budget", help="search at this budget, then re-align the winner "
                     "to --budget ('auto' by default, 'none' to disable)")
    run.add_argument("--model", help="model family (default resnet20)")
    run.add_argument("--dataset", help="fashion-mnist (default), cifar10, cifar100, imagefolder")
    run.add_argument("--data-root", help="dataset directory")
    run.add_argument("--train-fraction", type=float, help="fraction of the train split used")
    run.add_argument("--trials", type=int, help="maximum number of search trials")
    run.add_argument("--steps", type=int, help="training steps per trial (default 300)")
    run.add_argument("--epochs", type=float, help="epochs per trial (instead of --steps)")
    run.add_argument("--batch-size", type=int)
    run.add_argument("--a-bits", type=int, help="activation bits (default 4; 32 = float)")
    run.add_argument("--bit-choices", help="weight bits to search, e.g. 1,2,4,8")
    run.add_argument("--width-min", type=float)
    run.add_argument("--width-max", type=float)
    run.add_argument("--strategy-arg", action="append", type=key_value, metavar="KEY=VALUE",
                     help="strategy option (repeatable), e.g. --strategy-arg bits=[2,4]")
    run.add_argument("--seed", type=int)
    _add_run_settings(run)
    run.add_argument("--scheduler", help="none (default), asha or hyperband: Ray Tune's "
                     "rung schedulers stop or pause weak trials early")
    run.add_argument("--min-steps", type=int, help="first rung in steps (default: "
                     "max steps / reduction factor^2)")
    run.add_argument("--max-steps", type=int, help="trial length in steps under a scheduler "
                     "(same as --steps)")
    run.add_argument("--reduction-factor", type=int, help="rungs at min steps x factor^k; "
                     "1 in factor trials goes on at each rung (default 3)")
    run.add_argument("--out", help="experiment directory (default runs/<strategy>-<time>)")
    run.add_argument("--name", help="experiment id (default: the directory name)")
    run.add_argument("--final-seeds", type=int, help="retrain the final candidate at the "
                     "target budget with this many seeds and report test accuracy")
    run.add_argument("--final-epochs", type=float, help="epochs of that retrain (default 1)")
    run.add_argument("--evaluator", help="train (each candidate trained, default) or "
                     "supernet (cut out of one trained weight-sharing network, seconds each)")
    run.add_argument("--supernet-epochs", type=float, help="supernet training (default 2)")
    run.add_argument("--supernet-cache", help="trained supernets (default runs/supernets)")
    run.add_argument("--top-k", type=int, help="best candidates by supernet accuracy "
                     "retrained stand-alone before the final stage (default 3)")
    run.add_argument("--width", dest="width_mode", help="auto (a width family's width is "
                     "aligned to the budget) or fixed (bits only, the model's own channels)")
    run.add_argument("--checkpoint", help="float state_dict the trials fine-tune from (or "
                     "quantize, with --trial-mode ptq); implies --width fixed")
    run.add_argument("--trial-mode", help="train (quantization-aware, default) or ptq "
                     "(quantize --checkpoint, calibrate, validate: seconds per candidate)")
    run.add_argument("--pin", action="append", metavar="PATTERN=BITS", help="layers "
                     "matching PATTERN keep BITS (repeatable), e.g. --pin 'layer3.*=8'")
    run.add_argument("--keep-float", action="append", metavar="PATTERN", help="layers "
                     "matching PATTERN stay float (repeatable), e.g. --keep-float fc")
    run.set_defaults(fn=cmd_run)

    res = sub.add_parser("resume", help="continue an interrupted experiment (where and how "
                         "it runs may change; what it searches may not)")
    res.add_argument("dir")
    _add_run_settings(res)
    res.set_defaults(fn=cmd_resume)

    st = sub.add_parser("strategies", help="list the registered strategies")
    st.set_defaults(fn=cmd_strategies)

    rs = sub.add_parser("results", help="table of an experiment's trials")
    rs.add_argument("dir")
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(fn=cmd_results)

    ex = sub.add_parser("export", help="train an experiment's final candidate and write it "
                        "as a packed file (codes at their bit-width + scales) or as ONNX")
    ex.add_argument("dir", help="experiment directory (with final.json)")
    ex.add_argument("-o", "--output", help="file (default DIR/model.<format>)")
    ex.add_argument("--format", default="safetensors", help="safetensors (default: qsearch's "
                    "packed file) or onnx (integer weights for ONNX Runtime)")
    ex.add_argument("--steps", type=int, help="training steps (default: the final recipe)")
    ex.add_argument("--epochs", type=float)
    ex.set_defaults(fn=cmd_export)

    lb = sub.add_parser("leaderboard", help="compare strategies at matched size")
    lb.add_argument("dirs", nargs="+", help="experiment directories")
    lb.add_argument("--format", default="table", help="table (default), md, csv or json")
    fill_help = ("rank entries whose final cost fills at least this fraction of the budget "
                 "(default 0.99; smaller ones are listed, not ranked)")
    lb.add_argument("--min-fill", type=float, default=0.99, help=fill_help)
    lb.set_defaults(fn=cmd_leaderboard)

    rp = sub.add_parser("report", help="self-contained HTML report with Pareto plots")
    rp.add_argument("dirs", nargs="+", help="experiment directories")
    rp.add_argument("-o", "--output", default="report.html")
    rp.add_argument("--min-fill", type=float, default=0.99, help=fill_help)
    rp.set_defaults(fn=cmd_report)

    fi = sub.add_parser("fidelity", help="train K candidates at several trial lengths and "
                        "report how well the short ones rank them (Kendall's tau)")
    fi.add_argument("--report", metavar="DIR", help="print the table of an earlier run")
    fi.add_argument("--compare", nargs=2, metavar=("SMALL", "LARGE"), help="rank agreement "
                    "of two runs at different budgets (same --seed and --candidates)")
    fi.add_argument("--budget", help="budget the candidates are width-aligned to, e.g. 32KB")
    fi.add_argument("--proxy-budget", help="as for `qsearch run` ('auto' by default)")
    fi.add_argument("--model", help="model family (default resnet20)")
    fi.add_argument("--dataset", help="fashion-mnist (default), cifar10, ...")
    fi.add_argument("--data-root")
    fi.add_argument("--candidates", type=int, default=12, help="uniform bit-widths plus "
                    "mixed ones (default 12)")
    fi.add_argument("--mixes", default="random", help="random (default): random per-layer "
                    "mixes; halves: first the extremes, each half of the network at one end "
                    "of a pair of bit-widths")
    fi.add_argument("--steps", help="trial lengths in steps (default 100,300,900)")
    fi.add_argument("--epochs", help="trial lengths in epochs instead, e.g. 1,3")
    fi.add_argument("--seeds", type=int, default=1, help="repeats of each (candidate, "
                    "length) with other seeds, to see the noise (default 1)")
    fi.add_argument("--batch-size", type=int)
    fi.add_argument("--seed", type=int)
    fi.add_argument("--cpus-per-trial", type=float)
    fi.add_argument("--gpus-per-trial", type=float)
    fi.add_argument("--concurrency", type=int)
    fi.add_argument("--address", help="join an existing Ray cluster (host:port)")
    fi.add_argument("--out", help="experiment directory (default runs/fidelity-<time>)")
    fi.add_argument("--format", default="table", help="table (default) or md")
    fi.set_defaults(fn=cmd_fidelity)

    sp = sub.add_parser("space", help="inspect a search space")
    sps = sp.add_subparsers(dest="space_command", required=True, parser_class=_Parser)
    show = sps.add_parser("show", help="per-layer table, costs and width alignment")
    show.add_argument("--model", default="resnet20")
    show.add_argument("--dataset", default="fashion-mnist")
    show.add_argument("--data-root")
    show.add_argument("--bits", default="4", help="one bit-width for the free layers, or one "
                      "per free layer (comma-separated)")
    show.add_argument("--a-bits", type=int, default=4)
    show.add_argument("--width", type=float, default=1.0)
    show.add_argument("--budget", help="align the width to this budget")
    show.add_argument("--pin-bits", default="8", help="bits of the first and last layer: 8 "
                      "(default, as the papers), 32 (float), 1..7, or none (free them)")
    show.add_argument("--fixed-first", action=argparse.BooleanOptionalAction, default=None,
                      help="keep the stem's channels at 1x (default: on for 224-pixel data)")
    show.add_argument("--fixed-last", action=argparse.BooleanOptionalAction, default=None,
                      help="keep the final feature layer's channels at 1x (default: on for "
                      "224-pixel data)")
    show.add_argument("--count-bias", action="store_true", help="count conv/fc biases in "
                      "C_size at their layer's bits, as FracBits does (default: weights only)")
    show.set_defaults(fn=cmd_space_show)
    return p


def _short(text: str, limit: int = 1000, word: int = 200) -> str:
    """One line, bounded: a huge bad value is echoed truncated, never whole, and the end of
    the message (the fix) is kept."""
    text = re.sub(rf"\S{{{word},}}", lambda m: f"{m[0][:word // 2]}...({len(m[0]):,} chars)",
                  " ".join(text.split()))
    return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]}"


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.fn(args)
    except QSearchError as e:
        print(f"qsearch: error: {_short(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written
        where = f" {str(e.filename)[:200]!r}" if e.filename else ""
        print(f"qsearch: error: cannot use{where}: {e.strerror or e}: check the path and its "
              "permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qsearch: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
