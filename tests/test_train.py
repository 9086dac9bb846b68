"""The trainer: paper schedule, determinism, exact resume, divergence, stop requests."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from qsearch import QSearchError
from qsearch.data import load_dataset
from qsearch.spaces import get_family
from qsearch.train import TrainConfig, evaluate, lr_at, set_threads, total_steps, train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: tiny models gain nothing from more, and oversubscribed threads on a busy
    machine (parallel test runs) slow torch down several-fold."""
    before = torch.get_num_threads()
    set_threads(1)
    yield
    set_threads(before)


@pytest.fixture(scope="module")
def splits():
    return load_dataset("synthetic")


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    fam = get_family("resnet20")
    return fam.build(fam.plan(0.25), in_channels=1, num_classes=4)


def short(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 24, "batch_size": 32, "eval_every_steps": 8, **kw})


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_warmup_then_cosine_schedule():
    cfg = TrainConfig(steps=100, warmup_fraction=0.1, lr=0.05)
    assert lr_at(0, 100, cfg) == pytest.approx(0.005)  # warm-up from 0: (t + 1) / W
    assert lr_at(4, 100, cfg) == pytest.approx(0.025)
    assert lr_at(9, 100, cfg) == pytest.approx(0.05)
    assert lr_at(10, 100, cfg) == pytest.approx(0.05)  # cosine starts at the peak
    assert lr_at(55, 100, cfg) == pytest.approx(0.025)  # halfway through the decay
    assert lr_at(99, 100, cfg) == pytest.approx(0.05 * (1 + math.cos(math.pi * 89 / 90)) / 2)
    lrs = [lr_at(t, 100, cfg) for t in range(10, 100)]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    no_warmup = TrainConfig(steps=10, warmup_fraction=0)
    assert lr_at(0, 10, no_warmup) == pytest.approx(0.05)


def test_schedule_is_what_the_optimizer_used(splits):
    seen = []
    cfg = short(steps=12, eval_every_steps=1, warmup_fraction=0.25)
    train(tiny_model(), splits, cfg, callback=lambda m, _: seen.append(m["lr"]))
    assert seen == pytest.approx([lr_at(t, 12, cfg) for t in range(12)])


def test_config_is_plain_json_and_validated():
    cfg = TrainConfig.recipe("imagenet", epochs=0.5, seed=3)
    assert (cfg.weight_decay, cfg.label_smoothing, cfg.batch_size) == (4e-5, 0.1, 256)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    small = TrainConfig.recipe("cifar10", epochs=300)
    assert (small.lr, small.momentum, small.nesterov, small.weight_decay, small.batch_size) == (
        0.05, 0.9, True, 5e-4, 128)
    with pytest.raises(QSearchError, match="exactly one of epochs or steps"):
        TrainConfig()
    with pytest.raises(QSearchError, match="exactly one"):
        TrainConfig(epochs=1, steps=10)
    with pytest.raises(QSearchError, match="momentum"):
        TrainConfig(steps=10, momentum=1.5)
    with pytest.raises(QSearchError, match="unknown training settings"):
        TrainConfig.from_dict({"steps": 10, "learning_rate": 0.1})
    with pytest.raises(TypeError):
        TrainConfig(1.0)  # keyword-only


def test_fractional_epochs():
    assert total_steps(TrainConfig(epochs=0.5, batch_size=100), 1800) == 9
    assert total_steps(TrainConfig(epochs=2, batch_size=128), 1800) == 28  # drops the last
    assert total_steps(TrainConfig(steps=7), 1800) == 7


def test_synthetic_is_learnable(splits):
    model = tiny_model()
    cfg = TrainConfig(steps=200, batch_size=64, eval_every_steps=100)
    result = train(model, splits, cfg)
    assert result.status == "ok" and result.steps == 200 and result.images_seen == 200 * 64
    assert result.val_acc > 0.8, result.history
    assert result.best_val_acc >= result.val_acc
    assert [h["step"] for h in result.history] == [100, 200]
    acc, loss = evaluate(model, splits.test)
    assert acc > 0.8 and loss < 1
    assert model.training  # evaluate restores the mode


def test_same_seed_same_weights(splits):
    a, b, c = tiny_model(), tiny_model(), tiny_model()
    ra = train(a, splits, short(seed=1))
    rb = train(b, splits, short(seed=1))
    train(c, splits, short(seed=2))
    assert same_weights(a, b) and ra.val_acc == rb.val_acc
    assert not same_weights(a, c)


def test_resume_from_state_matches_uninterrupted(splits):
    cfg = short(steps=30, eval_every_steps=10)  # 1800 / 32 = 56 steps per epoch
    full = tiny_model()
    r_full = train(full, splits, cfg)

    saved = {}

    def stop_at_20(metrics, state_fn):
        if metrics["step"] == 20:
            saved["state"] = state_fn()
            return True
        return None

    first = tiny_model()
    r_first = train(first, splits, cfg, callback=stop_at_20)
    assert r_first.status == "stopped" and r_first.steps == 20
    resumed = tiny_model(seed=99)  # the state, not the initial weights, decides
    r_resumed = train(resumed, splits, cfg, start_state=saved["state"])
    assert r_resumed.status == "ok" and r_resumed.steps == 30
    assert same_weights(full, resumed)
    assert [h["val_acc"] for h in r_resumed.history] == [h["val_acc"] for h in r_full.history]
    assert r_resumed.images_seen == r_full.images_seen


def test_resume_across_an_epoch_boundary(splits):
    cfg = short(steps=20, batch_size=128, eval_every_steps=5)  # 14 steps per epoch
    full = tiny_model()
    train(full, splits, cfg)
    saved = {}

    def stop(metrics, state_fn):
        if metrics["step"] == 15:
            saved["state"] = state_fn()
            return True
        return None

    train(tiny_model(), splits, cfg, callback=stop)
    resumed = tiny_model()
    train(resumed, splits, cfg, start_state=saved["state"])
    assert same_weights(full, resumed)


def test_resume_with_another_config_is_refused(splits):
    saved = {}
    train(tiny_model(), splits, short(), callback=lambda m, f: saved.setdefault("s", f()))
    with pytest.raises(QSearchError, match="different config"):
        train(tiny_model(), splits, short(lr=0.1), start_state=saved["s"])


def test_huge_lr_diverges(splits):
    result = train(tiny_model(), splits, short(lr=1e6, warmup_fraction=0, steps=50))
    assert result.status == "diverged"
    assert "step" in result.reason and ("nan" in result.reason or "inf" in result.reason)
    assert result.steps < 50


class NaNAfter(nn.Module):
    """Wraps a model; its output turns NaN from the ``k``-th training forward on."""

    def __init__(self, model: nn.Module, k: int):
        super().__init__()
        self.model, self.k, self.calls = model, k, 0

    def forward(self, x):
        out = self.model(x)
        if self.training:
            self.calls += 1
            if self.calls > self.k:
                out = out * float("nan")
        return out


def test_nan_loss_stops_at_once(splits):
    model = NaNAfter(tiny_model(), k=5)
    result = train(model, splits, short())
    assert result.status == "diverged"
    assert result.steps == 5 and "at step 5" in result.reason
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no garbage update


def test_callback_stop_request_is_honoured(splits):
    calls = []

    def stop_first(metrics, state_fn):
        calls.append(metrics)
        return True

    result = train(tiny_model(), splits, short(), callback=stop_first)
    assert result.status == "stopped" and result.steps == 8 and len(calls) == 1
    assert {"step", "epoch", "train_loss", "val_acc", "val_loss", "elapsed_s",
            "images_per_s"} <= calls[0].keys()
    assert result.val_acc == calls[0]["val_acc"]


def test_no_validation_split(splits):
    no_val = load_dataset("synthetic", val_fraction=0)
    result = train(tiny_model(), no_val, short(steps=4))
    assert result.status == "ok" and result.val_acc is None and result.best_val_acc is None


def test_set_threads():
    before = torch.get_num_threads()
    set_threads(1)
    assert torch.get_num_threads() == 1
    set_threads(before)
    with pytest.raises(QSearchError):
        set_threads(0)
