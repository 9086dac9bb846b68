import json
import math

import pytest

from qsearch import QSearchError
from qsearch.budget import Budget, parse_budget
from qsearch.candidate import Candidate
from qsearch.space import SearchSpace
from qsearch.spaces import list_families


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
