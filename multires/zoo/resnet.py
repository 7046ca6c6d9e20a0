"""ImageNet ResNets: torchvision's ResNet / ResNeXt / Wide ResNet, and full pre-activation ResNets.

Each registered model is a partial of one of two general builders, `resnet` (torchvision's
layout and state-dict names) and `preact_resnet` (timm's `resnetv2` layout and names). Stage
`i` (0-based) has `layers[i]` blocks of widths 64, 128, 256, 512 (times the block's
expansion); the first block of stages 2-4 has stride 2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from multires.errors import SpecError
from multires.graph import Graph
from multires.zoo import register
from multires.zoo.blocks import (
    Block,
    bottleneck_block,
    preact_block,
    preact_bottleneck_block,
    residual_block,
    stem,
)
from multires.zoo.builder import GraphBuilder

WIDTHS = (64, 128, 256, 512)


def _stages(
    b: GraphBuilder, x: str, block: Block, layers: Sequence[int], prefix: Callable[[int, int], str]
) -> str:
    """Append the four stages; `prefix(i, j)` names block j of stage i."""
    if len(layers) != len(WIDTHS) or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in layers
    ):
        raise SpecError(
            f"{b.name}: layers must be {len(WIDTHS)} positive ints (blocks per stage), like (3, 4, 6, 3); "
            f"got {layers!r}."
        )
    for i, (depth, planes) in enumerate(zip(layers, WIDTHS, strict=True)):
        for j in range(depth):
            x = block(b, prefix(i, j), x, planes, 2 if i > 0 and j == 0 else 1)
    return x


def resnet(
    name: str, block: Block, layers: Sequence[int], num_classes: int = 1000, in_channels: int = 3
) -> Graph:
    """torchvision's `ResNet(block, layers)`, node for node and name for name.

    With `residual_block` / `bottleneck_block` this is He et al. 2016, Table 1 (v1.5); with a
    grouped or widened bottleneck, ResNeXt (Xie et al. 2017) or Wide ResNet (Zagoruyko and
    Komodakis 2016) as torchvision defines them.

    Stem conv 7x7/2 + BN + ReLU + max-pool 3x3/2; `layer1`..`layer4`; `avgpool`, `flatten`,
    `fc`. Canonical weight names equal torchvision's state-dict keys (`layer2.0.downsample.0.weight`).
    """
    b = GraphBuilder(name, in_channels)
    x = stem(b, "", b.input)
    x = _stages(b, x, block, layers, lambda i, j: f"layer{i + 1}.{j}")
    x = b.dense("fc", b.flatten("flatten", b.gap("avgpool", x)), num_classes)
    description = (
        f"torchvision.models.{name}, exactly: torchvision's ResNet v1.5 layout (stride on the "
        "bottleneck's 3x3 conv, no conv bias, BN in the projection shortcut); canonical names are "
        "torchvision's state-dict keys."
    )
    return b.graph(x, description)


def preact_resnet(
    name: str, block: Block, layers: Sequence[int], num_classes: int = 1000, in_channels: int = 3
) -> Graph:
    """Full pre-activation ResNet (He et al. 2016b): timm's `ResNetV2` with BatchNorm, names included.

    Stem conv 7x7/2 with no BN or ReLU after it (each block normalises its own input), then
    max-pool 3x3/2 pad 1 on the raw conv output, where max-pool padding semantics matter (pads
    never win the max; zero padding would differ on negative values); stages of
    `preact_block` / `preact_bottleneck_block` whose projection shortcut (1x1 conv, no BN)
    reads the pre-activated input; a final BN + ReLU (`norm`, `act`); global average pool, dense.
    """
    b = GraphBuilder(name, in_channels)
    x = stem(b, "stem", b.input, norm=False, names=("conv", "", "", "pool"))
    x = _stages(b, x, block, layers, lambda i, j: f"stages.{i}.blocks.{j}")
    x = b.relu("act", b.bn("norm", x))
    x = b.dense("head.fc", b.flatten("head.flatten", b.gap("head.global_pool", x)), num_classes)
    depth = name.rsplit("resnet", 1)[-1]
    description = (
        f"Full pre-activation ResNet-{depth} (He et al. 2016b): the architecture of timm's "
        f"resnetv2_{depth} (BatchNorm, 7x7 stem without norm, stride on the 3x3 conv); canonical names "
        "are timm's state-dict keys, except that timm's head.fc is a 1x1 conv: reshape its weight to "
        "(out, in)."
    )
    return b.graph(x, description)


resnet18 = register("resnet18")(partial(resnet, "resnet18", residual_block, (2, 2, 2, 2)))
resnet34 = register("resnet34")(partial(resnet, "resnet34", residual_block, (3, 4, 6, 3)))
resnet50 = register("resnet50")(partial(resnet, "resnet50", bottleneck_block, (3, 4, 6, 3)))
resnet101 = register("resnet101")(partial(resnet, "resnet101", bottleneck_block, (3, 4, 23, 3)))
resnet152 = register("resnet152")(partial(resnet, "resnet152", bottleneck_block, (3, 8, 36, 3)))

resnext50_32x4d = register("resnext50_32x4d")(
    partial(resnet, "resnext50_32x4d", partial(bottleneck_block, groups=32, width_per_group=4), (3, 4, 6, 3))
)
resnext101_32x8d = register("resnext101_32x8d")(
    partial(
        resnet, "resnext101_32x8d", partial(bottleneck_block, groups=32, width_per_group=8), (3, 4, 23, 3)
    )
)
wide_resnet50_2 = register("wide_resnet50_2")(
    partial(resnet, "wide_resnet50_2", partial(bottleneck_block, width_per_group=128), (3, 4, 6, 3))
)

preact_resnet18 = register("preact_resnet18")(
    partial(preact_resnet, "preact_resnet18", preact_block, (2, 2, 2, 2))
)
preact_resnet34 = register("preact_resnet34")(
    partial(preact_resnet, "preact_resnet34", preact_block, (3, 4, 6, 3))
)
preact_resnet50 = register("preact_resnet50")(
    partial(preact_resnet, "preact_resnet50", preact_bottleneck_block, (3, 4, 6, 3))
)
preact_resnet101 = register("preact_resnet101")(
    partial(preact_resnet, "preact_resnet101", preact_bottleneck_block, (3, 4, 23, 3))
)
preact_resnet152 = register("preact_resnet152")(
    partial(preact_resnet, "preact_resnet152", preact_bottleneck_block, (3, 8, 36, 3))
)
