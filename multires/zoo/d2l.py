"""The ResNets of *Dive into Deep Learning* (d2l.ai, chapter "Residual Networks (ResNet) and ResNeXt").

Each model takes `edition` ("pytorch", the default, "mxnet", "tf" or "jax") and then matches that
edition's code exactly, in eval and in training mode: the editions differ in padding (TF and JAX
use SAME, asymmetric at stride 2) and in BatchNorm eps, momentum and running-variance update
(`multires.zoo.editions` has the table). Their weights have the same names and shapes.

Node names are the book's module paths inside `ResNet.net`: `b1.0` (conv), `b1.1` (BN),
`b1.2` (ReLU), `b1.3` (max-pool), `b2.0.conv1` ..., `b3.0.conv3` (1x1 shortcut), `last.0`
(global pool), `last.1` (flatten), `last.2` (dense). The book builds `net` as
`nn.Sequential(self.b1())` and then adds `b2`, `b3`, ..., `last` by name, so in its state dict
the first stage is `net.0.*` and the rest `net.b2.*`, ...: map `net.0.` to `b1.` and drop `net.`
from every other key.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from multires.errors import SpecError
from multires.graph import Graph
from multires.zoo import register
from multires.zoo.blocks import Block, d2l_residual_block, resnext_block
from multires.zoo.builder import GraphBuilder
from multires.zoo.editions import Edition
from multires.zoo.editions import edition as get_edition

Arch = tuple[tuple[int, int], ...]
"""Stages as `(num_residuals, num_channels)` pairs, the book's `arch`."""

RESNET18_ARCH: Arch = ((2, 64), (2, 128), (2, 256), (2, 512))
"""The book's `ResNet18` arch."""

STEM_CHANNELS = 64
"""Channels of the book's `b1`, which the first stage must keep (it has no projection)."""


def _arch(name: str, arch: Any) -> Arch:
    """Normalise `arch` (tuples or lists, e.g. from YAML) and check it, naming the model."""
    try:
        pairs = [tuple(pair) for pair in arch]
        stages = tuple((int(depth), int(width)) for depth, width in pairs)
        exact = all(not isinstance(v, bool) and v == int(v) for pair in pairs for v in pair)
    except (TypeError, ValueError):
        stages, exact = (), False
    if not stages or not exact or min(min(pair) for pair in stages) < 1:
        raise SpecError(
            f"{name}: arch must be a non-empty sequence of (num_residuals, num_channels) pairs of "
            f"positive ints, like {RESNET18_ARCH}; got {arch!r}."
        )
    if stages[0][1] != STEM_CHANNELS:
        raise SpecError(
            f"{name}: the first stage adds its input to its output with no projection (as in the book), "
            f"so its num_channels must equal b1's {STEM_CHANNELS}; got arch[0]={stages[0]}."
        )
    return stages


def _d2l_net(
    name: str,
    block: Block,
    arch: Arch,
    num_classes: int,
    in_channels: int,
    description: str,
    edition: Edition,
) -> Graph:
    """The book's `ResNet(arch)` skeleton with `block` as its residual block, in `edition`."""
    b = GraphBuilder(name, in_channels)
    x = b.conv("b1.0", b.input, STEM_CHANNELS, 7, stride=2, padding=edition.padding(7), bias=True)
    x = b.relu("b1.2", b.bn("b1.1", x, **edition.bn_options()))
    x = b.maxpool("b1.3", x, 3, stride=2, padding=edition.padding(3))
    for i, (num_residuals, num_channels) in enumerate(arch):
        for j in range(num_residuals):
            first = i > 0 and j == 0
            x = block(
                b,
                f"b{i + 2}.{j}",
                x,
                num_channels,
                use_1x1conv=first,
                strides=2 if first else 1,
                edition=edition,
            )
    x = b.dense("last.2", b.flatten("last.1", b.gap("last.0", x)), num_classes)
    return b.graph(x, description)


_FRAMEWORK = {"pytorch": "PyTorch", "mxnet": "MXNet", "tf": "TensorFlow", "jax": "JAX"}

_RESNET = (
    "Dive into Deep Learning's ResNet{} ({} edition), exactly: b1 = conv 7x7/2 (bias) + BN + ReLU + "
    "max-pool 3x3/2; stages of the book's Residual blocks (conv bias, 1x1 shortcut conv without BN on "
    "the first block of every stage but the first); global average pool, flatten, dense; {}. Names are "
    "the book's module paths inside net (its PyTorch state dict stores b1 as net.0)."
)


def _describe(model: str, ed: Edition) -> str:
    padding = "TF/XLA SAME padding" if ed.same_padding else "symmetric padding k // 2"
    conventions = (
        f"{padding}, BatchNorm eps {ed.eps:g}, momentum {ed.momentum:g} (PyTorch's convention), "
        f"{ed.running_variance} running variance"
    )
    return _RESNET.format(model, _FRAMEWORK[ed.name], conventions)


def d2l_resnet(
    arch: Arch = RESNET18_ARCH, num_classes: int = 10, in_channels: int = 1, edition: str = "pytorch"
) -> Graph:
    """The book's `ResNet(arch, num_classes)` for `in_channels`-channel images (Fashion-MNIST: 1),
    as the `edition` ("pytorch", "mxnet", "tf", "jax") of the book computes it."""
    arch, ed = _arch("d2l_resnet", arch), get_edition(edition)
    return _d2l_net(
        "d2l_resnet", d2l_residual_block, arch, num_classes, in_channels, _describe(f"(arch={arch})", ed), ed
    )


def d2l_resnet18(num_classes: int = 10, in_channels: int = 1, edition: str = "pytorch") -> Graph:
    """The book's `ResNet18`: `d2l_resnet` with arch ((2, 64), (2, 128), (2, 256), (2, 512))."""
    ed = get_edition(edition)
    return _d2l_net(
        "d2l_resnet18", d2l_residual_block, RESNET18_ARCH, num_classes, in_channels, _describe("18", ed), ed
    )


def d2l_resnext(
    arch: Arch = RESNET18_ARCH,
    groups: int = 16,
    bot_mul: float = 1.0,
    num_classes: int = 10,
    in_channels: int = 1,
    edition: str = "pytorch",
) -> Graph:
    """The book's ResNet skeleton with its `ResNeXtBlock` in place of `Residual`, in `edition`.

    `groups` is the book's: channels per group (conv2 has `bot_channels // groups` groups).
    The defaults `groups=16, bot_mul=1` (group width 16, no bottleneck) are the book's own
    choice for its `RegNetX32`; the skeleton (b1, then stages whose first block, except in the
    first stage, has `use_1x1conv=True, strides=2`) is the chapter's ResNet. The book builds no
    ResNeXt model, so there is no reference checkpoint; node names follow the book's paths.
    """
    arch, ed = _arch("d2l_resnext", arch), get_edition(edition)
    block = partial(resnext_block, groups=groups, bot_mul=bot_mul)
    description = (
        f"Dive into Deep Learning's ResNet skeleton (arch={arch}) with the book's ResNeXtBlock "
        f"(groups={groups} channels per group, bot_mul={bot_mul}), {_FRAMEWORK[ed.name]} edition: b1 = "
        "conv 7x7/2 (bias) + BN + ReLU + max-pool 3x3/2; the first block of every stage but the first has "
        f"use_1x1conv=True, strides=2; {'TF/XLA SAME' if ed.same_padding else 'symmetric'} padding, "
        f"BatchNorm eps {ed.eps:g}, momentum {ed.momentum:g}, {ed.running_variance} running variance."
    )
    return _d2l_net("d2l_resnext", block, arch, num_classes, in_channels, description, ed)


register("d2l_resnet18")(d2l_resnet18)
register("d2l_resnet")(d2l_resnet)
register("d2l_resnext")(d2l_resnext)
