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
variables glue, `runner` the `Runner`, `execution` device names, the CPU device count and
multi-process JAX (`initialize_distributed`).

Importing this backend applies `MULTIRES_CPU_DEVICES` (XLA host devices for data parallelism on
a CPU-only machine) if JAX has not started yet.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from multires.backend import SGD, Execution
from multires.graph import Graph

from .execution import available_devices, expose_cpu_devices, initialize_distributed
from .lowering import LOWERINGS, Model, SpecBatchNorm, build, conv_as_matmul, im2col_matmul, matmul_pays
from .runner import FlaxRunner
from .weights import export_weights, load_variables, load_weights

expose_cpu_devices()

NAME = "flax"
LAYOUTS = ("NHWC", "NCHW")
"""NHWC is native; NCHW transposes inputs (and 4-D outputs) at the model's boundary."""
FRAMEWORK_MODULES = ("flax", "jax")
PRECISIONS = ("fp32", "bf16", "fp16")
"""Every `multires.PRECISIONS`: a Flax compute dtype with float32 parameters, float16 with
Flax's `DynamicScale` loss scaling."""


def make_runner(
    graph: Graph,
    weights: Mapping[str, np.ndarray],
    layout: str,
    optimizer: SGD,
    execution: Execution | None = None,
) -> FlaxRunner:
    """A `multires.Runner` for `graph` with canonical `weights`, inputs in `layout`, placed,
    parallelised and in the precision `execution` says (one CPU device, float32 by default)."""
    return FlaxRunner(graph, weights, layout, optimizer, execution)


__all__ = [
    "FRAMEWORK_MODULES",
    "LAYOUTS",
    "LOWERINGS",
    "NAME",
    "PRECISIONS",
    "FlaxRunner",
    "Model",
    "SpecBatchNorm",
    "available_devices",
    "build",
    "conv_as_matmul",
    "export_weights",
    "im2col_matmul",
    "initialize_distributed",
    "load_variables",
    "load_weights",
    "make_runner",
    "matmul_pays",
]
