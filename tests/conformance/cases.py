"""The graphs the conformance suite runs, each with its input shape and seeds.

`MODELS`: zoo models at small images. 32x32 (64x64 for d2l_resnet18, whose global pool then
averages a 2x2 map) with batch 4, so every BatchNorm normalises over at least 4 values per
channel; 10 classes. `DEEP`: the deepest ResNets, eval mode only (their float64 backward would
dominate the suite's time).

`SGD_MODELS`: where the zoo's SGD step is checked. At 32x32 the last stage of the ImageNet
ResNets is 1x1 and their gradients are too noisy to check (see `helpers.NOISE_CAP`), so they take
the step with one block per stage (their own blocks) on 40x40 images (48x48 for
wide_resnet50_2), where the last stage is 2x2; the d2l models take it as in `MODELS`. Sizes and
seeds are ones where no ReLU input or max-pool runner-up sits within rounding of its kink: one
that does moves the update by 1e-2 to 1 of itself, and the check then fails as unfit, saying so
(another seed or size is the fix).

`NODES`: small per-node-type graphs that catch the classic porting traps; each puts the trap
between a convolution (so the SGD step checks the gradient through it) and a Flatten + Dense head
(Flatten straight after a spatial map: channel-major order in every layout). Spatial sizes are
rectangular where possible, so swapped H and W show.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from hypothesis import strategies as st

import multires
from multires import (
    Add,
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Dense,
    Flatten,
    GlobalAvgPool,
    Graph,
    Input,
    MaxPool2d,
    Node,
    Pad2d,
    ReLU,
)
from multires.errors import SpecError
from multires.graph import VARIANCE_CONVENTIONS
from multires.shapes import infer_shapes
from multires.zoo import resnet as resnet_zoo

from .helpers import Case

MODELS = [
    Case("resnet18", partial(multires.spec, "resnet18", num_classes=10), (4, 3, 32, 32)),
    Case("resnet34", partial(multires.spec, "resnet34", num_classes=10), (4, 3, 32, 32), seed=1),
    Case("resnet50", partial(multires.spec, "resnet50", num_classes=10), (4, 3, 32, 32), seed=2),
    Case(
        "preact_resnet18", partial(multires.spec, "preact_resnet18", num_classes=10), (4, 3, 32, 32), seed=3
    ),
    Case(
        "resnext50_32x4d", partial(multires.spec, "resnext50_32x4d", num_classes=10), (4, 3, 32, 32), seed=4
    ),
    Case("d2l_resnet18", partial(multires.spec, "d2l_resnet18"), (4, 1, 64, 64), seed=5),
    Case(
        "wide_resnet50_2", partial(multires.spec, "wide_resnet50_2", num_classes=10), (4, 3, 32, 32), seed=6
    ),
    Case("d2l_resnet18_tf", partial(multires.spec, "d2l_resnet18", edition="tf"), (4, 1, 45, 45), seed=9),
]
DEEP = [
    Case(
        "resnet101",
        partial(multires.spec, "resnet101", num_classes=10),
        (2, 3, 32, 32),
        seed=7,
        eval_only=True,
    ),
    Case(
        "resnet152",
        partial(multires.spec, "resnet152", num_classes=10),
        (2, 3, 32, 32),
        seed=8,
        eval_only=True,
    ),
]


def _one_block_per_stage(model: str, size: int, seed: int) -> Case:
    """ImageNet ResNet `model` of the zoo with one block per stage, its own builder and block,
    on `size` x `size` images (batch 4, 10 classes)."""
    zoo = getattr(resnet_zoo, model)  # partial(builder, name, block, layers)
    builder, _, block, _ = zoo.func, *zoo.args
    name = f"{model}_1111"
    graph = partial(builder, name, block, (1, 1, 1, 1), num_classes=10)
    return Case(name, graph, (4, 3, size, size), seed=seed)


SGD_MODELS = [
    _one_block_per_stage("resnet18", 40, seed=0),
    _one_block_per_stage("resnet50", 40, seed=2),
    _one_block_per_stage("preact_resnet18", 40, seed=3),
    _one_block_per_stage("resnext50_32x4d", 40, seed=11),
    _one_block_per_stage("wide_resnet50_2", 48, seed=6),
    *(case for case in MODELS if case.id.startswith("d2l_")),
]


def _graph(name: str, channels: int, body: Sequence[Node], head: bool = True, bias: bool = True) -> Graph:
    """`body` read from input `x`, then (with `head`) Flatten + Dense(5) on its last node."""
    nodes = list(body)
    if head:
        nodes += [Flatten("flatten", nodes[-1].name), Dense("fc", "flatten", out_features=5, bias=bias)]
    return Graph(name, Input("x", channels), tuple(nodes), nodes[-1].name)


def _pool_graph(name: str, pool: Node) -> Graph:
    return _graph(name, 3, [Conv2d("conv", "x", out_channels=4, kernel=3, padding=1), pool])


NODES = [
    Case(
        "conv_asymmetric_padding",
        lambda: _graph(
            "conv_asymmetric_padding",
            3,
            [Conv2d("conv", "x", out_channels=4, kernel=3, padding=((0, 1), (2, 1)), bias=True)],
        ),
        (4, 3, 7, 9),
    ),
    Case(
        "conv_dilation",
        lambda: _graph(
            "conv_dilation",
            3,
            [Conv2d("conv", "x", out_channels=4, kernel=3, dilation=(2, 3), padding=((2, 2), (3, 3)))],
        ),
        (4, 3, 9, 11),
    ),
    Case(
        "conv_groups",
        lambda: _graph(
            "conv_groups",
            4,
            [
                Conv2d("grouped", "x", out_channels=6, kernel=3, padding=1, groups=2),
                Conv2d("depthwise", "grouped", out_channels=6, kernel=3, padding=1, groups=6, bias=True),
            ],
        ),
        (4, 4, 6, 7),
    ),
    Case(
        "conv_stride2_even_input",
        lambda: _graph(
            "conv_stride2_even_input",
            3,
            [
                Conv2d("conv3x3", "x", out_channels=4, kernel=3, stride=2, padding=1),
                Conv2d("conv1x1", "conv3x3", out_channels=4, kernel=1, stride=2),
            ],
        ),
        (4, 3, 8, 12),
    ),
    Case(
        "conv_rectangular_kernel",
        lambda: _graph(
            "conv_rectangular_kernel",
            3,
            [Conv2d("conv", "x", out_channels=4, kernel=(1, 3), stride=(2, 1), padding=((0, 0), (1, 1)))],
        ),
        (4, 3, 8, 6),
    ),
    Case(
        "maxpool_padding_negative_inputs",
        lambda: _graph(
            "maxpool_padding_negative_inputs", 3, [MaxPool2d("pool", "x", kernel=3, stride=2, padding=1)]
        ),
        (4, 3, 7, 8),
        negative=True,
    ),
    Case(
        "maxpool_asymmetric_padding_negative_inputs",
        lambda: _graph(
            "maxpool_asymmetric_padding_negative_inputs",
            3,
            [MaxPool2d("pool", "x", kernel=(3, 2), stride=2, padding=((0, 1), (1, 0)))],
        ),
        (4, 3, 7, 8),
        negative=True,
    ),
    Case(
        "maxpool_after_conv",
        lambda: _pool_graph("maxpool_after_conv", MaxPool2d("pool", "conv", kernel=3, stride=2, padding=1)),
        (4, 3, 8, 9),
    ),
    Case(
        "avgpool_count_include_pad",
        lambda: _pool_graph(
            "avgpool_count_include_pad", AvgPool2d("pool", "conv", kernel=3, stride=2, padding=1)
        ),
        (4, 3, 8, 9),
    ),
    Case(
        "avgpool_exclude_pad",
        lambda: _pool_graph(
            "avgpool_exclude_pad",
            AvgPool2d("pool", "conv", kernel=3, stride=2, padding=1, count_include_pad=False),
        ),
        (4, 3, 8, 9),
    ),
    Case(
        "avgpool_asymmetric_include_pad",
        lambda: _pool_graph(
            "avgpool_asymmetric_include_pad",
            AvgPool2d("pool", "conv", kernel=(2, 3), stride=(2, 1), padding=((1, 0), (0, 1))),
        ),
        (4, 3, 7, 8),
    ),
    Case(
        "avgpool_asymmetric_exclude_pad",
        lambda: _pool_graph(
            "avgpool_asymmetric_exclude_pad",
            AvgPool2d(
                "pool",
                "conv",
                kernel=(2, 3),
                stride=(2, 1),
                padding=((1, 0), (0, 1)),
                count_include_pad=False,
            ),
        ),
        (4, 3, 7, 8),
    ),
    Case(
        "flatten_after_spatial_map",
        lambda: _graph("flatten_after_spatial_map", 3, [Conv2d("conv", "x", out_channels=3, kernel=1)]),
        (4, 3, 5, 7),
    ),
    Case(
        "dense_without_bias",
        lambda: _graph(
            "dense_without_bias",
            3,
            [Conv2d("conv", "x", out_channels=4, kernel=3), GlobalAvgPool("gap", "conv")],
            bias=False,
        ),
        (4, 3, 6, 7),
    ),
    Case(
        "batchnorm_eps_momentum",
        lambda: _graph(
            "batchnorm_eps_momentum",
            3,
            [
                Conv2d("conv", "x", out_channels=4, kernel=3, padding=1),
                BatchNorm("bn", "conv", eps=0.5, momentum=0.3),
                ReLU("relu", "bn"),
            ],
        ),
        (4, 3, 5, 6),
    ),
    Case(
        "conv_same_stride2_even_and_odd",
        lambda: _graph(
            "conv_same_stride2_even_and_odd",
            3,
            [
                Conv2d("conv7x7", "x", out_channels=4, kernel=7, stride=2, padding="same", bias=True),
                Conv2d("conv3x3", "conv7x7", out_channels=4, kernel=3, stride=2, padding="same"),
                Conv2d("conv1x1", "conv3x3", out_channels=4, kernel=1, stride=2, padding="same"),
            ],
        ),
        (4, 3, 10, 13),
    ),
    Case(
        "conv_same_even_kernel_dilated",
        lambda: _graph(
            "conv_same_even_kernel_dilated",
            3,
            [
                Conv2d("even", "x", out_channels=4, kernel=(2, 4), padding="same"),
                Conv2d(
                    "dilated", "even", out_channels=4, kernel=3, stride=(2, 3), dilation=2, padding="same"
                ),
            ],
        ),
        (4, 3, 9, 8),
    ),
    Case(
        "maxpool_same_negative_inputs",
        lambda: _graph(
            "maxpool_same_negative_inputs",
            3,
            [MaxPool2d("pool", "x", kernel=3, stride=2, padding="same")],
        ),
        (4, 3, 8, 9),
        negative=True,
    ),
    Case(
        "avgpool_same_exclude_pad",
        lambda: _pool_graph(
            "avgpool_same_exclude_pad",
            AvgPool2d("pool", "conv", kernel=3, stride=2, padding="same", count_include_pad=False),
        ),
        (4, 3, 8, 9),
    ),
    Case(
        "avgpool_same_include_pad",
        lambda: _pool_graph(
            "avgpool_same_include_pad",
            AvgPool2d("pool", "conv", kernel=(3, 2), stride=2, padding="same", count_include_pad=True),
        ),
        (4, 3, 7, 10),
    ),
    Case(
        "zero_pad_before_maxpool_negative_inputs",
        lambda: _graph(
            "zero_pad_before_maxpool_negative_inputs",
            3,
            [
                Pad2d("pad", "x", padding=((1, 0), (2, 1))),
                MaxPool2d("pool", "pad", kernel=3, stride=2),
            ],
        ),
        (4, 3, 7, 8),
        negative=True,
    ),
    Case(
        "batchnorm_biased_running_variance",
        lambda: _graph(
            "batchnorm_biased_running_variance",
            3,
            [
                Conv2d("conv", "x", out_channels=4, kernel=3, padding=1),
                BatchNorm("bn", "conv", eps=1e-3, momentum=0.3, running_variance="biased"),
                ReLU("relu", "bn"),
            ],
        ),
        (2, 3, 2, 3),
    ),
    Case(
        "batchnorm_large_channel_offset",
        lambda: _graph(
            "batchnorm_large_channel_offset",
            3,
            [
                Conv2d("conv", "x", out_channels=4, kernel=3, padding=1, bias=True),
                BatchNorm("bn", "conv", momentum=0.3),
                Conv2d("conv2", "bn", out_channels=4, kernel=1, bias=True),
                BatchNorm("bn2", "conv2", eps=1e-3, momentum=0.3, running_variance="biased"),
                ReLU("relu", "bn2"),
            ],
        ),
        (4, 3, 5, 6),
        offsets=(
            ("conv.bias", 300.0),
            ("bn.running_mean", 300.0),
            ("conv2.bias", -300.0),
            ("bn2.running_mean", -300.0),
        ),
    ),
    Case(
        "add_three_branches",
        lambda: _graph(
            "add_three_branches",
            3,
            [
                Conv2d("a", "x", out_channels=4, kernel=3, padding=1),
                Conv2d("b", "x", out_channels=4, kernel=1),
                ReLU("relu", "a"),
                Add("add", ("relu", "b", "a")),
                ReLU("out", "add"),
            ],
        ),
        (4, 3, 5, 6),
    ),
]


@st.composite
def small_graphs(draw: st.DrawFn) -> Case:
    """A random small graph for training-mode BatchNorm: convolutions with biases (some offset
    by up to 100 on a channel), grouped 1x1 convolutions, max and average pools and BatchNorm
    with either running-variance convention, then a global pool or Flatten, and Dense."""
    channels = draw(st.integers(1, 4))
    shape = (draw(st.integers(2, 4)), channels, draw(st.integers(3, 8)), draw(st.integers(3, 8)))
    nodes: list[Node] = []
    offsets: list[tuple[str, float]] = []
    last, width = "x", channels
    for index in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "grouped_1x1", "maxpool", "avgpool"]))
        name = f"{kind}{index}"
        if kind == "maxpool":
            node: Node = MaxPool2d(name, last, kernel=draw(st.sampled_from([2, 3])), stride=2, padding=1)
        elif kind == "avgpool":
            node = AvgPool2d(name, last, kernel=2, stride=draw(st.sampled_from([1, 2])))
        else:
            groups = draw(st.sampled_from([g for g in (1, 2, 4) if width % g == 0]))
            out = groups * draw(st.integers(1, 3))
            kernel = 1 if kind == "grouped_1x1" else draw(st.sampled_from([1, 3]))
            if kind == "conv":
                groups = 1
            node = Conv2d(
                name, last, out_channels=out, kernel=kernel, padding=kernel // 2, groups=groups, bias=True
            )
            width = out
            offset = draw(st.sampled_from([0.0, 0.0, 10.0, -100.0]))
            if offset:
                offsets.append((f"{name}.bias", offset))
        try:
            infer_shapes(Graph("probe", Input("x", channels), (*nodes, node), node.name), shape)
        except SpecError:
            continue
        nodes.append(node)
        last = node.name
        if isinstance(node, Conv2d) and draw(st.booleans()):
            convention = draw(st.sampled_from(VARIANCE_CONVENTIONS))
            nodes.append(BatchNorm(f"bn{index}", last, eps=1e-3, momentum=0.3, running_variance=convention))
            nodes.append(ReLU(f"relu{index}", f"bn{index}"))
            last = f"relu{index}"
    if draw(st.booleans()):
        nodes.append(GlobalAvgPool("gap", last))
        last = "gap"
    nodes += [Flatten("flatten", last), Dense("fc", "flatten", out_features=3)]
    graph = Graph("small", Input("x", channels), tuple(nodes), "fc")
    seed = draw(st.integers(0, 2**16))
    return Case(f"small-{seed}", lambda: graph, shape, seed=seed, offsets=tuple(offsets))


SPATIAL = Case(
    "spatial_output",
    lambda: _graph(
        "spatial_output",
        3,
        [
            Conv2d("conv", "x", out_channels=4, kernel=3, stride=2, padding=((1, 0), (0, 1))),
            BatchNorm("bn", "conv"),
            ReLU("relu", "bn"),
        ],
        head=False,
    ),
    (4, 3, 8, 10),
)
"""A graph whose output is a 4-D map, returned in the runner's layout."""
