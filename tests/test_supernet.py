"""The weight-sharing evaluator: the envelope holds every aligned candidate, a candidate cut
out of it computes what its extracted model computes, the sandwich step trains the shared
weights and resumes exactly, and ``qsearch run --evaluator supernet`` runs its stages."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import torch.nn as nn

from qsearch import QSearchError
from qsearch.budget import Budget, parse_budget
from qsearch.data import load_dataset
from qsearch.space import SearchSpace
from qsearch.spaces import list_families
from qsearch.supernet import SandwichHooks, Supernet, evaluate_candidate, recalibrate
from qsearch.train import train
from qsearch.train_config import TrainConfig


def supernet(model: str = "resnet20", budget: str = "6KB") -> Supernet:
    return Supernet(SearchSpace(model, "synthetic"), parse_budget(budget))


@pytest.mark.parametrize("model", list_families())
def test_every_sampled_candidate_is_a_slice_that_computes_like_its_own_model(model):
    space = SearchSpace(model, "synthetic")  # every family of the zoo, depthwise included
    sn = Supernet(space, Budget("size", space.cost(space.candidate(8, width=0.3), "size")))
    torch.manual_seed(0)
    net = sn.build()
    x = torch.randn(2, 1, 16, 16)
    net.train()
    net(x)  # activation ranges
    net.eval()
    for _ in range(4):
        cand = sn.sample()
        assert sn.space.cost(cand, "size") <= sn.budget.value
        with torch.no_grad():
            assert torch.equal(sn.forward(net, cand, x), sn.extract(net, cand).eval()(x))


def test_a_candidate_outside_the_envelope_is_refused():
    sn = supernet(budget="6KB")
    space = sn.space
    wide = space.align(space.candidate(1), parse_budget("24KB")).candidate
    with pytest.raises(QSearchError, match="does not fit this supernet.*use that budget"):
        sn.slices(sn.build(), wide)


def test_the_sandwich_step_trains_the_shared_weights():
    sn = supernet()
    torch.manual_seed(0)
    net = sn.build().train()
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 4, (8,))
    task, terms = SandwichHooks(sn).forward_backward(net, x, y, nn.CrossEntropyLoss(), 0)
    assert task > 0 and terms["distill_loss"] > 0
    stem = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    widest = int(sn.space.plan(sn.largest)["stem"])
    assert stem.weight.grad[:widest].abs().sum() > 0  # the largest reaches its channels


@pytest.fixture(scope="module")
def splits():
    return load_dataset("synthetic", seed=0)


def test_trained_supernet_cuts_out_candidates_far_above_chance(splits):
    sn = supernet()
    torch.manual_seed(0)
    net = sn.build()
    train(net, splits, TrainConfig(steps=60, batch_size=32, seed=0), hooks=SandwichHooks(sn))
    for bits in sn.space.bit_choices:
        cand = sn.space.align(sn.space.candidate(bits), sn.budget).candidate
        acc, _ = evaluate_candidate(sn, net, cand, splits)
        assert acc > 0.5  # 4 classes: chance is 0.25


def test_recalibration_is_the_exact_average_of_the_batch_statistics(splits):
    sn = supernet()
    net = sn.extract(sn.build(), sn.widest)
    recalibrate(net, splits, batches=3, batch_size=16)
    assert not net.training
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.1
    recalibrated = bn.running_mean.clone()
    means = []
    hook = bn.register_forward_hook(lambda m, i, o: means.append(i[0].mean((0, 2, 3))))
    order = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for (x, _), _ in zip(splits.train.batches(16, shuffle=True, generator=order), range(3)):
            net(x)
    hook.remove()
    assert torch.allclose(recalibrated, torch.stack(means).mean(0), atol=1e-6)


def test_supernet_training_resumes_exactly(splits):
    """Sampled sub-networks come from torch's RNG, which the training state restores."""
    sn = supernet()
    cfg = TrainConfig(steps=8, batch_size=32, seed=0, eval_every_steps=4)
    saved = {}

    def keep(metrics, state_fn):
        if metrics["step"] == 4:
            saved["state"] = state_fn()

    torch.manual_seed(0)
    whole = sn.build()
    train(whole, splits, cfg, hooks=SandwichHooks(sn), callback=keep)
    resumed = sn.build()
    train(resumed, splits, cfg, hooks=SandwichHooks(sn), start_state=saved["state"])
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


QS = [sys.executable, "-m", "qsearch.cli"]
TINY = ["--dataset", "synthetic", "--steps", "20", "--batch-size", "32", "--budget", "6KB"]


def qsearch(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*QS, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "QSEARCH_PROGRESS_EVERY": "5"})


def test_search_with_the_supernet_evaluator_end_to_end(tmp_path):
    cache = tmp_path / "supernets"
    run = ["run", "--strategy", "random", *TINY, "--trials", "5", "--evaluator", "supernet",
           "--supernet-epochs", "1", "--supernet-cache", str(cache), "--top-k", "2",
           "--final-seeds", "1"]
    first = qsearch(*run, "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    df = pd.read_parquet(tmp_path / "a" / "results.parquet")
    stages = df.groupby("stage").task.agg(set).to_dict()
    assert stages == {"supernet": {"supernet-train"}, "search": {"supernet-eval"},
                      "topk": {"train"}, "final": {"train"}}
    search = df[df.stage == "search"]
    assert len(search) == 5 and (search.status == "ok").all()
    assert all(json.loads(m)["evaluator"] == "supernet" for m in search.metrics)
    top = df[df.stage == "topk"]
    best_two = search.sort_values("val_acc", ascending=False).candidate.unique()[:2]
    assert sorted(top.candidate) == sorted(best_two)  # the supernet's best, retrained
    final = json.loads((tmp_path / "a" / "final.json").read_text())
    assert final["trial_id"] in set(top.trial_id)  # the final stage takes a retrained one
    assert len(list(cache.glob("*/supernet.pt"))) == 1
    assert "search cost (trial wall time): supernet " in first.stdout
    second = qsearch(*run, "--out", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    assert "supernet: reusing" in second.stdout and "reused from the cache" in second.stdout
    again = pd.read_parquet(tmp_path / "b" / "results.parquet")
    assert "supernet" not in set(again.stage)
    # the same seed proposes the same candidates: their evaluations are looked up, equal
    assert not any(json.loads(m)["eval_cached"] for m in search.metrics)
    looked_up = again[again.stage == "search"]
    assert all(json.loads(m)["eval_cached"] for m in looked_up.metrics)
    assert looked_up.set_index("candidate").val_acc.to_dict() == \
        search.set_index("candidate").val_acc.to_dict()
    assert "evaluations (5 of them repeats looked up)" in second.stdout


@pytest.mark.parametrize("argv, trials, kwargs", [
    (["--strategy", "haq"], 600, {"warmup": 100, "net_arch": [300, 300]}),  # HAQ's length
    (["--strategy", "haq", "--trials", "40", "--strategy-arg", "warmup=10"], 40,
     {"warmup": 10, "net_arch": [300, 300]}),
    (["--strategy", "random"], 200, {}),
    (["--strategy", "random", "--evaluator", "train"], 8, {}),
])
def test_the_supernet_evaluator_sets_the_search_length_unless_given(argv, trials, kwargs):
    from qsearch.cli import build_parser, specs_from_args

    args = build_parser().parse_args(["run", "--evaluator", "supernet", *argv])
    (spec,) = specs_from_args(args)
    assert spec.trials == trials and spec.strategy_kwargs == kwargs


def test_a_time_budget_cuts_supernet_training_and_resume_finishes_every_stage(tmp_path):
    out, cache = tmp_path / "cut", tmp_path / "supernets"
    r = subprocess.run(
        [*QS, "run", "--strategy", "random", "--dataset", "synthetic", "--budget", "6KB",
         "--steps", "20", "--batch-size", "32", "--trials", "3", "--evaluator", "supernet",
         "--supernet-epochs", "5", "--supernet-cache", str(cache), "--top-k", "1",
         "--time-budget", "15s", "--out", str(out)], capture_output=True, text=True,
        timeout=600, env={**os.environ, "QSEARCH_CHECKPOINT_EVERY": "1"})
    assert r.returncode == 0, r.stderr
    assert "supernet: training did not finish" in r.stdout, r.stdout
    assert not list(cache.glob("*/supernet.pt")) and not (out / "results.parquet").exists()
    state = json.loads((out / "state-supernet.json").read_text())
    assert state["live"]  # the cut trial, kept for the resume (from a checkpoint if it made one)
    again = qsearch("resume", str(out), "--time-budget", "10m")
    assert again.returncode == 0, again.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert (df.status == "ok").all()
    assert df.groupby("stage").size().to_dict() == {"supernet": 1, "search": 3, "topk": 1}
    assert list(cache.glob("*/supernet.pt"))


def test_only_one_process_trains_a_supernet(tmp_path):
    import fcntl
    import io

    from qsearch.console import Display
    from qsearch.experiment import ExperimentBusy, run_supernet
    from qsearch.files import LOCK_FILE
    from qsearch.runner import Runner
    from qsearch.spec import Spec

    spec = Spec(strategy="random", dataset="synthetic", budget="6KB", evaluator="supernet",
                supernet_cache=str(tmp_path / "supernets"), trials=2,
                train={"steps": 20, "batch_size": 32})
    (tmp_path / "exp").mkdir()
    runner = Runner(spec, tmp_path / "exp", inline=True, display=Display(stream=io.StringIO()))
    runner.supernet_dir.mkdir(parents=True)
    fd = os.open(runner.supernet_dir / LOCK_FILE, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process trains it
    try:
        with pytest.raises(ExperimentBusy, match="another qsearch process is training the "
                           f"supernet {runner.supernet_dir}: when it is done, `qsearch resume"):
            run_supernet(runner)
    finally:
        os.close(fd)
    assert [p.name for p in runner.supernet_dir.iterdir()] == [LOCK_FILE]  # nothing trained
    assert not (tmp_path / "exp" / "results.parquet").exists()


@pytest.mark.parametrize("model", ["resnet20", "mobilenetv2-cifar", "vgg11-c"])
def test_a_cut_out_candidate_has_exactly_its_own_layer_shapes_and_c_size(model):
    """Eq. 6 of the DualPrecision paper counted on the cut-out network's own weights."""
    from qsearch.qlayers import quantize_model

    space = SearchSpace(model, "synthetic")
    sn = Supernet(space, Budget("size", space.cost(space.candidate(8, width=0.3), "size")))
    net = sn.build()
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        cand = sn.sample(generator)
        cut = sn.extract(net, cand)
        own = quantize_model(space.build(cand), space.layer_bits(cand), cand.a_bits)
        assert {k: v.shape for k, v in cut.state_dict().items()} == \
            {k: v.shape for k, v in own.state_dict().items()}
        c_size = sum(bits * cut.get_submodule(name).weight.numel()
                     for name, bits in space.layer_bits(cand).items())
        assert c_size == space.cost(cand, "size") <= sn.budget.value


def test_an_evaluation_is_deterministic_under_a_seed(splits):
    def trained(seed):
        sn = supernet()
        torch.manual_seed(seed)
        net = sn.build()
        train(net, splits, TrainConfig(steps=12, batch_size=32, seed=seed),
              hooks=SandwichHooks(sn))
        return sn, net.eval()

    sn, net = trained(0)
    cand = sn.sample(torch.Generator().manual_seed(3))
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    first = evaluate_candidate(sn, net, cand, splits)
    torch.manual_seed(123)  # the global RNG elsewhere does not matter
    assert evaluate_candidate(sn, net, cand, splits) == first
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())  # untouched
    again, net_again = trained(0)
    assert evaluate_candidate(again, net_again, cand, splits) == first
    other, net_other = trained(1)
    assert evaluate_candidate(other, net_other, cand, splits) != first


def test_the_cache_key_changes_when_any_of_its_inputs_changes(tmp_path):
    from dataclasses import replace

    from qsearch.evaluator import supernet_dir
    from qsearch.planning import plan_budgets
    from qsearch.spec import Spec, space_from_spec

    def key(spec: Spec):
        space = space_from_spec(spec)
        return supernet_dir(spec, space, plan_budgets(spec, space).search)

    base = Spec(strategy="random", dataset="synthetic", budget="6KB", evaluator="supernet",
                supernet_cache=str(tmp_path), train={"steps": 20})
    assert key(base).parent == tmp_path
    same = [replace(base, strategy="tpe", trials=50, top_k=5, train={"steps": 300})]
    assert {key(s) for s in same} == {key(base)}  # search settings: the same supernet
    changed = [replace(base, model="resnet32"), replace(base, dataset="fashion-mnist"),
               replace(base, bit_choices=[2, 4, 8]), replace(base, a_bits=8),
               replace(base, budget="8KB"), replace(base, supernet_train={"epochs": 3.0}),
               replace(base, seed=1), replace(base, data={"val_fraction": 0.2})]
    keys = [key(s) for s in changed]
    assert len(set(keys)) == len(keys) and key(base) not in keys


def test_a_killed_supernet_training_resumes_from_its_checkpoint(tmp_path):
    out, cache = tmp_path / "killed", tmp_path / "supernets"
    cmd = [*QS, "run", "--strategy", "random", *TINY, "--trials", "2", "--evaluator",
           "supernet", "--supernet-epochs", "4", "--supernet-cache", str(cache), "--top-k",
           "1", "--final-seeds", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True,
                            env={**os.environ, "QSEARCH_CHECKPOINT_EVERY": "1"})
    deadline = time.time() + 240
    while not list(out.glob("tune*/*/*/checkpoint_*")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)  # a checkpoint or two more
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    assert list(out.glob("tune*/*/*/checkpoint_*")), "no supernet checkpoint in time"
    assert not list(cache.glob("*/supernet.pt"))  # killed before the end
    r = qsearch("resume", str(out))
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(out / "results.parquet")
    (trained,) = df[df.stage == "supernet"].itertuples()
    metrics = json.loads(trained.metrics)
    assert trained.status == "ok" and 0 < metrics["resumed_from_step"] < trained.steps
    assert list(cache.glob("*/supernet.pt"))
    assert df.groupby("stage").size().to_dict() == {"supernet": 1, "search": 2, "topk": 1,
                                                    "final": 1}
