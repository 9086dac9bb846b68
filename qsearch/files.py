"""The files of an experiment directory, named once.

``<out>/spec.json`` the experiment spec, ``results.parquet`` one row per trial
(:mod:`qsearch.store`), ``state.json`` / ``state-final.json`` the runner's resumable state
per stage, ``summary.json`` the strategy's own summary, ``final.json`` the final candidate
at the target budget, ``.lock`` held while a process drives the experiment.
"""

SPEC_FILE = "spec.json"
RESULTS_FILE = "results.parquet"
STATE_FILE = "state.json"
SUMMARY_FILE = "summary.json"
FINAL_FILE = "final.json"
LOCK_FILE = ".lock"
RAY_LOG_FILE = "ray-driver.log"


def state_file(stage: str) -> str:
    """The runner's state file of a stage (``search`` or ``final``)."""
    return STATE_FILE if stage == "search" else f"state-{stage}.json"
