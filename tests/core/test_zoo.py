"""The model zoo: reference parameter counts and MACs, the book's shapes, canonical names,
options and their errors, the builder and blocks, and (hypothesis) shape inference against the
NumPy reference and exact serialisation of random zoo graphs."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import multires
from multires import (
    BatchNorm,
    Conv2d,
    Graph,
    MaxPool2d,
    ModelNotFoundError,
    SpecError,
    infer_shapes,
    macs,
    param_count,
)
from multires.graph import resolve_padding
from multires.weights import weight_shapes
from multires.zoo import (
    GraphBuilder,
    d2l_residual_block,
    join,
    model_options,
    models,
    resnext_block,
    spec,
    stem,
)

# Parameter counts and MACs ----------------------------------------------------------------------

TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "wide_resnet50_2": 68_883_240,
}
"""`sum(p.numel() for p in torchvision.models.<name>().parameters())` at 1000 classes, 3 channels."""


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_counts_equal_torchvision(name: str) -> None:
    assert param_count(spec(name)) == TORCHVISION_PARAMS[name]


def resnet50_macs_by_hand(size: int = 224) -> int:
    """ResNet-50 v1.5 multiply-accumulates from He et al. 2016 Table 1, independently of the zoo.

    A conv costs out_h * out_w * out_channels * in_channels/groups * kh * kw. Stem conv 7x7/2:
    112 * 112 * 64 * 3 * 49; after the max-pool, stage (blocks n, width p) on an s x s input
    with stride t has output side s/t. Its first block costs the 1x1 conv1 at the input
    resolution (v1.5 strides the 3x3) s^2 * p * c_in, then (s/t)^2 * (9 p^2 + 4 p^2 + 4p * c_in)
    for the 3x3, the 1x1 expansion and the projection; each other block costs
    (s/t)^2 * (4p * p + 9 p^2 + 4 p^2) = 17 p^2 (s/t)^2. Then fc 2048 * 1000.
    """
    side = size // 2
    total = side * side * 64 * 3 * 7 * 7
    side //= 2
    c_in = 64
    for blocks, p, stride in ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)):
        out = side // stride
        total += side * side * p * c_in + out * out * (9 * p * p + 4 * p * p + 4 * p * c_in)
        total += (blocks - 1) * 17 * p * p * out * out
        side, c_in = out, 4 * p
    return total + 2048 * 1000


def test_resnet50_macs_match_the_reported_4_09_g() -> None:
    # torchvision's model card and most papers quote ResNet-50 at "4.09 GFLOPs" per 224 x 224
    # image; that figure counts multiply-accumulates of the convolutions and the fc layer
    # (BN, ReLU, pooling and the residual adds are left out), which is what macs() counts.
    derived = resnet50_macs_by_hand()
    assert derived == 4_089_184_256
    assert macs(spec("resnet50"), (1, 3, 224, 224)) == derived
    assert round(derived / 1e9, 2) == 4.09
    assert macs(spec("resnet50"), (2, 3, 224, 224)) == 2 * derived


# The book's shapes --------------------------------------------------------------------------------


def stage_output(graph: Graph, stage: str) -> str:
    """The node of `stage` (a name prefix such as 'b3') that the rest of the graph reads."""
    inside = [n.name for n in graph.nodes if n.name.startswith(stage + ".")]
    leaving = [n for n in inside if any(not c.startswith(stage + ".") for c in graph.consumers[n])]
    assert len(leaving) == 1, leaving
    return leaving[0]


BOOK_STAGES = ("b1", "b2", "b3", "b4", "b5")


def test_d2l_resnet18_matches_the_books_layer_summary_at_96() -> None:
    graph = spec("d2l_resnet18")
    shapes = infer_shapes(graph, (1, 1, 96, 96))
    stages = [shapes[stage_output(graph, s)][1:] for s in BOOK_STAGES]
    assert stages == [(64, 24, 24), (64, 24, 24), (128, 12, 12), (256, 6, 6), (512, 3, 3)]
    assert shapes[graph.outputs[0]] == (1, 10)


def test_d2l_resnet18_spatial_sizes_at_224() -> None:
    graph = spec("d2l_resnet18")
    shapes = infer_shapes(graph, (1, 1, 224, 224))
    assert shapes["b1.0"][2:] == (112, 112)
    assert [shapes[stage_output(graph, s)][2] for s in BOOK_STAGES] == [56, 56, 28, 14, 7]


def test_d2l_resnet_default_is_resnet18() -> None:
    assert spec("d2l_resnet").nodes == spec("d2l_resnet18").nodes
    assert spec("d2l_resnet", arch=[[2, 64], [2, 128], [2, 256], [2, 512]]) == spec("d2l_resnet")


# Canonical names ------------------------------------------------------------------------------------


def test_resnet18_weight_names_are_torchvisions_state_dict_keys() -> None:
    names = weight_shapes(spec("resnet18"))
    # torchvision's resnet18 has 62 parameter tensors and 40 running statistics (plus 20
    # num_batches_tracked counters, which are not weights).
    assert len(names) == 102
    assert names["conv1.weight"] == (64, 3, 7, 7)
    assert names["layer1.0.conv1.weight"] == (64, 64, 3, 3)
    assert names["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert names["layer2.0.downsample.1.running_var"] == (128,)
    assert names["layer4.1.bn2.bias"] == (512,)
    assert names["fc.weight"] == (1000, 512)
    assert "layer1.0.downsample.0.weight" not in names
    assert not any(isinstance(node, Conv2d) and node.bias for node in spec("resnet18").nodes)


def test_bottleneck_names_and_grouped_widths() -> None:
    resnet50 = weight_shapes(spec("resnet50"))
    assert resnet50["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert resnet50["layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert resnet50["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert weight_shapes(spec("resnext50_32x4d"))["layer1.0.conv2.weight"] == (128, 4, 3, 3)
    assert weight_shapes(spec("resnext101_32x8d"))["layer4.0.conv2.weight"] == (2048, 64, 3, 3)
    assert weight_shapes(spec("wide_resnet50_2"))["layer1.0.conv2.weight"] == (128, 128, 3, 3)


def test_resnet_v1_5_strides_the_bottleneck_3x3() -> None:
    graph = spec("resnet50")
    assert graph["layer2.0.conv1"].stride == (1, 1)
    assert graph["layer2.0.conv2"].stride == (2, 2)
    assert graph["layer2.0.downsample.0"].stride == (2, 2)


def test_d2l_names_are_the_books_module_paths() -> None:
    names = weight_shapes(spec("d2l_resnet18"), (1, 1, 96, 96))
    assert names["b1.0.weight"] == (64, 1, 7, 7) and names["b1.0.bias"] == (64,)
    assert names["b1.1.running_mean"] == (64,)
    assert names["b2.0.conv1.bias"] == (64,)
    assert names["b3.0.conv3.weight"] == (128, 64, 1, 1) and names["b3.0.conv3.bias"] == (128,)
    assert names["last.2.weight"] == (10, 512)
    assert "b2.0.conv3.weight" not in names and "b3.1.conv3.weight" not in names
    graph = spec("d2l_resnet18")
    assert graph.consumers["b3.0.conv3"] == ("b3.0.add",)  # the book's shortcut has no BN
    assert [type(graph[f"b1.{i}"]).__name__ for i in range(4)] == ["Conv2d", "BatchNorm", "ReLU", "MaxPool2d"]
    assert [type(graph[f"last.{i}"]).__name__ for i in range(3)] == ["GlobalAvgPool", "Flatten", "Dense"]


@pytest.mark.parametrize("name", ["d2l_resnet18", "d2l_resnext"])
def test_d2l_editions_differ_only_in_padding_and_batchnorm(name: str) -> None:
    editions = {e: spec(name, edition=e) for e in ("pytorch", "mxnet", "tf", "jax")}
    shapes = {e: weight_shapes(g, (1, 1, 29, 29)) for e, g in editions.items()}
    assert all(s == shapes["pytorch"] for s in shapes.values())
    for e, graph in editions.items():
        bns = {(n.eps, n.momentum, n.running_variance) for n in graph.nodes if isinstance(n, BatchNorm)}
        assert (
            bns
            == {
                "pytorch": {(1e-5, 0.1, "unbiased")},
                "mxnet": {(1e-5, 0.1, "biased")},
                "tf": {(1e-3, 0.01, "biased")},
                "jax": {(1e-5, 0.01, "biased")},
            }[e]
        )
        windowed = [n for n in graph.nodes if isinstance(n, (Conv2d, MaxPool2d)) and max(n.kernel) > 1]
        paddings = {n.padding for n in windowed}
        assert paddings == ({"same"} if e in ("tf", "jax") else {((1, 1), (1, 1)), ((3, 3), (3, 3))})
        assert {n.padding for n in graph.nodes if isinstance(n, Conv2d) and n.kernel == (1, 1)} == {
            ((0, 0), (0, 0))
        }
    # SAME at stride 2 pads less before than after on even sizes: the TF stem sees another window.
    stem = editions["tf"]["b1.0"]
    assert resolve_padding(stem.padding, (96, 29), stem.kernel, stem.stride) == ((2, 3), (3, 3))
    assert infer_shapes(editions["tf"], (1, 1, 29, 29)) == infer_shapes(editions["pytorch"], (1, 1, 29, 29))


def test_unknown_edition_lists_the_editions() -> None:
    with pytest.raises(SpecError, match=r"unknown edition 'keras'.*\['jax', 'mxnet', 'pytorch', 'tf'\]"):
        spec("d2l_resnet18", edition="keras")


def test_preact_resnet_is_timm_resnetv2() -> None:
    graph = spec("preact_resnet50")
    # No BN or ReLU between the stem conv and the max-pool: the pool sees negative values.
    assert graph["stem.pool"].inputs == ("stem.conv",)
    # The projection shortcut reads the pre-activated input and has no BN.
    assert graph["stages.1.blocks.0.downsample.conv"].inputs == ("stages.1.blocks.0.act1",)
    assert graph.consumers["stages.1.blocks.0.downsample.conv"] == ("stages.1.blocks.0.add",)
    assert graph["stages.1.blocks.0.conv2"].stride == (2, 2)
    assert graph.consumers["stages.0.blocks.1.add"] == ("stages.0.blocks.2.norm1", "stages.0.blocks.2.add")
    names = weight_shapes(graph)
    assert names["stages.0.blocks.0.downsample.conv.weight"] == (256, 64, 1, 1)
    assert names["norm.weight"] == (2048,) and names["head.fc.weight"] == (1000, 2048)
    assert param_count(graph) == 25_549_352
    # The basic variant projects only where the shape changes.
    assert "stages.0.blocks.0.downsample.conv" not in spec("preact_resnet18").by_name
    assert "stages.1.blocks.0.downsample.conv" in spec("preact_resnet18").by_name


@pytest.mark.parametrize("name", models())
def test_every_model_describes_its_reference(name: str) -> None:
    if name.startswith("preact_"):
        reference = f"timm's resnetv2_{name.removeprefix('preact_resnet')}"
    elif name.startswith("d2l_"):
        reference = "Dive into Deep Learning"
    elif name.startswith("gluon_"):
        reference = f"mxnet.gluon.model_zoo.vision.{name.removeprefix('gluon_')}"
    elif name.startswith("keras_"):
        reference = "keras.applications.ResNet"
    else:
        reference = f"torchvision.models.{name}"
    assert reference in spec(name).description


# Options and their errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", models())
def test_options_change_the_input_and_output(name: str) -> None:
    assert {"num_classes", "in_channels"} <= set(model_options(name))
    graph = spec(name, num_classes=7, in_channels=2)
    shapes = infer_shapes(graph, (3, 2, 64, 48))
    assert shapes[graph.outputs[0]] == (3, 7)
    first_conv = next(n for n in graph.nodes if isinstance(n, Conv2d))
    assert weight_shapes(graph)[f"{first_conv.name}.weight"][1] == 2
    default = spec(name)
    assert infer_shapes(default, (1, default.inputs[0].channels, 64, 64))[default.outputs[0]] == (
        1,
        model_options(name)["num_classes"],
    )


def test_model_options_list_defaults() -> None:
    assert model_options("resnet18") == {"num_classes": 1000, "in_channels": 3}
    assert model_options("d2l_resnet18") == {"num_classes": 10, "in_channels": 1, "edition": "pytorch"}
    assert model_options("d2l_resnet")["arch"] == ((2, 64), (2, 128), (2, 256), (2, 512))


def test_unknown_model_suggests_a_close_name() -> None:
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'resnet05'.*'resnet50'"):
        spec("resnet05")
    with pytest.raises(LookupError):
        spec("d2l_resnte18")


def test_unknown_option_is_a_spec_error_listing_the_options() -> None:
    with pytest.raises(SpecError, match=r"'resnet18' has no option\(s\) \['num_class'\].*'num_classes'"):
        spec("resnet18", num_class=10)


@pytest.mark.parametrize(
    ("arch", "fragment"),
    [
        ((), "non-empty"),
        (((2, 64), (0, 128)), "positive ints"),
        (((2, 64.5),), "positive ints"),
        ((64, 128), "pairs"),
        (((2, 32), (2, 64)), "num_channels must equal b1's 64; got arch[0]=(2, 32)"),
    ],
)
def test_bad_d2l_arch_is_a_spec_error(arch: object, fragment: str) -> None:
    with pytest.raises(SpecError, match=r"^d2l_resnet: .*" + re.escape(fragment)):
        spec("d2l_resnet", arch=arch)


def test_bad_sizes_are_spec_errors_naming_the_node() -> None:
    with pytest.raises(SpecError, match=r"^last.2 \(Dense\): out_features must be positive"):
        spec("d2l_resnet18", num_classes=0)
    with pytest.raises(SpecError, match=r"^resnet18: in_channels must be a positive int; got 0"):
        spec("resnet18", in_channels=0)
    with pytest.raises(
        SpecError, match=r"^b2.0.conv2 \(Conv2d\): the book's `groups` is the channels per group"
    ):
        spec("d2l_resnext", groups=128)


# Builder and blocks -------------------------------------------------------------------------------


def test_builder_tracks_channels_and_names() -> None:
    b = GraphBuilder("tiny", in_channels=3)
    x = stem(b, "", b.input, 16)
    assert (x, b.channels(x)) == ("maxpool", 16)
    y = b.flatten("head.flatten", b.gap("head.pool", x))
    assert b.channels(y) == 16
    graph = b.graph(b.dense("head.fc", y, 5), description="tiny")
    assert [n.name for n in graph.nodes][:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert join("", "conv1") == "conv1" and join("layer1.0", "downsample", "0") == "layer1.0.downsample.0"


def test_builder_errors_name_the_node() -> None:
    b = GraphBuilder("tiny", in_channels=3)
    x = b.conv("conv", b.input, 4, 3)
    with pytest.raises(SpecError, match=r"^conv \(ReLU\): duplicate name"):
        b.relu("conv", x)
    with pytest.raises(SpecError, match=r"^act \(ReLU\): unknown input 'nope'"):
        b.relu("act", "nope")
    with pytest.raises(SpecError, match=r"feature count depends on the image size"):
        b.channels(b.flatten("flat", x))


def test_resnet_builder_rejects_bad_layers() -> None:
    with pytest.raises(SpecError, match=r"^custom: layers must be 4 positive ints"):
        multires.zoo.resnet.resnet("custom", multires.zoo.residual_block, (2, 2, 2))


def block_graph(block, channels: int, **options) -> Graph:
    b = GraphBuilder("block", channels)
    return b.graph(block(b, "blk", b.input, **options))


def test_resnext_block_is_the_books() -> None:
    # The book: ResNeXtBlock(32, 16, 1) keeps (4, 32, 96, 96); `groups` is channels per group.
    graph = block_graph(resnext_block, 32, num_channels=32, groups=16, bot_mul=1)
    assert infer_shapes(graph, (4, 32, 96, 96))[graph.outputs[0]] == (4, 32, 96, 96)
    assert graph["blk.conv2"].groups == 2 and all(graph[f"blk.conv{i}"].bias for i in (1, 2, 3))
    assert "blk.conv4" not in graph.by_name
    graph = block_graph(
        resnext_block, 32, num_channels=64, groups=8, bot_mul=0.5, use_1x1conv=True, strides=2
    )
    assert infer_shapes(graph, (1, 32, 96, 96))[graph.outputs[0]] == (1, 64, 48, 48)
    assert graph["blk.conv2"].groups == 4 and graph["blk.conv4"].stride == (2, 2)
    assert graph.consumers["blk.bn4"] == ("blk.add",)


def test_d2l_residual_block_is_the_books() -> None:
    # The book: Residual(3) keeps (4, 3, 6, 6); Residual(6, use_1x1conv=True, strides=2) gives (4, 6, 3, 3).
    graph = block_graph(d2l_residual_block, 3, num_channels=3)
    assert infer_shapes(graph, (4, 3, 6, 6))[graph.outputs[0]] == (4, 3, 6, 6)
    graph = block_graph(d2l_residual_block, 3, num_channels=6, use_1x1conv=True, strides=2)
    assert infer_shapes(graph, (4, 3, 6, 6))[graph.outputs[0]] == (4, 6, 3, 3)
    assert graph.consumers["blk.conv3"] == ("blk.add",) and graph["blk.conv3"].bias


# Hypothesis: shape inference against the reference; serialisation --------------------------------


@st.composite
def d2l_configs(draw: st.DrawFn) -> tuple[str, dict, tuple[int, int, int, int]]:
    stages = draw(st.integers(1, 4))
    arch = [(draw(st.integers(1, 2)), 64)]
    arch += [(draw(st.integers(1, 2)), draw(st.sampled_from((32, 64, 96)))) for _ in range(stages - 1)]
    options = {
        "arch": tuple(arch),
        "num_classes": draw(st.integers(1, 12)),
        "in_channels": draw(st.integers(1, 4)),
    }
    name = draw(st.sampled_from(("d2l_resnet", "d2l_resnext")))
    options["edition"] = draw(st.sampled_from(("pytorch", "mxnet", "tf", "jax")))
    if name == "d2l_resnext":
        options["groups"] = draw(st.sampled_from((1, 2, 4, 8, 16)))
        options["bot_mul"] = draw(st.sampled_from((0.5, 1.0)))
    shape = (
        draw(st.integers(1, 2)),
        options["in_channels"],
        draw(st.integers(1, 40)),
        draw(st.integers(1, 40)),
    )
    return name, options, shape


@settings(max_examples=12, deadline=None)
@given(d2l_configs(), st.integers(0, 2**31 - 1))
def test_shape_inference_agrees_with_the_reference(config, seed: int) -> None:
    name, options, shape = config
    graph = spec(name, **options)
    every = Graph(graph.name, graph.inputs, graph.nodes, tuple(n.name for n in graph.nodes))
    x = np.random.default_rng(seed).standard_normal(shape)
    values = multires.reference.run(every, multires.random_weights(every, seed, shape), x)
    inferred = infer_shapes(graph, shape)
    assert {name: v.shape for name, v in values.items()} == {n.name: inferred[n.name] for n in graph.nodes}
    assert inferred[graph.outputs[0]] == (shape[0], options["num_classes"])


@settings(max_examples=8, deadline=None)
@given(st.sampled_from(models()), st.integers(1, 2000), st.integers(1, 5))
def test_zoo_graphs_round_trip_exactly(name: str, num_classes: int, in_channels: int) -> None:
    graph = spec(name, num_classes=num_classes, in_channels=in_channels)
    for again in (Graph.from_json(graph.to_json()), Graph.from_yaml(graph.to_yaml())):
        assert again == graph and hash(again) == hash(graph)
        assert again.description == graph.description and again.to_dict() == graph.to_dict()
