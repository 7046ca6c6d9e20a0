"""Shape inference, parameter counts and MACs, in pure Python.

Shapes are NCHW tuples (or (N, F) after Flatten). A spatial size of None means "unknown":
`Graph` construction infers with unknown sizes to check the channel arithmetic, and
`infer_shapes(graph, (N, C, H, W))` checks everything for a concrete input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from multires.errors import ShapeError, SpecError
from multires.graph import (
    SAME,
    Add,
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Dense,
    Flatten,
    GlobalAvgPool,
    MaxPool2d,
    Node,
    Pad2d,
    ReLU,
)

if TYPE_CHECKING:
    from multires.graph import Graph

Shape = tuple[int | None, ...]
LAYOUTS = ("NCHW", "NHWC")


def _where(node: Node) -> str:
    return f"{node.name} ({type(node).__name__})"


def _spatial(
    node: Node, size: int | None, kernel: int, stride: int, pad: tuple[int, int] | str, dilation: int
) -> int | None:
    if size is None:
        return None
    if isinstance(pad, str):
        return -(-size // stride)
    return (size + pad[0] + pad[1] - dilation * (kernel - 1) - 1) // stride + 1


def known_size(dim: int | None, node: Node) -> int:
    """A size this node needs known: channels always are (inputs declare them); spatial sizes
    only when an input shape is given."""
    if dim is None:
        raise SpecError(f"{_where(node)}: its input size depends on the image size; give an input shape.")
    return dim


def _need_4d(node: Node, shape: Shape) -> None:
    if len(shape) != 4:
        raise SpecError(
            f"{_where(node)}: needs a 4-D (N, C, H, W) input; got a {len(shape)}-D one {shape}. "
            "Put it before the Flatten."
        )


def node_output_shape(node: Node, in_shapes: Sequence[Shape]) -> Shape:
    """The output shape of one node for the given input shapes (NCHW)."""
    shape = in_shapes[0]
    if isinstance(node, (Conv2d, MaxPool2d, AvgPool2d)):
        _need_4d(node, shape)
        n, c, h, w = shape
        dilation = node.dilation if isinstance(node, Conv2d) else (1, 1)
        pads = (SAME, SAME) if node.padding == SAME else node.padding
        oh = _spatial(node, h, node.kernel[0], node.stride[0], pads[0], dilation[0])
        ow = _spatial(node, w, node.kernel[1], node.stride[1], pads[1], dilation[1])
        if (oh is not None and oh < 1) or (ow is not None and ow < 1):
            raise SpecError(
                f"{_where(node)}: the spatial size shrinks to {oh} x {ow} for an input of "
                f"{h} x {w}. Use a larger input or less downsampling before this node."
            )
        if isinstance(node, Conv2d):
            if known_size(c, node) % node.groups:
                raise SpecError(
                    f"{_where(node)}: groups (={node.groups}) must divide the input channels "
                    f"(={c}). Change groups or the previous layer's channels."
                )
            c = node.out_channels
        return (n, c, oh, ow)
    if isinstance(node, BatchNorm):
        _need_4d(node, shape)
        return shape
    if isinstance(node, Pad2d):
        _need_4d(node, shape)
        n, c, h, w = shape
        (top, bottom), (left, right) = node.padding
        return (n, c, None if h is None else h + top + bottom, None if w is None else w + left + right)
    if isinstance(node, ReLU):
        return shape
    if isinstance(node, Add):
        for source, other in zip(node.inputs[1:], in_shapes[1:], strict=True):
            if len(other) != len(shape) or any(
                a is not None and b is not None and a != b for a, b in zip(shape, other, strict=True)
            ):
                raise SpecError(
                    f"{_where(node)}: cannot add {node.inputs[0]!r} of shape {shape} and {source!r} of "
                    f"shape {other}. Make the branches agree (e.g. a 1x1 projection with the same stride)."
                )
        return shape
    if isinstance(node, GlobalAvgPool):
        _need_4d(node, shape)
        return (shape[0], shape[1], 1, 1)
    if isinstance(node, Flatten):
        _need_4d(node, shape)
        n, c, h, w = shape
        return (n, None if h is None or w is None else known_size(c, node) * h * w)
    if isinstance(node, Dense):
        if len(shape) != 2:
            raise SpecError(
                f"{_where(node)}: needs a flat (N, features) input; got {shape}. Add a Flatten before it."
            )
        return (shape[0], node.out_features)
    raise SpecError(f"{_where(node)}: no shape rule for node type {type(node).__name__}.")


def _input_shapes(graph: Graph, input_shape: Shape | Mapping[str, Shape] | None) -> dict[str, Shape]:
    if input_shape is None:
        return {i.name: (None, i.channels, None, None) for i in graph.inputs}
    if not isinstance(input_shape, Mapping):
        if len(graph.inputs) != 1:
            raise ShapeError(
                f"graph {graph.name!r} has inputs {[i.name for i in graph.inputs]}; give a shape for each "
                "as a dict."
            )
        input_shape = {graph.inputs[0].name: tuple(input_shape)}
    shapes: dict[str, Shape] = {}
    for spec in graph.inputs:
        if spec.name not in input_shape:
            raise ShapeError(f"graph {graph.name!r}: no shape given for input {spec.name!r}.")
        shape = tuple(input_shape[spec.name])
        if (
            len(shape) != 4
            or shape[1] != spec.channels
            or any(d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1) for d in shape)
        ):
            raise ShapeError(
                f"input {spec.name!r} of {graph.name!r} expects (N, {spec.channels}, H, W) in NCHW with "
                f"positive sizes; got {shape}."
            )
        shapes[spec.name] = shape
    return shapes


def infer_shapes(graph: Graph, input_shape: Shape | Mapping[str, Shape] | None = None) -> dict[str, Shape]:
    """NCHW output shape of every input and node, in graph order; raises SpecError naming the node."""
    shapes = _input_shapes(graph, input_shape)
    for node in graph.nodes:
        shapes[node.name] = node_output_shape(node, [shapes[s] for s in node.inputs])
    return shapes


_Dim = TypeVar("_Dim", int, int | None)
"""A dimension: known (`int`) in a concrete shape, `int | None` in a `Shape`."""


def to_layout(shape: Sequence[_Dim], layout: str) -> tuple[_Dim, ...]:
    """An NCHW shape as it appears in `layout` (2-D shapes are the same in both)."""
    layout = check_layout(layout)
    if layout == "NHWC" and len(shape) == 4:
        n, c, h, w = shape
        return (n, h, w, c)
    return tuple(shape)


def from_layout(shape: Sequence[_Dim], layout: str) -> tuple[_Dim, ...]:
    """A shape given in `layout`, as NCHW."""
    layout = check_layout(layout)
    if layout == "NHWC" and len(shape) == 4:
        n, h, w, c = shape
        return (n, c, h, w)
    return tuple(shape)


def check_layout(layout: str) -> str:
    """Normalise a layout name, or raise a ShapeError listing the known ones."""
    name = str(layout).upper()
    if name not in LAYOUTS:
        raise ShapeError(f"unknown layout {layout!r}; use one of {LAYOUTS}.")
    return name


def check_input_shape(graph: Graph, shape: Sequence[int], layout: str = "NCHW") -> None:
    """Raise a ShapeError naming the expected shape if `shape` does not fit the graph's input."""
    layout = check_layout(layout)
    (spec,) = graph.inputs
    expected = "(N, C, H, W)".replace("C", str(spec.channels))
    if layout == "NHWC":
        expected = f"(N, H, W, {spec.channels})"
    shape = tuple(int(d) for d in shape)
    channel_axis = 1 if layout == "NCHW" else 3
    if len(shape) != 4 or shape[channel_axis] != spec.channels:
        hint = ""
        other_axis = 3 if layout == "NCHW" else 1
        if len(shape) == 4 and shape[other_axis] == spec.channels:
            other = "NHWC" if layout == "NCHW" else "NCHW"
            hint = f" It looks like {other}: transpose it or build the model with layout={other!r}."
        raise ShapeError(
            f"{graph.name}: input {spec.name!r} expects shape {expected} in {layout}; got {shape}.{hint}"
        )
    try:
        infer_shapes(graph, from_layout(shape, layout))
    except SpecError as error:
        raise ShapeError(f"{graph.name}: input of shape {shape} ({layout}) is too small: {error}") from None


def node_params(node: Node, in_shape: Shape) -> int:
    """Trainable parameters of one node (running statistics are buffers, not counted)."""
    if isinstance(node, Conv2d):
        c_in = known_size(in_shape[1], node)
        kh, kw = node.kernel
        return node.out_channels * (c_in // node.groups) * kh * kw + (node.out_channels if node.bias else 0)
    if isinstance(node, BatchNorm):
        return 2 * known_size(in_shape[1], node)
    if isinstance(node, Dense):
        features = known_size(in_shape[1], node)
        return node.out_features * features + (node.out_features if node.bias else 0)
    return 0


def node_macs(node: Node, in_shape: Shape, out_shape: Shape) -> int:
    """Multiply-accumulates of one node: convolutions and dense layers only."""
    if isinstance(node, Conv2d):
        n, c_out, h, w = (known_size(d, node) for d in out_shape)
        kh, kw = node.kernel
        return n * c_out * h * w * (known_size(in_shape[1], node) // node.groups) * kh * kw
    if isinstance(node, Dense):
        return known_size(in_shape[0], node) * known_size(in_shape[1], node) * node.out_features
    return 0


@dataclass(frozen=True)
class NodeSummary:
    """One row of a model summary."""

    name: str
    op: str
    shape: Shape
    params: int
    macs: int


@dataclass(frozen=True)
class Summary:
    """Per-node shapes (in the requested layout), parameters and MACs, with totals."""

    graph: str
    input_shape: Shape
    layout: str
    rows: tuple[NodeSummary, ...]

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "graph": self.graph,
            "input_shape": list(self.input_shape),
            "layout": self.layout,
            "nodes": [
                {"name": r.name, "op": r.op, "shape": list(r.shape), "params": r.params, "macs": r.macs}
                for r in self.rows
            ],
            "total_params": self.params,
            "total_macs": self.macs,
        }


def summarize(graph: Graph, input_shape: Sequence[int], layout: str = "NCHW") -> Summary:
    """Shapes, parameters and MACs of every node for an input given in `layout`."""
    layout = check_layout(layout)
    check_input_shape(graph, input_shape, layout)
    shapes = infer_shapes(graph, from_layout(tuple(input_shape), layout))
    rows = []
    for node in graph.nodes:
        in_shape = shapes[node.inputs[0]]
        out_shape = shapes[node.name]
        rows.append(
            NodeSummary(
                node.name,
                type(node).__name__,
                to_layout(out_shape, layout),
                node_params(node, in_shape),
                node_macs(node, in_shape, out_shape),
            )
        )
    return Summary(graph.name, tuple(input_shape), layout, tuple(rows))


def param_count(graph: Graph, input_shape: Shape | None = None) -> int:
    """Trainable parameters of the graph (an input shape is needed only if Flatten feeds Dense)."""
    shapes = infer_shapes(graph, input_shape)
    return sum(node_params(node, shapes[node.inputs[0]]) for node in graph.nodes)


def macs(graph: Graph, input_shape: Shape) -> int:
    """Total multiply-accumulates for an NCHW input shape."""
    shapes = infer_shapes(graph, input_shape)
    return sum(node_macs(n, shapes[n.inputs[0]], shapes[n.name]) for n in graph.nodes)
