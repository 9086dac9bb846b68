"""The Ray Tune runner end to end: a real local Ray, the CLI in a subprocess, the store.

Runs on the tiny synthetic dataset so each trial trains in about a second.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

QS = [sys.executable, "-m", "qsearch.cli"]
TINY = ["--model", "resnet20", "--dataset", "synthetic", "--steps", "20", "--batch-size", "32"]


def qsearch(*args, timeout=300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*QS, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def rows(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet")


def test_search_end_to_end(tmp_path):
    out = tmp_path / "uni"
    r = qsearch("run", "--strategy", "uniform", "--budget", "6KB", *TINY, "--trials", "4",
                "--out", str(out), env={"QSEARCH_PROGRESS_EVERY": "0.05"})
    assert r.returncode == 0, r.stderr
    # the progress line repeats while trials run, not only when one starts or ends (~8)
    assert r.stdout.count("trials done") > 20
    df = rows(out)
    assert len(df) == 4 and set(df.status) == {"ok"}
    assert df.trial_id.is_unique and sorted(df.trial_index) == [0, 1, 2, 3]
    assert (df.c_size <= 6e3 * 8).all() and (df.budget_ratio >= 0.9).all()
    assert df.val_acc.between(0, 1).all() and (df.train_seconds > 0).all()
    bits = sorted(json.loads(c)["w_bits"][1] for c in df.candidate)
    assert bits == [1, 2, 4, 8]  # one width-aligned trial per uniform bit-width
    final = json.loads((out / "final.json").read_text())
    assert final["budget_ratio"] <= 1.0
    assert "best:" in r.stdout and "trials done 4" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    shown = qsearch("results", str(out))
    assert shown.returncode == 0 and shown.stdout.count("\n") == 5
    exported = qsearch("export", str(out), "--steps", "10")
    assert exported.returncode == 0, exported.stderr
    assert "predicts identically on the test split: yes" in exported.stdout
    codes, c_size = re.search(r"codes ([\d,]+) \(C_size/8 = ([\d,]+)", exported.stdout).groups()
    assert abs(int(codes.replace(",", "")) / int(c_size.replace(",", "")) - 1) < 0.01


def test_dualprecision_prints_its_grid(tmp_path):
    out = tmp_path / "dp"
    r = qsearch("run", "--strategy", "dualprecision", "--budget", "6KB", *TINY, "--out", str(out))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("grid at 6KB"))
    assert lines[i + 1].split() == ["dw", "\\", "other", "1", "2", "4", "8"]
    df = rows(out)
    df["bits"] = [json.loads(c)["w_bits"][1] for c in df.candidate]
    accs = df.sort_values("bits").val_acc
    assert lines[i + 2].replace("*", "").split() == ["n/a"] + [f"{a:.2%}" for a in accs]
    assert f"*{accs.max():.2%}" in lines[i + 2]


def test_proxy_budget_rescales_the_winner(tmp_path):
    out = tmp_path / "proxy"
    r = qsearch("run", "--strategy", "random", "--budget", "12MB", *TINY, "--trials", "2",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "proxy: searching at" in r.stdout
    assert "final candidate re-aligned to the target 12MB" in r.stdout
    df = rows(out)
    assert (df.c_size < 12e6 * 8 / 10).all()  # trials ran at the proxy size
    final = json.loads((out / "final.json").read_text())
    assert 0.99 <= final["budget_ratio"] <= 1.0
    assert final["c_size"] <= 12e6 * 8


def test_second_run_in_same_directory_is_refused(tmp_path):
    import io

    from qsearch.console import Display
    from qsearch.experiment import run_experiment
    from qsearch.spec import Spec

    out = tmp_path / "twice"  # the first run, Ray-free: what the refusal reads is its store
    run_experiment(Spec(strategy="uniform", budget="6KB", model="resnet20", dataset="synthetic",
                        trials=1, train={"steps": 20, "batch_size": 32}, out=str(out)),
                   inline=True, display=Display(stream=io.StringIO()))
    r = qsearch("run", "--strategy", "uniform", "--budget", "6KB", *TINY, "--out", str(out))
    assert r.returncode == 2 and "qsearch resume" in r.stderr
    assert len(rows(out)) == 1


def test_second_run_while_the_first_is_running_is_refused(tmp_path):
    out = tmp_path / "busy"
    first = subprocess.Popen([*QS, "run", "--strategy", "uniform", "--budget", "6KB", *TINY,
                              "--trials", "2", "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "spec.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    r = qsearch("run", "--strategy", "random", "--budget", "6KB", *TINY, "--out", str(out))
    assert first.wait(timeout=300) == 0
    assert r.returncode == 2 and "qsearch resume" in r.stderr
    assert set(rows(out).strategy) == {"uniform"}


def test_resume_after_driver_killed(tmp_path):
    out = tmp_path / "resume"
    cmd = [*QS, "run", "--strategy", "uniform", "--budget", "6KB", *TINY[:-4],
           "--steps", "80", "--batch-size", "32", "--bit-choices", "1,2,3,4,5,6,7,8",
           "--trials", "8", "--concurrency", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (out / "results.parquet").exists() and len(rows(out)) >= 2:
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("no trial completed in time")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    before = rows(out)
    assert 2 <= len(before) < 8
    state = json.loads((out / "state.json").read_text())
    assert len(state["strategy"]["done"]) == len(before)

    r = qsearch("resume", str(out))
    assert r.returncode == 0, r.stderr
    assert "strategy state restored" in r.stdout
    after = rows(out)
    assert len(after) == 8 and after.trial_id.is_unique
    kept = after.set_index("trial_id").loc[before.trial_id]
    assert list(kept.val_acc) == list(before.val_acc)  # completed trials untouched
    bits = sorted(json.loads(c)["w_bits"][1] for c in after.candidate)
    assert bits == [1, 2, 3, 4, 5, 6, 7, 8]  # no cell re-run: the grid position was restored


def test_ctrl_c_stops_a_recipe_rather_than_its_experiment(tmp_path):
    """Tune ends its run gracefully on the first SIGINT; the recipe must not then go on to
    its next experiment: the command exits 130 and the rerun continues where it stopped."""
    recipe = tmp_path / "r.yaml"
    root = tmp_path / "recipe"
    recipe.write_text(f"strategy: uniform\nmodel: resnet20\ndataset: synthetic\n"
                      f"train: {{steps: 200, batch_size: 32}}\nout: {root}\n"
                      "matrix: {budget: [6KB, 7KB]}\n")
    proc = subprocess.Popen([*QS, "run", str(recipe), "--trials", "1"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not list(root.glob("6KB/tune/*/trial_fn_*")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "qsearch: interrupted" in err and "experiment 2/2" not in out
    assert not (root / "7KB").exists()
    # the same command again continues, under its own run settings
    again = qsearch("run", str(recipe), "--trials", "1", "--concurrency", "1")
    assert again.returncode == 0, again.stderr
    assert "resume: now with concurrency default -> 1" in again.stdout
    assert len(rows(root / "6KB")) == len(rows(root / "7KB")) == 1


@pytest.mark.slow
def test_time_budget_stops_cleanly_and_resume_continues(tmp_path):
    """Tune's time budget cuts two long trials (~60 s each on an idle machine) at 40 s."""
    out = tmp_path / "timed"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {steps: 2400, batch_size: 32, eval_every_steps: 10000}\n")
    r = qsearch("run", str(recipe), "--strategy", "uniform", "--strategy-arg", "bits=[1,8]",
                "--budget", "6KB", "--dataset", "synthetic", "--trials", "2", "--time-budget",
                "40s", "--out", str(out), env={"QSEARCH_CHECKPOINT_EVERY": "1"})
    assert r.returncode == 0, r.stderr
    assert "time budget 40s reached: 2 trials cut short" in r.stdout, r.stdout
    assert "no trial succeeded" not in r.stdout + r.stderr and "Traceback" not in r.stderr
    state = json.loads((out / "state.json").read_text())
    assert len(state["live"]) == 2 and state["checkpoints"]  # kept for the resume
    assert not (out / "results.parquet").exists()  # nothing stored for a trial cut short
    again = qsearch("resume", str(out), "--time-budget", "10m")
    assert again.returncode == 0, again.stderr
    df = rows(out)
    assert len(df) == 2 and set(df.status) == {"ok"} and df.trial_id.is_unique
    resumed = [json.loads(m)["resumed_from_step"] for m in df.metrics]
    assert max(resumed) > 0  # the trials the budget cut continued from their checkpoints
