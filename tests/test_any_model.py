"""Your own model: torchvision builders and user factories get the layer inventory and the
exact cost model; fixed-width models are searched through their bits by every strategy, and a
factory taking a width is width-aligned like the zoo."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

from qsearch import QSearchError
from qsearch.budget import Budget, parse_budget
from qsearch.cli import main
from qsearch.space import SearchSpace
from qsearch.spaces import get_family
from qsearch.strategy import list_strategies

# torchvision models not in spaces/ (the zoo's resnet18 is our own build of the same layout)
TORCHVISION = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
               "shufflenet_v2_x0_5"]
SHAPES = {"cifar10": (3, 10, 32), "fashion-mnist": (1, 10, 28), "synthetic": (1, 4, 16)}


def independent_count(arch: str, dataset: str) -> list[tuple[int, int]]:
    """(weights, MACs) of every Conv2d/Linear in call order, from a real CPU forward."""
    in_channels, num_classes, size = SHAPES[dataset]
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes).eval()
    if in_channels != 3:  # the documented stem swap: same conv, in_channels inputs
        name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, nn.Conv2d(
            in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            bias=conv.bias is not None))
    found: dict[nn.Module, tuple[int, int]] = {}

    def hook(mod, inp, out):
        hw = out.shape[2] * out.shape[3] if isinstance(mod, nn.Conv2d) else 1
        found.setdefault(mod, (mod.weight.numel(), mod.weight.numel() * hw))

    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            mod.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, in_channels, size, size))
    return list(found.values())


@pytest.mark.parametrize("arch, dataset", [*[(a, "cifar10") for a in TORCHVISION],
                                           ("resnet18", "fashion-mnist"),
                                           ("mobilenet_v3_small", "synthetic")])
def test_cost_model_equals_an_independent_count(arch, dataset):
    counted = independent_count(arch, dataset)
    weights = [w for w, _ in counted]
    macs = [m for _, m in counted]
    free = SearchSpace(f"torchvision:{arch}", dataset, pin_bits=None, a_bits=4)
    assert [l.params for l in free.layers] == weights
    assert [l.macs for l in free.layers] == macs
    for bits in (1, 3, 8, 32):
        cand = free.candidate(bits)
        assert free.c_size(cand) == bits * sum(weights)
        assert free.bitops(cand) == bits * (macs[0] * 8 + 4 * sum(macs[1:]))
    pinned = SearchSpace(f"torchvision:{arch}", dataset, a_bits=3)  # first/last at 8 bit
    cand = pinned.candidate(2)
    assert pinned.c_size(cand) == 8 * (weights[0] + weights[-1]) + 2 * sum(weights[1:-1])
    assert pinned.bitops(cand) == (8 * 8 * macs[0] + 8 * 3 * macs[-1]
                                   + 2 * 3 * sum(macs[1:-1]))


def test_roles_of_a_torchvision_model():
    space = SearchSpace("torchvision:mobilenet_v3_small", "cifar10")
    roles = [l.role for l in space.layers]
    assert roles[0] == "stem" and roles[-2:] == ["fc", "fc"]
    assert roles.count("depthwise") == 11  # one per inverted residual block
    assert get_family("torchvision:mobilenet_v3_small").fixed_width
    assert space.plan(1.0) == {} and space.groups["depthwise"]


FACTORY = '''
import torch
import torch.nn as nn


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(s))))


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, t):
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        w = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        return self.proj(w @ v)


class Net(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
        self.se = SqueezeExcite(16)
        self.pw = nn.Conv2d(16, 32, 1, bias=False)
        self.mix = nn.Conv1d(32, 32, 3, padding=1)  # not quantized: stays float
        self.attn = Attention(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.pw(self.se(self.dw(torch.relu(self.bn(self.stem(x))))))
        t = self.mix(x.flatten(2)).transpose(1, 2)  # (N, tokens, 32)
        return self.fc(self.attn(t).mean(1))


def build(*, num_classes, in_channels):
    return Net(num_classes, in_channels)


def wrong_signature(num_classes):
    return Net(num_classes, 3)


def needs_depth(num_classes, in_channels, depth):
    return Net(num_classes, in_channels)


def flat_only(num_classes, in_channels):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 32 * 32, num_classes))


def no_layers(num_classes, in_channels):
    return nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU())


def not_a_model(num_classes, in_channels):
    return "resnet"


def raises(num_classes, in_channels):
    raise RuntimeError("cannot build today")


not_callable = 3
'''


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "mynet.py"
    path.write_text(FACTORY)
    return path


def test_user_factory_inventory_roles_counts_and_float_layers(factory):
    with pytest.warns(UserWarning, match=r"Conv1d x1 \(mix\)") as caught:
        space = SearchSpace(f"{factory}:build", "synthetic", pin_bits=None)
    assert len(caught) == 1
    assert [(l.name, l.role) for l in space.layers] == [
        ("stem", "stem"), ("dw", "depthwise"), ("se.reduce", "pointwise"),
        ("se.expand", "pointwise"), ("pw", "pointwise"), ("attn.qkv", "fc"),
        ("attn.proj", "fc"), ("fc", "fc")]
    tokens = 8 * 8  # 16x16 input, one stride-2 conv
    by_name = {l.name: l for l in space.layers}
    assert by_name["dw"].fan_in == 9 and by_name["dw"].macs == 16 * 9 * 64
    assert by_name["se.reduce"].macs == 16 * 4 and by_name["se.expand"].out_hw == (1, 1)
    assert by_name["attn.qkv"].macs == 32 * 96 * tokens and by_name["attn.qkv"].in_hw == (64, 1)
    assert by_name["fc"].macs == 32 * 4
    cand = space.candidate(4)
    assert space.c_size(cand) == 4 * sum(l.params for l in space.layers)
    model = space.build(cand)
    floats = sum(p.numel() for p in model.parameters()) - sum(l.params for l in space.layers)
    floats += 2 * 16  # BN running mean and variance
    assert space.packed_bytes(cand)["float_bytes"] == 4 * floats  # the Conv1d included


def test_factory_from_an_importable_module(factory, monkeypatch):
    package = factory.parent / "qs_user_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(factory.parent))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = SearchSpace("qs_user_pkg.nets:build", "cifar10")
    assert space.family.fixed_width and len(space.layers) == 8
    assert space.layers[0].cin == 3 and space.layers[-1].cout == 10


def test_module_called_twice_is_one_layer(tmp_path):
    path = tmp_path / "twice.py"
    path.write_text("import torch.nn as nn\n\nclass Twice(nn.Module):\n"
                    "    def __init__(self, num_classes, in_channels):\n"
                    "        super().__init__()\n"
                    "        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)\n"
                    "        self.fc = nn.Linear(in_channels, num_classes)\n"
                    "    def forward(self, x):\n"
                    "        return self.fc(self.conv(self.conv(x)).mean((2, 3)))\n")
    with pytest.warns(UserWarning, match=r"called more than once.*conv \(2 calls\)"):
        space = SearchSpace(f"{path}:Twice", "synthetic")
    assert [l.name for l in space.layers] == ["conv", "fc"]


def test_fixed_width_align_fits_or_names_the_bits(factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = SearchSpace(f"{factory}:build", "synthetic")
    cand = space.candidate(2)
    size = space.c_size(cand)
    aligned = space.align(cand, Budget("size", size))
    assert aligned.candidate == cand and aligned.candidate.width == 1.0 and aligned.ratio == 1
    with pytest.raises(QSearchError, match=r"above the budget .*through its bits") as e:
        space.align(cand, Budget("size", size - 1))
    assert "\n" not in str(e.value)
    with pytest.raises(QSearchError, match="leave the width at 1"):
        space.candidate(2, width=0.5)


ERRORS = [  # (model, text the one-line error must contain)
    ("torchvision:resnet19", "unknown torchvision model 'resnet19' (close names: resnet18"),
    ("torchvision:zzz", "e.g. resnet18, mobilenet_v3_small"),
    ("{dir}/missing.py:build", "factory file '{dir}/missing.py' not found"),
    ("{dir}/broken.py:build", "could not be imported (SyntaxError"),
    ("no_such_package_qs.models:build", "module 'no_such_package_qs.models' of model"),
    ("{dir}/mynet.py:nothere", "has no callable 'nothere'"),
    ("{dir}/mynet.py:not_callable", "has no callable 'not_callable'"),
    ("{dir}/mynet.py:wrong_signature", "does not accept in_channels (its signature is "
     "wrong_signature(num_classes))"),
    ("{dir}/mynet.py:needs_depth", "requires depth, which qsearch does not pass"),
    ("{dir}/mynet.py:flat_only", "fails on the dataset's input of shape (1, 1, 16, 16) "
     "(RuntimeError: "),
    ("torchvision:vit_b_16", "(AssertionError: Wrong image height! Expected 224 but got 16!)"),
    ("{dir}/mynet.py:no_layers", "has no Conv2d or Linear layer that its forward calls"),
    ("{dir}/mynet.py:not_a_model", "returned a str, not a torch.nn.Module"),
    ("{dir}/mynet.py:raises", "(RuntimeError: cannot build today): fix the factory"),
    ("{dir}/mynet.py:", "not understood: use a registered family, torchvision:NAME"),
    ("resnet21", "or any torchvision classifier as torchvision:NAME"),
]


@pytest.mark.parametrize("model, expected", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_are_one_line_with_the_fix(model, expected, factory):
    (factory.parent / "broken.py").write_text("def build(:\n")
    where = str(factory.parent)
    with pytest.raises(QSearchError) as e:
        SearchSpace(model.format(dir=where), "synthetic")
    assert expected.format(dir=where) in str(e.value)
    assert "\n" not in str(e.value)


def test_space_show_prints_the_table(capsys):
    argv = ["space", "show", "--model", "torchvision:resnet18", "--dataset", "cifar10"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("torchvision:resnet18 on cifar10: 21 quantizable layers, fixed width "
                      "(its own channels), activations 4 bit")
    assert out[3].split()[:4] == ["0", "conv1", "stem", "3"]
    assert out[-1].startswith("C_size 5.593MB (44746240 bits)")
    assert main([*argv, "--bits", "2", "--budget", "3MB"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == ("fits 3MB at fixed width: 93.46% of "
                                                        "the budget")


# ----- fixed-width search: every strategy meets the budget through the bits ---------------
def _fixed_width_search(strategy: str, space: SearchSpace, budget: Budget):
    """Drive ``strategy`` for up to 6 trials: ``train`` proposals scored by a deterministic
    function of the bits (more bits, higher), other tasks (MixQuant's float model,
    FracBits' one-shot run) really run. Returns the strategy and the (candidate, score)
    of every evaluated candidate."""
    from qsearch.strategy import FINISHED, Result, create_strategy
    from qsearch.tasks import TaskContext, get_task

    s = create_strategy(strategy, space, budget, seed=0)
    s.max_trials = 6
    scored = []
    for i in range(6):
        p = s.ask(str(i))
        if p is None or p == FINISHED:
            break
        if p.task == "train":
            r = Result("ok", sum(p.candidate.w_bits) / 100, p.candidate)
        else:
            ctx = TaskContext(space=space, proposal=p, budget=budget, data={}, seed=0,
                              device="cpu", report=lambda m, s=None: False,
                              train={"steps": 4, "batch_size": 16, "eval_every_steps": 4})
            r = get_task(p.task)(ctx)
        if r.candidate is not None:
            scored.append((r.candidate, r.val_acc))
        s.tell(str(i), r)
    return s, scored


def _closest_by_raises(space, cand, budget, levels) -> float:
    """By enumeration: the largest C_size within the budget among the candidates that keep
    or raise each free layer's bits of ``cand`` (to larger ``levels``)."""
    import itertools

    free = space.free_layers
    unit = {j: space.layers[j].params for j in free}  # C_size per bit of a layer
    base = space.c_size(cand) - sum(unit[j] * cand.w_bits[j] for j in free)
    options = [[b for b in {cand.w_bits[j], *levels} if b >= cand.w_bits[j]] for j in free]
    sums = (base + sum(unit[j] * b for j, b in zip(free, bits))
            for bits in itertools.product(*options))
    return max(c for c in sums if c <= budget.value)


def _one_step_up_fits(space, cand, budget, levels, groups=None) -> bool:
    """Whether one free layer (or one whole group) can take the next of ``levels`` and fit."""
    up = dict(zip(levels, levels[1:]))
    for idx in (groups or [[j] for j in space.free_layers]):
        bits = list(cand.w_bits)
        if all(bits[j] in up for j in idx):
            for j in idx:
                bits[j] = up[bits[j]]
            if space.c_size(space.candidate(bits)) <= budget.value:
                return True
    return False


def _closest_qem_allocation(s, space, budget) -> float:
    """The largest C_size below the budget among MixQuant's Eq. (1) allocations."""
    from strategies._qe import mixquant_bits, qem_breakpoints

    free = s.table[space.free_layers]
    costs = [space.c_size(space.candidate(mixquant_bits(free, q, choices=s.bits)))
             for q in qem_breakpoints(free, choices=s.bits)]
    return max(c for c in costs if c <= budget.value)


@pytest.mark.parametrize("strategy", list_strategies(search_only=True))
def test_every_strategy_fills_a_fixed_width_budget_through_its_bits(strategy, factory):
    """The issue's contract on a user factory with squeeze-excitation and depthwise
    blocks: every candidate fits at width 1 and comes as close to the budget as the
    strategy's own bit choices allow: the closest raise of its per-layer bits, the
    largest uniform or grid cell that fits, MixQuant's closest QEM allocation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = SearchSpace(f"{factory}:build", "synthetic")
    two, four = (space.c_size(space.candidate(b)) for b in (2, 4))
    budget = Budget("size", int(two + 0.6 * (four - two)))
    s, scored = _fixed_width_search(strategy, space, budget)
    assert scored
    for cand, _ in scored:
        assert cand.width == 1.0 and not cand.channels
        assert space.c_size(cand) <= budget.value
    final = max(scored, key=lambda cs: cs[1])[0]
    fill = space.c_size(final) / budget.value
    levels = {"haq": getattr(s, "levels", None), "fracbits": list(range(1, 9))}.get(
        strategy, list(space.bit_choices))
    if strategy == "uniform":  # the largest uniform bit-width that fits, nothing else
        assert [c.w_bits[1] for c, _ in scored] == [2] and s.dominated == [1]
        assert s.over_budget == [4, 8]
    elif strategy == "dualprecision":  # no group can take its next bit-width and fit
        groups = list(space.groups.values())
        for cand, _ in scored:
            assert not _one_step_up_fits(space, cand, budget, levels, groups)
        assert s.dominated
    elif strategy == "mixquant":  # the QEM bisection: the closest of its allocations
        assert space.c_size(final) == _closest_qem_allocation(s, space, budget)
    else:  # per-layer bits: as close to the budget as raising the chosen bits can come
        for cand, _ in scored:
            assert space.c_size(cand) == _closest_by_raises(space, cand, budget, levels)
        assert fill > 0.9, f"{strategy} fills {fill:.2%} of the budget"


def test_lowering_to_fit_is_haqs_rule_last_layers_first():
    space = SearchSpace("torchvision:resnet18", "synthetic")
    budget = parse_budget("3MB")
    cand = space.lower_to_fit(space.candidate(4), budget)
    assert space.c_size(cand) <= budget.value
    free = [cand.w_bits[i] for i in space.free_layers]
    assert free == sorted(free, reverse=True) and len(set(free)) > 1  # last layers first
    assert space.lower_to_fit(space.candidate(1), budget) == space.candidate(1)  # fits as is


def test_qsearch_run_searches_a_user_factory_through_its_bits(factory, tmp_path):
    """A relative factory path works in Ray's trial processes, which run elsewhere."""
    import subprocess
    import sys

    import pandas as pd

    out = tmp_path / "fw"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = SearchSpace(f"{factory}:build", "synthetic")
    budget = space.c_size(space.candidate(2)) / 8  # bytes: 2-bit fits, 4-bit does not
    r = subprocess.run(
        [sys.executable, "-m", "qsearch.cli", "run", "--model", f"{factory.name}:build",
         "--dataset", "synthetic", "--strategy", "random", "--budget", f"{budget:.0f}B",
         "--trials", "3", "--steps", "5", "--batch-size", "32", "--final-seeds", "1",
         "--out", str(out)], cwd=factory.parent, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "spec.json").read_text())["model"] == f"{factory}:build"
    df = pd.read_parquet(out / "results.parquet")
    assert (df.status == "ok").all() and set(df.stage) == {"search", "final"}
    assert (df.width == 1.0).all() and (df.c_size <= budget * 8).all()


# ----- width mode: a factory that takes `width` is aligned by its width, as the zoo --------
WIDTH_FACTORY = '''
import torch
import torch.nn as nn


def ch(c, width):
    return max(1, round(c * width))


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.reduce = nn.Conv2d(c, max(1, c // 4), 1)
        self.expand = nn.Conv2d(max(1, c // 4), c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(s))))


class Net(nn.Module):
    def __init__(self, num_classes, in_channels, width, extra=False):
        super().__init__()
        c1, c2, c3 = ch(16, width), ch(32, width), ch(64, width)
        self.stem = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c1)
        self.dw = nn.Conv2d(c1, c1, 3, stride=2, padding=1, groups=c1, bias=False)
        self.pw = nn.Conv2d(c1, c2, 1, bias=False)
        self.se = SqueezeExcite(c2)
        self.conv = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.extra = nn.Conv2d(c3, c3, 1) if extra else nn.Identity()
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x):
        x = self.pw(self.dw(torch.relu(self.bn(self.stem(x)))))
        x = self.extra(torch.relu(self.conv(self.se(x))))
        return self.fc(x.mean((2, 3)))


def build(*, num_classes, in_channels, width=1.0):
    return Net(num_classes, in_channels, width)


def shrinking(*, num_classes, in_channels, width):  # no default: qsearch always passes it
    return Net(num_classes, in_channels, 1 / width)


def grows_a_layer(*, num_classes, in_channels, width):
    return Net(num_classes, in_channels, width, extra=width > 1)
'''


@pytest.fixture
def width_factory(tmp_path):
    path = tmp_path / "widenet.py"
    path.write_text(WIDTH_FACTORY)
    return path


def weights_times_bits(path, cand, bits: dict[str, int]) -> float:
    """C_size counted on the factory's own model at the candidate's width."""
    import runpy

    in_channels, num_classes, _ = SHAPES["synthetic"]
    model = runpy.run_path(str(path))["build"](num_classes=num_classes,
                                                in_channels=in_channels, width=cand.width)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(layers) == set(bits)
    return sum(bits[n] * m.weight.numel() for n, m in layers.items())


def test_a_width_factory_is_aligned_by_its_width(width_factory):
    space = SearchSpace(f"{width_factory}:build", "synthetic")
    assert not space.family.fixed_width and space.family.user_width
    assert [l.role for l in space.layers] == ["stem", "depthwise", "pointwise", "pointwise",
                                              "pointwise", "conv", "fc"]
    assert space.layers[1].groups_key == "dw.groups" and space.top_up_limits(1.0) == {}
    ref = space.c_size(space.candidate(4))  # the 4-bit model at width 1
    mixed = [1, 2, 4, 8, 2]  # one per free layer (first and last pinned at 8)
    ratios = []
    for scale in (0.3, 1.0, 3.0):
        for bits in (1, 2, 8, mixed):
            aligned = space.align(space.candidate(bits), Budget("size", scale * ref))
            cand = aligned.candidate
            assert cand.width != 1.0 and not cand.channels
            size = space.c_size(cand)
            assert size == weights_times_bits(width_factory, cand, space.layer_bits(cand))
            assert size <= scale * ref and aligned.ratio == size / (scale * ref)
            ratios.append(aligned.ratio)
            built = space.build(cand)  # the factory's model at the solved width
            assert built.conv.out_channels == max(1, round(64 * cand.width))
    # no channel top-up, so small widths fill less than the zoo's ~99%: measured >= 0.975
    assert min(ratios) >= 0.95
    bitops = space.align(space.candidate(2), Budget("bitops", space.bitops(space.candidate(4))))
    assert 0.95 <= bitops.ratio <= 1.0 and bitops.candidate.width > 1


def test_a_width_factory_packed_size_follows_the_width(width_factory):
    space = SearchSpace(f"{width_factory}:build", "synthetic")
    cand = space.candidate(8, width=2.0)
    model = space.build(cand)
    weights = sum(l.params for l in space.layers)  # at width 1
    assert space.c_size(cand) == 8 * sum(m.weight.numel() for m in model.modules()
                                         if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert space.c_size(cand) > 8 * weights
    floats = sum(p.numel() for p in model.parameters()) - space.c_size(cand) // 8
    floats += 2 * model.bn.num_features  # BN running mean and variance
    assert space.packed_bytes(cand)["float_bytes"] == 4 * floats


def test_a_width_factory_whose_cost_shrinks_with_width_is_refused(width_factory):
    space = SearchSpace(f"{width_factory}:shrinking", "synthetic")
    assert space.family.user_width  # a width without a default is still a width argument
    with pytest.raises(QSearchError, match=r"shrinking': its C_size decreases as the width "
                       r"grows \(.* at width 0\.05, .* at width 0\.126\), so width alignment "
                       r"cannot solve it: make the factory's channel counts non-decreasing "
                       r"in width, or drop its width argument") as e:
        space.align(space.candidate(2), Budget("size", space.c_size(space.candidate(2))))
    assert "\n" not in str(e.value)
    other = SearchSpace(f"{width_factory}:grows_a_layer", "synthetic")
    with pytest.raises(QSearchError, match=r"builds other layers at width .* \(missing: -; "
                       r"new: extra\): keep the same Conv2d, Linear and BatchNorm layers"):
        other.align(other.candidate(2), Budget("size", 3 * other.c_size(other.candidate(2))))


def test_a_width_factory_at_its_own_width(width_factory):
    space = SearchSpace(f"{width_factory}:build", "synthetic", fixed_width=True)
    assert space.family.fixed_width and space.describe()["fixed_width"]
    cand = space.candidate(2)
    assert space.align(cand, Budget("size", space.c_size(cand))).candidate.width == 1.0
    assert space.build(cand).conv.out_channels == 64


def test_qsearch_run_searches_a_width_factory_by_its_width(width_factory, tmp_path):
    import subprocess
    import sys

    import pandas as pd

    out = tmp_path / "wf"
    space = SearchSpace(f"{width_factory}:build", "synthetic")
    budget = space.c_size(space.candidate(4)) / 8 / 2  # bytes: half the 4-bit 1x model
    r = subprocess.run(
        [sys.executable, "-m", "qsearch.cli", "run", "--model", f"{width_factory.name}:build",
         "--dataset", "synthetic", "--strategy", "random", "--budget", f"{budget:.0f}B",
         "--trials", "2", "--steps", "5", "--batch-size", "32", "--final-seeds", "1",
         "--out", str(out)], cwd=width_factory.parent, capture_output=True, text=True,
        timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "spec.json").read_text())["model"] == f"{width_factory}:build"
    df = pd.read_parquet(out / "results.parquet")
    assert (df.status == "ok").all() and set(df.stage) == {"search", "final"}
    assert (df.width != 1.0).all() and df.width.nunique() > 1
    assert (df.c_size <= budget * 8).all() and (df.c_size >= 0.95 * budget * 8).all()
