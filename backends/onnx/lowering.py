"""Lowering a spec Graph to an `onnx.ModelProto`: one small function per node type.

`build` walks the graph once and emits one ONNX node per spec node, named by the spec node
(so `layer1.0.conv1` is the name of a `Conv` node) and writing a tensor of the same name; the
weights are initializers under their canonical names (`layer1.0.conv1.weight`). The model
carries the spec's JSON and the layout in its metadata, so it can be mapped back to the spec.

How spec semantics map onto ONNX (opset `OPSET`):

- Padding is explicit per side: ONNX `pads` are `[top, left, bottom, right]`.
- MaxPool: ONNX pads never take part in the max, which is the spec's "-inf padding".
  AveragePool's `count_include_pad` is the spec's.
- Pools get symmetric `pads` only: asymmetric padding becomes an explicit `Pad` (-inf for max,
  zeros for an average that counts them) before an unpadded pool. Runtimes have mishandled
  asymmetric pool pads (onnxruntime issues #24681 and #26708 on the CPU average with
  `count_include_pad=1`, #29631 on the CUDA average; ONNX's Python `ReferenceEvaluator` reads a
  stride-1 max pool's pads in the wrong order), and an explicit `Pad` is exact everywhere. An
  average that excludes padding from its divisor needs the operator's own pads, so it keeps them.
- TensorFlow/XLA SAME padding (`padding="same"`): where it does not depend on the input size
  (stride 1, or a one-pixel window, on both axes) it is resolved at build time and lowered as
  the explicit padding above. Otherwise the pads depend on H and W, which a model built here
  leaves symbolic (one file serves every image size), so they cannot be attributes:
  - Conv uses `auto_pad="SAME_UPPER"`, ONNX's own name for TF's rule (the larger half after),
    except when dilated, which onnxruntime rejects with `SAME_UPPER`: then, as for pools, an
    explicit `Pad` whose pads a few integer nodes compute from `Shape(x)`
    (`total = (k - 1) * d - (size - 1) % s`), before an unpadded operator.
  - MaxPool and a counting AveragePool: that computed `Pad` (-inf or zeros), as asymmetric
    explicit padding above.
  - An AveragePool that leaves the pads out of its divisor (TF's own SAME average) uses
    `auto_pad="SAME_UPPER"` with `count_include_pad=0`; a window shorter than `stride - 1` is
    refused (onnxruntime rejects the negative pads that `SAME_UPPER` then asks for).
- Pad2d is `Pad` with zeros.
- BatchNormalization in inference mode (`training_mode=0`, the default) with the spec's
  epsilon; ONNX's momentum is the weight of the old running statistic, so it is
  `1 - momentum` of the spec (kept for tools that train the exported graph). The spec's
  `running_variance` convention only changes training-mode updates, so it has nothing to lower.
- Dense is `Gemm` with `transB=1`, the weight staying canonical `(out, in)`; Flatten is ONNX
  `Flatten(axis=1)` of an NCHW map, which is the spec's channel-major order.
- `layout="NHWC"`: a `Transpose` to NCHW after each input and back after each 4-D output; the
  weights are unchanged.
- The batch dimension (and the image size) are symbolic, so one file serves every batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import multires
from multires.backend import LoweringTable
from multires.errors import SpecError, WeightsError
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
    static_padding,
    symmetric_padding,
)
from multires.shapes import Shape, check_layout, infer_shapes
from multires.weights import as_weights, init_weights

OPSET = 17
"""The ONNX operator set the models declare: every operator used here has had the semantics the
spec needs since opset 17 or earlier, and current runtimes (onnxruntime, DJL, TensorRT,
OpenVINO) all load it."""

IR_VERSION = 8
"""The ONNX IR version that goes with opset 17, so runtimes of that era load the file."""

LAYOUTS = ("NCHW", "NHWC")

GRAPH_KEY = "multires.graph"
LAYOUT_KEY = "multires.layout"
"""Metadata keys of the spec JSON and the input layout."""


class LoweringContext:
    """What a lowering function needs: the canonical weights, the ONNX nodes and initializers
    emitted so far, and the tensor name of every spec value."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.values: dict[str, str] = {}

    def emit(self, op_type: str, node: Node, inputs: list[str], output: str, **attributes: object) -> str:
        """Append an ONNX node named after `node` that writes the tensor `output`; returns `output`."""
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=node.name, **attributes))
        return output

    def weight(self, node: Node, kind: str) -> str:
        """Add the canonical weight `<node>.<kind>` as a float32 initializer; returns its name."""
        name = f"{node.name}.{kind}"
        if name not in self.weights:
            raise WeightsError(f"{node.name} ({type(node).__name__}): no weight {name!r} was given.")
        array = np.ascontiguousarray(self.weights[name], dtype=np.float32)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def constant(self, name: str, value: np.ndarray) -> str:
        """A `Constant` node holding `value`, named and written as `name`: helper operands stay
        out of the initializers, which are exactly the canonical weights."""
        tensor = numpy_helper.from_array(np.asarray(value), name)
        self.nodes.append(helper.make_node("Constant", [], [name], name=name, value=tensor))
        return name

    def pad(self, node: Node, x: str, pads: str, value: float) -> str:
        """`Pad` of `x` by the tensor `pads` with `value`, written as `<node>/padded`."""
        fill = self.constant(f"{node.name}/pad_value", np.array(value, np.float32))
        self.nodes.append(
            helper.make_node("Pad", [x, pads, fill], [f"{node.name}/padded"], name=f"{node.name}/pad")
        )
        return f"{node.name}/padded"

    def fixed_pad(self, node: Node, x: str, padding: Padding, value: float) -> str:
        """`x` padded by the per-side `padding` with `value`."""
        (top, bottom), (left, right) = padding
        pads = self.constant(f"{node.name}/pads", np.array([0, 0, top, left, 0, 0, bottom, right], np.int64))
        return self.pad(node, x, pads, value)

    def op(self, op_type: str, name: str, *inputs: str, **attributes: object) -> str:
        """Append a helper node `name` that writes the tensor `name`; returns `name`."""
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attributes))
        return name

    def same_pad(self, node: Conv2d | MaxPool2d | AvgPool2d, x: str, value: float) -> str:
        """`x` padded with `value` by TensorFlow/XLA SAME pads computed from its runtime size:
        per axis `total = max((k - 1) * d - (size - 1) % s, 0)`, the smaller half before."""
        name = f"{node.name}/same"
        span = np.array([(k - 1) * d for k, d in zip(node.kernel, _dilation(node), strict=True)], np.int64)
        stride = np.array(node.stride, np.int64)
        zeros = self.constant(f"{name}/zeros", np.zeros(2, np.int64))
        size = self.op("Shape", f"{name}/size", x, start=2, end=4)
        last = self.op("Sub", f"{name}/last", size, self.constant(f"{name}/one", np.ones(2, np.int64)))
        remainder = self.op("Mod", f"{name}/remainder", last, self.constant(f"{name}/stride", stride))
        total = self.op("Sub", f"{name}/total", self.constant(f"{name}/span", span), remainder)
        if np.any(span < stride - 1):  # only then can the remainder exceed the span
            total = self.op("Max", f"{name}/total_or_0", total, zeros)
        before = self.op(
            "Div", f"{name}/before", total, self.constant(f"{name}/two", np.full(2, 2, np.int64))
        )
        after = self.op("Sub", f"{name}/after", total, before)
        pads = self.op("Concat", f"{name}/pads", zeros, before, zeros, after, axis=0)  # N and C unpadded
        return self.pad(node, x, pads, value)

    def pool_input(self, node: MaxPool2d | AvgPool2d, x: str, value: float) -> tuple[str, list[int]]:
        """The pool's input and `pads`: symmetric padding stays on the operator; asymmetric or
        SAME padding becomes an explicit `Pad` with `value` before it (`<node>/pad`)."""
        fixed = static_padding(node)
        if fixed is None:
            return self.same_pad(node, x, value), [0, 0, 0, 0]
        if symmetric_padding(fixed) is not None:
            return x, _pads(fixed)
        return self.fixed_pad(node, x, fixed, value), [0, 0, 0, 0]


Lowering = Callable[[LoweringContext, Node, list[str], str], str]
LOWERINGS = LoweringTable("onnx")
"""Spec node type -> the function that emits it: `(ctx, node, input tensors, output tensor)`."""
lowers = LOWERINGS.register


def _pads(padding: Padding) -> list[int]:
    """The spec's `((top, bottom), (left, right))` as ONNX `[top, left, bottom, right]`."""
    (top, bottom), (left, right) = padding
    return [top, left, bottom, right]


def _dilation(node: Conv2d | MaxPool2d | AvgPool2d) -> tuple[int, int]:
    return node.dilation if isinstance(node, Conv2d) else (1, 1)


@lowers(Conv2d)
def _conv2d(ctx: LoweringContext, node: Conv2d, inputs: list[str], output: str) -> str:
    x, fixed = inputs[0], static_padding(node)
    if fixed is not None:
        padding: dict[str, object] = {"pads": _pads(fixed)}
    elif node.dilation == (1, 1):
        padding = {"auto_pad": "SAME_UPPER"}
    else:
        x, padding = ctx.same_pad(node, x, 0.0), {"pads": [0, 0, 0, 0]}
    operands = [x, ctx.weight(node, "weight")]
    if node.bias:
        operands.append(ctx.weight(node, "bias"))
    return ctx.emit(
        "Conv",
        node,
        operands,
        output,
        kernel_shape=list(node.kernel),
        strides=list(node.stride),
        dilations=list(node.dilation),
        group=node.groups,
        **padding,
    )


@lowers(BatchNorm)
def _batchnorm(ctx: LoweringContext, node: BatchNorm, inputs: list[str], output: str) -> str:
    operands = [
        inputs[0],
        *(ctx.weight(node, kind) for kind in ("weight", "bias", "running_mean", "running_var")),
    ]
    return ctx.emit(
        "BatchNormalization", node, operands, output, epsilon=node.eps, momentum=1.0 - node.momentum
    )


@lowers(ReLU)
def _relu(ctx: LoweringContext, node: ReLU, inputs: list[str], output: str) -> str:
    return ctx.emit("Relu", node, inputs, output)


@lowers(Add)
def _add(ctx: LoweringContext, node: Add, inputs: list[str], output: str) -> str:
    return ctx.emit("Add" if len(inputs) == 2 else "Sum", node, inputs, output)


@lowers(MaxPool2d)
def _maxpool2d(ctx: LoweringContext, node: MaxPool2d, inputs: list[str], output: str) -> str:
    x, pads = ctx.pool_input(node, inputs[0], float("-inf"))
    return ctx.emit(
        "MaxPool", node, [x], output, kernel_shape=list(node.kernel), strides=list(node.stride), pads=pads
    )


@lowers(AvgPool2d)
def _avgpool2d(ctx: LoweringContext, node: AvgPool2d, inputs: list[str], output: str) -> str:
    # Without count_include_pad the divisor must see which pixels are padding, so the padding
    # stays on the operator even when asymmetric or SAME.
    x, fixed = inputs[0], static_padding(node)
    padding: dict[str, object]
    if node.count_include_pad:
        x, pads = ctx.pool_input(node, x, 0.0)
        padding = {"pads": pads}
    elif fixed is not None:
        padding = {"pads": _pads(fixed)}
    else:
        _check_same_average(node)
        padding = {"auto_pad": "SAME_UPPER"}
    return ctx.emit(
        "AveragePool",
        node,
        [x],
        output,
        kernel_shape=list(node.kernel),
        strides=list(node.stride),
        count_include_pad=int(node.count_include_pad),
        **padding,
    )


def _check_same_average(node: AvgPool2d) -> None:
    """Refuse a SAME average without padding in its divisor whose window is shorter than
    `stride - 1`: `SAME_UPPER` then asks for negative pads at some sizes, which onnxruntime rejects."""
    if any(k - 1 < s - 1 for k, s in zip(node.kernel, node.stride, strict=True)):
        raise SpecError(
            f"{node.name} (AvgPool2d): onnx cannot lower padding='same' with count_include_pad=False "
            f"when the kernel {node.kernel} is shorter than the stride {node.stride} minus 1 "
            "(onnxruntime rejects the negative SAME_UPPER pads); use count_include_pad=True, a larger "
            "kernel, or another backend."
        )


@lowers(Pad2d)
def _pad2d(ctx: LoweringContext, node: Pad2d, inputs: list[str], output: str) -> str:
    (top, bottom), (left, right) = node.padding
    pads = ctx.constant(f"{node.name}/pads", np.array([0, 0, top, left, 0, 0, bottom, right], np.int64))
    return ctx.emit("Pad", node, [inputs[0], pads], output)


@lowers(GlobalAvgPool)
def _global_avgpool(ctx: LoweringContext, node: GlobalAvgPool, inputs: list[str], output: str) -> str:
    return ctx.emit("GlobalAveragePool", node, inputs, output)


@lowers(Flatten)
def _flatten(ctx: LoweringContext, node: Flatten, inputs: list[str], output: str) -> str:
    return ctx.emit("Flatten", node, inputs, output, axis=1)


@lowers(Dense)
def _dense(ctx: LoweringContext, node: Dense, inputs: list[str], output: str) -> str:
    operands = [inputs[0], ctx.weight(node, "weight")]
    if node.bias:
        operands.append(ctx.weight(node, "bias"))
    return ctx.emit("Gemm", node, operands, output, transB=1)


def _value_info(name: str, shape: Shape, layout: str, image: tuple[str, str] | None) -> onnx.ValueInfoProto:
    """A float32 graph input or output in `layout`: the batch is the symbol `N`, sizes the spec
    fixes are numbers, and unknown spatial sizes are the symbols `image` (graph inputs) or
    anonymous (outputs, whose size differs from the input's)."""
    _, *rest = shape
    dims: list[int | str | None] = ["N"]
    if len(shape) == 4:
        c, h, w = rest
        spatial = [h, w] if image is None else [h or image[0], w or image[1]]
        dims += [c, *spatial] if layout == "NCHW" else [*spatial, c]
    else:
        dims += rest
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def deferred_dense(graph: Graph) -> list[Dense]:
    """Dense nodes whose input width only the image size decides (a Flatten of a spatial map)."""
    shapes = infer_shapes(graph)
    return [n for n in graph.nodes if isinstance(n, Dense) and shapes[n.inputs[0]][1] is None]


def _initial_weights(graph: Graph) -> dict[str, np.ndarray]:
    """`init_weights(graph, seed=0)`; a Dense whose width the image size decides gets a zero-width
    placeholder weight, until `load_weights` rebuilds the model with real weights."""
    deferred = deferred_dense(graph)
    if not deferred:
        return init_weights(graph, seed=0)
    (spec_input,) = graph.inputs
    for size in range(1, 1025):
        try:
            weights = init_weights(graph, seed=0, input_shape=(1, spec_input.channels, size, size))
            break
        except SpecError:
            continue
    for node in deferred:
        weights[f"{node.name}.weight"] = np.zeros((node.out_features, 0), np.float32)
    return weights


def build(
    graph: Graph, layout: str = "NCHW", weights: Mapping[str, np.ndarray] | None = None
) -> onnx.ModelProto:
    """An `onnx.ModelProto` computing `graph` on `layout` inputs, with `weights` as initializers.

    Without `weights` the initializers are `multires.init_weights(graph, seed=0)` (ONNX has no
    initialisers of its own; a Dense after a spatial Flatten gets a zero-width placeholder that
    `load_weights` replaces by rebuilding the model)
    The model passes `onnx.checker.check_model(..., full_check=True)`
    and runs in onnxruntime; its inputs and outputs are named as in the spec.
    """
    layout = check_layout(layout)
    weights = _initial_weights(graph) if weights is None else as_weights(weights, graph)
    ctx = LoweringContext(weights)
    nhwc = layout == "NHWC"
    shapes = infer_shapes(graph)
    for spec_input in graph.inputs:
        name = spec_input.name
        if nhwc:
            # '/' never occurs in spec names, so these helper tensors cannot clash with them.
            ctx.nodes.append(
                helper.make_node(
                    "Transpose", [name], [f"{name}/NCHW"], name=f"{name}/to_NCHW", perm=[0, 3, 1, 2]
                )
            )
            name = f"{name}/NCHW"
        ctx.values[spec_input.name] = name
    transposed = {name for name in graph.outputs if nhwc and len(shapes[name]) == 4}
    for node in graph.nodes:
        output = f"{node.name}/NCHW" if node.name in transposed else node.name
        ctx.values[node.name] = LOWERINGS[type(node)](ctx, node, [ctx.values[s] for s in node.inputs], output)
    for name in graph.outputs:
        if name in transposed:
            ctx.nodes.append(
                helper.make_node(
                    "Transpose", [ctx.values[name]], [name], name=f"{name}/to_NHWC", perm=[0, 2, 3, 1]
                )
            )
    onnx_graph = helper.make_graph(
        ctx.nodes,
        graph.name,
        [_value_info(i.name, shapes[i.name], layout, ("H", "W")) for i in graph.inputs],
        [_value_info(name, shapes[name], layout, None) for name in graph.outputs],
        initializer=ctx.initializers,
    )
    model = helper.make_model(
        onnx_graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="multires",
        producer_version=multires.__version__,
        doc_string=graph.description,
    )
    helper.set_model_props(model, {GRAPH_KEY: graph.to_json(indent=None), LAYOUT_KEY: layout})
    return model


def model_graph(model: onnx.ModelProto) -> Graph | None:
    """The spec stored in a model built by `build`, or None for a model from elsewhere."""
    for prop in model.metadata_props:
        if prop.key == GRAPH_KEY:
            return Graph.from_json(prop.value)
    return None


def model_layout(model: onnx.ModelProto) -> str:
    """The input layout of a model built by `build` ("NCHW" for a model from elsewhere)."""
    for prop in model.metadata_props:
        if prop.key == LAYOUT_KEY:
            return prop.value
    return "NCHW"
