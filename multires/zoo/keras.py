"""The ResNets of `keras.applications`: ResNet50/101/152 (v1) and ResNet50V2/101V2/152V2.

Each entry is exactly the function of the Keras model of the same depth built with
`classifier_activation=None` (multires graphs end at logits), inference and training alike:
BatchNorm eps 1.001e-5, Keras momentum 0.99 (0.01 here, the weight of the new batch statistic),
running variance updated with the biased batch variance. The options follow Keras':
`include_top` (global average pool + dense `num_classes`, Keras' `classes`) or, without the top,
`pooling=None` (the 4-D feature map) or `"avg"`. Keras' `pooling="max"` has no spec node.

The two versions differ in more than the pre-activation:

| | v1 (`keras_resnet50`) | v2 (`keras_resnet50v2`) |
|---|---|---|
| block | conv-BN-ReLU x3, add, ReLU | BN-ReLU first (`preact`), conv x3, add |
| stride of a stage | first block, on its first 1x1 conv and the projection | *last* block, on its 3x3 conv; shortcut `MaxPooling2D(1, 2)` |
| conv bias | every conv | stem, projection and last 1x1 only |
| stem | conv 7x7/2, BN, ReLU, max-pool 3x3/2 | conv 7x7/2, max-pool 3x3/2 on the raw conv output |
| after the stages | - | BN + ReLU (`post_bn`) |

Keras pads with explicit `ZeroPadding2D` layers before valid convolutions and pools. For a
convolution that is the conv's own zero padding. Before the v1 stem max-pool the input is a ReLU
output (>= 0), so zero padding never wins the max and the pool's own padding is exact; before
the v2 stem max-pool the values are not normalised yet, so the graph keeps the zero padding as
an explicit `Pad2d` (`pool1_pad`) followed by an unpadded pool.

Node names: torchvision's for v1 (`layer1.0.conv1`) and timm's `resnetv2` for v2
(`stages.0.blocks.0.norm1`), so weights line up with those families where the architectures
agree; `multires.interchange.keras` holds the table to Keras' layer names.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from multires.errors import SpecError
from multires.graph import Graph
from multires.zoo import register
from multires.zoo.builder import GraphBuilder, join

EPS = 1.001e-5
"""BatchNorm epsilon of every `keras.applications` ResNet."""

MOMENTUM = 0.01
"""Keras' BatchNormalization momentum 0.99 as the spec's weight of the new batch statistic."""

WIDTHS = (64, 128, 256, 512)
"""Bottleneck widths of the four stages (outputs are 4 times as wide)."""

POOLINGS = (None, "avg")
"""The `pooling` options a graph can express (Keras also has "max": GlobalMaxPooling2D)."""


def _bn(b: GraphBuilder, name: str, x: str) -> str:
    return b.bn(name, x, EPS, MOMENTUM, running_variance="biased")


def v1_block(
    b: GraphBuilder, prefix: str, x: str, filters: int, stride: int = 1, conv_shortcut: bool = True
) -> str:
    """`keras.applications.resnet.residual_block_v1`: 1x1(stride)-BN-ReLU, 3x3-BN-ReLU, 1x1-BN,
    plus the shortcut (1x1(stride) + BN when `conv_shortcut`, else the input), then ReLU. Every
    conv has a bias; names are torchvision's (`downsample.0`/`.1` for Keras' `_0_conv`/`_0_bn`)."""
    if conv_shortcut:
        shortcut = b.conv(join(prefix, "downsample.0"), x, 4 * filters, 1, stride=stride, bias=True)
        shortcut = _bn(b, join(prefix, "downsample.1"), shortcut)
    else:
        shortcut = x
    y = b.conv(join(prefix, "conv1"), x, filters, 1, stride=stride, bias=True)
    y = b.relu(join(prefix, "relu1"), _bn(b, join(prefix, "bn1"), y))
    y = b.conv(join(prefix, "conv2"), y, filters, 3, padding=1, bias=True)
    y = b.relu(join(prefix, "relu2"), _bn(b, join(prefix, "bn2"), y))
    y = _bn(b, join(prefix, "bn3"), b.conv(join(prefix, "conv3"), y, 4 * filters, 1, bias=True))
    return b.relu(join(prefix, "relu3"), b.add(join(prefix, "add"), shortcut, y))


def v2_block(
    b: GraphBuilder, prefix: str, x: str, filters: int, stride: int = 1, conv_shortcut: bool = False
) -> str:
    """`keras.applications.resnet.residual_block_v2`: BN-ReLU (`preact`), then 1x1-BN-ReLU,
    3x3(stride)-BN-ReLU, 1x1 (bias), plus the shortcut: a 1x1 conv (bias) of the pre-activated
    input when `conv_shortcut`, else `MaxPooling2D(1, stride)` of the input (or the input itself).
    No ReLU after the sum. Names are timm's `PreActBottleneck`'s."""
    pre = b.relu(join(prefix, "act1"), _bn(b, join(prefix, "norm1"), x))
    if conv_shortcut:
        shortcut = b.conv(join(prefix, "downsample.conv"), pre, 4 * filters, 1, stride=stride, bias=True)
    elif stride > 1:
        shortcut = b.maxpool(join(prefix, "downsample.pool"), x, 1, stride=stride)
    else:
        shortcut = x
    y = b.conv(join(prefix, "conv1"), pre, filters, 1)
    y = b.relu(join(prefix, "act2"), _bn(b, join(prefix, "norm2"), y))
    y = b.conv(join(prefix, "conv2"), y, filters, 3, stride=stride, padding=1)
    y = b.relu(join(prefix, "act3"), _bn(b, join(prefix, "norm3"), y))
    y = b.conv(join(prefix, "conv3"), y, 4 * filters, 1, bias=True)
    return b.add(join(prefix, "add"), shortcut, y)


def _check(name: str, layers: Sequence[int], include_top: bool, pooling: str | None) -> None:
    if len(layers) != len(WIDTHS) or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 2 for d in layers
    ):
        raise SpecError(f"{name}: layers must be {len(WIDTHS)} ints >= 2 (blocks per stage); got {layers!r}.")
    if not include_top and pooling not in POOLINGS:
        raise SpecError(
            f"{name}: pooling must be None or 'avg' (Keras' 'max' is a global max pool, which the spec "
            f"has no node for); got {pooling!r}. Use pooling=None and take the max of the feature map."
        )


def _head(
    b: GraphBuilder, x: str, include_top: bool, pooling: str | None, num_classes: int, names: Sequence[str]
) -> str:
    """Keras' top: GAP + dense (`include_top`), or GAP + flatten (`pooling="avg"`), or nothing;
    `names` are those of (global pool, flatten, dense)."""
    pool, flatten, fc = names
    if include_top or pooling == "avg":
        x = b.flatten(flatten, b.gap(pool, x))
    if include_top:
        x = b.dense(fc, x, num_classes)
    return x


def _reference(name: str) -> str:
    return f"keras.applications.ResNet{name.removeprefix('keras_resnet').upper()}"


def keras_resnet(
    name: str,
    layers: Sequence[int],
    num_classes: int = 1000,
    in_channels: int = 3,
    include_top: bool = True,
    pooling: str | None = None,
) -> Graph:
    """`keras.applications.resnet.ResNet` with `stack_residual_blocks_v1` stages of `layers` blocks.

    Stage i's first block has a projection shortcut and stride 2 (stride 1 in the first stage),
    on its first 1x1 conv; the 3x3 is SAME at stride 1, i.e. padding 1.
    """
    _check(name, layers, include_top, pooling)
    b = GraphBuilder(name, in_channels)
    x = b.conv("conv1", b.input, 64, 7, stride=2, padding=3, bias=True)
    x = b.relu("relu", _bn(b, "bn1", x))
    x = b.maxpool("maxpool", x, 3, stride=2, padding=1)
    for i, (depth, filters) in enumerate(zip(layers, WIDTHS, strict=True)):
        for j in range(depth):
            x = v1_block(
                b, f"layer{i + 1}.{j}", x, filters, 2 if i > 0 and j == 0 else 1, conv_shortcut=j == 0
            )
    x = _head(b, x, include_top, pooling, num_classes, ("avgpool", "flatten", "fc"))
    description = (
        f"{_reference(name)}, exactly (with classifier_activation=None): Keras' ResNet v1 (stride on the "
        "first 1x1 conv and the projection of a stage's first block, conv biases, BN eps 1.001e-5, Keras "
        "momentum 0.99, biased running variance); names are torchvision's."
    )
    return b.graph(x, description)


def keras_resnet_v2(
    name: str,
    layers: Sequence[int],
    num_classes: int = 1000,
    in_channels: int = 3,
    include_top: bool = True,
    pooling: str | None = None,
) -> Graph:
    """`keras.applications.resnet.ResNet(preact=True)` with `stack_residual_blocks_v2` stages.

    Stage i's first block has a 1x1 projection (stride 1), its last block stride 2 (none in the
    last stage) with a `MaxPooling2D(1, 2)` shortcut. The stem max-pool reads the raw conv output
    after Keras' `ZeroPadding2D`, so the graph pads with zeros explicitly (`pool1_pad`).
    """
    _check(name, layers, include_top, pooling)
    b = GraphBuilder(name, in_channels)
    x = b.conv("stem.conv", b.input, 64, 7, stride=2, padding=3, bias=True)
    x = b.maxpool("stem.pool", b.pad("stem.pad", x, ((1, 1), (1, 1))), 3, stride=2)
    last = len(layers) - 1
    for i, (depth, filters) in enumerate(zip(layers, WIDTHS, strict=True)):
        for j in range(depth):
            stride = 2 if j == depth - 1 and i < last else 1
            x = v2_block(b, f"stages.{i}.blocks.{j}", x, filters, stride, conv_shortcut=j == 0)
    x = b.relu("act", _bn(b, "norm", x))
    x = _head(b, x, include_top, pooling, num_classes, ("head.global_pool", "head.flatten", "head.fc"))
    description = (
        f"{_reference(name)}, exactly (with classifier_activation=None): Keras' ResNet v2, pre-activation "
        "(stride on the last block of a stage with a 1x1 max-pool shortcut, zero-padded stem max-pool, "
        "post BN, BN eps 1.001e-5, Keras momentum 0.99, biased running variance); names are timm's "
        "resnetv2 where the architectures agree."
    )
    return b.graph(x, description)


DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
"""Blocks per stage of Keras' ResNet50/101/152 (v1 and v2 alike)."""

for _depth, _layers in DEPTHS.items():
    register(f"keras_resnet{_depth}")(partial(keras_resnet, f"keras_resnet{_depth}", _layers))
    register(f"keras_resnet{_depth}v2")(partial(keras_resnet_v2, f"keras_resnet{_depth}v2", _layers))
