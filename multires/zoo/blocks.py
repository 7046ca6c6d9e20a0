"""The public building blocks of residual networks, one function per idea.

Every block has the signature `block(b, prefix, x, ...) -> str`: it appends its nodes to the
`GraphBuilder` `b` under the hierarchical name `prefix` (e.g. "layer2.0"), reads tensor `x` and
returns the name of its output tensor, so blocks chain like layers in a forward pass:

    b = GraphBuilder("tiny", in_channels=3)
    x = stem(b, "", b.input)
    x = residual_block(b, "layer1.0", x, 64)
    x = residual_block(b, "layer2.0", x, 128, stride=2)   # adds a projection shortcut
    graph = b.graph(x)

Node names inside a block follow the reference implementation each block reproduces, so that
its published checkpoints map onto canonical weight names without renaming: torchvision for
`residual_block` / `bottleneck_block`, timm's `resnetv2` for the pre-activation blocks, and the
*Dive into Deep Learning* book for `d2l_residual_block` / `resnext_block`. ReLU and Add nodes
have no parameters; their names (`relu1`, `add`, ...) are ours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from multires.errors import SpecError
from multires.zoo.builder import GraphBuilder, join
from multires.zoo.editions import Edition
from multires.zoo.editions import edition as get_edition

__all__ = [
    "Block",
    "bottleneck_block",
    "d2l_residual_block",
    "preact_block",
    "preact_bottleneck_block",
    "residual_block",
    "resnext_block",
    "stem",
]

Block = Callable[..., str]
"""A block: `block(b, prefix, x, ...) -> str`, the name of its output tensor."""

TORCHVISION_STEM = ("conv1", "bn1", "relu", "maxpool")
"""Stem node names of torchvision's ResNet: (conv, batch norm, ReLU, max-pool)."""


def stem(
    b: GraphBuilder,
    prefix: str,
    x: str,
    out_channels: int = 64,
    *,
    bias: bool = False,
    norm: bool = True,
    names: Sequence[str] = TORCHVISION_STEM,
) -> str:
    """The ImageNet ResNet stem: conv 7x7/2 pad 3, BN + ReLU (if `norm`), max-pool 3x3/2 pad 1.

    Divides the spatial size by 4. `names` are the leaf names of (conv, BN, ReLU, max-pool);
    pre-activation networks pass `norm=False` because their first block normalises its input.
    """
    conv, bn, relu, pool = (join(prefix, leaf) for leaf in names)
    y = b.conv(conv, x, out_channels, 7, stride=2, padding=3, bias=bias)
    if norm:
        y = b.relu(relu, b.bn(bn, y))
    return b.maxpool(pool, y, 3, stride=2, padding=1)


def _shape_changes(b: GraphBuilder, x: str, out_channels: int, stride: int) -> bool:
    return stride != 1 or b.channels(x) != out_channels


def _projection(b: GraphBuilder, prefix: str, x: str, out_channels: int, stride: int) -> str:
    """torchvision's `downsample`: 1x1 conv with `stride` (`.0`) + BN (`.1`), or `x` itself
    when the shape is unchanged."""
    if not _shape_changes(b, x, out_channels, stride):
        return x
    y = b.conv(join(prefix, "0"), x, out_channels, 1, stride=stride)
    return b.bn(join(prefix, "1"), y)


def residual_block(b: GraphBuilder, prefix: str, x: str, channels: int, stride: int = 1) -> str:
    """torchvision's `BasicBlock`: conv3x3(stride)-BN-ReLU, conv3x3-BN, + shortcut, ReLU.

    The shortcut is the identity, or a 1x1 conv + BN (`downsample.0`, `downsample.1`) when the
    stride or the channel count changes. Convolutions have no bias.
    """
    y = b.conv(join(prefix, "conv1"), x, channels, 3, stride=stride, padding=1)
    y = b.relu(join(prefix, "relu1"), b.bn(join(prefix, "bn1"), y))
    y = b.bn(join(prefix, "bn2"), b.conv(join(prefix, "conv2"), y, channels, 3, padding=1))
    shortcut = _projection(b, join(prefix, "downsample"), x, channels, stride)
    return b.relu(join(prefix, "relu2"), b.add(join(prefix, "add"), y, shortcut))


def bottleneck_block(
    b: GraphBuilder,
    prefix: str,
    x: str,
    planes: int,
    stride: int = 1,
    groups: int = 1,
    width_per_group: int = 64,
    expansion: int = 4,
) -> str:
    """torchvision's `Bottleneck` (ResNet v1.5): 1x1, 3x3(stride, groups), 1x1 to `planes * expansion`.

    The stride sits on the 3x3 conv (v1.5; the original v1 strides the first 1x1). The inner
    width is `planes * width_per_group // 64 * groups`: 64 and 1 give ResNet-50's bottleneck,
    `groups=32, width_per_group=4` ResNeXt's 32x4d, `width_per_group=128` Wide ResNet-50-2's.
    BN follows every conv; the shortcut is as in `residual_block`.
    """
    width = planes * width_per_group // 64 * groups
    out_channels = planes * expansion
    y = b.conv(join(prefix, "conv1"), x, width, 1)
    y = b.relu(join(prefix, "relu1"), b.bn(join(prefix, "bn1"), y))
    y = b.conv(join(prefix, "conv2"), y, width, 3, stride=stride, padding=1, groups=groups)
    y = b.relu(join(prefix, "relu2"), b.bn(join(prefix, "bn2"), y))
    y = b.bn(join(prefix, "bn3"), b.conv(join(prefix, "conv3"), y, out_channels, 1))
    shortcut = _projection(b, join(prefix, "downsample"), x, out_channels, stride)
    return b.relu(join(prefix, "relu3"), b.add(join(prefix, "add"), y, shortcut))


def _preact(b: GraphBuilder, prefix: str, index: int, x: str) -> str:
    """BN then ReLU, named as timm's `norm{index}` (a BatchNormAct2d) and our `act{index}`."""
    return b.relu(join(prefix, f"act{index}"), b.bn(join(prefix, f"norm{index}"), x))


def _preact_shortcut(b: GraphBuilder, prefix: str, x: str, pre: str, out_channels: int, stride: int) -> str:
    """Identity `x`, or a 1x1 conv (no BN) of the pre-activated input `pre` when the shape changes."""
    if not _shape_changes(b, x, out_channels, stride):
        return x
    return b.conv(join(prefix, "downsample.conv"), pre, out_channels, 1, stride=stride)


def preact_block(b: GraphBuilder, prefix: str, x: str, channels: int, stride: int = 1) -> str:
    """Full pre-activation basic block (He et al. 2016b): BN-ReLU-conv3x3(stride), BN-ReLU-conv3x3.

    The output is the sum with the shortcut, with no ReLU after it. The shortcut is `x`, or a
    1x1 conv of the pre-activated input when the shape changes (timm's `PreActBasic`, whose
    names `norm1`, `conv1`, `norm2`, `conv2`, `downsample.conv` this block uses).
    """
    pre = _preact(b, prefix, 1, x)
    shortcut = _preact_shortcut(b, prefix, x, pre, channels, stride)
    y = b.conv(join(prefix, "conv1"), pre, channels, 3, stride=stride, padding=1)
    y = b.conv(join(prefix, "conv2"), _preact(b, prefix, 2, y), channels, 3, padding=1)
    return b.add(join(prefix, "add"), y, shortcut)


def preact_bottleneck_block(
    b: GraphBuilder, prefix: str, x: str, planes: int, stride: int = 1, expansion: int = 4
) -> str:
    """Full pre-activation bottleneck (He et al. 2016b): BN-ReLU-conv1x1, BN-ReLU-conv3x3(stride),
    BN-ReLU-conv1x1 to `planes * expansion`, plus the shortcut of `preact_block`.

    As timm's `PreActBottleneck` (names included), the stride sits on the 3x3 conv.
    """
    out_channels = planes * expansion
    pre = _preact(b, prefix, 1, x)
    shortcut = _preact_shortcut(b, prefix, x, pre, out_channels, stride)
    y = b.conv(join(prefix, "conv1"), pre, planes, 1)
    y = b.conv(join(prefix, "conv2"), _preact(b, prefix, 2, y), planes, 3, stride=stride, padding=1)
    y = b.conv(join(prefix, "conv3"), _preact(b, prefix, 3, y), out_channels, 1)
    return b.add(join(prefix, "add"), y, shortcut)


def d2l_residual_block(
    b: GraphBuilder,
    prefix: str,
    x: str,
    num_channels: int,
    use_1x1conv: bool = False,
    strides: int = 1,
    edition: str | Edition = "pytorch",
) -> str:
    """The book's `Residual` (*Dive into Deep Learning*, ResNet chapter), names included.

    conv3x3(strides)-BN-ReLU, conv3x3-BN, plus `x` or, with `use_1x1conv`, a 1x1 conv with
    `strides` (`conv3`, no BN); then ReLU. Every conv has a bias, as the book's `LazyConv2d`.
    `edition` ("pytorch", "mxnet", "tf", "jax") picks the framework edition's padding and
    BatchNorm (`multires.zoo.editions`).
    """
    ed = get_edition(edition)
    y = b.conv(join(prefix, "conv1"), x, num_channels, 3, stride=strides, padding=ed.padding(3), bias=True)
    y = b.relu(join(prefix, "relu1"), b.bn(join(prefix, "bn1"), y, **ed.bn_options()))
    y = b.conv(join(prefix, "conv2"), y, num_channels, 3, padding=ed.padding(3), bias=True)
    y = b.bn(join(prefix, "bn2"), y, **ed.bn_options())
    if use_1x1conv:
        x = b.conv(join(prefix, "conv3"), x, num_channels, 1, stride=strides, bias=True)
    return b.relu(join(prefix, "relu2"), b.add(join(prefix, "add"), y, x))


def resnext_block(
    b: GraphBuilder,
    prefix: str,
    x: str,
    num_channels: int,
    groups: int,
    bot_mul: float,
    use_1x1conv: bool = False,
    strides: int = 1,
    edition: str | Edition = "pytorch",
) -> str:
    """The book's `ResNeXtBlock(num_channels, groups, bot_mul, use_1x1conv, strides)`, names included.

    With `bot_channels = int(round(num_channels * bot_mul))`: conv1 1x1 to `bot_channels`,
    conv2 3x3 (`strides`) grouped, conv3 1x1 to `num_channels`, BN after each, ReLU after the
    first two; the shortcut is `x` or, with `use_1x1conv`, conv4 1x1 (`strides`) + bn4; then
    ReLU(Y + X). All convs have a bias; `edition` as in `d2l_residual_block`.

    Note the book's convention: its `groups` is the number of channels *per group*; conv2 has
    `bot_channels // groups` groups (the book's `ResNeXtBlock(32, 16, 1)` makes 2 groups of 16).
    """
    ed = get_edition(edition)
    bot_channels = int(round(num_channels * bot_mul))
    if not 1 <= groups <= bot_channels:
        raise SpecError(
            f"{join(prefix, 'conv2')} (Conv2d): the book's `groups` is the channels per group and must "
            f"lie in [1, bot_channels={bot_channels}]; got {groups}. Lower groups or raise bot_mul."
        )
    bn = ed.bn_options()
    y = b.conv(join(prefix, "conv1"), x, bot_channels, 1, bias=True)
    y = b.relu(join(prefix, "relu1"), b.bn(join(prefix, "bn1"), y, **bn))
    y = b.conv(
        join(prefix, "conv2"),
        y,
        bot_channels,
        3,
        stride=strides,
        padding=ed.padding(3),
        groups=bot_channels // groups,
        bias=True,
    )
    y = b.relu(join(prefix, "relu2"), b.bn(join(prefix, "bn2"), y, **bn))
    y = b.bn(join(prefix, "bn3"), b.conv(join(prefix, "conv3"), y, num_channels, 1, bias=True), **bn)
    if use_1x1conv:
        shortcut = b.conv(join(prefix, "conv4"), x, num_channels, 1, stride=strides, bias=True)
        x = b.bn(join(prefix, "bn4"), shortcut, **bn)
    return b.relu(join(prefix, "relu3"), b.add(join(prefix, "add"), y, x))
