"""Bad input, table-driven: one clear line naming the bad value, exit 2, no traceback,
nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qsearch.cli import main

RUN = ["run", "--dataset", "synthetic", "--steps", "5"]

CASES = [  # (argv, text the one-line message must contain)
    (["--budget", "12XB"], "'12XB' not understood"),
    (["--budget=-3MB"], "'-3MB' must be a positive"),
    (["--budget", "0"], "'0' not understood"),
    (["--budget", "0MB"], "'0MB' must be a positive"),
    (["--budget", "1e400MB"], "'1e400MB' must be a positive, finite"),
    (["--budget", "10B"], "below the smallest resnet20 model"),
    (["--budget", "6KB", "--strategy", "nope"], "unknown strategy 'nope': choose one of"),
    (["--budget", "6KB", "--model", "resnet21"], "unknown model 'resnet21'"),
    (["--budget", "6KB", "--dataset", "mnist2"], "unknown dataset 'mnist2'"),
    (["--budget", "6KB", "--bit-choices", "1,9"], "bit choices [1, 9] not allowed"),
    (["--budget", "6KB", "--bit-choices", "a,b"], "bit list 'a,b' not understood"),
    (["--budget", "6KB", "--width-min", "2", "--width-max", "1"], "width bounds min 2.0"),
    (["--budget", "6KB", "--steps", "10", "--epochs", "1"], "--steps and --epochs both"),
    (["--budget", "6KB", "--trials", "0"], "trials = 0"),
    (["--budget", "6KB", "--trials", "-3"], "trials = -3"),
    (["--budget", "6KB", "--trials", "many"], "invalid int value: 'many'"),
    (["--budget", "6KB", "--a-bits", "9"], "activation bits 9"),
    (["--budget", "6KB", "--cpus-per-trial", "0"], "resources per trial invalid (cpus 0.0"),
    (["--budget", "6KB", "--gpus-per-trial", "-1"], "gpus -1.0"),
    (["--budget", "6KB", "--concurrency", "0"], "concurrency = 0"),
    (["--budget", "6KB", "--final-seeds", "-1"], "final_seeds = -1"),
    (["--budget", "6KB", "--strategy-arg", "colour"], "'colour' must look like key=value"),
    (["--budget", "6KB", "--strategy", "uniform", "--strategy-arg", "colour=blue"],
     "valid options: bits"),
    (["--budget", "6KB", "--proxy-budget", "12KB"], "proxy budget 12KB exceeds the target"),
    (["--budget", "6KB", "--proxy-budget", "1GBitOPs"], "is a bitops budget but the target"),
    (["--budget", "6KB", "--address", "127.0.0.9:1"], "127.0.0.9:1' is unreachable"),
    (["--budget", "6KB", "--address", "nohost"], "'nohost' is unreachable"),
    (["--budget", "6KB", "--dataset", "fashion-mnist", "--data-root", "/nonexistent/fm"],
     "/nonexistent/fm"),
    (["--budget", "6KB", "--out", "/etc/hostname/run"], "is not writable"),
    (["--budget", "6KB", "--train-fraction", "2"], "train_fraction"),
    (["--budget", "6KB", "--colour", "blue"], "unrecognized arguments: --colour"),
]

YAML_CASES = [  # (recipe text, expected message part)
    ("strategy: [unclosed\n", "is not valid YAML at line"),
    ("strategy: uniform\nbudgett: 6KB\n", "unknown key(s) ['budgett']"),
    ("strategy: uniform\ntrials: many\n", "'trials' = 'many' has the wrong type"),
    ("- just\n- a list\n", "must be a mapping"),
    ("budget: 6KB\ntrain: {steps: 5, lr: -1}\n", "bad training setting lr=-1"),
    ("budget: 6KB\ntrain: {steps: 5, momentun: 0.9}\n", "unknown training settings"),
    ("budget: 6KB\nmatrix: {budget: 6KB}\n", "matrix key 'budget' must be a non-empty list"),
    ("budget: 6KB\ndata: {rooot: /x}\n", "unknown data settings ['rooot']"),
    ("budget: 6KB\nversion: 7\n", "spec version 7 not supported"),
    ("budget: !!python/object/apply:os.system ['touch /tmp/pwned']\n", "not valid YAML"),
]


def check_one_line(capsys, code: int, expected: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("qsearch: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_run_flags(argv, expected, tmp_path, capsys):
    out = tmp_path / "exp"
    if "--out" not in argv:
        argv = [*argv, "--out", str(out)]
    check_one_line(capsys, main([*RUN, *argv]), expected)
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("text, expected", YAML_CASES, ids=[c[1][:30] for c in YAML_CASES])
def test_bad_recipes(text, expected, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    out = tmp_path / "exp"
    check_one_line(capsys, main([*RUN, str(recipe), "--out", str(out)]), expected)
    assert not out.exists()


def test_missing_recipe(tmp_path, capsys):
    check_one_line(capsys, main(["run", str(tmp_path / "none.yaml")]), "none.yaml' not found")


def test_resume_of_a_directory_that_is_not_an_experiment(tmp_path, capsys):
    check_one_line(capsys, main(["resume", str(tmp_path)]), "is not a qsearch experiment")


def test_corrupted_results_file(tmp_path, capsys):
    (tmp_path / "spec.json").write_text(json.dumps({"budget": "6KB", "dataset": "synthetic"}))
    (tmp_path / "results.parquet").write_bytes(b"PAR1 this is not parquet")
    check_one_line(capsys, main(["results", str(tmp_path)]), "is unreadable")
    check_one_line(capsys, main(["resume", str(tmp_path)]), "is unreadable")
    assert (tmp_path / "results.parquet").read_bytes() == b"PAR1 this is not parquet"


def test_results_of_a_directory_without_a_store(tmp_path, capsys):
    check_one_line(capsys, main(["results", str(tmp_path)]), "no results.parquet")


@pytest.mark.parametrize("argv, expected", [
    (["space", "show", "--model", "nope"], "unknown model 'nope'"),
    (["space", "show", "--bits", "9"], "weight bits [9] not allowed"),
    (["space", "show", "--bits", "2", "--budget", "1B"], "below the smallest"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
])
def test_bad_space_and_command(argv, expected, capsys):
    check_one_line(capsys, main(argv), expected)


def test_exit_code_and_stderr_of_the_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qsearch.cli", "run", "--budget", "12XB",
                        "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "'12XB'" in r.stderr
    assert not Path(tmp_path / "x").exists()
