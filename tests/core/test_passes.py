"""`multires.passes`: each pass computes what the original graph computes, by the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

import multires
from multires import Add, BatchNorm, Conv2d, Dense, Flatten, GlobalAvgPool, Graph, Input, MaxPool2d, ReLU
from multires.errors import WeightsError
from multires.passes import fold_batchnorm, foldable_batchnorms
from multires.reference import relative_error
from multires.weights import check_weights, random_weights

FOLD_RTOL = 1e-6
"""Folded weights are rounded to float32 once (about 6e-8 relative); the reference then computes in
float64, so the folded graph matches the original to well within this (measured up to 7e-8)."""


def _head(nodes: list, last: str) -> list:
    return [
        *nodes,
        GlobalAvgPool("gap", last),
        Flatten("flatten", "gap"),
        Dense("fc", "flatten", out_features=3),
    ]


def _traps() -> Graph:
    """Grouped and depthwise convs, a conv with and one without bias, SAME stride-2 padding, and
    BatchNorms that must stay: one whose conv also feeds the shortcut, one after a pool, one
    after an Add."""
    nodes = [
        Conv2d("stem", "x", out_channels=8, kernel=3, stride=2, padding="same", bias=True),
        BatchNorm("stem_bn", "stem", eps=1e-3),
        ReLU("stem_relu", "stem_bn"),
        Conv2d("grouped", "stem_relu", out_channels=8, kernel=3, padding=1, groups=2),
        BatchNorm("grouped_bn", "grouped"),
        ReLU("grouped_relu", "grouped_bn"),
        Conv2d("depthwise", "grouped_relu", out_channels=8, kernel=3, padding="same", groups=8, bias=True),
        BatchNorm("depthwise_bn", "depthwise", eps=0.5),
        Conv2d("shared", "stem_relu", out_channels=8, kernel=1),
        BatchNorm("shared_bn", "shared"),
        Add("add", ("depthwise_bn", "shared_bn", "shared")),
        BatchNorm("add_bn", "add"),
        MaxPool2d("pool", "add_bn", kernel=2),
        BatchNorm("pool_bn", "pool"),
        ReLU("relu", "pool_bn"),
    ]
    return Graph("traps", Input("x", 3), tuple(_head(nodes, "relu")), "fc")


def _check_exact(graph: Graph, shape: tuple[int, ...], seed: int = 0) -> tuple[Graph, dict]:
    weights = random_weights(graph, seed, input_shape=shape)
    folded, folded_weights = fold_batchnorm(graph, weights)
    check_weights(folded, folded_weights, shape)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    expected = multires.reference.run(graph, weights, x)
    assert relative_error(multires.reference.run(folded, folded_weights, x), expected) < FOLD_RTOL
    return folded, folded_weights


def test_traps_fold_only_sole_consumer_convs_and_stay_exact() -> None:
    graph = _traps()
    assert foldable_batchnorms(graph) == {
        "stem_bn": "stem",
        "grouped_bn": "grouped",
        "depthwise_bn": "depthwise",
    }
    folded, weights = _check_exact(graph, (2, 3, 11, 10))
    bns = [n.name for n in folded.nodes if isinstance(n, BatchNorm)]
    assert bns == ["shared_bn", "add_bn", "pool_bn"]
    assert all(folded[name].bias for name in ("stem", "grouped", "depthwise"))
    assert not folded["shared"].bias
    assert folded["stem_relu"].inputs == ("stem",) and folded["add"].inputs == (
        "depthwise",
        "shared_bn",
        "shared",
    )
    assert "grouped.bias" in weights and not any(k.startswith(("stem_bn.", "grouped_bn.")) for k in weights)
    assert folded.name == graph.name and "3 conv(s)" in folded.description


@pytest.mark.parametrize(
    ("name", "options", "shape"),
    [
        ("resnet18", {"num_classes": 10}, (2, 3, 16, 16)),
        ("resnext50_32x4d", {"num_classes": 10}, (1, 3, 16, 16)),
        ("d2l_resnet18", {"edition": "tf"}, (2, 1, 21, 21)),
        ("preact_resnet18", {"num_classes": 10}, (2, 3, 16, 16)),
    ],
)
def test_zoo_models_fold_exactly(name: str, options: dict, shape: tuple[int, ...]) -> None:
    graph = multires.spec(name, **options)
    folded, _ = _check_exact(graph, shape)
    left = sum(isinstance(n, BatchNorm) for n in folded.nodes)
    before = sum(isinstance(n, BatchNorm) for n in graph.nodes)
    assert before - left == len(foldable_batchnorms(graph)) > 0
    if not name.startswith("preact"):
        assert left == 0
    assert multires.param_count(folded) < multires.param_count(graph)


def test_output_nodes_keep_their_batchnorm() -> None:
    nodes = (Conv2d("conv", "x", out_channels=4, kernel=3), BatchNorm("bn", "conv"))
    as_output = Graph("bn_out", Input("x", 3), nodes, "bn")
    conv_out = Graph("both_out", Input("x", 3), nodes, ("conv", "bn"))
    assert foldable_batchnorms(as_output) == {} == foldable_batchnorms(conv_out)
    weights = random_weights(as_output)
    folded, folded_weights = fold_batchnorm(as_output, weights)
    assert folded is as_output and all(folded_weights[k] is v for k, v in weights.items())


def test_folding_rejects_mismatched_weights() -> None:
    graph = _traps()
    weights = random_weights(graph)
    del weights["grouped_bn.running_var"]
    with pytest.raises(WeightsError, match=r"missing grouped_bn.running_var"):
        fold_batchnorm(graph, weights)
    weights = random_weights(graph)
    weights["stem_bn.running_var"][0] = -1.0
    with pytest.raises(WeightsError, match=r"stem_bn \(BatchNorm\): running_var \+ eps must be positive"):
        fold_batchnorm(graph, weights)
