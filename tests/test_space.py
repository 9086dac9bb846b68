import json
import math

import pytest

from qsearch import QSearchError
from qsearch.budget import Budget, parse_budget
from qsearch.candidate import Candidate
from qsearch.space import SearchSpace
from qsearch.spaces import get_family, list_families


def resnet_cifar_weights(n: int, c0: int, k: int, w: int = 16) -> int:
    """Closed form of conv+fc weights of CIFAR ResNet-(6n+2) with 1x1 projection shortcuts."""
    stem = w * c0 * 9
    s1 = 2 * n * w * w * 9
    s2 = 2 * w * w * 9 + (2 * n - 1) * (2 * w) ** 2 * 9 + 2 * w * w
    s3 = 8 * w * w * 9 + (2 * n - 1) * (4 * w) ** 2 * 9 + 8 * w * w
    return stem + s1 + s2 + s3 + 4 * w * k


@pytest.mark.parametrize("depth", [20, 26, 32, 38, 44, 50, 56])
@pytest.mark.parametrize("dataset, c0, k", [("fashion-mnist", 1, 10), ("cifar100", 3, 100)])
def test_c_size_closed_form_resnets(depth, dataset, c0, k):
    name = "resnet50-cifar" if depth == 50 else f"resnet{depth}"
    space = SearchSpace(name, dataset, pin_bits=None)
    n = (depth - 2) // 6
    assert space.c_size(space.candidate(1)) == resnet_cifar_weights(n, c0, k)
    assert space.c_size(space.candidate(32)) == 32 * resnet_cifar_weights(n, c0, k)
    # width 2 doubles every channel: the closed form at w=32
    assert space.c_size(space.candidate(1, width=2.0)) == resnet_cifar_weights(n, c0, k, 32)


def test_pinned_first_last_and_mixed_bits():
    space = SearchSpace("resnet20")
    cand = space.candidate(2)
    assert cand.w_bits[0] == 8 and cand.w_bits[-1] == 8
    params = [l.params for l in space.layers]
    expected = 8 * (params[0] + params[-1]) + 2 * sum(params[1:-1])
    assert space.c_size(cand) == expected
    per_free = space.candidate([1, 2, 4, 8] * 5)
    assert per_free.w_bits[1:5] == (1, 2, 4, 8)


def test_bitops_conventions():
    space = SearchSpace("resnet20", a_bits=4)
    cand = space.candidate(2)
    first, last = space.layers[0], space.layers[-1]
    bitops = first.macs * 8 * 8 + last.macs * 8 * 4
    bitops += sum(l.macs * 2 * 4 for l in space.layers[1:-1])
    assert space.bitops(cand) == bitops


def test_layer_inventory_roles_and_fan_in():
    space = SearchSpace("resnet20")
    roles = [l.role for l in space.layers]
    assert roles[0] == "stem" and roles[-1] == "fc"
    assert roles.count("pointwise") == 2  # the two projection shortcuts
    conv = space.layers[1]
    assert conv.fan_in == 16 * 9 and conv.out_hw == (28, 28)
    assert space.layers[-1].fan_in == 64
    assert space.groups == {"other": list(range(1, 21))}


@pytest.mark.parametrize("bits", [(8,) * 22, (8, 1, 2, 3, 4, 5, 6, 7, 32) + (4,) * 12 + (8,)])
@pytest.mark.parametrize("channels", [(), (("s2", 1), ("s3", 2))])
def test_candidate_json_round_trip(bits, channels):
    cand = Candidate(bits, 4, 0.123456789012345, channels)
    again = Candidate.from_json(cand.to_json())
    assert again == cand and again.to_json() == cand.to_json()
    assert json.loads(cand.to_json())["version"] == 1


def test_candidate_rejects_bad_bits():
    with pytest.raises(QSearchError, match="weight bits"):
        Candidate((8, 9, 8), 4, 1.0)
    with pytest.raises(QSearchError, match="width"):
        Candidate((8, 8), 4, -1.0)


ALIGN_CASES = [
    ("resnet20", "fashion-mnist", 1, "64KB"),
    ("resnet20", "fashion-mnist", 4, "64KB"),
    ("resnet20", "fashion-mnist", 2, "12MB"),
    ("resnet56", "cifar10", 1, "200KB"),
    ("resnet20", "fashion-mnist", 2, "2GBitOPs"),
    ("resnet56", "cifar10", 4, "5GBitOPs"),
]


@pytest.mark.parametrize("model, dataset, bits, budget", ALIGN_CASES)
def test_width_alignment_fills_budget(model, dataset, bits, budget):
    space = SearchSpace(model, dataset)
    b = parse_budget(budget)
    aligned = space.align(space.candidate(bits), b)
    assert aligned.cost <= b.value
    # maximal: the next width step exceeds the budget, and so does the next top-up step
    cand = aligned.candidate
    assert space.cost(cand.with_width(cand.width * (1 + 1e-5)), b.kind) > b.value
    for key in space._scalable_keys:
        more = dict(cand.channels)
        more[key] = more.get(key, 0) + 1
        grown = cand.with_width(cand.width, tuple(more.items()))
        assert space.cost(grown, b.kind) > b.value or more[key] > 0.25 * space.plan(
            cand.width)[key]
    assert aligned.ratio >= 0.99
    assert aligned.cost == space.cost(aligned.candidate, b.kind)
    again = space.align(space.candidate(bits), b)
    assert again.candidate == aligned.candidate  # deterministic


@pytest.mark.parametrize("model", [m for m in ("vgg11", "vgg11-c", "mobilenetv2-cifar",
                                               "inv-resnet26", "mobilenetv1")])
def test_width_alignment_other_families(model):
    if model not in list_families():
        pytest.skip(f"{model} not registered")
    space = SearchSpace(model, "cifar10")
    for budget in ("100KB", "1MB", "4MB"):
        aligned = space.align(space.candidate(2), parse_budget(budget))
        assert aligned.ratio <= 1.0
        wider = aligned.candidate.with_width(aligned.candidate.width * (1 + 1e-5))
        assert space.c_size(wider) > aligned.budget.value
        if budget != "100KB":  # small models: one channel step can exceed 1% of the budget
            assert aligned.ratio >= 0.99, (budget, aligned.ratio)


def test_topped_up_candidate_builds_the_model_the_cost_model_counts():
    import torch

    space = SearchSpace("resnet20")
    cand = space.align(space.candidate(4), parse_budget("16KB")).candidate
    assert cand.channels  # the top-up was needed here
    model = space.build(cand)
    weights = sum(m.weight.numel() for m in model.modules()
                  if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert weights == space.params(cand).sum()
    assert space.c_size(cand) == sum(b * n for b, n in zip(cand.w_bits, space.params(cand)))


def test_budget_below_smallest_model_names_the_minimum():
    space = SearchSpace("resnet20")
    with pytest.raises(QSearchError, match="below the smallest resnet20 model"):
        space.align(space.candidate(8), Budget("size", 100.0))


def test_memory_footprint_and_packed_estimate():
    space = SearchSpace("resnet20", a_bits=4)
    cand = space.candidate(4)
    # largest input: 16x28x28 at 4 bits (the 8-bit 1x28x28 image is smaller); same for output
    assert space.memory_footprint(cand) == 16 * 28 * 28 * 4 * 2 + space.c_size(cand)
    packed = space.packed_bytes(cand)
    assert abs(packed["code_bytes"] - space.c_size(cand) / 8) <= len(space.layers)
    bn_channels = 16 + 6 * 16 + 6 * 32 + 32 + 6 * 64 + 64  # every conv is followed by BN
    assert packed["float_bytes"] == 4 * (4 * bn_channels + 10)  # BN stats + fc bias


def test_dualprecision_table3_resnet50():
    """DualPrecision Table 3: ResNet-50 at 1x is 816.72e6 bits float and 204.18e6 bits 8-bit."""
    space = SearchSpace("resnet50", "imagenet", pin_bits=None)
    assert math.isclose(space.c_size(space.candidate(32)), 816.72e6, rel_tol=2e-3)
    assert math.isclose(space.c_size(space.candidate(8)), 204.18e6, rel_tol=2e-3)


def test_mobilenetv2_8bit_size_vs_paper():
    """Paper: 27.50e6 bits. Ours counts torchvision's MobileNetV2 exactly: 3,469,760 weights
    x 8 = 27.758e6 bits, 0.94% more (see docs/cost-model.md)."""
    space = SearchSpace("mobilenetv2", "imagenet")
    assert space.c_size(space.candidate(8)) == 8 * 3_469_760


# ----- the built model is the costed model; ImageNet defaults are torchvision's -----------
def weights_and_macs(model, in_channels: int, size: int) -> dict[str, tuple[tuple, int]]:
    """Conv2d/Linear name -> (weight shape, MACs), in forward order, by hooks on meta."""
    import torch
    import torch.nn as nn

    seen: dict[str, tuple[tuple, int]] = {}

    def hook(m, inp, out, name):
        pixels = out.shape[2] * out.shape[3] if out.dim() == 4 else 1
        seen.setdefault(name, (tuple(m.weight.shape), m.weight.numel() * pixels))

    hooks = [m.register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.empty(1, in_channels, size, size, device="meta"))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenetv2"])
def test_imagenet_defaults_are_torchvision(name):
    """Through the CLI defaults (fixed first/last channels for 224-pixel data), width 1 has
    exactly torchvision's conv and fc layers: names, weight shapes, weights and MACs."""
    import torch
    import torchvision

    space = SearchSpace(name, "imagenet")
    assert space.fixed_first and space.fixed_last
    with torch.device("meta"):
        reference = getattr(torchvision.models, name.replace("v2", "_v2"))(num_classes=1000)
        ours = space.build(1.0)
    theirs = weights_and_macs(reference, 3, 224)
    inventory = {l.name: ((l.cout, l.cin // l.groups, *l.kernel) if l.role != "fc"
                          else (l.cout, l.cin), l.macs) for l in space.layers}
    assert len(space.layers) == len(theirs) == {"resnet18": 21, "resnet50": 54,
                                                "mobilenetv2": 53}[name]
    assert inventory == theirs
    assert space.params(1.0).sum() == sum(math.prod(s) for s, _ in theirs.values())
    assert (space.params(1.0) * space._hw_out).sum() == sum(m for _, m in theirs.values())
    assert ({k: v.shape for k, v in ours.state_dict().items()}
            == {k: v.shape for k, v in reference.state_dict().items()})


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("model", list_families())
def test_costs_count_the_built_model_at_every_width(model, fixed):
    """One trace at width 1 costs every width and every topped-up candidate exactly: the
    built model has the inventory's layers, weights and MACs (shortcuts included)."""
    import torch

    dataset = "imagenet" if get_family(model).image_size >= 128 else "cifar10"
    space = SearchSpace(model, dataset, a_bits=1, pin_bits=None, fixed_first=fixed,
                        fixed_last=fixed)
    extra = tuple((k, space.family.granularity) for k in space._scalable_keys)
    for width in (0.25, 0.5, 1.0, 1.7):
        for channels in ((), extra):
            cand = space.candidate(1).with_width(width, channels)
            with torch.device("meta"):
                built = weights_and_macs(space.build(cand), space.info.in_channels,
                                         space.info.image_size)
            assert list(built) == [l.name for l in space.layers], (width, channels)
            weights = [math.prod(s) for s, _ in built.values()]
            macs = [m for _, m in built.values()]
            assert list(space.params(cand)) == weights, (width, channels)
            assert space.c_size(cand) == sum(weights)
            assert space.bitops(cand) == 8 * macs[0] + sum(macs[1:])  # 8-bit image in


# ----- FracBits' conventions through `qsearch space show` -----------------------------------
def show(capsys, *args: str) -> dict:
    """Run `qsearch space show ARGS`; the layer count, conventions line and raw costs."""
    from qsearch.cli import main

    assert main(["space", "show", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    total = lines[-1]
    return {"layers": int(lines[0].split(": ")[1].split()[0]), "conventions": lines[1],
            "rows": lines[3:-1], "c_size": float(total.split("(")[1].split(" bits")[0]),
            "bitops": float(total.split("BitOPs (")[1].split(")")[0])}


@pytest.mark.parametrize(("bits", "paper"), [(3, 22.83e9), (4, 34.70e9)])
def test_fracbits_resnet18_bitops_table3(capsys, bits, paper):
    """FracBits Table 3 (SAT/PACT rows): W3A3 22.83 G, W4A4 34.70 G BitOPs, first and last
    layer at 8 bit, the first reading the 8-bit image, the fc reading a_bits activations."""
    out = show(capsys, "--model", "resnet18", "--dataset", "imagenet", "--bits", str(bits),
               "--a-bits", str(bits))
    assert out["layers"] == 21
    assert math.isclose(out["bitops"], paper, rel_tol=1e-3), out["bitops"] / paper - 1


def test_space_show_conventions_change_the_numbers_as_documented(capsys):
    base_args = ("--model", "resnet18", "--dataset", "imagenet", "--bits", "4", "--a-bits", "4")
    space = SearchSpace("resnet18", "imagenet")
    first, fc = space.layers[0], space.layers[-1]
    base = show(capsys, *base_args)
    assert base["conventions"] == ("first/last layer bits: 8, first/last channels fixed: "
                                   "yes/yes, biases in C_size: no")
    # float first/last layer: 32 weight bits; the stem still reads the 8-bit image
    fp = show(capsys, *base_args, "--pin-bits", "32")
    assert fp["c_size"] - base["c_size"] == 24 * (first.params + fc.params)
    assert fp["bitops"] - base["bitops"] == 24 * (first.macs * 8 + fc.macs * 4)
    # free first/last layer: 4-bit weights like the others
    free = show(capsys, *base_args, "--pin-bits", "none")
    assert base["c_size"] - free["c_size"] == 4 * (first.params + fc.params)
    assert "first/last layer bits: free" in free["conventions"]
    # the fc bias (1000 values) at the fc's 8 bits
    bias = show(capsys, *base_args, "--count-bias")
    assert bias["c_size"] - base["c_size"] == 8 * 1000 and bias["bitops"] == base["bitops"]
    # --no-fixed-first scales MobileNetV2's stem with the width (16 channels at 0.5x)
    args = ("--model", "mobilenetv2", "--dataset", "imagenet", "--width", "0.5")
    stem = [show(capsys, *args, *flag)["rows"][0].split()[4]
            for flag in ((), ("--no-fixed-first",))]
    assert stem == ["32", "16"]


@pytest.mark.parametrize(("args", "message"), [
    (["--pin-bits", "9"], "pin bits '9' not understood"),
    (["--pin-bits", "eight"], "pin bits 'eight' not understood"),
    (["--fixed-first=yes"], "--fixed-first"),
])
def test_space_show_bad_conventions_one_line(capsys, args, message):
    from qsearch.cli import main

    assert main(["space", "show", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_search_space_rejects_bad_pin_bits():
    with pytest.raises(QSearchError, match="pin bits 9 not allowed"):
        SearchSpace("resnet20", pin_bits=9)
    assert SearchSpace("resnet20", count_bias=True).describe()["count_bias"] is True
    assert "count_bias" not in SearchSpace("resnet20").describe()  # unchanged by default
