"""The Flax (JAX) backend: a spec Graph becomes a `flax.linen.Module`, NHWC by default.

    >>> model = multires.build("resnet18", backend="flax")
    >>> variables = multires.get_backend("flax").load_variables(model, canonical)
    >>> logits = model.apply(variables, x_nhwc)            # or multires.weights.to_variables(canonical)
    >>> logits, updates = model.apply(variables, x_nhwc, train=True, mutable=["batch_stats"])

Submodules are named by the canonical names, nested at the dots (`layer1.0.conv1` is
`params['layer1']['0']['conv1']`); `multires.weights.to_variables` / `from_variables` convert.
A linen Module holds no state, so `load_weights` (behind `multires.build(..., weights=...)` and
`multires.weights.load`) returns the model bound to its variables; `bound.unbind()` gives
`(model, variables)` back.
`lowering` holds the per-node-type lowering table and `build`, `weights` the canonical <->
variables glue, `runner` the `Runner`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from multires.backend import SGD
from multires.graph import Graph

from .lowering import LOWERINGS, Model, SpecBatchNorm, build
from .runner import FlaxRunner
from .weights import export_weights, load_variables, load_weights

NAME = "flax"
LAYOUTS = ("NHWC", "NCHW")
"""NHWC is native; NCHW transposes inputs (and 4-D outputs) at the model's boundary."""
FRAMEWORK_MODULES = ("flax", "jax")


def make_runner(graph: Graph, weights: Mapping[str, np.ndarray], layout: str, optimizer: SGD) -> FlaxRunner:
    """A `multires.Runner` for `graph` with canonical `weights`, inputs in `layout`."""
    return FlaxRunner(graph, weights, layout, optimizer)


__all__ = [
    "FRAMEWORK_MODULES",
    "LAYOUTS",
    "LOWERINGS",
    "NAME",
    "FlaxRunner",
    "Model",
    "SpecBatchNorm",
    "build",
    "export_weights",
    "load_variables",
    "load_weights",
    "make_runner",
]
