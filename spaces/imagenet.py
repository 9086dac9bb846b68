"""ImageNet-style families: ResNet-18/50, MobileNetV2 (One-Bitwidth Sec. 4.4) and MobileNetV1.

The ResNets and MobileNetV2 keep torchvision's module names, so at width 1 (with or without
``fixed_first``/``fixed_last``) a model has torchvision's conv and fc layers, and its
``state_dict`` matches ``torchvision.models`` key for key and shape for shape. torchvision's
own blocks compute channel counts (``planes * expansion``, ``inp * expand_ratio``), which
would lose the plan keys, so the blocks are re-declared here with every derived count read
from the plan.

Rounding: ResNets use ``round_channels``; MobileNets use ``make_divisible`` (torchvision).
The MobileNetV2 builder also serves the CIFAR variant in :mod:`qsearch.spaces.cifar`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
from torchvision.ops.misc import Conv2dNormActivation

from qsearch.spaces import Ch, make_divisible, register_family, round_channels, scaled_plan

# ----- ResNet (He et al. 2016; torchvision layout, ResNet v1.5: stride on the 3x3) ----------


def _downsample(cin: Ch, cout: Ch, stride: int) -> nn.Module | None:
    """Identity shortcut (None) where stride is 1 and input and output are one plan entry,
    else a 1x1 conv + BN projection.

    One plan entry has one channel count at every width and after every top-up (extra
    channels are added per key), so the identity is valid wherever it is chosen, and the
    block's layers are the same at every width: the single trace the cost model relies on.
    Two entries whose counts merely coincide at some width (a fixed 64-channel stem and
    ResNet-50's ``l1`` = 4 x 16 at 0.25x) keep the projection for that reason; the plans tie
    entries that must be equal (see ``resnet18_plan``), which gives torchvision's shortcuts
    at width 1.
    """
    if stride == 1 and cin.key == cout.key:
        if int(cin) != int(cout):  # a plan bug, not user input
            raise ValueError(f"plan entry {cin.key!r} has two channel counts: {cin}, {cout}")
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """torchvision ``BasicBlock`` with channels from the plan."""

    def __init__(self, cin: Ch, width: Ch, cout: Ch, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """torchvision ``Bottleneck`` (1x1, 3x3 with the stride, 1x1) with channels from the plan."""

    def __init__(self, cin: Ch, width: Ch, cout: Ch, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision ``ResNet`` body: 7x7/2 stem, 3x3/2 max-pool, layer1..4, GAP, fc."""

    def __init__(self, plan: dict[str, Ch], *, block: type[nn.Module], blocks: Sequence[int],
                 in_channels: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, plan["stem"], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(plan["stem"])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = plan["stem"]
        for i, n in enumerate(blocks, 1):
            cout = plan[f"l{i}"]
            width = plan.get(f"w{i}", cout)  # bottleneck width; a basic block has none
            layer = []
            for j in range(n):
                layer.append(block(cin, width, cout, 2 if i > 1 and j == 0 else 1))
                cin = cout
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_plan(width: float, *, fixed_first: bool = False, fixed_last: bool = False):
    """Stem 64, stages 64/128/256/512 (``l1..l4``). No dedicated final feature layer, so
    ``fixed_last`` changes nothing.

    layer1 adds its blocks' outputs to the stem's through identity shortcuts (torchvision has
    no 1x1 convolution there), so its output and the stem are one plan entry at every width.
    Unless ``fixed_first``, the stem follows ``l1``. With ``fixed_first`` (the ImageNet
    default) the stem keeps 64 channels, so does layer1's output, and the width multiplier
    scales layer1's inner width ``w1`` (conv1's output) and stages 2-4.
    """
    p = scaled_plan({"stem": 64, "l1": 64, "l2": 128, "l3": 256, "l4": 512}, width,
                    round_channels, {"stem"} if fixed_first else set())
    if fixed_first:
        p["w1"] = Ch(p["l1"], "w1")
        p["l1"] = p["stem"]
    else:
        p["stem"] = p["l1"]
    return p


def resnet50_plan(width: float, *, fixed_first: bool = False, fixed_last: bool = False):
    """Stem 64, bottleneck widths ``w1..w4`` = 64/128/256/512, stage outputs ``l1..l4`` =
    4 x the rounded bottleneck width (torchvision's ``planes * expansion``). No dedicated
    final feature layer, so ``fixed_last`` changes nothing. Unless ``fixed_first``, the stem
    shares ``w1`` (both 64 at 1x)."""
    p = scaled_plan({"stem": 64, "w1": 64, "w2": 128, "w3": 256, "w4": 512}, width,
                    round_channels, {"stem"} if fixed_first else set())
    if not fixed_first:
        p["stem"] = p["w1"]
    for i in range(1, 5):
        p[f"l{i}"] = Ch(4 * p[f"w{i}"], f"l{i}")
    return p


register_family(
    "resnet18", plan=resnet18_plan,
    build=partial(ResNet, block=BasicBlock, blocks=(2, 2, 2, 2)),
    description="ImageNet ResNet-18 (torchvision layout)", image_size=224,
)
register_family(
    "resnet50", plan=resnet50_plan,
    build=partial(ResNet, block=Bottleneck, blocks=(3, 4, 6, 3)),
    description="ImageNet ResNet-50 (torchvision layout; One-Bitwidth Sec. 4.4)", image_size=224,
)

# ----- MobileNetV2 (Sandler et al. 2018, Table 2; torchvision layout) ----------------------

MOBILENETV2_SETTING = (  # t (expansion), c (channels), n (blocks), s (stride of the first)
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """torchvision ``InvertedResidual``: [1x1 expand], 3x3 depthwise, 1x1 linear projection.

    The expansion conv exists iff ``hidden`` is not the input's own plan entry (t != 1); the
    residual is used iff ``stride == 1`` and input and output share a plan key.
    """

    def __init__(self, cin: Ch, hidden: Ch, cout: Ch, stride: int):
        super().__init__()
        self.stride = stride
        self.use_res_connect = stride == 1 and cin.key == cout.key
        layers: list[nn.Module] = []
        if hidden.key != cin.key:
            layers.append(Conv2dNormActivation(cin, hidden, 1, activation_layer=nn.ReLU6))
        layers += [
            Conv2dNormActivation(hidden, hidden, 3, stride, groups=hidden,
                                 activation_layer=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def mobilenetv2_plan(width: float, *, fixed_first: bool = False, fixed_last: bool = False):
    """Stem 32, groups ``g1..g7`` (Table 2 c), expansion ``{input key}x6`` = 6 x the rounded
    input channels (torchvision's ``round(inp * t)``), final 1x1 conv ``last`` =
    ``make_divisible(1280 * max(1, width))`` as in torchvision. ``fixed_first`` keeps the stem
    at 32, ``fixed_last`` keeps ``last`` at 1280."""
    p = {"stem": Ch(32 if fixed_first else make_divisible(32 * width), "stem")}
    cin = "stem"
    for i, (t, c, n, _) in enumerate(MOBILENETV2_SETTING, 1):
        out = f"g{i}"
        p[out] = Ch(make_divisible(c * width), out)
        inputs = (cin, out) if n > 1 else (cin,)  # the first block reads the previous group
        for key in inputs if t != 1 else ():
            p[f"{key}x{t}"] = Ch(t * p[key], f"{key}x{t}")
        cin = out
    p["last"] = Ch(1280 if fixed_last else make_divisible(1280 * max(1.0, width)), "last")
    return p


class MobileNetV2(nn.Module):
    """torchvision ``MobileNetV2``: ``features`` (stem, 17 blocks, 1x1 conv), GAP, ``classifier``
    (dropout, fc). ``strides`` gives each group's first-block stride (Table 2 column s)."""

    def __init__(self, plan: dict[str, Ch], *, strides: Sequence[int], stem_stride: int,
                 in_channels: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        features: list[nn.Module] = [
            Conv2dNormActivation(in_channels, plan["stem"], 3, stem_stride,
                                 activation_layer=nn.ReLU6)
        ]
        cin = plan["stem"]
        for i, ((t, _, n, _), s) in enumerate(zip(MOBILENETV2_SETTING, strides, strict=True), 1):
            for j in range(n):
                hidden = cin if t == 1 else plan[f"{cin.key}x{t}"]
                features.append(InvertedResidual(cin, hidden, plan[f"g{i}"], s if j == 0 else 1))
                cin = plan[f"g{i}"]
        features.append(Conv2dNormActivation(cin, plan["last"], 1, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(plan["last"], num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def build_mobilenetv2(plan, *, in_channels: int, num_classes: int) -> nn.Module:
    """ImageNet strides: stem 2, groups 1,2,2,2,1,2,1 (32x down-sampling)."""
    return MobileNetV2(plan, strides=[s for *_, s in MOBILENETV2_SETTING], stem_stride=2,
                       in_channels=in_channels, num_classes=num_classes)


register_family(
    "mobilenetv2", plan=mobilenetv2_plan, build=build_mobilenetv2, granularity=8,
    description="ImageNet MobileNetV2 (torchvision layout; One-Bitwidth Sec. 4.4)",
    image_size=224,
)

# ----- MobileNetV1 (Howard et al. 2017, Table 1; the FracBits ImageNet model) --------------

MOBILENETV1_BLOCKS = (  # (plan key of the pointwise output, stride of the depthwise conv)
    ("c1", 1), ("c2", 2), ("c2", 1), ("c3", 2), ("c3", 1), ("c4", 2),
    ("c4", 1), ("c4", 1), ("c4", 1), ("c4", 1), ("c4", 1), ("c5", 2), ("last", 1),
)


def mobilenetv1_plan(width: float, *, fixed_first: bool = False, fixed_last: bool = False):
    """Stem 32, pointwise outputs ``c1..c5`` = 64/128/256/512/1024 and ``last`` = 1024 (the
    13th block, whose output feeds the classifier). ``fixed_first`` keeps the stem at 32,
    ``fixed_last`` keeps ``last`` at 1024."""
    base = {"stem": 32, "c1": 64, "c2": 128, "c3": 256, "c4": 512, "c5": 1024, "last": 1024}
    fixed = {k for k, on in (("stem", fixed_first), ("last", fixed_last)) if on}
    return scaled_plan(base, width, make_divisible, fixed)


def build_mobilenetv1(plan, *, in_channels: int, num_classes: int) -> nn.Module:
    """3x3/2 stem, 13 x (3x3 depthwise + BN + ReLU, 1x1 pointwise + BN + ReLU), GAP, fc."""
    layers: list[nn.Module] = [Conv2dNormActivation(in_channels, plan["stem"], 3, 2)]
    cin = plan["stem"]
    for key, stride in MOBILENETV1_BLOCKS:
        cout = plan[key]
        layers.append(nn.Sequential(Conv2dNormActivation(cin, cin, 3, stride, groups=cin),
                                    Conv2dNormActivation(cin, cout, 1)))
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(cin, num_classes))


register_family(
    "mobilenetv1", plan=mobilenetv1_plan, build=build_mobilenetv1, granularity=8,
    description="ImageNet MobileNetV1 (Howard et al. 2017; FracBits)", image_size=224,
)
