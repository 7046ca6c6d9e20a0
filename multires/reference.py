"""The NumPy reference interpreter: the executable definition of every node, in float64.

Every backend is tested against this module (forward, training-mode BatchNorm, gradients of SGD
steps), so it is written for clarity and exactness first and speed second, while staying fast
enough to run a ResNet-50 forward and backward on small images in seconds (convolutions are one
im2col matmul per group). Arrays are NCHW; weights are canonical (`multires.weights`) and may be
of any floating dtype: they are converted to float64.

What each node computes (`x` is the node's input, `g` the gradient of its output):

- Conv2d: cross-correlation as `torch.nn.Conv2d`: zero padding per side
  `((top, bottom), (left, right))`, stride, dilation, groups, optional bias. Weight OIHW.
  Padding "same" (here and in the pools) is TensorFlow/XLA SAME: the per-side pads
  `multires.graph.same_padding` computes from the input size, then as above.
- BatchNorm (4-D): eval mode `(x - running_mean) / sqrt(running_var + eps) * weight + bias`.
  Training mode normalises with the batch mean and the *biased* batch variance over (N, H, W)
  and updates `running_mean = (1 - m) * running_mean + m * mean`,
  `running_var = (1 - m) * running_var + m * var * n / (n - 1)` (the unbiased variance), as
  PyTorch does; with `running_variance="biased"` (Keras, Flax) without the `n / (n - 1)`. Its backward goes through the batch statistics in training mode and through
  the fixed running statistics in eval mode.
- ReLU: `max(x, 0)`; the gradient is 0 where `x <= 0`.
- Add: the sum of its inputs; each input receives `g`.
- MaxPool2d: padding is -inf, so it never wins; the gradient goes to the first maximal element
  of each window in row-major window order (as PyTorch), and overlapping windows accumulate.
- AvgPool2d: zero padding; the window sum is divided by the kernel area with
  `count_include_pad`, else by the number of non-padding elements in the window.
- Pad2d: zeros added per side; the gradient is `g` with the padding cropped off.
- GlobalAvgPool: the mean over H and W, keeping them: (N, C, 1, 1).
- Flatten: (N, C, H, W) -> (N, C*H*W) in channel-major order.
- Dense: `x @ weight.T + bias`, weight (out, in).

Where one value feeds several nodes (residual branches), their gradients add up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from multires.backend import SGD, Execution, HostTotals, shard_bounds
from multires.errors import DeviceError, ShapeError, SpecError, WeightsError
from multires.graph import (
    Add,
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Dense,
    Flatten,
    GlobalAvgPool,
    Graph,
    MaxPool2d,
    Node,
    Pad2d,
    Padding,
    ReLU,
    resolve_padding,
)
from multires.shapes import check_input_shape, check_layout, infer_shapes
from multires.weights import BUFFER_KINDS, check_weights, is_buffer, weight_shapes

__all__ = [
    "Forward",
    "ReferenceRunner",
    "backward",
    "forward",
    "loss_and_grads",
    "relative_error",
    "run",
    "sgd_step",
    "softmax_cross_entropy",
]

PLAIN_SGD = SGD()
"""The default optimizer: `SGD()` (lr 0.1, no momentum, no weight decay)."""

Params = dict[str, np.ndarray]
"""One node's weights by kind (`weight`, `bias`, `running_mean`, `running_var`)."""


def _where(node: Node) -> str:
    return f"{node.name} ({type(node).__name__})"


# --------------------------------------------------------------------------------------------
# Sliding windows shared by convolution and pooling.


def _pad(x: np.ndarray, padding: tuple[tuple[int, int], tuple[int, int]], value: float) -> np.ndarray:
    (top, bottom), (left, right) = padding
    if not (top or bottom or left or right):
        return x
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=value)


def _crop(xp: np.ndarray, padding: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    (top, bottom), (left, right) = padding
    return xp[:, :, top : xp.shape[2] - bottom, left : xp.shape[3] - right]


def _windows(
    xp: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int] = (1, 1)
) -> np.ndarray:
    """A read-only view (N, C, OH, OW, KH, KW) of every window of a padded map."""
    extent = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True))
    view = sliding_window_view(xp, extent, axis=(2, 3))
    return view[:, :, :: stride[0], :: stride[1], :: dilation[0], :: dilation[1]]


def _scatter_windows(
    piece: Callable[[int, int], np.ndarray],
    padded: tuple[int, ...],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int] = (1, 1),
) -> np.ndarray:
    """The adjoint of `_windows`: add `piece(i, j)` (N, C, OH, OW), the gradient reaching kernel
    position (i, j) of every window, into a zero map of the padded shape."""
    out = np.zeros(padded)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            part = piece(i, j)
            oh, ow = part.shape[2:]
            top, left = i * dilation[0], j * dilation[1]
            out[
                :,
                :,
                top : top + stride[0] * (oh - 1) + 1 : stride[0],
                left : left + stride[1] * (ow - 1) + 1 : stride[1],
            ] += part
    return out


# --------------------------------------------------------------------------------------------
# Node rules. A forward rule maps (node, inputs, params, training) to (output, saved), where
# `saved` holds what the backward rule needs (and, for BatchNorm in training mode, the updated
# running statistics). A backward rule maps (node, g, inputs, params, saved, training) to
# (gradients of the inputs, gradients of the trainable params by kind).

ForwardRule = Callable[[Any, list[np.ndarray], Params, bool], tuple[np.ndarray, dict[str, Any]]]
BackwardRule = Callable[
    [Any, np.ndarray, list[np.ndarray], Params, dict[str, Any], bool],
    tuple[list[np.ndarray], Params],
]


def _padding_of(node: Conv2d | MaxPool2d | AvgPool2d, x: np.ndarray) -> Padding:
    """The node's per-side padding for input `x` (SAME resolved from its spatial size)."""
    dilation = node.dilation if isinstance(node, Conv2d) else (1, 1)
    return resolve_padding(node.padding, x.shape[2:4], node.kernel, node.stride, dilation)


def _padded_shape(x: np.ndarray, padding: Padding) -> tuple[int, ...]:
    return (*x.shape[:2], x.shape[2] + sum(padding[0]), x.shape[3] + sum(padding[1]))


def _im2col(node: Conv2d, x: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Columns (G, N*OH*OW, C/G*KH*KW) of a convolution's input, one row per output position,
    with the output size OH, OW."""
    n, c = x.shape[:2]
    g = node.groups
    win = _windows(_pad(x, _padding_of(node, x), 0.0), node.kernel, node.stride, node.dilation)
    oh, ow = win.shape[2:4]
    win = win.reshape(n, g, c // g, oh, ow, *node.kernel).transpose(1, 0, 3, 4, 2, 5, 6)
    return win.reshape(g, n * oh * ow, -1), oh, ow


def _conv_forward(node: Conv2d, xs: list[np.ndarray], p: Params, training: bool) -> tuple[np.ndarray, dict]:
    (x,) = xs
    n, g, o = x.shape[0], node.groups, node.out_channels
    cols, oh, ow = _im2col(node, x)
    w = p["weight"].reshape(g, o // g, -1)
    y = (cols @ w.transpose(0, 2, 1)).reshape(g, n, oh, ow, o // g).transpose(1, 0, 4, 2, 3)
    y = np.ascontiguousarray(y).reshape(n, o, oh, ow)
    if node.bias:
        y += p["bias"][None, :, None, None]
    return y, {}


def _conv_backward(
    node: Conv2d, gy: np.ndarray, xs: list[np.ndarray], p: Params, saved: dict, training: bool
) -> tuple[list[np.ndarray], Params]:
    (x,) = xs
    n, c = x.shape[:2]
    g, o = node.groups, node.out_channels
    oh, ow = gy.shape[2:]
    kh, kw = node.kernel
    gm = gy.reshape(n, g, o // g, oh, ow).transpose(1, 0, 3, 4, 2).reshape(g, n * oh * ow, o // g)
    w = p["weight"].reshape(g, o // g, -1)
    grads = {"weight": (gm.transpose(0, 2, 1) @ _im2col(node, x)[0]).reshape(p["weight"].shape)}
    if node.bias:
        grads["bias"] = gy.sum(axis=(0, 2, 3))
    dcols = (gm @ w).reshape(g, n, oh, ow, c // g, kh, kw).transpose(5, 6, 1, 0, 4, 2, 3)
    dcols = np.ascontiguousarray(dcols).reshape(kh, kw, n, c, oh, ow)
    padding = _padding_of(node, x)
    dxp = _scatter_windows(
        lambda i, j: dcols[i, j], _padded_shape(x, padding), node.kernel, node.stride, node.dilation
    )
    return [_crop(dxp, padding)], grads


def _channel(v: np.ndarray) -> np.ndarray:
    return v[None, :, None, None]


def _variance_factor(node: BatchNorm, count: int) -> float:
    """What the running variance takes of the biased batch variance over `count` values."""
    return count / (count - 1) if node.running_variance == "unbiased" else 1.0


def _bn_forward(node: BatchNorm, xs: list[np.ndarray], p: Params, training: bool) -> tuple[np.ndarray, dict]:
    (x,) = xs
    if training:
        count = x.shape[0] * x.shape[2] * x.shape[3]
        if count < 2:
            raise ShapeError(
                f"{_where(node)}: training mode needs more than one value per channel to estimate "
                f"the batch variance; got N*H*W = {count} for input {x.shape}. Use a batch of 2 or "
                "more, or eval mode."
            )
        mean = x.mean(axis=(0, 2, 3))
        var = x.var(axis=(0, 2, 3))
        m = node.momentum
        saved = {
            "running_mean": (1 - m) * p["running_mean"] + m * mean,
            "running_var": (1 - m) * p["running_var"] + m * var * _variance_factor(node, count),
        }
    else:
        mean, var, saved = p["running_mean"], p["running_var"], {}
    inv_std = 1.0 / np.sqrt(var + node.eps)
    xhat = (x - _channel(mean)) * _channel(inv_std)
    saved.update(xhat=xhat, inv_std=inv_std)
    return xhat * _channel(p["weight"]) + _channel(p["bias"]), saved


def _bn_backward(
    node: BatchNorm, gy: np.ndarray, xs: list[np.ndarray], p: Params, saved: dict, training: bool
) -> tuple[list[np.ndarray], Params]:
    xhat, inv_std = saved["xhat"], saved["inv_std"]
    axes = (0, 2, 3)
    grads = {"weight": (gy * xhat).sum(axis=axes), "bias": gy.sum(axis=axes)}
    dxhat = gy * _channel(p["weight"])
    if training:
        dxhat = (
            dxhat
            - dxhat.mean(axis=axes, keepdims=True)
            - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True)
        )
    return [dxhat * _channel(inv_std)], grads


def _relu_forward(node: ReLU, xs: list[np.ndarray], p: Params, training: bool) -> tuple[np.ndarray, dict]:
    return np.maximum(xs[0], 0.0), {}


def _relu_backward(
    node: ReLU, gy: np.ndarray, xs: list[np.ndarray], p: Params, saved: dict, training: bool
) -> tuple[list[np.ndarray], Params]:
    return [np.where(xs[0] > 0, gy, 0.0)], {}


def _add_forward(node: Add, xs: list[np.ndarray], p: Params, training: bool) -> tuple[np.ndarray, dict]:
    return sum(xs[1:], xs[0].copy()), {}


def _add_backward(
    node: Add, gy: np.ndarray, xs: list[np.ndarray], p: Params, saved: dict, training: bool
) -> tuple[list[np.ndarray], Params]:
    return [gy] * len(xs), {}


def _maxpool_forward(
    node: MaxPool2d, xs: list[np.ndarray], p: Params, training: bool
) -> tuple[np.ndarray, dict]:
    (x,) = xs
    win = _windows(_pad(x, _padding_of(node, x), -np.inf), node.kernel, node.stride)
    flat = win.reshape(*win.shape[:4], -1)
    index = flat.argmax(axis=-1)  # the first maximum in row-major window order
    return np.take_along_axis(flat, index[..., None], axis=-1)[..., 0], {"index": index}


def _maxpool_backward(
    node: MaxPool2d, gy: np.ndarray, xs: list[np.ndarray], p: Params, saved: dict, training: bool
) -> tuple[list[np.ndarray], Params]:
    (x,) = xs
    index, kw = saved["index"], node.kernel[1]
    padding = _padding_of(node, x)
    dxp = _scatter_windows(
        lambda i, j: np.where(index == i * kw + j, gy, 0.0),
        _padded_shape(x, padding),
        node.kernel,
        node.stride,
    )
    return [_crop(dxp, padding)], {}


def _avgpool_divisor(node: AvgPool2d, x: np.ndarray) -> np.ndarray | float:
    if node.count_include_pad:
        return float(node.kernel[0] * node.kernel[1])
    ones = _pad(np.ones((1, 1, *x.shape[2:])), _padding_of(node, x), 0.0)
    return _windows(ones, node.kernel, node.stride).sum(axis=(-2, -1))


def _avgpool_forward(
    node: AvgPool2d, xs: list[np.ndarray], p: Params, training: bool
) -> tuple[np.ndarray, dict]:
    (x,) = xs
    win = _windows(_pad(x, _padding_of(node, x), 0.0), node.kernel, node.stride)
    return win.sum(axis=(-2, -1)) / _avgpool_divisor(node, x), {}


def _avgpool_backward(
    node: AvgPool2d, gy: np.ndarray, xs: list[np.ndarray], p: Params, saved: dict, training: bool
) -> tuple[list[np.ndarray], Params]:
    (x,) = xs
    share = gy / _avgpool_divisor(node, x)
    padding = _padding_of(node, x)
    dxp = _scatter_windows(lambda i, j: share, _padded_shape(x, padding), node.kernel, node.stride)
    return [_crop(dxp, padding)], {}


def _pad2d_forward(node: Pad2d, xs: list[np.ndarray], p: Params, training: bool) -> tuple[np.ndarray, dict]:
    return _pad(xs[0], node.padding, 0.0), {}


def _pad2d_backward(
    node: Pad2d, gy: np.ndarray, xs: list[np.ndarray], p: Params, saved: dict, training: bool
) -> tuple[list[np.ndarray], Params]:
    return [_crop(gy, node.padding)], {}


def _gap_forward(
    node: GlobalAvgPool, xs: list[np.ndarray], p: Params, training: bool
) -> tuple[np.ndarray, dict]:
    return xs[0].mean(axis=(2, 3), keepdims=True), {}


def _gap_backward(
    node: GlobalAvgPool, gy: np.ndarray, xs: list[np.ndarray], p: Params, saved: dict, training: bool
) -> tuple[list[np.ndarray], Params]:
    (x,) = xs
    return [np.broadcast_to(gy / (x.shape[2] * x.shape[3]), x.shape).copy()], {}


def _flatten_forward(
    node: Flatten, xs: list[np.ndarray], p: Params, training: bool
) -> tuple[np.ndarray, dict]:
    return xs[0].reshape(xs[0].shape[0], -1), {}


def _flatten_backward(
    node: Flatten, gy: np.ndarray, xs: list[np.ndarray], p: Params, saved: dict, training: bool
) -> tuple[list[np.ndarray], Params]:
    return [gy.reshape(xs[0].shape)], {}


def _dense_forward(node: Dense, xs: list[np.ndarray], p: Params, training: bool) -> tuple[np.ndarray, dict]:
    y = xs[0] @ p["weight"].T
    if node.bias:
        y += p["bias"]
    return y, {}


def _dense_backward(
    node: Dense, gy: np.ndarray, xs: list[np.ndarray], p: Params, saved: dict, training: bool
) -> tuple[list[np.ndarray], Params]:
    grads = {"weight": gy.T @ xs[0]}
    if node.bias:
        grads["bias"] = gy.sum(axis=0)
    return [gy @ p["weight"]], grads


RULES: dict[type[Node], tuple[ForwardRule, BackwardRule]] = {
    Conv2d: (_conv_forward, _conv_backward),
    BatchNorm: (_bn_forward, _bn_backward),
    ReLU: (_relu_forward, _relu_backward),
    Add: (_add_forward, _add_backward),
    MaxPool2d: (_maxpool_forward, _maxpool_backward),
    AvgPool2d: (_avgpool_forward, _avgpool_backward),
    Pad2d: (_pad2d_forward, _pad2d_backward),
    GlobalAvgPool: (_gap_forward, _gap_backward),
    Flatten: (_flatten_forward, _flatten_backward),
    Dense: (_dense_forward, _dense_backward),
}
"""Forward and backward rule of every node type of the spec."""


# --------------------------------------------------------------------------------------------
# Checking what the user passes.


def _inputs(graph: Graph, x: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph inputs as float64 NCHW arrays by name, their shapes checked against the graph."""
    names = [i.name for i in graph.inputs]
    if isinstance(x, Mapping):
        if sorted(x) != sorted(names):
            raise ShapeError(
                f"{graph.name}: the graph's inputs are {names}; got arrays for {sorted(x)}. "
                "Pass one array per input, keyed by input name."
            )
        arrays = {name: np.asarray(x[name], dtype=np.float64) for name in names}
    elif len(names) == 1:
        arrays = {names[0]: np.asarray(x, dtype=np.float64)}
    else:
        raise ShapeError(
            f"{graph.name}: the graph has inputs {names}; pass a dict of NCHW arrays keyed by input name."
        )
    if len(names) == 1:
        check_input_shape(graph, arrays[names[0]].shape)
        return arrays
    for spec in graph.inputs:
        shape = arrays[spec.name].shape
        if len(shape) != 4 or shape[1] != spec.channels:
            raise ShapeError(
                f"{graph.name}: input {spec.name!r} expects shape (N, {spec.channels}, H, W) in NCHW; "
                f"got {shape}."
            )
    try:
        infer_shapes(graph, {name: a.shape for name, a in arrays.items()})
    except SpecError as error:
        raise ShapeError(f"{graph.name}: inputs of shapes {_shapes(arrays)} do not fit: {error}") from None
    return arrays


def _shapes(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(a.shape) for name, a in arrays.items()}


def _check_weights(graph: Graph, weights: Mapping[str, Any], input_shape: Any = None) -> None:
    """`multires.weights.check_weights`, except that any floating dtype is accepted (the
    reference computes in float64, and its own results are float64)."""
    proxies = {
        name: np.broadcast_to(np.float32(0), value.shape)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f"
        else value
        for name, value in weights.items()
    }
    check_weights(graph, proxies, input_shape)


def _float64(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.asarray(value, dtype=np.float64) for name, value in weights.items()}


def _node_params(node: Node, weights: Mapping[str, np.ndarray]) -> Params:
    prefix = node.name + "."
    kinds = ("weight", "bias", *BUFFER_KINDS)
    return {kind: weights[prefix + kind] for kind in kinds if prefix + kind in weights}


# --------------------------------------------------------------------------------------------
# Forward and backward over a graph.


@dataclass
class Forward:
    """One forward pass, with everything `backward` needs.

    `outputs`: the graph outputs by name. `values`: the output of every input and node by name
    (float64 NCHW, or (N, F) after Flatten). `running`: in training mode, the updated running
    statistics by canonical name (`<node>.running_mean`, `<node>.running_var`); empty in eval
    mode. `weights`: the float64 weights used; `saved`: per-node intermediates for backward.
    """

    graph: Graph
    weights: dict[str, np.ndarray]
    training: bool
    values: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    running: dict[str, np.ndarray] = field(default_factory=dict)
    saved: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)


def forward(
    graph: Graph,
    weights: Mapping[str, np.ndarray],
    x: np.ndarray | Mapping[str, np.ndarray],
    training: bool = False,
) -> Forward:
    """Run `graph` in float64 on NCHW input `x` (one array, or a dict by input name), keeping
    every intermediate value. Training mode normalises BatchNorm with batch statistics and
    reports the updated running statistics in `Forward.running` (the weights are not changed)."""
    arrays = _inputs(graph, x)
    single = next(iter(arrays.values())).shape if len(arrays) == 1 else _shapes(arrays)
    _check_weights(graph, weights, single)
    w64 = _float64(weights)
    values: dict[str, np.ndarray] = dict(arrays)
    saved: dict[str, dict[str, Any]] = {}
    running: dict[str, np.ndarray] = {}
    for node in graph.nodes:
        rule = RULES[type(node)][0]
        out, aux = rule(node, [values[s] for s in node.inputs], _node_params(node, w64), training)
        for kind in BUFFER_KINDS:
            if kind in aux:
                running[f"{node.name}.{kind}"] = aux.pop(kind)
        values[node.name] = out
        saved[node.name] = aux
    outputs = {name: values[name] for name in graph.outputs}
    return Forward(graph, w64, training, values, outputs, running, saved)


def run(
    graph: Graph,
    weights: Mapping[str, np.ndarray],
    x: np.ndarray | Mapping[str, np.ndarray],
    training: bool = False,
) -> np.ndarray | dict[str, np.ndarray]:
    """The float64 output of `graph` for NCHW input `x` (a dict by name when it has several outputs).

    Raises ShapeError (naming the expected shape) for an input that does not fit and
    WeightsError for weights that do not match the graph.
    """
    outputs = forward(graph, weights, x, training).outputs
    if len(outputs) == 1:
        return next(iter(outputs.values()))
    return outputs


def backward(fwd: Forward, grad_outputs: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Gradients, given those of the outputs, of every trainable weight (by canonical name) and
    of every graph input (by input name), in float64.

    `grad_outputs` is one array for a single-output graph, or a dict by output name (outputs
    left out get a zero gradient). The pass follows the mode of `fwd`: through the batch
    statistics in training mode, through the running statistics in eval mode.
    """
    graph = fwd.graph
    if not isinstance(grad_outputs, Mapping):
        if len(graph.outputs) != 1:
            raise ShapeError(
                f"{graph.name}: the graph has outputs {list(graph.outputs)}; pass their gradients as a "
                "dict keyed by output name."
            )
        grad_outputs = {graph.outputs[0]: grad_outputs}
    pending: dict[str, np.ndarray] = {}
    for name, value in grad_outputs.items():
        if name not in fwd.outputs:
            raise ShapeError(
                f"{graph.name}: {name!r} is not an output; the outputs are {list(graph.outputs)}."
            )
        value = np.asarray(value, dtype=np.float64)
        if value.shape != fwd.outputs[name].shape:
            raise ShapeError(
                f"{graph.name}: the gradient of output {name!r} has shape {value.shape}; the output has "
                f"shape {fwd.outputs[name].shape}."
            )
        pending[name] = value
    grads: dict[str, np.ndarray] = {}
    for node in reversed(graph.nodes):
        gy = pending.pop(node.name, None)
        if gy is None:
            continue
        rule = RULES[type(node)][1]
        xs = [fwd.values[s] for s in node.inputs]
        params = _node_params(node, fwd.weights)
        input_grads, param_grads = rule(node, gy, xs, params, fwd.saved[node.name], fwd.training)
        for source, gx in zip(node.inputs, input_grads, strict=True):
            pending[source] = pending[source] + gx if source in pending else gx
        for kind, gp in param_grads.items():
            grads[f"{node.name}.{kind}"] = gp
    result = {
        name: grads.get(name, np.zeros_like(fwd.weights[name])) for name in fwd.weights if not is_buffer(name)
    }
    for spec in graph.inputs:
        grad = pending.get(spec.name)
        result[spec.name] = np.zeros_like(fwd.values[spec.name]) if grad is None else np.array(grad)
    return result


# --------------------------------------------------------------------------------------------
# Loss and training.


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy of (N, K) logits for integer labels in [0, K), and its
    gradient with respect to the logits, in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2:
        raise ShapeError(
            f"cross-entropy needs (N, classes) logits; got shape {logits.shape}. "
            "End the graph with Flatten and Dense (or GlobalAvgPool, Flatten)."
        )
    n, k = logits.shape
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise ShapeError(
            f"labels must be {n} integer class indices (shape ({n},)); got {labels.dtype} of shape "
            f"{labels.shape}."
        )
    if n and (labels.min() < 0 or labels.max() >= k):
        raise ShapeError(
            f"labels must lie in [0, {k}) for {k} classes; got values in [{labels.min()}, {labels.max()}]."
        )
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(n)
    loss = -log_probs[rows, labels].mean()
    grad = np.exp(log_probs)
    grad[rows, labels] -= 1.0
    return float(loss), grad / n


def _single_output(graph: Graph) -> str:
    if len(graph.outputs) != 1:
        raise SpecError(
            f"{graph.name}: training needs a graph with one output (the logits); it has "
            f"{list(graph.outputs)}."
        )
    return graph.outputs[0]


def loss_and_grads(
    graph: Graph,
    weights: Mapping[str, np.ndarray],
    x: np.ndarray | Mapping[str, np.ndarray],
    labels: np.ndarray,
    training: bool = True,
) -> tuple[float, dict[str, np.ndarray], Forward]:
    """Mean softmax cross-entropy of the graph's single output, the gradients `backward` gives
    for it (trainable weights and inputs), and the forward pass."""
    output = _single_output(graph)
    fwd = forward(graph, weights, x, training)
    loss, grad_logits = softmax_cross_entropy(fwd.outputs[output], labels)
    return loss, backward(fwd, grad_logits), fwd


def _check_state(weights: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> None:
    problems = []
    for name, buf in state.items():
        if name not in weights or is_buffer(name):
            problems.append(f"{name}: not a trainable parameter")
        elif np.shape(buf) != np.shape(weights[name]):
            problems.append(f"{name}: shape {np.shape(buf)}, expected {np.shape(weights[name])}")
    if problems:
        raise WeightsError("the optimizer state does not match the weights:\n  " + "\n  ".join(problems))


def _apply_sgd(
    weights: Mapping[str, np.ndarray],
    grads: Mapping[str, np.ndarray],
    running: Mapping[str, np.ndarray],
    optimizer: SGD,
    state: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """New float64 weights (running statistics replaced by `running`) and momentum buffers."""
    new_weights: dict[str, np.ndarray] = {}
    new_state: dict[str, np.ndarray] = {}
    for name, value in weights.items():
        value = np.asarray(value, dtype=np.float64)
        if is_buffer(name):
            new_weights[name] = np.array(running.get(name, value))
            continue
        step = grads[name] + optimizer.weight_decay * value
        if optimizer.momentum:
            previous = state.get(name)
            if previous is not None:
                step = optimizer.momentum * np.asarray(previous, dtype=np.float64) + step
            new_state[name] = step
        new_weights[name] = value - optimizer.lr * step
    return new_weights, new_state


def sgd_step(
    graph: Graph,
    weights: Mapping[str, np.ndarray],
    x: np.ndarray | Mapping[str, np.ndarray],
    labels: np.ndarray,
    optimizer: SGD = PLAIN_SGD,
    state: Mapping[str, np.ndarray] | None = None,
) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One SGD step on mean softmax cross-entropy in training mode, in float64.

    Follows `multires.backend.SGD` (PyTorch's `torch.optim.SGD`): `g = grad + weight_decay * w`;
    with momentum `buf = momentum * buf + g` (`buf = g` where `state` has no buffer yet);
    `w -= lr * buf` (`lr * g` without momentum). Returns the loss before the step, the new full
    canonical weights (with the running statistics this batch updated) and the new momentum
    buffers by parameter name (empty without momentum).
    """
    loss, grads, fwd = loss_and_grads(graph, weights, x, labels, training=True)
    state = {} if state is None else state
    _check_state(weights, state)
    new_weights, new_state = _apply_sgd(fwd.weights, grads, fwd.running, optimizer, state)
    return loss, new_weights, new_state


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """`max|actual - expected| / max(max|expected|, 1e-12)`, in float64: the conformance metric.

    NaN anywhere gives NaN, which fails every `<=` comparison.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise ShapeError(f"cannot compare arrays of shapes {a.shape} (actual) and {e.shape} (expected).")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - e)) / max(float(np.max(np.abs(e))), 1e-12))


# --------------------------------------------------------------------------------------------
# A Runner on top of the reference.


class ReferenceRunner(HostTotals):
    """The `multires.backend.Runner` protocol on the reference: float64 inside, float32 out.

    A slow but exact, framework-free runner: the trainer's core tests drive it, and its
    `train_step` is `sgd_step`. Arrays go in and come out in `layout` ("NCHW" or "NHWC").

    It also defines data parallelism without synchronised BatchNorm (`Execution(devices=N,
    sync_batchnorm=False)`): each shard (`shard_bounds`) runs its own training-mode forward and
    backward, the update uses the sum over shards of each shard's summed loss / global n, and the
    running statistics are shard 0's. With `sync_batchnorm` (or one device) the global batch is one
    computation, which is what synchronised data parallelism must equal.
    """

    is_main = True

    def __init__(
        self,
        graph: Graph,
        weights: Mapping[str, np.ndarray],
        layout: str = "NCHW",
        optimizer: SGD = PLAIN_SGD,
        execution: Execution | None = None,
    ) -> None:
        self.graph = graph
        self.layout = check_layout(layout)
        self.optimizer = optimizer
        self.execution = execution or Execution()
        if self.execution.precision != "fp32" or self.execution.device not in (None, "cpu"):
            raise DeviceError(
                "the reference computes in float64 on the host: it takes device None or 'cpu' and precision "
                f"'fp32' (mixed precision is checked against it); got {self.execution}."
            )
        self._weights: dict[str, np.ndarray] = {}
        self._state: dict[str, np.ndarray] = {}
        self.set_weights(dict(weights))

    def _to_nchw(self, x: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray | dict[str, np.ndarray]:
        if isinstance(x, Mapping):
            return {name: self._array_to_nchw(value) for name, value in x.items()}
        return self._array_to_nchw(x)

    def _array_to_nchw(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if len(self.graph.inputs) == 1:
            check_input_shape(self.graph, x.shape, self.layout)
        if self.layout == "NHWC" and x.ndim == 4:
            return x.transpose(0, 3, 1, 2)
        return x

    def _out(self, value: np.ndarray) -> np.ndarray:
        if self.layout == "NHWC" and value.ndim == 4:
            value = value.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(value, dtype=np.float32)

    def forward(
        self, x: np.ndarray | Mapping[str, np.ndarray], training: bool = False
    ) -> np.ndarray | dict[str, np.ndarray]:
        """The float32 output(s) for a batch in `layout`; training mode uses batch statistics and
        updates the running statistics."""
        inputs = self._to_nchw(x)
        if not (training and self._per_shard):
            fwd = forward(self.graph, self._weights, inputs, training)
            self._weights.update(fwd.running)
            outputs = {name: self._out(value) for name, value in fwd.outputs.items()}
        else:
            shards = [forward(self.graph, self._weights, part, True) for _, part in self._shards(inputs)]
            self._weights.update(shards[0].running)
            outputs = {
                name: self._out(np.concatenate([fwd.outputs[name] for fwd in shards]))
                for name in shards[0].outputs
            }
        return next(iter(outputs.values())) if len(outputs) == 1 else outputs

    @property
    def _per_shard(self) -> bool:
        """Whether training-mode BatchNorm sees each device's shard rather than the global batch."""
        return self.execution.devices > 1 and not self.execution.sync_batchnorm

    def _shards(self, x: np.ndarray | Mapping[str, np.ndarray]) -> list[tuple[slice, Any]]:
        """The rows and inputs of each non-empty device shard of a global batch (inputs cut alike)."""
        first = next(iter(x.values())) if isinstance(x, Mapping) else x
        rows = [slice(*b) for b in shard_bounds(len(first), self.execution.devices) if b[1] > b[0]]
        if isinstance(x, Mapping):
            return [(r, {name: value[r] for name, value in x.items()}) for r in rows]
        return [(r, x[r]) for r in rows]

    def train_step(
        self, x: np.ndarray | Mapping[str, np.ndarray], labels: np.ndarray
    ) -> tuple[float, np.ndarray]:
        """One `sgd_step` in training mode; returns the loss and the float32 logits of the
        forward pass before the update."""
        inputs = self._to_nchw(x)
        if not self._per_shard:
            loss, grads, fwd = loss_and_grads(self.graph, self._weights, inputs, labels)
            self._weights, self._state = _apply_sgd(
                self._weights, grads, fwd.running, self.optimizer, self._state
            )
            return loss, self._out(fwd.outputs[self.graph.outputs[0]])
        labels = np.asarray(labels)
        total = len(labels)
        loss, grads, logits = 0.0, {}, []
        running: dict[str, np.ndarray] = {}
        for rows, part in self._shards(inputs):
            shard_loss, shard_grads, fwd = loss_and_grads(self.graph, self._weights, part, labels[rows])
            share = (rows.stop - rows.start) / total
            loss += shard_loss * share
            for name, grad in shard_grads.items():
                if name in self._weights:  # not the inputs' gradients, whose shapes are per shard
                    grads[name] = grads.get(name, 0.0) + grad * share
            logits.append(fwd.outputs[self.graph.outputs[0]])
            running = running or fwd.running
        self._weights, self._state = _apply_sgd(self._weights, grads, running, self.optimizer, self._state)
        return loss, self._out(np.concatenate(logits))

    def set_lr(self, lr: float) -> None:
        """The learning rate of the following steps."""
        self.optimizer = replace(self.optimizer, lr=lr)

    def weights(self) -> dict[str, np.ndarray]:
        """The current canonical weights, running statistics included, as float32."""
        return {name: value.astype(np.float32) for name, value in self._weights.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace every weight (a full canonical mapping of any floating dtype)."""
        try:
            weight_shapes(self.graph)
        except WeightsError:
            pass  # a Dense size depends on the image size: checked on each forward instead
        else:
            _check_weights(self.graph, weights)
        self._weights = {name: np.array(value, dtype=np.float64) for name, value in weights.items()}

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Momentum buffers by parameter name as float32 (empty before the first step or
        without momentum)."""
        return {name: value.astype(np.float32) for name, value in self._state.items()}

    def set_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore buffers saved by `optimizer_state`."""
        _check_state(self._weights, state)
        self._state = {name: np.array(value, dtype=np.float64) for name, value in state.items()}
