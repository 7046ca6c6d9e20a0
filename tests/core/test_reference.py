"""The reference interpreter against naive loops, finite differences and hand computations."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multires import reference
from multires.backend import SGD
from multires.errors import ShapeError, SpecError, WeightsError
from multires.graph import (
    NODE_TYPES,
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
    pads_as_same,
    resolve_padding,
)
from multires.weights import is_buffer, weight_shapes


def graph_of(*nodes: Node, channels: int = 3, outputs: tuple[str, ...] | None = None) -> Graph:
    return Graph("t", (Input("x", channels),), nodes, outputs or (nodes[-1].name,))


def random_weights64(graph: Graph, input_shape: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """float64 weights with positive running variances and non-trivial BatchNorm parameters."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(graph, input_shape).items():
        node, kind = name.rsplit(".", 1)
        if kind == "running_var" or (kind == "weight" and isinstance(graph[node], BatchNorm)):
            weights[name] = rng.uniform(0.5, 1.5, shape)
        else:
            weights[name] = rng.normal(0.0, 0.5, shape)
    return weights


# --------------------------------------------------------------------------------------------
# Naive loop definitions.


def naive_conv(x, weight, bias, stride, padding, dilation, groups):
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    (top, bottom), (left, right) = padding
    oh = (h + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    og = o // groups
    y = np.zeros((n, o, oh, ow))
    for b in range(n):
        for oc in range(o):
            first = (oc // og) * cg
            for oy in range(oh):
                for ox in range(ow):
                    total = 0.0 if bias is None else bias[oc]
                    for ic in range(cg):
                        for i in range(kh):
                            for j in range(kw):
                                iy = oy * stride[0] - top + i * dilation[0]
                                ix = ox * stride[1] - left + j * dilation[1]
                                if 0 <= iy < h and 0 <= ix < w:
                                    total += x[b, first + ic, iy, ix] * weight[oc, ic, i, j]
                    y[b, oc, oy, ox] = total
    return y


def naive_pool(x, kernel, stride, padding, mode, count_include_pad=True):
    n, c, h, w = x.shape
    (top, bottom), (left, right) = padding
    oh = (h + top + bottom - kernel[0]) // stride[0] + 1
    ow = (w + left + right - kernel[1]) // stride[1] + 1
    y = np.zeros((n, c, oh, ow))
    for b in range(n):
        for ch in range(c):
            for oy in range(oh):
                for ox in range(ow):
                    inside = [
                        x[b, ch, iy, ix]
                        for iy in range(oy * stride[0] - top, oy * stride[0] - top + kernel[0])
                        for ix in range(ox * stride[1] - left, ox * stride[1] - left + kernel[1])
                        if 0 <= iy < h and 0 <= ix < w
                    ]
                    if mode == "max":
                        y[b, ch, oy, ox] = max(inside)
                    else:
                        divisor = kernel[0] * kernel[1] if count_include_pad else len(inside)
                        y[b, ch, oy, ox] = sum(inside) / divisor
    return y


# --------------------------------------------------------------------------------------------
# Forward against naive loops.


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(2))
    sizes = []
    for axis in range(2):
        extent = dilation[axis] * (kernel[axis] - 1) + 1
        smallest = max(1, extent - sum(padding[axis]))
        sizes.append(draw(st.integers(smallest, smallest + 4)))
    node = Conv2d(
        "conv",
        ("x",),
        out_channels=cout,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
    )
    return node, (draw(st.integers(1, 2)), cin, *sizes), draw(st.integers(0, 2**32 - 1))


@settings(max_examples=40, deadline=None)
@given(conv_cases())
def test_conv_matches_naive_loops(case):
    node, shape, seed = case
    graph = graph_of(node, channels=shape[1])
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    weights = random_weights64(graph, shape, seed)
    expected = naive_conv(
        x,
        weights["conv.weight"],
        weights.get("conv.bias"),
        node.stride,
        node.padding,
        node.dilation,
        node.groups,
    )
    fwd = reference.forward(graph, weights, x)
    np.testing.assert_allclose(fwd.outputs["conv"], expected, rtol=1e-12, atol=1e-12)
    # The convolution is linear in x and in the weight separately, so its backward is exact when
    # <y - b, g> = <x, dx> = <w, dw> (adjoint identities), for every geometry drawn.
    gy = rng.normal(size=expected.shape)
    grads = reference.backward(fwd, gy)
    bias = weights.get("conv.bias", np.zeros(node.out_channels))
    linear = float(((expected - bias[:, None, None]) * gy).sum())
    assert float((x * grads["x"]).sum()) == pytest.approx(linear, rel=1e-10, abs=1e-10)
    assert float((weights["conv.weight"] * grads["conv.weight"]).sum()) == pytest.approx(
        linear, rel=1e-10, abs=1e-10
    )
    if node.bias:
        np.testing.assert_allclose(grads["conv.bias"], gy.sum(axis=(0, 2, 3)), rtol=1e-12)


@st.composite
def pool_cases(draw):
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = tuple((draw(st.integers(0, k // 2)), draw(st.integers(0, k // 2))) for k in kernel)
    shape = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 2)),
        draw(st.integers(3, 7)),
        draw(st.integers(3, 7)),
    )
    return kernel, stride, padding, shape, draw(st.booleans()), draw(st.integers(0, 2**32 - 1))


@settings(max_examples=40, deadline=None)
@given(pool_cases(), st.booleans())
def test_pools_match_naive_loops(case, all_negative):
    kernel, stride, padding, shape, count_include_pad, seed = case
    x = np.random.default_rng(seed).normal(size=shape)
    if all_negative:
        x = -np.abs(x) - 1.0  # zero padding would win the max here; -inf padding never does
    maxpool = MaxPool2d("pool", ("x",), kernel=kernel, stride=stride, padding=padding)
    avgpool = AvgPool2d(
        "pool", ("x",), kernel=kernel, stride=stride, padding=padding, count_include_pad=count_include_pad
    )
    fwd_max = reference.forward(graph_of(maxpool, channels=shape[1]), {}, x)
    fwd_avg = reference.forward(graph_of(avgpool, channels=shape[1]), {}, x)
    expected_avg = naive_pool(x, kernel, stride, padding, "avg", count_include_pad)
    np.testing.assert_array_equal(fwd_max.outputs["pool"], naive_pool(x, kernel, stride, padding, "max"))
    np.testing.assert_allclose(fwd_avg.outputs["pool"], expected_avg, rtol=1e-13, atol=1e-13)
    # Both pools are positively homogeneous of degree 1, so <y, g> = <x, dx> (Euler's identity).
    gy = np.random.default_rng(seed + 1).normal(size=expected_avg.shape)
    for fwd in (fwd_max, fwd_avg):
        dx = reference.backward(fwd, gy)["x"]
        assert float((x * dx).sum()) == pytest.approx(
            float((fwd.outputs["pool"] * gy).sum()), rel=1e-10, abs=1e-10
        )


def tf_same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's documented SAME rule: output ceil(size / stride), the smaller half before."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


@settings(max_examples=40, deadline=None)
@given(
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.integers(1, 2),
)
def test_same_padding_is_tensorflows_rule_for_convs_and_pools(size, kernel, stride, dilation):
    x = np.random.default_rng(sum(size)).normal(size=(1, 2, *size))
    pads = tuple(tf_same_pads(*axis, dilation) for axis in zip(size, kernel, stride, strict=True))
    conv = Conv2d(
        "c", ("x",), out_channels=2, kernel=kernel, stride=stride, padding="same", dilation=dilation
    )
    graph = graph_of(conv, channels=2)
    w = random_weights64(graph, x.shape)
    y = reference.run(graph, w, {"x": x})
    expected = naive_conv(x, w["c.weight"], None, stride, pads, (dilation, dilation), 1)
    assert y.shape == (1, 2, -(-size[0] // stride[0]), -(-size[1] // stride[1]))
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    pool_pads = tuple(tf_same_pads(*axis) for axis in zip(size, kernel, stride, strict=True))
    for mode, node in (
        ("max", MaxPool2d("p", ("x",), kernel=kernel, stride=stride, padding="same")),
        (
            "avg",
            AvgPool2d("p", ("x",), kernel=kernel, stride=stride, padding="same", count_include_pad=False),
        ),
    ):
        got = reference.run(graph_of(node, channels=2), {}, {"x": -np.abs(x)})
        np.testing.assert_allclose(
            got, naive_pool(-np.abs(x), kernel, stride, pool_pads, mode, False), rtol=1e-12
        )


def test_same_padding_is_asymmetric_and_depends_on_the_input_size():
    conv = Conv2d("c", ("x",), out_channels=1, kernel=7, stride=2, padding="same")
    assert resolve_padding(conv.padding, (96, 97), conv.kernel, conv.stride) == ((2, 3), (3, 3))
    assert Conv2d("c", ("x",), out_channels=1, kernel=3, padding="SAME").padding == "same"
    with pytest.raises(SpecError, match="explicit per side or 'same'.*not 'valid'"):
        Conv2d("c", ("x",), out_channels=1, kernel=3, padding="valid")


@settings(max_examples=40, deadline=None)
@given(
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    pads=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)),
    dilation=st.integers(1, 2),
)
def test_pads_as_same_holds_exactly_when_the_explicit_pads_compute_same(size, kernel, pads, dilation):
    """Where `pads_as_same` says so, the explicitly padded conv equals the SAME one at any input
    size; a stride-1 window it rejects has pads that differ from SAME's."""
    top, bottom, left, right = pads
    explicit = Conv2d(
        "c", ("x",), out_channels=2, kernel=kernel, padding=((top, bottom), (left, right)), dilation=dilation
    )
    same = Conv2d("c", ("x",), out_channels=2, kernel=kernel, padding="same", dilation=dilation)
    expected_pads = tuple(tf_same_pads(s, k, 1, dilation) for s, k in zip(size, kernel, strict=True))
    assert pads_as_same(explicit) == (explicit.padding == expected_pads)
    if pads_as_same(explicit):
        x = np.random.default_rng(sum(size)).normal(size=(1, 2, *size))
        w = random_weights64(graph_of(explicit, channels=2), x.shape)
        np.testing.assert_array_equal(
            reference.run(graph_of(explicit, channels=2), w, {"x": x}),
            reference.run(graph_of(same, channels=2), w, {"x": x}),
        )
    strided = Conv2d("c", ("x",), out_channels=2, kernel=3, stride=2, padding=((1, 1), (1, 1)))
    assert not pads_as_same(strided) and not pads_as_same(same)


def test_pad2d_adds_zeros_that_win_a_following_max_over_negative_values():
    graph = graph_of(Pad2d("z", ("x",), padding=1), MaxPool2d("p", ("z",), kernel=3, stride=2), channels=1)
    x = -np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    np.testing.assert_array_equal(reference.run(graph, {}, {"x": x}), np.zeros((1, 1, 2, 2)))
    same = graph_of(MaxPool2d("p", ("x",), kernel=3, stride=2, padding=1), channels=1)
    assert reference.run(same, {}, {"x": x}).max() < 0  # a pool's own padding never wins


def test_avgpool_divisor_counts_padding_only_when_asked():
    x = np.ones((1, 1, 2, 2))
    for include, corner in ((True, 4 / 9), (False, 1.0)):
        node = AvgPool2d("pool", ("x",), kernel=3, stride=1, padding=1, count_include_pad=include)
        y = reference.run(graph_of(node, channels=1), {}, x)
        assert y[0, 0, 0, 0] == pytest.approx(corner)


def test_small_nodes_match_their_definitions():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 4, 5))
    relu = reference.run(graph_of(ReLU("r", ("x",))), {}, x)
    np.testing.assert_array_equal(relu, np.where(x > 0, x, 0.0))
    gap = reference.run(graph_of(GlobalAvgPool("g", ("x",))), {}, x)
    assert gap.shape == (2, 3, 1, 1)
    np.testing.assert_allclose(gap[:, :, 0, 0], x.mean(axis=(2, 3)), rtol=1e-14)
    flat = reference.run(graph_of(Flatten("f", ("x",))), {}, x)
    assert flat[1, 5 * 4 + 2 * 5 + 3] == x[1, 1, 2, 3]  # channel-major (C, H, W) order
    dense = Dense("d", ("f",), out_features=4)
    graph = graph_of(Flatten("f", ("x",)), dense)
    w = {"d.weight": rng.normal(size=(4, 60)), "d.bias": rng.normal(size=4)}
    np.testing.assert_allclose(
        reference.run(graph, w, x), x.reshape(2, 60) @ w["d.weight"].T + w["d.bias"], rtol=1e-13
    )
    added = reference.run(graph_of(ReLU("r", ("x",)), Add("a", ("x", "r", "x"))), {}, x)
    np.testing.assert_allclose(added, 2 * x + np.maximum(x, 0), rtol=1e-14)


# --------------------------------------------------------------------------------------------
# BatchNorm.


def bn_case(momentum: float = 0.1):
    graph = graph_of(BatchNorm("bn", ("x",), eps=1e-3, momentum=momentum))
    x = np.random.default_rng(4).normal(2.0, 3.0, size=(3, 3, 4, 5))
    return graph, random_weights64(graph, x.shape), x


def test_batchnorm_eval_uses_running_statistics():
    graph, w, x = bn_case()
    fwd = reference.forward(graph, w, x, training=False)
    c = (slice(None), None, None)
    expected = (x - w["bn.running_mean"][c]) / np.sqrt(w["bn.running_var"][c] + 1e-3) * w["bn.weight"][c]
    np.testing.assert_allclose(fwd.outputs["bn"], expected + w["bn.bias"][c], rtol=1e-13)
    assert fwd.running == {}


def test_batchnorm_training_normalises_with_biased_batch_variance_and_updates_running_stats():
    graph, w, x = bn_case(momentum=0.25)
    before = {k: v.copy() for k, v in w.items()}
    fwd = reference.forward(graph, w, x, training=True)
    mean = x.mean(axis=(0, 2, 3))
    biased = ((x - mean[:, None, None]) ** 2).mean(axis=(0, 2, 3))
    c = (slice(None), None, None)
    expected = (x - mean[c]) / np.sqrt(biased[c] + 1e-3) * w["bn.weight"][c] + w["bn.bias"][c]
    np.testing.assert_allclose(fwd.outputs["bn"], expected, rtol=1e-12)
    count = 3 * 4 * 5
    np.testing.assert_allclose(fwd.running["bn.running_mean"], 0.75 * w["bn.running_mean"] + 0.25 * mean)
    np.testing.assert_allclose(
        fwd.running["bn.running_var"], 0.75 * w["bn.running_var"] + 0.25 * biased * count / (count - 1)
    )
    assert sorted(fwd.running) == ["bn.running_mean", "bn.running_var"]
    for name, value in w.items():
        np.testing.assert_array_equal(value, before[name])  # forward reports, never mutates


def test_batchnorm_biased_convention_updates_running_var_with_the_biased_variance():
    graph = graph_of(BatchNorm("bn", ("x",), eps=1e-3, momentum=0.25, running_variance="biased"))
    x = np.random.default_rng(4).normal(2.0, 3.0, size=(3, 3, 4, 5))
    w = random_weights64(graph, x.shape)
    fwd = reference.forward(graph, w, x, training=True)
    biased = x.var(axis=(0, 2, 3))
    np.testing.assert_allclose(fwd.running["bn.running_var"], 0.75 * w["bn.running_var"] + 0.25 * biased)


def test_batchnorm_training_needs_two_values_per_channel():
    graph, w, _ = bn_case()
    with pytest.raises(ShapeError, match=r"bn \(BatchNorm\).*more than one value per channel"):
        reference.forward(graph, w, np.ones((1, 3, 1, 1)), training=True)
    reference.forward(graph, w, np.ones((1, 3, 1, 1)), training=False)


# --------------------------------------------------------------------------------------------
# Backward against central finite differences.


def numeric_gradients(graph, weights, inputs, coefficients, training, names, eps=1e-6):
    """Central differences of sum(output * coefficient) for every element of the named arrays."""

    def objective() -> float:
        fwd = reference.forward(graph, weights, inputs, training)
        return sum(float((fwd.outputs[k] * c).sum()) for k, c in coefficients.items())

    grads = {}
    for name in names:
        array = weights[name] if name in weights else inputs[name]
        grad = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            saved = array[index]
            array[index] = saved + eps
            plus = objective()
            array[index] = saved - eps
            minus = objective()
            array[index] = saved
            grad[index] = (plus - minus) / (2 * eps)
        grads[name] = grad
    return grads


def check_backward(graph: Graph, inputs: Mapping[str, np.ndarray], training: bool, seed: int = 0):
    shapes = {k: v.shape for k, v in inputs.items()}
    weights = random_weights64(graph, shapes if len(shapes) > 1 else next(iter(shapes.values())), seed)
    inputs = {k: np.array(v, dtype=np.float64) for k, v in inputs.items()}
    fwd = reference.forward(graph, weights, inputs, training)
    rng = np.random.default_rng(seed + 1)
    coefficients = {k: rng.normal(size=v.shape) for k, v in fwd.outputs.items()}
    grads = reference.backward(fwd, coefficients)
    trainable = [name for name in weights if not is_buffer(name)]
    assert sorted(grads) == sorted(trainable + list(inputs))
    numeric = numeric_gradients(graph, weights, inputs, coefficients, training, list(grads))
    for name, value in grads.items():
        scale = max(1.0, float(np.abs(numeric[name]).max()))
        np.testing.assert_allclose(value, numeric[name], rtol=0, atol=1e-6 * scale, err_msg=name)


def x_input(shape, seed=0):
    return {"x": np.random.default_rng(seed + 100).normal(size=shape)}


NODE_CASES = {
    "conv": (
        [
            Conv2d(
                "c",
                ("x",),
                out_channels=4,
                kernel=(3, 2),
                stride=(2, 1),
                padding=((1, 0), (2, 1)),
                dilation=(1, 2),
                groups=2,
                bias=True,
            )
        ],
        (2, 4, 6, 7),
    ),
    "conv_dilated_rows": (
        [
            Conv2d(
                "c",
                ("x",),
                out_channels=3,
                kernel=2,
                stride=(1, 2),
                padding=((0, 2), (1, 0)),
                dilation=(2, 1),
                groups=3,
            )
        ],
        (1, 3, 5, 6),
    ),
    "conv_1x1": ([Conv2d("c", ("x",), out_channels=2, kernel=1, stride=2)], (2, 3, 5, 5)),
    "batchnorm": ([BatchNorm("bn", ("x",), momentum=0.3)], (3, 2, 3, 2)),
    "relu": ([ReLU("r", ("x",))], (2, 3, 3, 3)),
    "maxpool": ([MaxPool2d("p", ("x",), kernel=3, stride=2, padding=((1, 0), (1, 1)))], (2, 2, 6, 5)),
    "avgpool_incl": (
        [AvgPool2d("p", ("x",), kernel=3, stride=2, padding=((1, 0), (0, 1)), count_include_pad=True)],
        (2, 2, 6, 5),
    ),
    "avgpool_excl": (
        [AvgPool2d("p", ("x",), kernel=(3, 2), stride=1, padding=((1, 1), (1, 0)), count_include_pad=False)],
        (1, 2, 4, 4),
    ),
    "global_avgpool": ([GlobalAvgPool("g", ("x",))], (2, 3, 3, 2)),
    "flatten_dense": ([Flatten("f", ("x",)), Dense("d", ("f",), out_features=3)], (2, 2, 2, 2)),
    "dense_no_bias": ([Flatten("f", ("x",)), Dense("d", ("f",), out_features=2, bias=False)], (3, 2, 1, 2)),
    "add_same_input_twice": ([Add("a", ("x", "x"))], (2, 2, 3, 3)),
    "conv_same_stride2_even": (
        [Conv2d("c", ("x",), out_channels=2, kernel=3, stride=2, padding="same", bias=True)],
        (2, 2, 6, 7),
    ),
    "conv_same_7x7_odd": (
        [Conv2d("c", ("x",), out_channels=2, kernel=(7, 4), stride=2, padding="same")],
        (1, 2, 9, 8),
    ),
    "maxpool_same": ([MaxPool2d("p", ("x",), kernel=3, stride=2, padding="same")], (2, 2, 6, 5)),
    "avgpool_same_excl": (
        [AvgPool2d("p", ("x",), kernel=3, stride=2, padding="same", count_include_pad=False)],
        (2, 2, 6, 5),
    ),
    "pad2d": ([Pad2d("z", ("x",), padding=((1, 2), (0, 3)))], (2, 2, 3, 2)),
    "batchnorm_biased": ([BatchNorm("bn", ("x",), momentum=0.3, running_variance="biased")], (3, 2, 3, 2)),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(NODE_CASES))
def test_node_backward_matches_finite_differences(case, training):
    nodes, shape = NODE_CASES[case]
    check_backward(graph_of(*nodes, channels=shape[1]), x_input(shape), training)


def test_add_of_several_inputs_backward():
    graph = Graph(
        "t",
        (Input("a", 2), Input("b", 2), Input("c", 2)),
        (ReLU("r", ("b",)), Add("sum", ("a", "r", "c"))),
        ("sum",),
    )
    rng = np.random.default_rng(5)
    check_backward(graph, {k: rng.normal(size=(2, 2, 3, 3)) for k in "abc"}, training=False)


def residual_graph() -> Graph:
    """A stem and one residual block with a projection shortcut, pooled into a classifier."""
    return graph_of(
        Conv2d("stem", ("x",), out_channels=4, kernel=3, padding=1, bias=True),
        BatchNorm("stem_bn", ("stem",)),
        ReLU("stem_relu", ("stem_bn",)),
        MaxPool2d("pool", ("stem_relu",), kernel=3, stride=2, padding=1),
        Conv2d("block.conv1", ("pool",), out_channels=4, kernel=3, stride=2, padding=1),
        BatchNorm("block.bn1", ("block.conv1",)),
        ReLU("block.relu1", ("block.bn1",)),
        Conv2d("block.conv2", ("block.relu1",), out_channels=4, kernel=3, padding=1, groups=2),
        BatchNorm("block.bn2", ("block.conv2",)),
        Conv2d("block.down", ("pool",), out_channels=4, kernel=1, stride=2),
        BatchNorm("block.down_bn", ("block.down",)),
        Add("block.add", ("block.bn2", "block.down_bn")),
        ReLU("block.relu", ("block.add",)),
        AvgPool2d(
            "avg", ("block.relu",), kernel=2, stride=1, padding=((1, 0), (0, 1)), count_include_pad=False
        ),
        GlobalAvgPool("gap", ("avg",)),
        Flatten("flatten", ("gap",)),
        Dense("fc", ("flatten",), out_features=3),
        outputs=("block.relu", "fc"),
    )


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_residual_graph_backward_matches_finite_differences(training):
    check_backward(residual_graph(), x_input((2, 3, 7, 6)), training, seed=7)


def test_maxpool_gradient_goes_to_the_first_maximum_and_overlaps_accumulate():
    x = np.array([[[[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]]])
    graph = graph_of(MaxPool2d("p", ("x",), kernel=2, stride=1), channels=1)
    dx = reference.backward(reference.forward(graph, {}, x), np.array([[[[1.0, 2.0], [4.0, 8.0]]]]))["x"]
    np.testing.assert_array_equal(dx, [[[[1.0, 2.0, 0.0], [0.0, 12.0, 0.0], [0.0, 0.0, 0.0]]]])


def test_relu_gradient_is_zero_at_zero():
    graph = graph_of(ReLU("r", ("x",)), channels=1)
    x = np.array([[[[-1.0, 0.0, 2.0]]]])
    dx = reference.backward(reference.forward(graph, {}, x), np.ones((1, 1, 1, 3)))["x"]
    np.testing.assert_array_equal(dx, [[[[0.0, 0.0, 1.0]]]])


def test_backward_accepts_one_array_for_one_output_and_zero_for_unused_branches():
    graph = graph_of(Conv2d("c", ("x",), out_channels=2, kernel=1), ReLU("r", ("x",)), outputs=("r",))
    w = random_weights64(graph, (1, 3, 2, 2))
    x = np.random.default_rng(0).normal(size=(1, 3, 2, 2))
    grads = reference.backward(reference.forward(graph, w, x), np.ones((1, 3, 2, 2)))
    np.testing.assert_array_equal(grads["c.weight"], np.zeros((2, 3, 1, 1)))
    np.testing.assert_array_equal(grads["x"], (x > 0).astype(float))
    with pytest.raises(ShapeError, match=r"shape \(1, 3, 2, 2\)"):
        reference.backward(reference.forward(graph, w, x), np.ones((1, 3)))


# --------------------------------------------------------------------------------------------
# Loss and SGD.


def test_softmax_cross_entropy_value_gradient_and_stability():
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]])
    loss, grad = reference.softmax_cross_entropy(logits, np.array([2, 1]))
    p0 = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    assert loss == pytest.approx((-np.log(p0[2]) + 1000.0) / 2)
    np.testing.assert_allclose(grad, np.array([p0 - [0, 0, 1], [1, -1, 0]]) / 2, atol=1e-15)
    with pytest.raises(ShapeError, match=r"\[0, 3\)"):
        reference.softmax_cross_entropy(logits, np.array([0, 3]))
    with pytest.raises(ShapeError, match="integer"):
        reference.softmax_cross_entropy(logits, np.array([0.0, 1.0]))


def linear_case():
    graph = graph_of(Flatten("f", ("x",)), Dense("fc", ("f",), out_features=3), channels=2)
    rng = np.random.default_rng(8)
    x = rng.normal(size=(4, 2, 1, 2))
    weights = {"fc.weight": rng.normal(size=(3, 4)), "fc.bias": rng.normal(size=3)}
    return graph, weights, x, np.array([0, 2, 1, 2])


def test_sgd_step_with_momentum_and_weight_decay_matches_hand_computation():
    graph, weights, x, labels = linear_case()
    opt = SGD(lr=0.1, momentum=0.9, weight_decay=0.01)
    flat, onehot = x.reshape(4, 4), np.eye(3)[labels]

    def hand_grads(w, b):
        z = flat @ w.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        loss = -np.log(p[np.arange(4), labels]).mean()
        dz = (p - onehot) / 4
        return loss, dz.T @ flat, dz.sum(0)

    w0, b0 = weights["fc.weight"], weights["fc.bias"]
    loss0, gw0, gb0 = hand_grads(w0, b0)
    buf_w, buf_b = gw0 + 0.01 * w0, gb0 + 0.01 * b0
    w1, b1 = w0 - 0.1 * buf_w, b0 - 0.1 * buf_b
    loss1, gw1, gb1 = hand_grads(w1, b1)
    buf_w, buf_b = 0.9 * buf_w + gw1 + 0.01 * w1, 0.9 * buf_b + gb1 + 0.01 * b1
    w2, b2 = w1 - 0.1 * buf_w, b1 - 0.1 * buf_b

    got0, new1, state1 = reference.sgd_step(graph, weights, x, labels, opt)
    got1, new2, state2 = reference.sgd_step(graph, new1, x, labels, opt, state1)
    assert (got0, got1) == (pytest.approx(loss0, rel=1e-13), pytest.approx(loss1, rel=1e-13))
    np.testing.assert_allclose(new2["fc.weight"], w2, rtol=1e-13)
    np.testing.assert_allclose(new2["fc.bias"], b2, rtol=1e-13)
    np.testing.assert_allclose(state2["fc.weight"], buf_w, rtol=1e-13)
    np.testing.assert_allclose(state2["fc.bias"], buf_b, rtol=1e-13)
    np.testing.assert_array_equal(weights["fc.weight"], w0)  # inputs untouched


def test_plain_sgd_keeps_no_state_and_updates_running_stats_not_by_gradient():
    graph = graph_of(
        BatchNorm("bn", ("x",)),
        GlobalAvgPool("g", ("bn",)),
        Flatten("f", ("g",)),
        Dense("fc", ("f",), out_features=2),
    )
    x = np.random.default_rng(9).normal(size=(2, 3, 2, 2))
    weights = random_weights64(graph, x.shape)
    labels = np.array([1, 0])
    loss, grads, fwd = reference.loss_and_grads(graph, weights, x, labels)
    got_loss, new, state = reference.sgd_step(graph, weights, x, labels, SGD(lr=0.5))
    assert state == {} and got_loss == loss
    for name in weights:
        expected = fwd.running[name] if is_buffer(name) else weights[name] - 0.5 * grads[name]
        np.testing.assert_allclose(new[name], expected, rtol=1e-14, err_msg=name)


# --------------------------------------------------------------------------------------------
# ReferenceRunner.


def runner_case():
    graph = graph_of(
        Conv2d("conv", ("x",), out_channels=4, kernel=3, padding=1),
        BatchNorm("bn", ("conv",)),
        ReLU("relu", ("bn",)),
        GlobalAvgPool("gap", ("relu",)),
        Flatten("flat", ("gap",)),
        Dense("fc", ("flat",), out_features=3),
    )
    rng = np.random.default_rng(10)
    weights = {k: v.astype(np.float32) for k, v in random_weights64(graph, (4, 3, 5, 5)).items()}
    x = rng.normal(size=(4, 3, 5, 5)).astype(np.float32)
    return graph, weights, x, np.array([0, 1, 2, 1])


def test_runner_train_step_equals_sgd_step():
    graph, weights, x, labels = runner_case()
    opt = SGD(lr=0.05, momentum=0.9, weight_decay=1e-3)
    runner = reference.ReferenceRunner(graph, weights, optimizer=opt)
    assert runner.optimizer_state() == {}
    state, current = None, weights
    for _ in range(2):
        logits = reference.run(graph, current, x, training=True)
        loss, current, state = reference.sgd_step(graph, current, x, labels, opt, state)
        got_loss, got_logits = runner.train_step(x, labels)
        assert got_loss == loss
        assert got_logits.dtype == np.float32
        np.testing.assert_array_equal(got_logits, logits.astype(np.float32))
    assert runner.weights().keys() == current.keys()
    for name, value in runner.weights().items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, current[name].astype(np.float32))
    assert sorted(runner.optimizer_state()) == sorted(n for n in weights if not is_buffer(n))
    for name, value in runner.optimizer_state().items():
        np.testing.assert_array_equal(value, state[name].astype(np.float32))


def test_runner_optimizer_state_round_trips():
    graph, weights, x, labels = runner_case()
    opt = SGD(lr=0.05, momentum=0.9)
    first = reference.ReferenceRunner(graph, weights, optimizer=opt)
    first.train_step(x, labels)
    resumed = reference.ReferenceRunner(graph, first.weights(), optimizer=opt)
    fresh = reference.ReferenceRunner(graph, first.weights(), optimizer=opt)
    resumed.set_optimizer_state(first.optimizer_state())
    for name, value in first.optimizer_state().items():
        np.testing.assert_array_equal(resumed.optimizer_state()[name], value)
    for runner in (first, resumed, fresh):
        runner.train_step(x, labels)
    for name, value in first.weights().items():
        np.testing.assert_allclose(resumed.weights()[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert any(
        not np.allclose(fresh.weights()[name], value, rtol=1e-5, atol=1e-6)
        for name, value in first.weights().items()
    )
    with pytest.raises(WeightsError, match="bn.running_mean: not a trainable parameter"):
        resumed.set_optimizer_state({"bn.running_mean": np.zeros(4, np.float32)})


def test_runner_nhwc_layout_and_running_stat_updates():
    graph, weights, x, _ = runner_case()
    nchw = graph_of(Conv2d("conv", ("x",), out_channels=4, kernel=3, padding=1), outputs=("conv",))
    runner = reference.ReferenceRunner(nchw, {"conv.weight": weights["conv.weight"]}, layout="NHWC")
    y = runner.forward(x.transpose(0, 2, 3, 1))
    assert y.dtype == np.float32 and y.shape == (4, 5, 5, 4)
    expected = reference.run(nchw, {"conv.weight": weights["conv.weight"]}, x).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ShapeError, match="looks like NCHW"):
        runner.forward(x)

    runner = reference.ReferenceRunner(graph, weights)
    runner.forward(x)
    np.testing.assert_array_equal(runner.weights()["bn.running_mean"], weights["bn.running_mean"])
    running = reference.forward(graph, weights, x, training=True).running
    runner.forward(x, training=True)
    for name, value in running.items():
        np.testing.assert_array_equal(runner.weights()[name], value.astype(np.float32))


# --------------------------------------------------------------------------------------------
# Errors and small contracts.


def test_every_node_type_has_rules():
    assert set(reference.RULES) == set(NODE_TYPES.values())


def test_wrong_input_shape_names_the_expected_shape():
    graph, weights, x, _ = runner_case()
    with pytest.raises(ShapeError, match=r"expects shape \(N, 3, H, W\)"):
        reference.run(graph, weights, x[:, :2])
    with pytest.raises(ShapeError, match=r"expects shape \(N, 3, H, W\)"):
        reference.run(graph, weights, x[0])
    with pytest.raises(ShapeError, match="too small"):
        reference.run(graph_of(MaxPool2d("p", ("x",), kernel=3)), {}, np.zeros((1, 3, 2, 2)))


def test_multi_input_graph_needs_a_dict_of_fitting_arrays():
    graph = Graph("two", (Input("a", 2), Input("b", 2)), (Add("sum", ("a", "b")),), ("sum",))
    a = np.ones((1, 2, 3, 3))
    np.testing.assert_array_equal(reference.run(graph, {}, {"a": a, "b": a}), 2 * a)
    with pytest.raises(ShapeError, match="dict"):
        reference.run(graph, {}, a)
    with pytest.raises(ShapeError, match=r"inputs are \['a', 'b'\]"):
        reference.run(graph, {}, {"a": a})
    with pytest.raises(ShapeError, match="cannot add"):
        reference.run(graph, {}, {"a": a, "b": np.ones((1, 2, 4, 4))})


def test_mismatched_weights_raise_weights_error():
    graph, weights, x, _ = runner_case()
    missing = {k: v for k, v in weights.items() if k != "bn.bias"}
    with pytest.raises(WeightsError, match=r"missing bn.bias"):
        reference.run(graph, missing, x)
    with pytest.raises(WeightsError, match=r"conv.weight: shape \(4, 3, 1, 1\), expected \(4, 3, 3, 3\)"):
        reference.run(graph, {**weights, "conv.weight": np.zeros((4, 3, 1, 1), np.float32)}, x)
    with pytest.raises(WeightsError, match="unexpected extra.weight"):
        reference.run(graph, {**weights, "extra.weight": np.zeros(1, np.float32)}, x)
    with pytest.raises(WeightsError, match="missing"):
        reference.ReferenceRunner(graph_of(Conv2d("c", ("x",), out_channels=2, kernel=1)), {})


def test_multiple_outputs_come_back_as_a_dict_and_cannot_be_trained():
    graph = residual_graph()
    x = np.random.default_rng(0).normal(size=(2, 3, 7, 6))
    weights = random_weights64(graph, x.shape)
    out = reference.run(graph, weights, x)
    assert sorted(out) == ["block.relu", "fc"] and out["fc"].shape == (2, 3)
    with pytest.raises(SpecError, match="one output"):
        reference.sgd_step(graph, weights, x, np.array([0, 1]))


def test_relative_error():
    assert reference.relative_error(np.array([1.0, 2.0]), np.array([1.0, 2.5])) == pytest.approx(0.2)
    assert reference.relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert reference.relative_error(np.array([1e-9]), np.array([0.0])) == pytest.approx(1e3)
    assert np.isnan(reference.relative_error(np.array([np.nan]), np.array([1.0])))
    with pytest.raises(ShapeError, match="shapes"):
        reference.relative_error(np.zeros(2), np.zeros(3))
