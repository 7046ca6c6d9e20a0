"""Flax linen variable trees in and out: multires' own layout and the book's JAX edition.

A Flax model's weights live outside it, in a variables tree `{'params': ..., 'batch_stats': ...}`,
so the importer takes that tree and the graph it belongs to: `from_flax(variables, graph)`.
Two layouts are recognised, each a readable path rule:

| layout    | whose                                      | a path                                     | node          |
|-----------|--------------------------------------------|--------------------------------------------|---------------|
| `multires`| `multires.build(..., backend="flax")`      | `params/layer1/0/conv1/kernel`             | `layer1.0.conv1` |
| `d2l`     | the book's JAX `ResNet` (d2l.ai, ResNet chapter) | `params/net/layers_2/layers_0/conv1/kernel` | `b3.0.conv1`  |

In the book's JAX code `self.net` is an `nn.Sequential` whose entries `layers_0` (the stem `b1`,
itself a Sequential: conv `layers_0`, BatchNorm `layers_1`), `layers_1` ... (one Sequential of
`Residual`s per stage, named as its attributes `conv1`, `bn1`, ...) and the last Sequential (pool,
reshape, `nn.Dense` at index 2) are numbered by position. Leaves are Flax's: conv `kernel` HWIO and
`bias`, dense `kernel` (in, out), BatchNorm `scale`, `bias` and `mean`, `var` in `batch_stats`.

The graph is the function: for the book's JAX code it is `multires.spec("d2l_resnet18",
edition="jax")` (XLA SAME padding, Flax BatchNorm eps 1e-5 and momentum 0.99, biased running
variance), which `from_flax` cannot infer from weights alone, since the editions share every shape.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from multires.errors import InterchangeError
from multires.graph import Graph
from multires.interchange.common import match_weights
from multires.weights import CanonicalWeights, from_variables, to_variables, weight_shapes

LAYOUTS = ("multires", "d2l")
"""Variable-tree layouts `from_flax` recognises and `to_flax` writes."""

_D2L_NODE = re.compile(r"^b(?P<stage>\d+)\.(?P<rest>.+)$")


def _d2l_path(node: str, graph: Graph) -> tuple[str, ...]:
    """The book's module path (under `net`) of a d2l graph's node."""
    if node.startswith("last."):
        stages = max(int(m["stage"]) for n in graph.nodes if (m := _D2L_NODE.match(n.name)))
        return ("net", f"layers_{stages}", f"layers_{node.removeprefix('last.')}")
    match = _D2L_NODE.match(node)
    if match is None:
        raise InterchangeError(f"{node}: not a node of the book's ResNet (b1..., b2.0.conv1, last.2).")
    stage, rest = int(match["stage"]), match["rest"].split(".")
    return ("net", f"layers_{stage - 1}", f"layers_{rest[0]}", *rest[1:])


def _rename(variables: Mapping[str, Any], rename: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The variables with each module path (dotted) renamed by `rename`."""
    out: dict[str, dict[str, Any]] = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in _leaves(variables.get(collection, {}), ()):
            module = ".".join(path[:-1])
            tree = out.setdefault(collection, {})
            for segment in rename.get(module, module).split("."):
                tree = tree.setdefault(segment, {})
            tree[path[-1]] = leaf
    return out


def _leaves(tree: Any, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, Mapping):
        return [item for key, sub in tree.items() for item in _leaves(sub, (*path, str(key)))]
    return [(path, tree)]


def _module_paths(variables: Mapping[str, Any]) -> set[str]:
    return {".".join(path[:-1]) for path, _ in _leaves(variables.get("params", {}), ())}


def _weighted_nodes(graph: Graph) -> list[str]:
    """Names of the graph's nodes that have weights, in graph order."""
    return list(dict.fromkeys(name.rsplit(".", 1)[0] for name in weight_shapes(graph, partial=True)))


def _d2l_names(graph: Graph) -> dict[str, str]:
    """Book module path (dotted) -> node name, for every node of a d2l graph that has weights."""
    return {".".join(_d2l_path(node, graph)): node for node in _weighted_nodes(graph)}


def detect_layout(variables: Mapping[str, Any], graph: Graph) -> str:
    """Which layout of `LAYOUTS` `variables` is in, or an InterchangeError saying what is supported."""
    modules = _module_paths(variables)
    weighted = set(_weighted_nodes(graph))
    if modules == weighted:
        return "multires"
    if graph.name.startswith("d2l_") and modules == set(_d2l_names(graph)):
        return "d2l"
    raise InterchangeError(
        f"the Flax variables do not match graph {graph.name!r} in a known layout: supported are "
        f"{LAYOUTS} (multires' own, module paths = node names; the book's JAX ResNet, "
        "net/layers_<i>/..., for the d2l_* zoo graphs with edition='jax'). Modules in the variables "
        f"but not the graph: {sorted(modules - weighted)[:6]}; in the graph but not the variables: "
        f"{sorted(weighted - modules)[:6]}. Pass the graph that describes this model."
    )


def from_flax(variables: Mapping[str, Any], graph: Graph) -> tuple[Graph, CanonicalWeights]:
    """The graph and canonical weights of Flax `variables` (`{'params', 'batch_stats'}`) for `graph`.

    The layout (multires' own or the book's JAX ResNet) is recognised from the module paths; the
    weights are checked against the graph, every mismatch listed at once.
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise InterchangeError(
            f"from_flax takes a Flax variables tree {{'params': ..., 'batch_stats': ...}}; got "
            f"{type(variables).__name__}. Pass model.init(...) output or a restored checkpoint."
        )
    layout = detect_layout(variables, graph)
    if layout == "d2l":
        variables = _rename(variables, _d2l_names(graph))
    weights = from_variables(variables)
    return graph, match_weights(graph, weights, "the Flax variables")


def to_flax(graph: Graph, weights: Mapping[str, Any], layout: str = "multires") -> dict[str, Any]:
    """Flax variables `{'params': ..., 'batch_stats': ...}` of JAX arrays holding `weights`, in
    `layout`: "multires" (for `multires.build(graph, backend="flax")`) or "d2l" (the book's JAX
    `ResNet`, for a d2l_* graph)."""
    import jax.numpy as jnp

    if layout not in LAYOUTS:
        raise InterchangeError(f"unknown Flax layout {layout!r}; choose one of {LAYOUTS}.")
    variables: dict[str, Any] = to_variables(match_weights(graph, weights, "the weights"), graph)
    if layout == "d2l":
        if not graph.name.startswith("d2l_"):
            raise InterchangeError(
                f"layout 'd2l' is the book's JAX ResNet, for the d2l_* zoo graphs; got {graph.name!r}."
            )
        variables = _rename(variables, {node: path for path, node in _d2l_names(graph).items()})
    return _tree_map(jnp.asarray, variables)


def _tree_map(fn: Any, tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {key: _tree_map(fn, sub) for key, sub in tree.items()}
    return fn(np.asarray(tree))


def read(path: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    """Flax variables from a file written by `write` (`flax.serialization.msgpack_serialize`)."""
    from flax import serialization

    return serialization.msgpack_restore(Path(path).read_bytes())


def write(variables: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write Flax variables with `flax.serialization.msgpack_serialize`, atomically."""
    from flax import serialization

    from multires.files import atomic_write

    data = serialization.msgpack_serialize(_tree_map(np.asarray, variables))
    return atomic_write(path, lambda handle: handle.write(data))
