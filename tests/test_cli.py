"""The command line's own wiring: flag aliases and the flags `run` and `resume` share."""

import argparse

from qsearch.cli import build_parser, specs_from_args
from qsearch.spec import RUN_SETTINGS


def _subparser(name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def test_max_steps_is_steps_by_another_name_and_the_flags_stay_as_given():
    for argv in (["--max-steps", "90"], ["--steps", "90", "--max-steps", "90"]):
        args = build_parser().parse_args(["run", "--budget", "6KB", *argv])
        given = vars(args).copy()
        (spec,) = specs_from_args(args)
        assert spec.train["steps"] == 90 and "epochs" not in spec.train
        assert vars(args) == given  # resolved, not written back into the namespace


def test_run_and_resume_share_every_run_setting_flag():
    """Where and how trials run may change on resume: each such spec key is a flag of both
    commands, defined once (same option strings, type, action and help)."""
    def flags(name: str) -> dict:
        return {a.dest: (tuple(a.option_strings), a.type, type(a), a.help)
                for a in _subparser(name)._actions if a.dest in RUN_SETTINGS}

    assert set(flags("run")) == set(RUN_SETTINGS)
    assert flags("resume") == flags("run")
