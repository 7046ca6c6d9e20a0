"""What every family's importer and exporter shares: matching weights to a graph with every
mismatch reported at once, and the layout transposes between the canonical form and others."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np

from multires.errors import InterchangeError, WeightsError
from multires.graph import Graph, Node
from multires.shapes import Shape
from multires.weights import CanonicalWeights, weight_shapes

N = TypeVar("N", bound=Node)


def node_as(graph: Graph, name: str, kind: type[N]) -> N:
    """`graph[name]`, which an importer or exporter reads as a `kind` node."""
    node = graph[name]
    if not isinstance(node, kind):
        raise InterchangeError(
            f"{name} ({type(node).__name__}): graph {graph.name!r} has it where a {kind.__name__} is "
            "expected; pass a graph of the library's architecture."
        )
    return node


def match_weights(
    graph: Graph, weights: Mapping[str, Any], source: str, input_shape: Shape | None = None
) -> CanonicalWeights:
    """`weights` as float32 canonical weights in `graph`'s order, or a `WeightsError` that lists
    every missing, unexpected and mis-shaped entry at once (`source` names where they came from)."""
    expected = weight_shapes(graph, input_shape, partial=True)
    arrays = {name: np.asarray(value, dtype=np.float32) for name, value in weights.items()}
    problems = [f"missing {name} {shape}" for name, shape in expected.items() if name not in arrays]
    problems += [f"unexpected {name} {arrays[name].shape}" for name in arrays if name not in expected]
    for name, shape in expected.items():
        if name in arrays and not _fits(arrays[name].shape, shape):
            problems.append(f"{name}: shape {arrays[name].shape}, graph expects {shape}")
    if problems:
        listing = "\n  ".join(problems)
        raise WeightsError(
            f"{source} and graph {graph.name!r} disagree ({len(problems)} mismatches):\n  {listing}\n"
            "Pass the graph that describes this model, or weights of the model the graph describes."
        )
    return {name: np.ascontiguousarray(arrays[name]) for name in expected}


def _fits(actual: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(actual) == len(expected) and all(e in (-1, a) for a, e in zip(actual, expected, strict=True))


def hwio_to_oihw(kernel: Any) -> np.ndarray:
    """A Keras/Flax convolution kernel `(kh, kw, in, out)` in the canonical `(out, in, kh, kw)`."""
    return np.ascontiguousarray(np.asarray(kernel, dtype=np.float32).transpose(3, 2, 0, 1))


def oihw_to_hwio(weight: Any) -> np.ndarray:
    """A canonical convolution weight `(out, in, kh, kw)` as a Keras/Flax kernel `(kh, kw, in, out)`."""
    return np.ascontiguousarray(np.asarray(weight, dtype=np.float32).transpose(2, 3, 1, 0))
