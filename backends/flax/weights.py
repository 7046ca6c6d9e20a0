"""Canonical weights <-> Flax variables for models built by this backend.

The mapping itself is framework-free and lives in the core (`multires.weights.to_variables` /
`from_variables`); here it meets JAX arrays and linen modules. A linen Module holds no state, so
`load_weights` returns the variables to pass to `model.apply` rather than a loaded model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from multires.errors import WeightsError
from multires.graph import Graph
from multires.weights import (
    CanonicalWeights,
    as_weights,
    check_weights,
    from_variables,
    load_file,
    to_variables,
    weight_shapes,
)

Variables = dict[str, Any]
"""Flax variables: `{'params': ..., 'batch_stats': ...}` nested dicts of JAX arrays."""


def _graph(model: Any) -> Graph | None:
    graph = getattr(model, "graph", None)
    return graph if isinstance(graph, Graph) else None


def checkable(graph: Graph) -> bool:
    """Whether the weight shapes of `graph` are known without an input size (a Dense after a
    spatial Flatten depends on it; such weights are checked by the first forward pass)."""
    try:
        weight_shapes(graph)
    except WeightsError:
        return False
    return True


def variables_from_weights(weights: Mapping[str, Any], graph: Graph | None = None) -> Variables:
    """Canonical weights as Flax variables of JAX arrays (checked against `graph` when given)."""
    return jax.tree.map(jnp.asarray, to_variables(weights, graph if graph and checkable(graph) else None))


def load_weights(model: nn.Module, weights: Mapping[str, Any] | str | os.PathLike) -> Variables:
    """The variables of `model` holding canonical `weights` (a mapping or a weight file).

    A linen Module is stateless, so this returns `{'params': ..., 'batch_stats': ...}` for
    `model.apply(variables, x)` instead of a model; the weights are checked against the model's graph.
    """
    graph = _graph(model)
    if graph is not None and checkable(graph):
        weights = as_weights(weights, graph)
    elif isinstance(weights, (str, os.PathLike)):
        weights = load_file(weights)
    return variables_from_weights(weights)


def export_weights(model: nn.Module | Mapping[str, Any]) -> CanonicalWeights:
    """Canonical weights of a bound model (`model.bind(variables)`) or of a variables mapping."""
    if isinstance(model, nn.Module):
        if model.scope is None:
            raise WeightsError(
                f"an unbound {type(model).__name__} holds no weights: pass its variables, or "
                "model.bind(variables)."
            )
        graph, variables = _graph(model), model.variables
    else:
        graph, variables = None, model
    weights = from_variables(jax.device_get(variables))
    if graph is not None and checkable(graph):
        check_weights(graph, weights)
    return weights
