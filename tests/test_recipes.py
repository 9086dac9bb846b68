"""Every recipe in experiments/ parses, expands its matrix and dry-runs (nothing trained,
nothing written); how `qsearch run` walks a recipe's experiments (--only, --out, skipping
those another process drives)."""

import fcntl
import json
import os
from pathlib import Path

import pytest

from qsearch.cli import main
from qsearch.files import LOCK_FILE, SPEC_FILE
from qsearch.spec import Spec

RECIPES = sorted(Path(__file__).parent.parent.glob("experiments/*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_dry_runs(recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # recipes write under runs/: a dry run must not
    assert main(["run", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    experiments = max(1, out.count("== experiment "))
    assert out.count("plan: ") == experiments and "task " in out
    assert not (tmp_path / "runs").exists()


def test_the_recipes_are_all_there():
    assert {r.stem for r in RECIPES} >= {"leaderboard-fmnist", "bitwidth-ordering",
                                         "depthwise", "imagenet-table3"}


def test_strategy_all_means_the_search_strategies_not_the_fidelity_tool(tmp_path, capsys,
                                                                        monkeypatch):
    from qsearch.strategy import list_strategies

    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).parent.parent / "experiments/leaderboard-fmnist.yaml"
    assert main(["run", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    searches = list_strategies(search_only=True)
    assert "fidelity" in list_strategies() and "fidelity" not in searches
    assert "leaderboard-fmnist/fidelity-" not in out
    assert out.count("== experiment ") == len(searches)  # one budget


def test_strategy_all_with_the_supernet_evaluator_means_the_strategies_it_serves(
        tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: synthetic\nbudget: 6KB\nevaluator: supernet\n"
                      "matrix: {strategy: all}\n")
    assert main(["run", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    served = {"uniform", "random", "dualprecision", "tpe", "haq"}
    assert {s for s in served if f"plan: {s} on" in out} == served
    assert "plan: fracbits" not in out and "plan: mixquant" not in out
    assert out.count("== experiment ") == len(served)


def test_a_named_experiment_of_a_recipe_gets_its_name_as_directory(tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: synthetic\nout: runs/r\nmatrix:\n"
                      "  - {name: one-bit, strategy: uniform, budget: 6KB, bit_choices: [1]}\n"
                      "  - {strategy: uniform, budget: 7KB}\n")
    assert main(["run", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "== experiment 1/2: runs/r/one-bit\n" in out
    assert "== experiment 2/2: runs/r/uniform-7KB\n" in out
    first = out.split("== experiment 2/2")[0]
    assert "bits other 1," in first and "bits other 2," not in first


def test_only_runs_the_experiments_it_names(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: synthetic\nstrategy: uniform\nout: runs/r\nmatrix:\n" + "".join(
        f"  - {{name: u{b}-s{s}, budget: 6KB, bit_choices: [{b}], seed: {s}}}\n"
        for b in (1, 2) for s in (0, 1)))
    assert main(["run", str(recipe), "--dry-run", "--only", "*-s1, u1-s0"]) == 0
    out = capsys.readouterr().out
    assert [ln for ln in out.splitlines() if ln.startswith("==")] == [
        "== experiment 1/3: runs/r/u1-s0", "== experiment 2/3: runs/r/u1-s1",
        "== experiment 3/3: runs/r/u2-s1"]
    # one experiment selected is still one of the recipe's: --out is the recipe's directory
    assert main(["run", str(recipe), "--dry-run", "--only", "u2-s0", "--out", "elsewhere"]) == 0
    assert "== experiment 1/1: elsewhere/u2-s0\n" in capsys.readouterr().out
    assert main(["run", str(recipe), "--dry-run", "--out", "elsewhere"]) == 0
    out = capsys.readouterr().out
    assert all(f": elsewhere/u{b}-s{s}\n" in out for b in (1, 2) for s in (0, 1))
    assert main(["run", str(recipe), "--dry-run", "--only", "u4-*"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--only 'u4-*' matches none of the recipe's experiments: " \
        "u1-s0, u1-s1, u2-s0, u2-s1;" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "elsewhere").exists()


def test_a_recipe_skips_the_experiments_another_process_drives(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: synthetic\nstrategy: uniform\nbudget: 6KB\nout: runs/r\n"
                      "matrix:\n  - {name: a, seed: 0}\n  - {name: b, seed: 1}\n")
    held = []
    for name in "ab":  # stored experiments whose lock another process holds
        out = tmp_path / "runs/r" / name
        out.mkdir(parents=True)
        spec = Spec(strategy="uniform", dataset="synthetic", budget="6KB", out=str(out))
        (out / SPEC_FILE).write_text(json.dumps(spec.to_dict()))
        held.append(os.open(out / LOCK_FILE, os.O_CREAT | os.O_RDWR))
        fcntl.flock(held[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert main(["run", str(recipe)]) == 0
        out = capsys.readouterr().out
        assert "skipped: another qsearch process is running in runs/r/a:" in out
        assert "skipped 2 experiments another process is busy with: runs/r/a, runs/r/b" in out
        assert main(["resume", "runs/r/a"]) == 2  # one experiment alone: an error
        assert "another qsearch process is running in runs/r/a" in capsys.readouterr().err
    finally:
        for fd in held:
            os.close(fd)
    assert sorted(p.name for p in (tmp_path / "runs/r/a").iterdir()) == [LOCK_FILE, SPEC_FILE]
