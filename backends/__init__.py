"""Framework backends, installed as `multires.backends`: one folder per framework, the same file
names in each, each registered through the entry-point group `multires.backends`."""

from __future__ import annotations

import numpy as np

from multires.errors import ShapeError
from multires.graph import BatchNorm, Graph
from multires.shapes import from_layout, infer_shapes


def input_array(graph: Graph, x: object) -> np.ndarray:
    """`x` as a float32 array, or a ShapeError naming its dtype if it is not real numbers
    (integers and floats convert; NumPy would drop a complex input's imaginary part with only a
    warning, and strings, booleans and objects fail inside the framework)."""
    array = np.asarray(x)
    if array.dtype.kind not in "iuf":
        raise ShapeError(
            f"{graph.name}: input must hold real numbers (float32, or integers and floats that convert "
            f"to it); got dtype {array.dtype}."
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def check_batch_statistics(graph: Graph, shape: tuple[int, ...], layout: str) -> None:
    """Raise a ShapeError naming the first BatchNorm that would see one value per channel in
    training mode (a batch variance needs two) for an input of `shape` in `layout`."""
    shapes = infer_shapes(graph, from_layout(tuple(shape), layout))
    for node in graph.nodes:
        if isinstance(node, BatchNorm):
            n, _, h, w = shapes[node.inputs[0]]
            if n * h * w < 2:
                raise ShapeError(
                    f"{node.name} (BatchNorm): training mode needs more than one value per channel to "
                    f"estimate the batch variance; got N*H*W = {n * h * w} for input {tuple(shape)} "
                    f"({layout}). Use a batch of 2 or more, or eval mode."
                )
