"""The trainer: paper schedule, determinism, exact resume, divergence, stop requests."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from qsearch import QSearchError
from qsearch.data import load_dataset
from qsearch.spaces import get_family
from qsearch.train import (
    TrainConfig,
    TrainHooks,
    evaluate,
    lr_at,
    set_threads,
    total_steps,
    train,
)


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
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
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
            "images_per_s", "total_steps"} <= calls[0].keys()
    assert calls[0]["total_steps"] == 24
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


# ----- hooks ----------------------------------------------------------------------------------
def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 4))


class L2Term(TrainHooks):
    """Weight decay written as an extra loss term: (wd / 2) x sum of squared weights."""

    def __init__(self, wd: float):
        self.wd = wd

    def loss(self, model, x, y, criterion, step):
        l2 = sum((p * p).sum() for p in model.parameters())
        return criterion(model(x), y), {"l2": 0.5 * self.wd * l2}


def test_extra_loss_term_reaches_the_gradients(splits):
    """Its gradient is SGD's weight decay: the same run as the config's weight_decay."""
    by_term, by_config, plain = linear_model(), linear_model(), linear_model()
    r_term = train(by_term, splits, short(weight_decay=0.0), hooks=L2Term(0.05))
    r_config = train(by_config, splits, short(weight_decay=0.05))
    train(plain, splits, short(weight_decay=0.0))
    for a, b in zip(by_term.parameters(), by_config.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not same_weights(by_term, plain)
    for h_term, h_config in zip(r_term.history, r_config.history, strict=True):
        assert h_term["l2"] > 0  # logged, averaged over the window
        assert h_term["train_loss"] == pytest.approx(h_config["train_loss"], rel=1e-4)


def head_of(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


class FrozenHead(TrainHooks):
    """The classifier in its own group: no learning rate, another weight decay."""

    def param_groups(self, model):
        return [{"params": head_of(model).parameters(), "lr_scale": 0.0, "weight_decay": 0.0}]


def test_param_groups_get_their_own_settings(splits):
    model = tiny_model()
    head = [p.detach().clone() for p in head_of(model).parameters()]
    rest = [p.detach().clone() for p in model.parameters()][: -len(head)]
    states = []
    cfg = short(weight_decay=1e-3)
    train(model, splits, cfg, hooks=FrozenHead(), callback=lambda m, f: states.append(f()))
    assert all(torch.equal(p, q) for p, q in zip(head_of(model).parameters(), head, strict=True))
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), rest, strict=False))
    groups = states[-1]["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [1e-3, 0.0]
    assert [len(g["params"]) for g in groups] == [len(rest), len(head)]
    assert groups[0]["lr"] == pytest.approx(lr_at(cfg.steps - 1, cfg.steps, cfg))
    assert groups[1]["lr"] == 0.0


class StopAt(TrainHooks):
    def __init__(self, at: int):
        self.at, self.seen = at, []

    def after_step(self, step, model):
        self.seen.append(step)
        return step == self.at


def test_after_step_can_stop_the_run(splits):
    hooks, calls = StopAt(5), []
    result = train(tiny_model(), splits, short(), hooks=hooks,
                   callback=lambda m, f: calls.append(m["step"]))
    assert result.status == "stopped" and result.steps == 5 and "step 5" in result.reason
    assert hooks.seen == [1, 2, 3, 4, 5]
    assert calls == [5] and [h["step"] for h in result.history] == [5]  # evaluated at the stop
    assert result.val_acc == result.history[-1]["val_acc"]


class WeightNorm(TrainHooks):
    """Adds the weight norm to each evaluation and replaces val_acc by a made-up score."""

    def evaluate(self, model, splits, metrics, *, batch_size, device):
        out = super().evaluate(model, splits, metrics, batch_size=batch_size, device=device)
        norm = float(sum((p.detach() ** 2).sum() for p in model.parameters())) ** 0.5
        return {**out, "weight_norm": norm, "real_acc": out["val_acc"],
                "val_acc": 1 - metrics["step"] / 100}


def test_custom_evaluation_metrics_land_in_the_history(splits):
    seen = []
    result = train(tiny_model(), splits, short(), hooks=WeightNorm(),
                   callback=lambda m, f: seen.append(m))
    assert [h["step"] for h in result.history] == [8, 16, 24]
    assert all(h["weight_norm"] > 0 and 0 <= h["real_acc"] <= 1 for h in result.history)
    assert [h["val_acc"] for h in result.history] == pytest.approx([0.92, 0.84, 0.76])
    assert result.best_val_acc == pytest.approx(0.92)  # best tracks the hook's val_acc
    assert [m.pop("total_steps") for m in seen] == [24] * 3  # for the progress display
    assert seen == result.history


class LossEMA(TrainHooks):
    """Stateful: weights each step's loss by a running mean of past losses, so a run only
    continues exactly if this state is restored."""

    def __init__(self, restore: bool = True):
        self.ema, self.restore = 1.0, restore

    def loss(self, model, x, y, criterion, step):
        ce = criterion(model(x), y)
        self.ema = 0.7 * self.ema + 0.3 * float(ce.detach())
        return ce, {"scaled": (self.ema - 1) * ce}

    def state_dict(self):
        return {"ema": self.ema}

    def load_state_dict(self, state):
        if self.restore:
            self.ema = state["ema"]


def test_hook_state_resumes_exactly(splits):
    cfg = short(steps=20, eval_every_steps=5)
    full, hooks_full = tiny_model(), LossEMA()
    train(full, splits, cfg, hooks=hooks_full)
    saved = {}

    def stop(metrics, state_fn):
        if metrics["step"] == 10:
            saved["state"] = state_fn()
            return True
        return None

    train(tiny_model(), splits, cfg, hooks=LossEMA(), callback=stop)
    assert saved["state"]["hooks"]["ema"] != 1.0
    resumed, hooks_resumed = tiny_model(), LossEMA()
    train(resumed, splits, cfg, hooks=hooks_resumed, start_state=saved["state"])
    assert same_weights(full, resumed) and hooks_resumed.ema == hooks_full.ema
    forgetful = tiny_model()  # the same run without the hook's state goes elsewhere
    train(forgetful, splits, cfg, hooks=LossEMA(restore=False), start_state=saved["state"])
    assert not same_weights(full, forgetful)


class HalfBatches(TrainHooks):
    """Two forward/backward passes per step (as the sandwich rule does), one per half batch,
    each weighted 1/2: for a model without BatchNorm the gradient of the whole batch."""

    def forward_backward(self, model, x, y, criterion, step):
        losses = []
        for xs, ys in ((x[: len(x) // 2], y[: len(y) // 2]), (x[len(x) // 2:], y[len(y) // 2:])):
            loss = criterion(model(xs), ys)
            (0.5 * loss).backward()
            losses.append(loss.detach())
        return 0.5 * (losses[0] + losses[1]), {}


def test_several_backward_passes_per_step(splits):
    one, two = linear_model(), linear_model()
    r_one = train(one, splits, short())
    r_two = train(two, splits, short(), hooks=HalfBatches())
    for a, b in zip(one.parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert [h["train_loss"] for h in r_two.history] == pytest.approx(
        [h["train_loss"] for h in r_one.history], rel=1e-5)


def test_resuming_a_foreign_state_is_refused(splits):
    with pytest.raises(QSearchError, match="cannot resume: not a training state"):
        train(tiny_model(), splits, short(), start_state={"version": 1, "step": 3})
