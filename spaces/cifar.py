"""CIFAR-style families of the One-Bitwidth / DualPrecision papers (Appendix B/C).

ResNet-20..56 follow Table 4 of "One Weight Bitwidth to Rule Them All": a 3x3 stem with 16
channels, three stages of n basic blocks (16, 32, 64 channels; the first block of stages 2
and 3 has stride 2), global average pooling and one fully connected layer; depth = 6n + 2.
Shortcuts are identity when shape is kept and a 1x1 convolution + BN (option B) otherwise.

Inv-ResNet26 (Table 5), VGG11 and its DWSConv variants A/B/C (Table 6) and the CIFAR
MobileNetV2 (Appendix B text) follow below. None of these families has a dedicated final
feature layer except MobileNetV2, so ``fixed_last`` changes nothing for the others.
Every family ends in global average pooling, so 28x28 and 32x32 inputs both work.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from qsearch.spaces import Ch, register_family, round_channels, scaled_plan
from qsearch.spaces.imagenet import InvertedResidual, MobileNetV2, mobilenetv2_plan


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class BasicBlock(nn.Module):
    def __init__(self, cin: Ch, cout: Ch, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True), *conv_bn(cout, cout, 3)
        )
        same = stride == 1 and cin.key == cout.key
        self.shortcut = nn.Identity() if same else nn.Sequential(*conv_bn(cin, cout, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class Classifier(nn.Sequential):
    """Global average pooling, then the last (fully connected) layer."""

    def __init__(self, cin: int, num_classes: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def resnet_cifar_plan(width: float, *, fixed_first: bool = False, fixed_last: bool = False):
    p = scaled_plan({"stem": 16, "s1": 16, "s2": 32, "s3": 64}, width, round_channels,
                    {"stem"} if fixed_first else set())
    if not fixed_first:
        p["stem"] = p["s1"]  # same width: the first block keeps an identity shortcut
    return p


def build_resnet_cifar(plan, *, depth: int, in_channels: int, num_classes: int) -> nn.Module:
    n = (depth - 2) // 6
    layers: list[nn.Module] = [*conv_bn(in_channels, plan["stem"], 3), nn.ReLU(inplace=True)]
    cin = plan["stem"]
    for stage, key in enumerate(("s1", "s2", "s3")):
        for i in range(n):
            layers.append(BasicBlock(cin, plan[key], 2 if stage > 0 and i == 0 else 1))
            cin = plan[key]
    return nn.Sequential(*layers, Classifier(cin, num_classes))


for _depth in (20, 26, 32, 38, 44, 50, 56):
    register_family(
        f"resnet{_depth}" + ("-cifar" if _depth == 50 else ""),  # "resnet50" is ImageNet's
        plan=resnet_cifar_plan,
        build=partial(build_resnet_cifar, depth=_depth),
        description=f"CIFAR ResNet-{_depth} (One-Bitwidth Table 4)",
    )


# ----- Inv-ResNet26 (One-Bitwidth Table 5) -----------------------------------------------


def inv_resnet26_plan(width: float, *, fixed_first: bool = False, fixed_last: bool = False):
    """ResNet stages ``s1..s3`` (16/32/64) plus expansion ``s{i}x6`` = 6 x the rounded stage
    width: Table 5 expands every block of a stage to 6 x its *output* channels."""
    p = resnet_cifar_plan(width, fixed_first=fixed_first)
    for key in ("s1", "s2", "s3"):
        p[f"{key}x6"] = Ch(6 * p[key], f"{key}x6")
    return p


def build_inv_resnet26(plan, *, in_channels: int, num_classes: int) -> nn.Module:
    """ResNet-26's basic blocks replaced by inverted residual blocks, 4 per stage; the first
    block of stages 2 and 3 has a stride-2 depthwise conv. As in MobileNetV2, a block adds
    its input only when it keeps the shape (no projection shortcut)."""
    layers: list[nn.Module] = [*conv_bn(in_channels, plan["stem"], 3), nn.ReLU(inplace=True)]
    cin = plan["stem"]
    for stage, key in enumerate(("s1", "s2", "s3")):
        for i in range(4):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(InvertedResidual(cin, plan[f"{key}x6"], plan[key], stride))
            cin = plan[key]
    return nn.Sequential(*layers, Classifier(cin, num_classes))


register_family(
    "inv-resnet26", plan=inv_resnet26_plan, build=build_inv_resnet26,
    description="CIFAR Inv-ResNet26: ResNet-26 with inverted residual blocks (One-Bitwidth "
    "Table 5)",
)

# ----- VGG11 and variants A/B/C (One-Bitwidth Table 6) -----------------------------------

VGG11_LAYERS = ("stem", "M", "s2", "M", "s3", "s3", "M", "s4", "s4", "M", "s5", "s5", "M")
VGG11_DWS = {  # which of the 8 convolutions (1-based) are DWSConvs, per Table 6 column
    "vgg11": frozenset(),
    "vgg11-a": frozenset({2}),
    "vgg11-b": frozenset({2, 3, 4, 5}),
    "vgg11-c": frozenset(range(2, 9)),
}


def vgg11_plan(width: float, *, fixed_first: bool = False, fixed_last: bool = False):
    """First conv ``stem`` (64), then one key per pooling stage: ``s2..s5`` =
    128/256/512/512. ``fixed_first`` keeps the 64-channel first conv."""
    base = {"stem": 64, "s2": 128, "s3": 256, "s4": 512, "s5": 512}
    return scaled_plan(base, width, round_channels, {"stem"} if fixed_first else set())


def build_vgg11(plan, *, dws: frozenset[int], in_channels: int, num_classes: int) -> nn.Module:
    """Conv3x3 or DWSConv (1x1 conv, then 3x3 depthwise), each conv followed by BN + ReLU;
    2x2 max-pooling in ``ceil_mode``, so a 1x1 map passes unchanged (28x28 inputs reach 1x1
    after four pools); GAP + one fc."""
    layers: list[nn.Module] = []
    cin, conv = in_channels, 0
    for key in VGG11_LAYERS:
        if key == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            continue
        conv += 1
        cout = plan[key]
        if conv in dws:
            layers += [*conv_bn(cin, cout, 1), nn.ReLU(inplace=True),
                       *conv_bn(cout, cout, 3, groups=cout), nn.ReLU(inplace=True)]
        else:
            layers += [*conv_bn(cin, cout, 3), nn.ReLU(inplace=True)]
        cin = cout
    return nn.Sequential(*layers, Classifier(cin, num_classes))


for _name, _dws in VGG11_DWS.items():
    _variant = f" variant {_name[-1].upper()}, DWSConv for {len(_dws)} of 8 convs" if _dws else ""
    register_family(
        _name, plan=vgg11_plan, build=partial(build_vgg11, dws=_dws),
        description=f"CIFAR VGG11{_variant} (One-Bitwidth Table 6)",
    )

# ----- MobileNetV2 for CIFAR (One-Bitwidth Appendix B) -----------------------------------


def build_mobilenetv2_cifar(plan, *, in_channels: int, num_classes: int) -> nn.Module:
    """MobileNetV2 with every bottleneck group at stride 1 except the fifth (96 channels),
    which has stride 2. The stem keeps its stride 2, so the image is down-sampled twice in
    total (32 -> 16 -> 8), ending at 8x8 like the CIFAR ResNets (Appendix B). Plan, rounding
    (``make_divisible``) and layout are the ImageNet model's (:func:`mobilenetv2_plan`)."""
    return MobileNetV2(plan, strides=(1, 1, 1, 1, 2, 1, 1), stem_stride=2,
                       in_channels=in_channels, num_classes=num_classes)


register_family(
    "mobilenetv2-cifar", plan=mobilenetv2_plan, build=build_mobilenetv2_cifar, granularity=8,
    description="CIFAR MobileNetV2: strides moved so the image is down-sampled twice "
    "(One-Bitwidth Appendix B)",
)
