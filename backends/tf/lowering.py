"""Lowering of spec nodes to Keras layers: one function per node type, in a table.

Each lowering takes the node, the Keras tensors of its inputs and a `LoweringContext`, and
returns the node's output tensor; `build` runs them once over the graph in the functional API.
The layer holding a node's weights is named exactly as the node, so
`model.get_layer("layer1.0.conv1")` and `model.summary()` read like the spec. Helper layers a
node needs (explicit padding, the NCHW reordering before a Flatten, the subsampling of a
strided dilated convolution) are named `<node>.<role>`, a name no spec node can have (a spec
name is never the prefix of another).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from multires.backend import LoweringTable
from multires.graph import (
    SAME,
    Add,
    AvgPool2d,
    Conv2d,
    Dense,
    Flatten,
    GlobalAvgPool,
    Graph,
    MaxPool2d,
    Node,
    Pad2d,
    Padding,
    Pair,
    ReLU,
    pads_as_same,
)
from multires.graph import BatchNorm as BatchNormNode
from multires.shapes import check_layout, infer_shapes

from .layers import (
    AveragePooling2DExcludePad,
    BatchNorm,
    ConstantPadding2D,
    DeferredDense,
    SamePadding2D,
    Subsample2D,
)


@dataclass(frozen=True)
class LoweringContext:
    """What a lowering needs beyond its node and inputs.

    `layout` is the model's; `dense_features` gives the input width of Dense nodes fed by a
    Flatten of an image-size-dependent map (Keras must know it when it creates the kernel);
    `dtype` is the dtype policy each layer gets.
    """

    layout: str
    dense_features: Mapping[str, int] = field(default_factory=dict)
    dtype: str | None = None
    """The Keras dtype policy of every layer ("mixed_bfloat16", ...); None is the global one."""

    @property
    def data_format(self) -> str:
        """Keras' name for the layout."""
        return "channels_first" if self.layout == "NCHW" else "channels_last"


Lowering = Callable[[Any, Sequence[Any], LoweringContext], Any]
"""`(node, input tensors, context) -> output tensor`."""

LOWERINGS = LoweringTable("tf")
"""Spec node type -> its lowering."""
lowers = LOWERINGS.register


def _zero_pad(x: Any, node: Node, padding: Padding, ctx: LoweringContext) -> Any:
    if not any(any(side) for side in padding):
        return x
    return keras.layers.ZeroPadding2D(
        padding, data_format=ctx.data_format, name=f"{node.name}.pad", dtype=ctx.dtype
    )(x)


def _same_pad(x: Any, node: Conv2d | AvgPool2d, ctx: LoweringContext, dilation: Pair = (1, 1)) -> Any:
    """Explicit zero padding as TF's SAME pads the node's window, for what `padding="same"` can't run."""
    return SamePadding2D(
        node.kernel,
        node.stride,
        dilation,
        data_format=ctx.data_format,
        name=f"{node.name}.pad",
        dtype=ctx.dtype,
    )(x)


@lowers(Conv2d)
def conv2d(node: Conv2d, inputs: Sequence[Any], ctx: LoweringContext) -> Any:
    """`Conv2D`: SAME is Keras' own "same" (TensorFlow's SAME), and so is explicit padding that
    equals it (`pads_as_same`: a 3 x 3 convolution at stride 1 padded 1 on each side, as Keras
    code writes it); other explicit per-side padding is a `ZeroPadding2D` before a "valid"
    convolution. TensorFlow refuses stride with dilation, so such a convolution runs at stride 1
    and is subsampled, SAME padded for its real stride."""
    both = max(node.stride) > 1 and max(node.dilation) > 1
    same = node.padding == SAME or pads_as_same(node)
    x = inputs[0]
    if not same:
        x = _zero_pad(x, node, node.padding, ctx)
    elif both:
        x = _same_pad(x, node, ctx, node.dilation)
    x = keras.layers.Conv2D(
        node.out_channels,
        node.kernel,
        strides=(1, 1) if both else node.stride,
        padding="same" if same and not both else "valid",
        data_format=ctx.data_format,
        dilation_rate=node.dilation,
        groups=node.groups,
        use_bias=node.bias,
        name=node.name,
        dtype=ctx.dtype,
    )(x)
    if both:
        x = Subsample2D(
            node.stride, data_format=ctx.data_format, name=f"{node.name}.stride", dtype=ctx.dtype
        )(x)
    return x


@lowers(BatchNormNode)
def batchnorm(node: BatchNormNode, inputs: Sequence[Any], ctx: LoweringContext) -> Any:
    """This backend's `BatchNorm` (a `BatchNormalization` with accurate batch statistics) with
    Keras' momentum convention (1 - the spec's), the exact epsilon and the node's running-variance
    convention."""
    return BatchNorm(
        unbiased=node.running_variance == "unbiased",
        axis=1 if ctx.layout == "NCHW" else -1,
        momentum=1.0 - node.momentum,
        epsilon=node.eps,
        name=node.name,
        dtype=ctx.dtype,
    )(inputs[0])


@lowers(ReLU)
def relu(node: ReLU, inputs: Sequence[Any], ctx: LoweringContext) -> Any:
    return keras.layers.ReLU(name=node.name, dtype=ctx.dtype)(inputs[0])


@lowers(Add)
def add(node: Add, inputs: Sequence[Any], ctx: LoweringContext) -> Any:
    return keras.layers.Add(name=node.name, dtype=ctx.dtype)(list(inputs))


@lowers(MaxPool2d)
def maxpool2d(node: MaxPool2d, inputs: Sequence[Any], ctx: LoweringContext) -> Any:
    """SAME is Keras' own "same" (TensorFlow's SAME max pool leaves the pads out); explicit
    padding is -inf (a `ZeroPadding2D` would win the max over negative inputs)."""
    x = inputs[0]
    if node.padding != SAME and any(any(side) for side in node.padding):
        x = ConstantPadding2D(
            node.padding, float("-inf"), data_format=ctx.data_format, name=f"{node.name}.pad", dtype=ctx.dtype
        )(x)
    padding = "same" if node.padding == SAME else "valid"
    return keras.layers.MaxPooling2D(
        node.kernel,
        node.stride,
        padding=padding,
        data_format=ctx.data_format,
        name=node.name,
        dtype=ctx.dtype,
    )(x)


@lowers(AvgPool2d)
def avgpool2d(node: AvgPool2d, inputs: Sequence[Any], ctx: LoweringContext) -> Any:
    """SAME without the pads in the divisor is Keras' own "same"; SAME counting them pads
    explicitly. Explicit padding is zeros counted in the divisor, or (count_include_pad=False)
    a divisor of real inputs."""
    if node.padding == SAME and not node.count_include_pad:
        return keras.layers.AveragePooling2D(
            node.kernel,
            node.stride,
            padding="same",
            data_format=ctx.data_format,
            name=node.name,
            dtype=ctx.dtype,
        )(inputs[0])
    if node.padding == SAME:
        x = _same_pad(inputs[0], node, ctx)
    elif any(any(side) for side in node.padding) and not node.count_include_pad:
        return AveragePooling2DExcludePad(
            node.kernel,
            node.stride,
            node.padding,
            data_format=ctx.data_format,
            name=node.name,
            dtype=ctx.dtype,
        )(inputs[0])
    else:
        x = _zero_pad(inputs[0], node, node.padding, ctx)
    return keras.layers.AveragePooling2D(
        node.kernel,
        node.stride,
        padding="valid",
        data_format=ctx.data_format,
        name=node.name,
        dtype=ctx.dtype,
    )(x)


@lowers(Pad2d)
def pad2d(node: Pad2d, inputs: Sequence[Any], ctx: LoweringContext) -> Any:
    """`ZeroPadding2D`, per side."""
    return keras.layers.ZeroPadding2D(
        node.padding, data_format=ctx.data_format, name=node.name, dtype=ctx.dtype
    )(inputs[0])


@lowers(GlobalAvgPool)
def global_avgpool(node: GlobalAvgPool, inputs: Sequence[Any], ctx: LoweringContext) -> Any:
    """Mean over the spatial axes, keeping them as 1 x 1."""
    return keras.layers.GlobalAveragePooling2D(
        data_format=ctx.data_format, keepdims=True, name=node.name, dtype=ctx.dtype
    )(inputs[0])


@lowers(Flatten)
def flatten(node: Flatten, inputs: Sequence[Any], ctx: LoweringContext) -> Any:
    """Channel-major order whatever the layout: an NHWC map is permuted to NCHW first.

    A 1 x 1 map needs no permutation (both orders agree), so the usual global-pool head stays
    a plain `Flatten`.
    """
    x = inputs[0]
    if ctx.layout == "NHWC" and tuple(x.shape[1:3]) != (1, 1):
        x = keras.layers.Permute((3, 1, 2), name=f"{node.name}.nchw", dtype=ctx.dtype)(x)
    return keras.layers.Flatten(name=node.name, dtype=ctx.dtype)(x)


@lowers(Dense)
def dense(node: Dense, inputs: Sequence[Any], ctx: LoweringContext) -> Any:
    """`Dense`. An input of unknown width (a Flatten of a spatial map) gets its width from the
    weights, or, without them, a `DeferredDense` placeholder that `complete` replaces."""
    x = inputs[0]
    if x.shape[-1] is not None:
        return keras.layers.Dense(node.out_features, use_bias=node.bias, name=node.name, dtype=ctx.dtype)(x)
    if node.name not in ctx.dense_features:
        return DeferredDense(node.out_features, use_bias=node.bias, name=node.name, dtype=ctx.dtype)(x)
    x = keras.layers.Reshape((ctx.dense_features[node.name],), name=f"{node.name}.features", dtype=ctx.dtype)(
        x
    )
    return keras.layers.Dense(node.out_features, use_bias=node.bias, name=node.name, dtype=ctx.dtype)(x)


_DEFERRED: weakref.WeakKeyDictionary[keras.Model, tuple[Graph, str, str | None]] = weakref.WeakKeyDictionary()
"""Models holding a `DeferredDense`, with what `complete` rebuilds them from."""


def build(
    graph: Graph,
    layout: str = "NHWC",
    weights: Mapping[str, np.ndarray] | None = None,
    dtype: str | None = None,
) -> keras.Model:
    """A Keras functional model computing `graph` on `layout` inputs, with Keras-initialised weights.

    Layers holding weights are named by their node; inputs and 4-D outputs are in `layout`.
    `weights` (canonical) are only read for the input width of a Dense fed by a Flatten of a
    spatial map, which Keras needs now and the spec leaves to the image size; without them such
    a Dense is a placeholder until `load_weights`. NCHW runs on GPU or under XLA
    (`jit_compile=True`): TensorFlow's CPU kernels for convolution and pooling are NHWC only.

    `dtype` is a Keras dtype policy for every layer of this model, such as "mixed_bfloat16"
    (float32 variables, bfloat16 compute; BatchNorm computes in float32), leaving Keras' global
    policy and other models alone; None is the global policy (float32 unless changed).
    """
    layout = check_layout(layout)
    ctx = LoweringContext(layout, _dense_features(graph, weights), dtype)
    values: dict[str, Any] = {}
    for spec_input in graph.inputs:
        shape = (spec_input.channels, None, None) if layout == "NCHW" else (None, None, spec_input.channels)
        values[spec_input.name] = keras.Input(shape, name=spec_input.name)
    inputs = [values[i.name] for i in graph.inputs]
    for node in graph.nodes:
        values[node.name] = LOWERINGS[type(node)](node, [values[s] for s in node.inputs], ctx)
    outputs = [values[name] for name in graph.outputs]
    model = keras.Model(
        inputs[0] if len(inputs) == 1 else inputs,
        outputs[0] if len(outputs) == 1 else outputs,
        name=graph.name,
    )
    if any(isinstance(layer, DeferredDense) for layer in model.layers):
        _DEFERRED[model] = (graph, layout, dtype)
    return model


def complete(model: keras.Model, weights: Mapping[str, np.ndarray]) -> keras.Model:
    """`model`, or, if it holds `DeferredDense` placeholders, the model rebuilt with the widths
    the canonical `weights` give."""
    if model not in _DEFERRED:
        return model
    graph, layout, dtype = _DEFERRED[model]
    return build(graph, layout, weights, dtype)


def _dense_features(graph: Graph, weights: Mapping[str, np.ndarray] | None) -> dict[str, int]:
    """Input widths, from `weights`, of the Dense nodes whose width depends on the image size."""
    if weights is None:
        return {}
    shapes = infer_shapes(graph)
    features = {}
    for node in graph.nodes:
        weight = weights.get(f"{node.name}.weight")
        if isinstance(node, Dense) and shapes[node.inputs[0]][1] is None and weight is not None:
            features[node.name] = int(np.shape(weight)[1])
    return features
