"""Canonical weights <-> Flax variables for models built by this backend.

The mapping itself is framework-free and lives in the core (`multires.weights.to_variables` /
`from_variables`); here it meets JAX arrays and linen modules. A linen Module holds no state:
`load_variables` gives the variables `model.apply` takes, and `load_weights` (the backend
contract, behind `multires.build(..., weights=...)` and `multires.weights.load`) returns the
model bound to them, `model.bind(variables)`, from which `.unbind()` gives `(model, variables)`.
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
    from_variables,
    load_file,
    to_variables,
)

Variables = dict[str, Any]
"""Flax variables: `{'params': ..., 'batch_stats': ...}` nested dicts of JAX arrays."""


def _graph(model: Any) -> Graph | None:
    graph = getattr(model, "graph", None)
    return graph if isinstance(graph, Graph) else None


def load_variables(model: nn.Module, weights: Mapping[str, Any] | str | os.PathLike) -> Variables:
    """The variables for `model.apply` holding canonical `weights` (a mapping or a weight file),
    checked against the model's graph: every mismatch is reported in one WeightsError."""
    graph = _graph(model)
    if graph is not None:
        weights = as_weights(weights, graph)
    elif isinstance(weights, (str, os.PathLike)):
        weights = load_file(weights)
    return jax.tree.map(jnp.asarray, to_variables(weights))


def load_weights(model: nn.Module, weights: Mapping[str, Any] | str | os.PathLike) -> nn.Module:
    """`model` bound to variables holding canonical `weights`: `bound(x)` runs it in eval mode,
    `bound.variables` are the variables (`model, variables = bound.unbind()` for `apply`).

    A model that is already bound is rebound to the new weights.
    """
    if model.scope is not None:
        model, _ = model.unbind()
    return model.bind(load_variables(model, weights))


def export_weights(model: nn.Module | Mapping[str, Any]) -> CanonicalWeights:
    """Canonical weights of a bound model (`model.bind(variables)`, checked against its graph and
    in graph order) or of a variables mapping."""
    if isinstance(model, nn.Module):
        if model.scope is None:
            raise WeightsError(
                f"an unbound {type(model).__name__} holds no weights: pass its variables, or "
                "model.bind(variables)."
            )
        graph, variables = _graph(model), model.variables
    else:
        graph, variables = None, model
    return from_variables(jax.device_get(variables), graph)
