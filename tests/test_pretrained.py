"""Your own weights: pins and float layers, fixed-width search of a width family, a
pretrained checkpoint (loaded, adapted or refused), post-training trials, and the searches
that start from a checkpoint end to end."""

import io
import json
import subprocess
import sys

import pytest
import torch

from qsearch import QSearchError
from qsearch.budget import parse_budget
from qsearch.candidate import FLOAT_BITS
from qsearch.console import Display
from qsearch.data import load_dataset
from qsearch.experiment import run_experiment
from qsearch.pins import parse_pins
from qsearch.pretrained import FINETUNE, load_pretrained, matched, read_state_dict
from qsearch.ptq import calibrate, estimating, quantized_from
from qsearch.qlayers import quantize_model
from qsearch.space import SearchSpace
from qsearch.spec import Spec, space_from_spec
from qsearch.store import ResultsStore
from qsearch.strategy import Proposal
from qsearch.tasks import TaskContext, get_task
from qsearch.train import evaluate, train
from qsearch.train_config import TrainConfig


# ----- pins and float layers ---------------------------------------------------------------
def test_pins_take_layers_out_of_the_search_and_keep_float_pins_them_at_32():
    pins = parse_pins(["5.*=2"], keep_float=["3.body.0"])
    space = SearchSpace("resnet20", "synthetic", pins=pins)
    names = [layer.name for layer in space.layers]
    pinned = {names[i]: b for i, b in space.pinned.items()}
    assert pinned["3.body.0"] == FLOAT_BITS and pinned["5.body.0"] == pinned["5.body.3"] == 2
    assert pinned[names[0]] == pinned[names[-1]] == 8  # first and last as before
    free = {names[i] for i in space.free_layers}
    assert free.isdisjoint(pinned) and len(free) == len(names) - 5
    cand = space.candidate(4)
    assert cand.w_bits[names.index("3.body.0")] == FLOAT_BITS
    assert space.describe()["pins"] == pins
    base = SearchSpace("resnet20", "synthetic")  # a float layer costs its 32 bits
    i = names.index("3.body.0")
    assert space.c_size(cand) - base.c_size(base.candidate(4)) == pytest.approx(
        (32 - 4) * base.params(cand)[i] - (4 - 2) * base.params(cand)[i + 2:i + 4].sum())


@pytest.mark.parametrize("pins, words", [
    ({"layer3.*": 8}, "matches no quantizable layer .* e.g. '"),
    ({"3.*": 9}, "bits must be 1..8 or 32"),
])
def test_bad_pins_are_one_line_with_the_fix(pins, words):
    with pytest.raises(QSearchError, match=words):
        SearchSpace("resnet20", "synthetic", pins=pins)


def test_pin_flags_parse_and_refuse_what_they_cannot_read():
    assert parse_pins(["a.*=8", "b=32"], keep_float=["fc"]) == {"a.*": 8, "b": 32, "fc": 32}
    for bad in ("a.*", "=8", "a=x"):
        with pytest.raises(QSearchError, match="PATTERN=BITS"):
            parse_pins([bad])


# ----- fixed width for a width family ------------------------------------------------------
def test_fixed_width_searches_a_width_family_at_its_own_channels():
    wide, fixed = SearchSpace("resnet20", "synthetic"), SearchSpace("resnet20", "synthetic",
                                                                    fixed_width=True)
    assert fixed.family.fixed_width and fixed.describe()["fixed_width"]
    assert "fixed_width" not in wide.describe()
    assert fixed.c_size(fixed.candidate(2)) == wide.c_size(wide.candidate(2, width=1.0))
    with pytest.raises(QSearchError, match="fixed-width"):
        fixed.candidate(2, width=2.0)
    budget = parse_budget(f"{fixed.c_size(fixed.candidate(2)) * 1.5 / 8:.0f}B")
    cand = fixed.fit(fixed.candidate(4), budget)  # lowered until it fits, width kept
    assert cand.width == 1.0 and fixed.c_size(cand) <= budget.value
    assert Spec(checkpoint="x.pt").fixed_width and Spec(width_mode="fixed").fixed_width


# ----- the checkpoint ----------------------------------------------------------------------
def tiny_state(space, tmp_path, name="ckpt.pt", **extra):
    torch.manual_seed(1)
    model = space.build(1.0)
    state = {**model.state_dict(), **extra}
    torch.save(state, tmp_path / name)
    return model, str(tmp_path / name)


def test_a_matching_checkpoint_loads_every_tensor(tmp_path):
    space = SearchSpace("resnet20", "synthetic", fixed_width=True)
    source, path = tiny_state(space, tmp_path)
    torch.save({"model": source.state_dict()}, tmp_path / "wrapped.pt")  # qsearch's state
    for p in (path, str(tmp_path / "wrapped.pt")):
        model = space.build(1.0)
        assert load_pretrained(model, p, "resnet20") == []
        for (k, a), b in zip(model.state_dict().items(), source.state_dict().values()):
            assert torch.equal(a, b), k


def test_torchvision_weights_are_adapted_to_grey_images_and_other_classes(tmp_path):
    from torchvision import models

    torch.manual_seed(0)
    rgb = models.resnet18(weights=None)  # a torchvision weights file: RGB, 1000 classes
    torch.save(rgb.state_dict(), tmp_path / "r18.pth")
    space = SearchSpace("torchvision:resnet18", "synthetic")  # grey images, 4 classes
    model = space.build(1.0)
    notes = load_pretrained(model, str(tmp_path / "r18.pth"), space.model)
    assert any("conv1.weight summed over its 3 colour channels" in n for n in notes)
    assert any("classifier fc left at its initialisation" in n and "1000 classes" in n
               for n in notes)
    assert torch.equal(model.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.layer4[1].conv2.weight, rgb.layer4[1].conv2.weight)
    x = torch.rand(2, 1, 16, 16)  # grey image = RGB image with equal channels
    assert torch.allclose(model.conv1(x), rgb.conv1(x.expand(-1, 3, -1, -1)), atol=1e-5)


@pytest.mark.parametrize("change, words", [
    ("drop", "has no tensor '3.body.0.weight' of resnet20"),
    ("shape", r"tensor '3.body.0.weight' has shape \(16, 16, 1, 1\), resnet20 needs"),
    ("extra", "has tensor 'zzz.weight', which resnet20 does not"),
])
def test_a_mismatched_checkpoint_names_the_first_tensor(tmp_path, change, words):
    space = SearchSpace("resnet20", "synthetic", fixed_width=True)
    state = space.build(1.0).state_dict()
    if change == "drop":
        del state["3.body.0.weight"]
    elif change == "shape":
        state["3.body.0.weight"] = torch.zeros(16, 16, 1, 1)
    else:
        state["zzz.weight"] = torch.zeros(1)
    with pytest.raises(QSearchError, match=words):
        matched(space.build(1.0), state, "ck.pt", "resnet20")


def test_unreadable_checkpoints_are_refused_in_one_line(tmp_path):
    with pytest.raises(QSearchError, match="not found"):
        read_state_dict(str(tmp_path / "none.pt"))
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(QSearchError, match="weights_only=True"):
        read_state_dict(str(tmp_path / "text.pt"))
    torch.save({"a": [1, 2]}, tmp_path / "list.pt")
    with pytest.raises(QSearchError, match="no mapping of tensor names"):
        read_state_dict(str(tmp_path / "list.pt"))


# ----- post-training trials ----------------------------------------------------------------
def context(space, checkpoint, cand, tmp_path, **train):
    return TaskContext(space=space, proposal=Proposal(cand, task="ptq"),
                       budget=parse_budget("1MB"),
                       train={"steps": 30, "batch_size": 64, **train}, data={}, seed=0,
                       device="cpu", report=lambda m, s: False, checkpoint=checkpoint)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A float resnet20 trained briefly on the synthetic data, saved as a checkpoint."""
    tmp = tmp_path_factory.mktemp("float")
    space = SearchSpace("resnet20", "synthetic", fixed_width=True)
    torch.manual_seed(0)
    model = space.build(1.0)
    splits = load_dataset("synthetic", seed=0)
    train(model, splits, TrainConfig(steps=60, batch_size=64, lr=0.05))
    torch.save(model.state_dict(), tmp / "float.pt")
    return space, str(tmp / "float.pt"), evaluate(model, splits.val)[0]


def test_ptq_trial_is_the_checkpoint_quantized_and_calibrated(trained, tmp_path):
    space, path, float_acc = trained
    floating = space.build(1.0)
    load_pretrained(floating, path, space.model)
    x = next(iter(load_dataset("synthetic", seed=0).val.batches(64)))[0]
    accs, drift = {}, {}
    for bits in (8, 2):
        cand = space.candidate(bits)
        res = get_task("ptq")(context(space, path, cand, tmp_path))
        again = get_task("ptq")(context(space, path, cand, tmp_path))
        assert res.status == "ok" and res.val_acc == again.val_acc  # deterministic
        accs[bits] = res.val_acc
        model = quantized_from(context(space, path, cand, tmp_path), cand, path).eval()
        layers = [m for m in model.modules() if getattr(m, "w_bits", None) == bits]
        assert layers and all(len(w.unique()) <= 2 ** bits  # the checkpoint's weights, quantized
                              for m in layers for w in m.quantized_weight().detach())
        with torch.no_grad():
            drift[bits] = float((model(x) - floating.eval()(x)).abs().mean())
    assert float_acc > 0.6 and accs[8] >= float_acc - 0.05  # 8 bits: nearly the float model
    # 2 bits moves the logits further from the float model's (accuracy on this easy synthetic
    # task can stay level: it is not a sound test of the damage)
    assert drift[2] > drift[8]


def test_calibration_estimates_bn_as_an_exact_average_and_restores_the_model(trained):
    space, path, _ = trained
    model = space.build(1.0)
    load_pretrained(model, path, space.model)
    quantize_model(model, space.layer_bits(space.candidate(4)), 4)
    x = [torch.randn(8, 1, 16, 16) for _ in range(3)]
    calibrate(model, ((b, None) for b in x), 3, "cpu")
    bn = model.get_submodule("1")  # the stem's BatchNorm reads the stem conv's output
    stem = model.get_submodule("0")
    with torch.no_grad():
        means = [stem(b).mean((0, 2, 3)) for b in x]
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=2e-4)
    assert not model.training and bn.momentum == 0.1
    with estimating(model, batchnorm=False, act_ranges=True):
        assert not bn.training


def test_finetuning_starts_from_the_checkpoint_with_its_own_learning_rate(trained, tmp_path):
    space, path, _ = trained
    cand = space.candidate(4)
    ctx = context(space, path, cand, tmp_path)
    model = ctx.build(cand)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 torch.load(path).values()))
    assert ctx.train_config().lr == FINETUNE["lr"]
    assert context(space, path, cand, tmp_path, lr=0.2).train_config().lr == 0.2
    assert context(space, None, cand, tmp_path).train_config().lr == TrainConfig.lr


# ----- searches from a checkpoint ----------------------------------------------------------
def test_ptq_search_then_a_finetuned_final_inline(trained, tmp_path):
    space, path, _ = trained
    budget = space.c_size(space.candidate(4)) / 8 * 0.8  # 4 bits does not fit, 2 bits does
    spec = Spec(model="resnet20", dataset="synthetic", strategy="random", trials=4,
                budget=f"{budget:.0f}B", checkpoint=path, trial_mode="ptq",
                train={"steps": 20, "batch_size": 64}, final_seeds=1,
                final_train={"steps": 20, "batch_size": 64}, out=str(tmp_path / "ptq"))
    out = io.StringIO()
    runner = run_experiment(spec, inline=True, display=Display(stream=out, live=False))
    rows = ResultsStore(runner.out).rows
    search = [r for r in rows if r["stage"] == "search"]
    final = [r for r in rows if r["stage"] == "final"]
    assert len(search) == 4 and {r["task"] for r in search} == {"ptq"}
    assert all(r["status"] == "ok" and r["c_size"] <= budget * 8 for r in search)
    assert all(json.loads(r["candidate"])["width"] == 1.0 for r in rows)
    assert len(final) == 1 and final[0]["task"] == "train" and final[0]["test_acc"] > 0.5
    text = out.getvalue()
    assert "post-training quantized" in text and f"trials start from {path}" in text


def test_strategies_without_ptq_trials_and_ptq_without_weights_are_refused(trained, tmp_path):
    space, path, _ = trained
    with pytest.raises(QSearchError, match="--trial-mode ptq needs the float weights"):
        Spec(trial_mode="ptq")
    with pytest.raises(QSearchError, match="--checkpoint with --evaluator supernet"):
        Spec(checkpoint=path, evaluator="supernet")
    spec = Spec(model="resnet20", dataset="synthetic", strategy="fracbits", budget="20KB",
                checkpoint=path, trial_mode="ptq", out=str(tmp_path / "f"))
    with pytest.raises(QSearchError, match="--trial-mode ptq with --strategy fracbits"):
        run_experiment(spec, inline=True, display=Display(stream=io.StringIO()))
    assert not (tmp_path / "f").exists()


def test_mixquant_ptq_on_torchvision_resnet18_from_a_state_dict(tmp_path):
    """The issue's command: mixquant, torchvision:resnet18, ImageFolder, --checkpoint, ptq."""
    from PIL import Image
    from torchvision import models

    root = tmp_path / "images"
    for split in ("train", "val"):
        for k, cls in enumerate(("dark", "light")):
            (root / split / cls).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (40, 40), (40 + 150 * k + i,) * 3).save(
                    root / split / cls / f"{i}.png")
    torch.manual_seed(0)
    torch.save(models.resnet18(weights=None).state_dict(), tmp_path / "r18.pt")
    space = SearchSpace("torchvision:resnet18", "imagefolder", data_root=str(root))
    budget = space.c_size(space.candidate(4)) / 8 * 0.8  # between all-2 and all-4 bits
    out = tmp_path / "mq"
    r = subprocess.run(
        [sys.executable, "-m", "qsearch.cli", "run", "--strategy", "mixquant", "--model",
         "torchvision:resnet18", "--dataset", "imagefolder", "--data-root", str(root),
         "--checkpoint", "r18.pt", "--trial-mode", "ptq",  # relative: trials run elsewhere
         "--budget", f"{budget:.0f}B", "--batch-size", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import pandas as pd

    df = pd.read_parquet(out / "results.parquet")
    assert list(df.task) == ["mixquant_ptq"] and (df.status == "ok").all()
    assert (df.c_size <= budget * 8).all() and (df.c_size >= 0.9 * budget * 8).all()
    spec = json.loads((out / "spec.json").read_text())
    assert spec["strategy_kwargs"] == {"checkpoint": str(tmp_path / "r18.pt"), "mode": "ptq"}
    assert space_from_spec(Spec.from_dict(spec)).family.fixed_width
