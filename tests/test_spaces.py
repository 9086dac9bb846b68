"""Contract tests for every registered model family (spaces/__init__.py), on the meta device."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from qsearch.spaces import Ch, Family, get_family, list_families

WIDTHS = (0.5, 1.0, 1.7)
FAMILIES = list_families()
FLAGS = [(False, False), (True, True)]  # (fixed_first, fixed_last)


def inputs(family: Family) -> list[tuple[int, int]]:
    """(in_channels, image size) pairs: CIFAR families also take 28x28 Fashion-MNIST."""
    return [(3, 32), (1, 28)] if family.image_size == 32 else [(3, 64)]


def build(name: str, width: float, *, in_channels: int = 3, num_classes: int = 10,
          fixed: tuple[bool, bool] = (False, False)) -> nn.Module:
    family = get_family(name)
    plan = family.plan(width, fixed_first=fixed[0], fixed_last=fixed[1])
    with torch.device("meta"):
        return family.build(plan, in_channels=in_channels, num_classes=num_classes)


def weighted(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def weight_count(model: nn.Module) -> int:
    """Conv + fc weights (no biases, no BN): the parameters the papers' C_size counts."""
    return sum(m.weight.numel() for m in weighted(model).values())


def layer_shapes(model: nn.Module) -> dict[str, tuple]:
    """Module name -> (Cin, Cout, groups, kernel) as recorded, Ch objects kept."""
    out = {}
    for name, m in weighted(model).items():
        if isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features, 1, 1)
        else:
            out[name] = (m.in_channels, m.out_channels, m.groups,
                         m.kernel_size[0] * m.kernel_size[1])
    return out


def evaluate(value: int, plan: dict[str, Ch]) -> int:
    """A channel argument recorded at width 1, re-evaluated at another plan via its key."""
    return plan[value.key] if isinstance(value, Ch) else value


@pytest.mark.parametrize("name", FAMILIES)
def test_plan_is_pure_and_keyed(name):
    family = get_family(name)
    for fixed in FLAGS:
        keys = None
        for w in (*WIDTHS, 0.25, 3.0):
            plan = family.plan(w, fixed_first=fixed[0], fixed_last=fixed[1])
            # an entry may share another's Ch (a stem with its first stage), never a stale one
            assert all(isinstance(v, Ch) and plan[v.key] is v and v >= 1 for v in plan.values())
            keys = keys or set(plan)
            assert set(plan) == keys, "plan keys (hence topology) must not depend on width"


@pytest.mark.parametrize("name", FAMILIES)
def test_builds_runs_and_uses_plan_channels(name):
    family = get_family(name)
    for in_channels, size in inputs(family):
        for w in WIDTHS:
            model = build(name, w, in_channels=in_channels, num_classes=7)
            with torch.no_grad():
                y = model(torch.empty(2, in_channels, size, size, device="meta"))
            assert y.shape == (2, 7)
            shapes = layer_shapes(model)
            first, *_, last = shapes
            for layer, (cin, cout, groups, _) in shapes.items():
                assert isinstance(cin, Ch) or (layer == first and cin == in_channels), layer
                assert isinstance(cout, Ch) or (layer == last and cout == 7), layer
                assert isinstance(groups, Ch) or groups == 1, layer
                if isinstance(groups, Ch):
                    assert groups.key == cin.key == cout.key, f"{layer}: depthwise only"
            assert isinstance(shapes[last][0], Ch) and shapes[last][1] == 7


@pytest.mark.parametrize("fixed", FLAGS)
@pytest.mark.parametrize("name", FAMILIES)
def test_plan_predicts_every_width(name, fixed):
    """The cost model's premise: one trace at width 1 + plan(w) gives every layer's shape."""
    family = get_family(name)
    ref = build(name, 1.0, fixed=fixed)
    traced = layer_shapes(ref)
    for w in WIDTHS:
        model = build(name, w, fixed=fixed)
        actual = layer_shapes(model)
        assert list(actual) == list(traced), "topology must not depend on width"
        plan = family.plan(w, fixed_first=fixed[0], fixed_last=fixed[1])
        predicted = 0
        for layer, (cin, cout, groups, k) in traced.items():
            shape = tuple(evaluate(v, plan) for v in (cin, cout, groups)) + (k,)
            assert shape == tuple(int(v) for v in actual[layer]), layer
            predicted += shape[1] * shape[0] // shape[2] * k
        assert predicted == weight_count(model)


def test_stem_shares_next_stage_unless_fixed():
    plan = get_family("resnet20").plan(0.5)
    assert plan["stem"] is plan["s1"]
    plan = get_family("resnet20").plan(0.5, fixed_first=True)
    assert (plan["stem"], plan["s1"]) == (16, 8)


@pytest.mark.parametrize("name", ["mobilenetv2", "mobilenetv2-cifar", "mobilenetv1"])
def test_fixed_first_and_last_keep_mobilenet_ends(name):
    plan = get_family(name).plan(0.5, fixed_first=True, fixed_last=True)
    last = 1024 if name == "mobilenetv1" else 1280
    assert (plan["stem"], plan["last"]) == (32, last)
    free = get_family(name).plan(0.5)
    assert (free["stem"], free["last"]) == (16, 512 if name == "mobilenetv1" else 1280)
    assert all(v % 8 == 0 for v in get_family(name).plan(1.7).values())


def test_resnet20_weight_count():
    # stem 432 + stage 1 13,824 + stage 2 51,200 + stage 3 204,800 + fc 640 (He et al.: 0.27M)
    assert weight_count(build("resnet20", 1.0)) == 270_896


@pytest.mark.parametrize("fixed", FLAGS)
@pytest.mark.parametrize(("name", "reference"), [
    ("resnet18", torchvision.models.resnet18),
    ("resnet50", torchvision.models.resnet50),
    ("mobilenetv2", torchvision.models.mobilenet_v2),
])
def test_matches_torchvision_at_width_one(name, reference, fixed):
    ours = build(name, 1.0, num_classes=1000, fixed=fixed)
    with torch.device("meta"):
        theirs = reference(num_classes=1000)
    assert weight_count(ours) == weight_count(theirs)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("fixed_first", [False, True])
def test_resnet18_layer1_keeps_identity_shortcuts(fixed_first):
    """layer1 adds to the stem's output, so the two are one plan entry at every width; with
    ``fixed_first`` the stem and layer1's output stay at 64 and layer1's inner width scales."""
    for w in (0.25, 0.5, 1.0, 1.7):
        plan = get_family("resnet18").plan(w, fixed_first=fixed_first)
        assert plan["l1"] is plan["stem"]
        assert plan["stem"] == (64 if fixed_first else round(64 * w))
        if fixed_first:
            assert plan["w1"] == round(64 * w)
        names = weighted(build("resnet18", w, fixed=(fixed_first, False)))
        assert not [n for n in names if n.startswith("layer1.") and "downsample" in n]
        assert len(names) == 21


def test_shortcut_projection_follows_keys_not_coincident_counts():
    """ResNet-50 with a fixed 64-channel stem at 0.25x: layer1's output is 4 x 16 = 64 too, but
    a different plan entry, so layer1.0 keeps its projection (the same layers at every width)."""
    plan = get_family("resnet50").plan(0.25, fixed_first=True)
    assert int(plan["stem"]) == int(plan["l1"]) == 64
    assert "layer1.0.downsample.0" in weighted(build("resnet50", 0.25, fixed=(True, True)))


def test_torchvision_mobilenetv2_widths():
    for w in (0.5, 0.75, 1.4):
        ours = build("mobilenetv2", w, num_classes=1000)
        with torch.device("meta"):
            theirs = torchvision.models.mobilenet_v2(num_classes=1000, width_mult=w)
        assert weight_count(ours) == weight_count(theirs)


def final_map(model: nn.Module, in_channels: int, size: int) -> tuple[int, int]:
    """Spatial size of the features that enter global average pooling."""
    with torch.no_grad():
        y = model.features(torch.empty(1, in_channels, size, size, device="meta"))
    return tuple(y.shape[2:])


def test_mobilenetv2_cifar_downsamples_twice():
    model = build("mobilenetv2-cifar", 1.0)
    strided = [n for n, m in weighted(model).items()
               if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert strided == ["features.0.0", "features.11.conv.1.0"]  # stem, first 96-channel block
    assert final_map(model, 3, 32) == (8, 8)
    assert final_map(build("mobilenetv2-cifar", 1.0, in_channels=1), 1, 28) == (7, 7)
    assert final_map(build("mobilenetv2", 1.0), 3, 224) == (7, 7)


def test_vgg_variants_follow_table_6():
    depthwise = {name: sum(isinstance(m, nn.Conv2d) and m.groups > 1
                           for m in build(name, 1.0).modules())
                 for name in ("vgg11", "vgg11-a", "vgg11-b", "vgg11-c")}
    assert depthwise == {"vgg11": 0, "vgg11-a": 1, "vgg11-b": 4, "vgg11-c": 7}
