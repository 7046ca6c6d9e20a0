"""The ResNets of MXNet Gluon's model zoo (`mxnet.gluon.model_zoo.vision.resnet*_v1` / `_v2`, MXNet 1.9.1).

Each entry computes exactly the function of the Gluon zoo model of the same name, which differs
from torchvision's ResNets in ways that change the outputs:

| variant | block | where Gluon differs from torchvision |
|---------|-------|--------------------------------------|
| `gluon_resnet18_v1`, `gluon_resnet34_v1` | `BasicBlockV1` | nowhere: the same function as torchvision's resnet18/34 |
| `gluon_resnet50_v1` ... `152_v1` | `BottleneckV1` | stride on the *first* 1x1 conv (ResNet v1, not v1.5); both 1x1 convs of the bottleneck have a bias |
| `gluon_resnet18_v2`, `gluon_resnet34_v2` | `BasicBlockV2` | pre-activation; a BatchNorm with no scale or shift on the *input* image |
| `gluon_resnet50_v2` ... `152_v2` | `BottleneckV2` | as above; stride on the 3x3 conv; no conv bias |

v2 (He et al. 2016b, "Identity Mappings") normalises the raw input with `BatchNorm(scale=False,
center=False)` (`data_bn`: its weight is 1 and its bias 0, which `to_gluon` checks), keeps the v1
stem (conv 7x7/2, BN, ReLU, max-pool 3x3/2), uses pre-activation blocks whose projection shortcut
(a 1x1 conv, no BN) reads the pre-activated input, and ends with BN + ReLU (`final_bn`,
`final_relu`) before the pool. Every BatchNorm has Gluon's defaults: eps 1e-5, Gluon momentum 0.9
(the spec's 0.1). `thumbnail=True` is the zoo's CIFAR-sized stem: one conv 3x3/1 with no BN,
ReLU or pool after it (v1 and v2 alike).

Node names are torchvision's where the two agree (`conv1`, `bn1`, `layer2.0.conv1`,
`layer2.0.downsample.0`, `fc`); `multires.interchange.gluon` holds the table from Gluon's own
parameter paths (`features.4.0.body.0.weight`) to these names.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from multires.errors import SpecError
from multires.graph import Graph
from multires.zoo import register
from multires.zoo.blocks import Block, residual_block
from multires.zoo.builder import GraphBuilder, join

__all__ = ["gluon_bottleneck_v1", "gluon_bottleneck_v2", "gluon_basic_block_v2", "gluon_resnet"]

DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
"""Depth -> (block kind, blocks per stage), Gluon's `resnet_spec`."""

EXPANSION = 4
"""Output channels of a bottleneck block per inner channel (Gluon's `channels // 4`)."""


def gluon_bottleneck_v1(b: GraphBuilder, prefix: str, x: str, planes: int, stride: int = 1) -> str:
    """Gluon's `BottleneckV1`: conv1x1(stride, bias)-BN-ReLU, conv3x3-BN-ReLU, conv1x1(bias)-BN,
    plus the shortcut (identity, or conv1x1(stride, no bias) + BN), then ReLU.

    Unlike torchvision's v1.5 `bottleneck_block`, the stride sits on the first 1x1 conv, and the
    two 1x1 convs have a bias (Gluon's `Conv2D` default); the 3x3 and the shortcut conv have none.
    """
    out_channels = planes * EXPANSION
    y = b.conv(join(prefix, "conv1"), x, planes, 1, stride=stride, bias=True)
    y = b.relu(join(prefix, "relu1"), b.bn(join(prefix, "bn1"), y))
    y = b.conv(join(prefix, "conv2"), y, planes, 3, padding=1)
    y = b.relu(join(prefix, "relu2"), b.bn(join(prefix, "bn2"), y))
    y = b.bn(join(prefix, "bn3"), b.conv(join(prefix, "conv3"), y, out_channels, 1, bias=True))
    shortcut = x
    if stride != 1 or b.channels(x) != out_channels:
        shortcut = b.conv(join(prefix, "downsample.0"), x, out_channels, 1, stride=stride)
        shortcut = b.bn(join(prefix, "downsample.1"), shortcut)
    return b.relu(join(prefix, "relu3"), b.add(join(prefix, "add"), y, shortcut))


def _preact(b: GraphBuilder, prefix: str, index: int, x: str) -> str:
    return b.relu(join(prefix, f"relu{index}"), b.bn(join(prefix, f"bn{index}"), x))


def _preact_shortcut(b: GraphBuilder, prefix: str, x: str, pre: str, out_channels: int, stride: int) -> str:
    """`x`, or Gluon's `downsample` (a 1x1 conv, no BN, no bias) of the pre-activated input `pre`."""
    if stride == 1 and b.channels(x) == out_channels:
        return x
    return b.conv(join(prefix, "downsample"), pre, out_channels, 1, stride=stride)


def gluon_basic_block_v2(b: GraphBuilder, prefix: str, x: str, channels: int, stride: int = 1) -> str:
    """Gluon's `BasicBlockV2`: BN-ReLU-conv3x3(stride), BN-ReLU-conv3x3, plus the shortcut; no ReLU
    after the sum. Gluon's attribute names (`bn1`, `conv1`, `bn2`, `conv2`, `downsample`)."""
    pre = _preact(b, prefix, 1, x)
    shortcut = _preact_shortcut(b, prefix, x, pre, channels, stride)
    y = b.conv(join(prefix, "conv1"), pre, channels, 3, stride=stride, padding=1)
    y = b.conv(join(prefix, "conv2"), _preact(b, prefix, 2, y), channels, 3, padding=1)
    return b.add(join(prefix, "add"), y, shortcut)


def gluon_bottleneck_v2(b: GraphBuilder, prefix: str, x: str, planes: int, stride: int = 1) -> str:
    """Gluon's `BottleneckV2`: BN-ReLU-conv1x1, BN-ReLU-conv3x3(stride), BN-ReLU-conv1x1 to
    `planes * 4`, plus the shortcut of `gluon_basic_block_v2`. No conv has a bias."""
    out_channels = planes * EXPANSION
    pre = _preact(b, prefix, 1, x)
    shortcut = _preact_shortcut(b, prefix, x, pre, out_channels, stride)
    y = b.conv(join(prefix, "conv1"), pre, planes, 1)
    y = b.conv(join(prefix, "conv2"), _preact(b, prefix, 2, y), planes, 3, stride=stride, padding=1)
    y = b.conv(join(prefix, "conv3"), _preact(b, prefix, 3, y), out_channels, 1)
    return b.add(join(prefix, "add"), y, shortcut)


BLOCKS: dict[tuple[int, str], Block] = {
    (1, "basic"): residual_block,
    (1, "bottleneck"): gluon_bottleneck_v1,
    (2, "basic"): gluon_basic_block_v2,
    (2, "bottleneck"): gluon_bottleneck_v2,
}
"""(version, block kind) -> the block reproducing Gluon's `BasicBlockV1` ... `BottleneckV2`."""


def gluon_resnet(
    version: int,
    depth: int,
    num_classes: int = 1000,
    in_channels: int = 3,
    thumbnail: bool = False,
) -> Graph:
    """`mxnet.gluon.model_zoo.vision.get_resnet(version, depth, classes=num_classes,
    thumbnail=thumbnail)`, exactly (see the module docstring for how v1 and v2 differ)."""
    if version not in (1, 2) or depth not in DEPTHS:
        raise SpecError(
            f"gluon_resnet: version must be 1 or 2 and depth one of {sorted(DEPTHS)}; "
            f"got version={version!r}, depth={depth!r}."
        )
    kind, layers = DEPTHS[depth]
    name = f"gluon_resnet{depth}_v{version}"
    b = GraphBuilder(name, in_channels)
    x = b.input
    if version == 2:
        x = b.bn("data_bn", x)
    x = _stem(b, x, thumbnail)
    x = _stages(b, x, BLOCKS[version, kind], layers)
    if version == 2:
        x = b.relu("final_relu", b.bn("final_bn", x))
    x = b.dense("fc", b.flatten("flatten", b.gap("avgpool", x)), num_classes)
    description = (
        f"mxnet.gluon.model_zoo.vision.resnet{depth}_v{version}"
        f"{'(thumbnail=True)' if thumbnail else ''} (MXNet 1.9.1), exactly: "
        + (
            "ResNet v1 (stride on the bottleneck's first 1x1 conv, which has a bias, as has its last 1x1)"
            if version == 1
            else "ResNet v2, pre-activation, with a BatchNorm (weight 1, bias 0) on the input image"
        )
        + "; BatchNorm eps 1e-5, Gluon momentum 0.9. Node names are torchvision's where they agree."
    )
    return b.graph(x, description)


def _stem(b: GraphBuilder, x: str, thumbnail: bool) -> str:
    if thumbnail:
        return b.conv("conv1", x, 64, 3, padding=1)
    y = b.conv("conv1", x, 64, 7, stride=2, padding=3)
    y = b.relu("relu", b.bn("bn1", y))
    return b.maxpool("maxpool", y, 3, stride=2, padding=1)


def _stages(b: GraphBuilder, x: str, block: Block, layers: Sequence[int]) -> str:
    """Gluon's four stages `layer1`..`layer4`: `planes` 64, 128, 256, 512 (a bottleneck outputs 4
    times as many channels; Gluon's blocks take that output width instead); the first block of
    stages 2-4 has stride 2."""
    for i, depth in enumerate(layers):
        for j in range(depth):
            x = block(b, f"layer{i + 1}.{j}", x, 64 * 2**i, 2 if i > 0 and j == 0 else 1)
    return x


for _version in (1, 2):
    for _depth in DEPTHS:
        register(f"gluon_resnet{_depth}_v{_version}")(partial(gluon_resnet, _version, _depth))
del _version, _depth
