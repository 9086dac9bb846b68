"""Bad input, table-driven: one clear line naming the bad value, exit 2, no traceback,
nothing written, within seconds. Run flags and recipes are checked by a real run and by
`--dry-run` alike (the dry run runs every check that needs no dataset files or cluster)."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qsearch import QSearchError
from qsearch.cli import main
from qsearch.store import SCHEMA
from tests.test_leaderboard import make_experiment

RUN = ["run", "--dataset", "synthetic"]
HUGE = "1" * 10_000  # a 10,000-digit number: echoed truncated, never whole
MAX_LINE = 1100  # bound on any error line

CASES = [  # (argv, text the one-line message must contain); "--steps 5" added unless set
    (["--budget", "12XB"], "'12XB' not understood"),
    (["--budget=-3MB"], "'-3MB' must be a positive"),
    (["--budget", "0"], "'0' not understood"),
    (["--budget", "0MB"], "'0MB' must be a positive"),
    (["--budget", "1e400MB"], "'1e400MB' must be a positive, finite"),
    (["--budget", f"{HUGE}MB"], "'11111111111111111111"),
    (["--budget", "10B"], "below the smallest resnet20 model"),
    (["--budget", "1e30MB"], "'1e30MB' is above the largest resnet20 model the width bounds"),
    (["--budget", "1e30GBitOPs"], "is above the largest resnet20 model"),
    (["--budget", "300KB", "--width-max", "0.5"], "at width 0.5): lower the budget"),
    (["--budget", "6KB", "--strategy", "nope"], "unknown strategy 'nope': choose one of"),
    (["--budget", "6KB", "--model", "resnet21"], "unknown model 'resnet21'"),
    (["--budget", "6KB", "--model", "torchvision:resnet18"], "budget '6KB' is below the "
     "smallest torchvision:resnet18 with these bits: every free layer at 1 bits costs 1.4MB"),
    (["--budget", "3MB", "--model", "torchvision:resnet18", "--proxy-budget", "1MB"],
     "--proxy-budget 1MB with the fixed-width model torchvision:resnet18"),
    (["--budget", "6KB", "--model", "torchvision:resnet19"], "unknown torchvision model"),
    (["--budget", "6KB", "--dataset", "mnist2"], "unknown dataset 'mnist2'"),
    (["--budget", "6KB", "--bit-choices", "1,9"], "bit choices [1, 9] not allowed"),
    (["--budget", "6KB", "--evaluator", "oracle"], "evaluator 'oracle' not known"),
    (["--budget", "6KB", "--evaluator", "supernet", "--strategy", "fracbits"],
     "--evaluator supernet with --strategy fracbits"),
    (["--budget", "6KB", "--evaluator", "supernet", "--scheduler", "asha"],
     "--scheduler asha with --evaluator supernet"),
    (["--budget", "6KB", "--top-k", "0"], "top_k = 0: retrain at least 1"),
    (["--budget", "6KB", "--width", "wide"], "width mode 'wide' not known: use auto"),
    (["--budget", "6KB", "--trial-mode", "ptq"], "--trial-mode ptq needs the float weights"),
    (["--budget", "6KB", "--trial-mode", "zero-shot"], "trial mode 'zero-shot' not known"),
    (["--budget", "6KB", "--checkpoint", "/nonexistent/float.pt"],
     "checkpoint '/nonexistent/float.pt' not found"),
    (["--budget", "6KB", "--pin", "3.body.0"], "--pin '3.body.0' not understood: use "
     "PATTERN=BITS"),
    (["--budget", "6KB", "--pin", "layer9.*=4"], "layer pattern 'layer9.*' matches no"),
    (["--budget", "6KB", "--pin", "3.*=12"], "--pin 3.*=12: bits must be 1..8 or 32"),
    (["--budget", "6KB", "--keep-float", "fc*"], "layer pattern 'fc*' matches no"),
    (["--budget", "6KB", "--supernet-epochs", "-1"], "supernet_train"),
    (["--budget", "6KB", "--bit-choices", "a,b"], "bit list 'a,b' not understood"),
    (["--budget", "6KB", "--bit-choices", ""], "bit list '' not understood"),
    (["--budget", "6KB", "--width-min", "2", "--width-max", "1"], "width bounds min 2.0"),
    (["--budget", "6KB", "--width-max", "1e9"], "width_max = 1000000000.0: the widest"),
    (["--budget", "6KB", "--width-min", "nan"], "'width_min' = nan must be a finite number"),
    (["--budget", "6KB", "--steps", "10", "--epochs", "1"], "--steps and --epochs both"),
    (["--budget", "6KB", "--epochs", "inf"], "'epochs' = inf must be a finite number"),
    (["--budget", "6KB", "--epochs", "nan"], "'epochs' = nan must be a finite number"),
    (["--budget", "6KB", "--epochs", "1e9"], "epochs = 1e+09 is beyond any useful trial"),
    (["--budget", "6KB", "--steps", "100000000000000"], "steps = 1e+14 is beyond any"),
    (["--budget", "6KB", "--final-epochs", "inf"], "final_train setting 'epochs' = inf"),
    (["--budget", "6KB", "--trials", "0"], "trials = 0"),
    (["--budget", "6KB", "--trials", "-3"], "trials = -3"),
    (["--budget", "6KB", "--trials", "many"], "invalid int value: 'many'"),
    (["--budget", "6KB", "--trials", HUGE], "invalid int value: '111111111"),
    (["--budget", "6KB", "--seed", "-1"], "seed = -1: use an integer from 0 to 4294967295"),
    (["--budget", "6KB", "--seed", str(2**32)], "seed = 4294967296"),
    (["--budget", "6KB", "--a-bits", "9"], "activation bits 9"),
    (["--budget", "6KB", "--cpus-per-trial", "0"], "resources per trial invalid (cpus 0.0"),
    (["--budget", "6KB", "--cpus-per-trial", "nan"], "'cpus_per_trial' = nan must be a finite"),
    (["--budget", "6KB", "--gpus-per-trial", "-1"], "gpus -1.0"),
    (["--budget", "6KB", "--gpus-per-trial", "inf"], "'gpus_per_trial' = inf must be a finite"),
    (["--budget", "6KB", "--concurrency", "0"], "concurrency = 0"),
    (["--budget", "6KB", "--workers-per-trial", "0"], "workers_per_trial = 0: a trial runs on"),
    (["--budget", "6KB", "--workers-per-trial", "two"], "invalid int value: 'two'"),
    (["--budget", "6KB", "--workers-per-trial", "4", "--batch-size", "30"],
     "train batch size 30 does not split over --workers-per-trial 4: the batch size is the "
     "global batch of one step, each worker trains 1/4 of it; use a multiple of 4, e.g. "
     "--batch-size 28"),
    (["--budget", "6KB", "--cpus-per-worker", "2"], "--cpus-per-worker 2 needs "
     "--workers-per-trial 2 or more"),
    (["--budget", "6KB", "--workers-per-trial", "2", "--gpus-per-trial", "1"],
     "--gpus-per-trial 1 with --workers-per-trial 2: each worker's resources are "
     "--cpus-per-worker / --gpus-per-worker"),
    (["--budget", "6KB", "--workers-per-trial", "2", "--cpus-per-worker", "0"],
     "resources per worker invalid (cpus 0.0"),
    (["--budget", "6KB", "--workers-per-trial", "2", "--cpus-per-worker", "nan"],
     "'cpus_per_worker' = nan must be a finite"),
    (["--budget", "6KB", "--workers-per-trial", "2", "--gpus-per-worker", "0.5"],
     "gpus_per_worker = 0.5: DDP workers (NCCL) cannot share a GPU"),
    (["--budget", "6KB", "--workers-per-trial", "2", "--gpus-per-worker", "-1"],
     "resources per worker invalid (cpus None, gpus -1.0)"),
    (["--budget", "6KB", "--scheduler", "pbt"], "scheduler 'pbt' not known: choose one of "
     "none, asha, hyperband"),
    (["--budget", "6KB", "--scheduler", "asha", "--epochs", "1"], "--scheduler asha needs "
     "the trial length in steps"),
    (["--budget", "6KB", "--scheduler", "asha", "--steps", "90", "--min-steps", "90"],
     "--min-steps 90 with --max-steps 90: the first rung must be"),
    (["--budget", "6KB", "--scheduler", "asha", "--steps", "90", "--min-steps", "0"],
     "--min-steps 0 with --max-steps 90"),
    (["--budget", "6KB", "--scheduler", "asha", "--steps", "90", "--reduction-factor", "1"],
     "reduction factor 1: give an integer of 2 or more"),
    (["--budget", "6KB", "--scheduler", "hyperband", "--steps", "100", "--min-steps", "10"],
     "--max-steps 100 is not --min-steps 10 times a power of --reduction-factor 3; e.g. "
     "--max-steps 90"),
    (["--budget", "6KB", "--min-steps", "10"], "--min-steps 10 needs a rung scheduler"),
    (["--budget", "6KB", "--steps", "30", "--max-steps", "90"], "--steps 30 and --max-steps "
     "90 both give the trial length"),
    (["--budget", "6KB", "--max-failures", "-5"], "max_failures = -5: retries of a failed"),
    (["--budget", "6KB", "--final-seeds", "-1"], "final_seeds = -1"),
    (["--budget", "6KB", "--strategy-arg", "colour"], "'colour' must look like key=value"),
    (["--budget", "6KB", "--strategy", "uniform", "--strategy-arg", "colour=blue"],
     "valid options: bits"),
    (["--budget", "6KB", "--strategy-arg", "bits=abc"], "uniform bits='abc' not allowed"),
    (["--budget", "6KB", "--strategy-arg", "bits=5"], "uniform bits=5 not allowed"),
    (["--budget", "6KB", "--strategy-arg", "bits=[2, 2.5]"], "bits=[2, 2.5] not allowed"),
    (["--budget", "6KB", "--strategy-arg", "x=[1,"], "value '[1,' of 'x' is not valid YAML"),
    (["--budget", "6KB", "--strategy-arg", "x={a: 1, a: 2}"], "duplicate key 'a'"),
    (["--budget", "6KB", "--strategy", "random", "--strategy-arg", "bits=[3]"],
     "random bits=[3] not allowed"),
    (["--budget", "6KB", "--strategy", "dualprecision", "--strategy-arg", "bits=[true]"],
     "dualprecision bits=[True] not allowed"),
    (["--budget", "6KB", "--strategy", "tpe", "--strategy-arg", "n_startup_trials=abc"],
     "tpe n_startup_trials='abc' not allowed: give an integer >= 0"),
    (["--budget", "6KB", "--strategy", "tpe", "--strategy-arg", "population_size=1"],
     "tpe population_size=1 not allowed"),
    (["--budget", "6KB", "--strategy", "tpe", "--strategy-arg", "width_range=[0.5, .inf]"],
     "tpe width_range [0.5, inf] invalid"),
    (["--budget", "6KB", "--proxy-budget", "12KB"], "proxy budget 12KB exceeds the target"),
    (["--budget", "6KB", "--proxy-budget", "1GBitOPs"], "is a bitops budget but the target"),
    (["--budget", "6KB", "--address", "127.0.0.9:1"], "127.0.0.9:1' is unreachable"),
    (["--budget", "6KB", "--address", "nohost"], "'nohost' is unreachable"),
    (["--budget", "6KB", "--address", "ray://head:1"], "address 'ray://head:1' not understood"),
    (["--budget", "6KB", "--address", "head:99999"], "address 'head:99999' not understood"),
    (["--budget", "6KB", "--dataset", "fashion-mnist", "--data-root", "/nonexistent/fm"],
     "/nonexistent/fm"),
    (["--budget", "6KB", "--data-root", ""], "data setting root = '' must be a directory"),
    (["--budget", "6KB", "--out", "/etc/hostname/run"], "is not writable"),
    (["--budget", "6KB", "--out", "/proc/qs"], "output directory '/proc/qs' is not writable"),
    (["--budget", "6KB", "--out", "/etc/hostname"], "'/etc/hostname' is a file: give a dir"),
    (["--budget", "6KB", "--out", ""], "out '' is empty: give a directory"),
    (["--budget", "6KB", "--name", " "], "name ' ' is empty"),
    (["--budget", "6KB", "--train-fraction", "2"], "train_fraction"),
    (["--budget", "6KB", "--train-fraction", "nan"], "train_fraction = nan not understood"),
    (["--budget", "6KB", "--colour", "blue"], "unrecognized arguments: --colour"),
    (["--budget", "6KB", "--only", "a*"], "--only 'a*' selects experiments of a recipe's"),
]
# checks that need the cluster or the dataset's files: a real run only
REAL_RUN_ONLY = ("is unreachable", "/nonexistent/fm")

BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{n}: &{n} [{','.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))

YAML_CASES = [  # (recipe text or bytes, expected message part)
    ("strategy: [unclosed\n", "is not valid YAML at line"),
    ("strategy: uniform\nbudgett: 6KB\n", "unknown key(s) ['budgett']"),
    ("strategy: uniform\n1: 6KB\n", "unknown key(s) [1]"),
    ("strategy: uniform\ntrials: many\n", "'trials' = 'many' has the wrong type"),
    ("strategy: uniform\ntrials: null\n", "'trials' = None has the wrong type"),
    ("strategy: uniform\nseed: 1.5\n", "'seed' = 1.5 has the wrong type"),
    ("budget: 6KB\nwidth_min: true\n", "'width_min' = True has the wrong type: expected float"),
    ("budget: 6KB\naddress: 5\n", "'address' = 5 has the wrong type"),
    ("- just\n- a list\n", "must be a mapping"),
    ("budget: 6KB\ntrain: {steps: 5, lr: -1}\n", "bad training setting lr=-1"),
    ("budget: 6KB\ntrain: {steps: 5, momentun: 0.9}\n", "unknown training settings"),
    ("budget: 6KB\ntrain: {steps: abc}\n", "train setting 'steps' = 'abc' has the wrong type"),
    ("budget: 6KB\ntrain: {epochs: .inf}\n", "train setting 'epochs' = inf must be a finite"),
    ("budget: 6KB\ntrain: {steps: 5, nesterov: 1}\n", "'nesterov' = 1 has the wrong type"),
    ("budget: 6KB\nfinal_train: {epochs: .nan}\n", "final_train setting 'epochs' = nan"),
    ("budget: 6KB\nmatrix: {budget: 6KB}\n", "matrix key 'budget' must be a non-empty list"),
    ("budget: 6KB\nmatrix: {budget: [6KB, 6KB]}\n", "matrix gives two experiments the dir"),
    ("matrix: [{budget: 6KB}, {budget: 6KB}]\n", "matrix gives two experiments the dir"),
    ("matrix: [{name: a, budget: 6KB}, {name: a, budget: 7KB}]\n", "or name each"),
    ("matrix: [{name: ../up, budget: 6KB}]\n", "matrix name '../up' must be a directory"),
    (f"matrix: {{seed: {list(range(40))}, trials: {list(range(1, 41))}}}\n",
     "matrix expands to more than 1000 experiments"),
    ("budget: 6KB\ndata: {rooot: /x}\n", "unknown data settings ['rooot']"),
    ("budget: 6KB\ndata: {root: 5, train_fraction: 7}\n", "data setting root = 5 must be"),
    ("budget: 6KB\ndata: {train_fraction: 7.5}\n", "train_fraction = 7.5 not understood"),
    ("budget: 6KB\ndata: {val_fraction: true}\n", "val_fraction = True not understood"),
    ("budget: 6KB\nversion: 7\n", "spec version 7 not supported"),
    ("budget: 6KB\nmodel: torchvision:resnet18\n", "below the smallest torchvision:resnet18"),
    ("budget: 6KB\nstrategy_kwargs: {bits: [2, 9]}\n", "uniform bits=[2, 9] not allowed"),
    ("budget: !!python/object/apply:os.system ['touch /tmp/pwned']\n", "not valid YAML"),
    ("budget: 6KB\nbudget: 7KB\n", "duplicate key 'budget' (first at line 1)"),
    ("budget: 6KB\ntrain: {steps: 5, steps: 6}\n", "duplicate key 'steps'"),
    (BOMB + "strategy_kwargs: {bits: *i}\n", "more than 100,000 values once aliases are"),
    ("budget: 6KB\nx: [" + "1," * 100_001 + "]\n", "is refused at line 2: more than 100,000"),
    ("a: &a [*a]\n", "is refused at line 1: an alias refers to a value that contains it"),
    ("budget: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 50 levels"),
    (f"budget: 6KB\ntrials: {HUGE}\n", "cannot be read: Exceeds the limit"),
    ("budget: 6KB\x00\n", "is not valid YAML"),
    ("# padding\n" + "#" * 1_000_001 + "\n", "is 1,000,012 bytes: recipes are a few KB"),
    (bytes(range(256)) * 8, "is not a text file (not UTF-8)"),
]


def check_one_line(capsys, code: int, expected: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("qsearch: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert "Traceback" not in err and len(err) <= MAX_LINE, err
    return err


def run_argv(argv: list[str], dry: bool) -> list[str]:
    steps = [] if {"--steps", "--epochs"} & set(argv) else ["--steps", "5"]
    return [*RUN, *steps, *(["--dry-run"] if dry else []), *argv]


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_run_flags(argv, expected, dry, tmp_path, capsys, monkeypatch):
    if dry and any(part in expected for part in REAL_RUN_ONLY):
        pytest.skip("needs the cluster or the dataset's files")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "exp"
    if "--out" not in argv:
        argv = [*argv, "--out", str(out)]
    check_one_line(capsys, main(run_argv(argv, dry)), expected)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no probe left


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("text, expected", YAML_CASES, ids=[c[1][:40] for c in YAML_CASES])
def test_bad_recipes(text, expected, dry, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    if isinstance(text, bytes):
        recipe.write_bytes(text)
    else:
        recipe.write_text(text)
    out = tmp_path / "exp"
    argv = [*RUN, str(recipe), "--out", str(out), *(["--dry-run"] if dry else [])]
    check_one_line(capsys, main(argv), expected)
    assert not out.exists() and not (tmp_path / "runs").exists()


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


SPEC = json.dumps({"budget": "6KB", "dataset": "synthetic"})


def _table(columns: dict, version: str = "2") -> pa.Table:
    return pa.table(columns).replace_schema_metadata({"qsearch_schema_version": version})


DIR_CASES = [  # (spec.json text or bytes, results table or None, command, expected)
    ("[1, 2]", None, "resume", "spec.json' is corrupted: it holds a list, not a spec"),
    ("[1, 2]", None, "leaderboard", "spec.json is not a spec (a JSON object)"),
    ("[1, 2]", None, "results", "no results.parquet"),
    (b"\xff\xfe binary", None, "resume", "spec.json' is corrupted"),
    (b"\xff\xfe binary", None, "leaderboard", "spec.json is unreadable"),
    ('{"budget": "6KB", "seed": -1}', None, "resume", "seed = -1"),
    *[(SPEC, _table({"a": [1, 2]}), cmd, "does not hold qsearch results (it lacks 29")
      for cmd in ("results", "leaderboard", "resume")],
    *[(SPEC, _table({n: ["x"] for n in SCHEMA.names}), cmd, "has columns of the wrong type")
      for cmd in ("results", "leaderboard", "resume")],
    (SPEC, _table({"a": [1]}, version="abc"), "results", "has schema version abc;"),
]


@pytest.mark.parametrize("spec, table, command, expected", DIR_CASES,
                         ids=[f"{c[2]}: {c[3][:30]}" for c in DIR_CASES])
def test_bad_experiment_directories(spec, table, command, expected, tmp_path, capsys):
    spec_file = tmp_path / "spec.json"
    spec_file.write_bytes(spec if isinstance(spec, bytes) else spec.encode())
    if table is not None:
        pq.write_table(table, tmp_path / "results.parquet")
    before = sorted(p.name for p in tmp_path.iterdir())
    check_one_line(capsys, main([command, str(tmp_path)]), expected)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock") == before


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    return make_experiment(tmp_path_factory.mktemp("runs"), "uniform", "32KB", None, 1.0,
                           [0.9])


@pytest.mark.parametrize("command, output, extra, expected", [
    ("report", "{tmp}", [], "report file '{tmp}' is a directory: give a file name"),
    ("report", "/proc/x.html", [], "report file '/proc/x.html' is not writable"),
    ("report", "/etc/hostname/x.html", [], "is not writable (/etc/hostname"),
    ("report", "", [], "-o '' is empty: give the report file"),
    ("export", "{tmp}", [], "export file '{tmp}' is a directory: give a file name"),
    ("export", "/proc/m.safetensors", [], "export file '/proc/m.safetensors' is not writable"),
    ("export", "", [], "-o '' is empty: give the export file"),
    ("export", "{tmp}/m.st", ["--steps", "5", "--epochs", "1"], "--steps and --epochs both"),
    ("export", "{tmp}/m.st", ["--epochs", "nan"], "export setting 'epochs' = nan"),
    ("export", "{tmp}/m.st", ["--steps", "10000000000"], "steps = 1e+10 is beyond"),
    ("export", "{tmp}/m.onnx", ["--format", "tflite"],
     "export format 'tflite' not known: choose safetensors (the default, qsearch's packed "
     "file) or onnx (integer weights for ONNX Runtime), e.g. --format onnx"),
    ("export", "{tmp}/m.onnx", ["--format", "ONNX"], "format 'ONNX' not known"),
    ("export", "{tmp}", ["--format", "onnx"],
     "export file '{tmp}' is a directory: give a file name, e.g. -o model.onnx"),
])
def test_bad_output_files(command, output, extra, expected, experiment, tmp_path, capsys):
    """Checked before the report is drawn or the export trains, not after."""
    out, expected = output.format(tmp=tmp_path), expected.format(tmp=tmp_path)
    check_one_line(capsys, main([command, str(experiment), "-o", out, *extra]), expected)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, expected", [
    (["space", "show", "--model", "nope"], "unknown model 'nope'"),
    (["space", "show", "--bits", "9"], "weight bits [9] not allowed"),
    (["space", "show", "--bits", "2", "--budget", "1B"], "below the smallest"),
    (["space", "show", "--model", "torchvision:resnet19"], "unknown torchvision model"),
    (["space", "show", "--model", "torchvision:resnet18", "--budget", "1MB"],
     "a fixed-width model meets a budget through its bits, not its width"),
    (["space", "show", "--model", "torchvision:resnet18", "--width", "0.5"],
     "leave the width at 1"),
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


# ----- requests no cluster can meet, and addresses that are not Ray: one line, no hang -------
def real_run(*args, tmp_path) -> subprocess.CompletedProcess:
    """The CLI in its own process (it starts local Ray); the timeout only guards a hang."""
    return subprocess.run([sys.executable, "-m", "qsearch.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)


@pytest.mark.parametrize("flags, expected", [
    (["--cpus-per-trial", "1000"], "asks for 1000 CPU and 0 GPU but no node"),
    (["--gpus-per-trial", "1.5"], "asks for 1 CPU and 1.5 GPU but no node"),
    (["--workers-per-trial", "2", "--gpus-per-worker", "1"], "a trial of 2 workers asks for 1 "
     "CPU and 1 GPU per worker but the cluster holds 0 such workers"),
])
def test_a_trial_no_node_can_fit_is_refused_before_anything_is_written(flags, expected,
                                                                        tmp_path):
    out = tmp_path / "exp"
    r = real_run(*RUN, "--budget", "6KB", *flags, "--out", str(out), tmp_path=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


@pytest.fixture
def http_server():
    """Something that is not Ray listening on loopback: a plain HTTP server."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_address_that_is_not_ray_is_one_line_not_a_hang(http_server, tmp_path):
    out = tmp_path / "exp"
    r = real_run(*RUN, "--budget", "6KB", "--address", http_server, "--out", str(out),
                 tmp_path=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "answers, but not as a Ray cluster" in r.stderr and not out.exists()


def test_resume_takes_where_it_runs_but_not_what_it_searches(tmp_path, capsys):
    from qsearch.experiment import resume_experiment

    (tmp_path / "spec.json").write_text(json.dumps({"budget": "6KB", "dataset": "synthetic"}))
    check_one_line(capsys, main(["resume", str(tmp_path), "--address", "127.0.0.9:1"]),
                   "'127.0.0.9:1' is unreachable")  # the override reached the connection
    with pytest.raises(QSearchError, match=r"cannot change \['budget'\]"):
        resume_experiment(tmp_path, overrides={"budget": "8KB"})


def test_resume_hands_the_data_parallel_and_gpu_path_flags_to_the_spec(tmp_path, capsys,
                                                                        monkeypatch):
    seen = []

    def connect(runner):  # stand-in for starting Ray: record what the resume would run
        seen.append(runner.spec)
        raise QSearchError("stopped before starting Ray")

    monkeypatch.setattr("qsearch.experiment.connect", connect)
    (tmp_path / "spec.json").write_text(SPEC)
    code = main(["resume", str(tmp_path), "--workers-per-trial", "2", "--cpus-per-worker", "2",
                 "--gpus-per-worker", "0", "--bf16", "--channels-last", "--pin-memory"])
    check_one_line(capsys, code, "stopped before starting Ray")
    (spec,) = seen
    assert (spec.workers_per_trial, spec.cpus_per_worker, spec.gpus_per_worker) == (2, 2.0, 0.0)
    assert spec.bf16 and spec.channels_last and spec.pin_memory


RESUME_FLAGS = {"--address", "--cpus-per-trial", "--gpus-per-trial", "--workers-per-trial",
                "--cpus-per-worker", "--gpus-per-worker", "--concurrency", "--max-failures",
                "--time-budget"}
RESUME_CASES = [  # the run cases of those flags alone, and one a resume meets on its spec
    *[(argv[2:], expected, {}) for argv, expected in CASES if argv[:2] == ["--budget", "6KB"]
      and argv[2:] and {a for a in argv[2:] if a.startswith("--")} <= RESUME_FLAGS],
    (["--workers-per-trial", "4"], "train batch size 30 does not split over "
     "--workers-per-trial 4", {"train": {"steps": 5, "batch_size": 30}}),
]


@pytest.mark.parametrize("argv, expected, spec", RESUME_CASES,
                         ids=[" ".join(c[0])[:60] for c in RESUME_CASES])
def test_resume_refuses_bad_run_settings_as_run_does(argv, expected, spec, tmp_path, capsys):
    """`qsearch resume` takes the run settings through the same flags as `run`, and refuses
    a bad value with the same line."""
    (tmp_path / "spec.json").write_text(json.dumps({**json.loads(SPEC), **spec}))
    check_one_line(capsys, main(["resume", str(tmp_path), *argv]), expected)
    assert not (tmp_path / "results.parquet").exists()
