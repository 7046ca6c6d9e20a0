"""Canonical weights <-> the Gluon parameters of a model from `build`.

Layouts agree (convolution OIHW, Dense `(units, in_units)`), so values are copied unchanged;
only BatchNorm's parameter names differ. Each block's prefix is its node name plus a dot, so
the Gluon name of a canonical weight is the same in `model.collect_params()`,
`model.save_parameters()` files and `export()`ed `.params` files (after `arg:`/`aux:`):

| node type | canonical kind | Gluon parameter |
|-----------|----------------|-----------------|
| Conv2d    | weight, bias   | weight, bias    |
| Dense     | weight, bias   | weight, bias    |
| BatchNorm | weight         | gamma           |
| BatchNorm | bias           | beta            |
| BatchNorm | running_mean   | running_mean    |
| BatchNorm | running_var    | running_var     |

so `layer1.0.bn1.weight` is Gluon's `layer1.0.bn1.gamma`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from mxnet import gluon, nd

from multires.errors import WeightsError
from multires.graph import BatchNorm, Conv2d, Dense, Graph, Node

GLUON_KINDS: dict[type[Node], dict[str, str]] = {
    Conv2d: {"weight": "weight", "bias": "bias"},
    Dense: {"weight": "weight", "bias": "bias"},
    BatchNorm: {
        "weight": "gamma",
        "bias": "beta",
        "running_mean": "running_mean",
        "running_var": "running_var",
    },
}
"""Node type -> canonical weight kind -> Gluon parameter attribute of its block."""


def _kinds(node: Node) -> list[str]:
    kinds = list(GLUON_KINDS.get(type(node), ()))
    if isinstance(node, (Conv2d, Dense)) and not node.bias:
        kinds.remove("bias")
    return kinds


def name_map(graph: Graph) -> dict[str, str]:
    """Every canonical weight name of `graph` -> its Gluon parameter name, in graph order."""
    return {
        f"{node.name}.{kind}": f"{node.name}.{GLUON_KINDS[type(node)][kind]}"
        for node in graph.nodes
        for kind in _kinds(node)
    }


def gluon_name(graph: Graph, canonical: str) -> str:
    """The Gluon parameter name of canonical weight `canonical` (`x.bn1.weight` -> `x.bn1.gamma`)."""
    names = name_map(graph)
    if canonical not in names:
        raise WeightsError(f"graph {graph.name!r} has no weight {canonical!r}.")
    return names[canonical]


def canonical_name(graph: Graph, gluon: str) -> str:
    """The canonical weight name of Gluon parameter `gluon` (`x.bn1.gamma` -> `x.bn1.weight`)."""
    names = {v: k for k, v in name_map(graph).items()}
    if gluon not in names:
        raise WeightsError(f"graph {graph.name!r} has no Gluon parameter {gluon!r}.")
    return names[gluon]


def parameters(model: Any) -> dict[str, gluon.Parameter]:
    """Canonical weight name -> the model's `gluon.Parameter`, in graph order."""
    graph = getattr(model, "graph", None)
    if not isinstance(graph, Graph) or not hasattr(model, "blocks"):
        raise WeightsError(
            f"{type(model).__name__} is not a model built by multires' mxnet backend; "
            "use multires.build(..., backend='mxnet')."
        )
    params = {}
    for name in name_map(graph):
        node_name, kind = name.rsplit(".", 1)
        params[name] = getattr(model.blocks[node_name], GLUON_KINDS[type(graph[node_name])][kind])
    return params


def export_weights(model: Any) -> dict[str, np.ndarray]:
    """The model's canonical weights: float32 NumPy copies of its Gluon parameters (of their
    first context, for a model placed on several)."""
    weights = {}
    for name, param in parameters(model).items():
        if param._data is None:
            raise WeightsError(
                f"{name.rsplit('.', 1)[0]}: its parameters are not initialised yet (its shape depends on "
                "the image size); load weights or run one forward pass before exporting."
            )
        weights[name] = param.list_data()[0].asnumpy().astype(np.float32)
    return weights


def load_weights(model: Any, weights: Mapping[str, Any]) -> Any:
    """Copy canonical `weights` into `model` in place and return it.

    Every missing, unexpected, misshapen or non-floating entry is reported in one WeightsError;
    values are cast to float32. Uninitialised parameters are initialised from the values.
    """
    params = parameters(model)
    problems = []
    for name, param in params.items():
        if name not in weights:
            problems.append(f"missing {name} {_shape(param.shape)}")
            continue
        value = weights[name]
        if np.asarray(value).dtype.kind != "f":
            problems.append(f"{name}: dtype {np.asarray(value).dtype}, expected float32")
        elif not _fits(np.shape(value), param.shape):
            problems.append(f"{name}: shape {tuple(np.shape(value))}, expected {_shape(param.shape)}")
    problems += [f"unexpected {name}" for name in weights if name not in params]
    if problems:
        raise WeightsError(
            f"weights do not match the mxnet model of {model.graph.name!r} ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )
    for name, param in params.items():
        param._load_init(nd.array(np.asarray(weights[name], dtype=np.float32), dtype="float32"), None)
    return model


def _fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Whether `shape` matches a Gluon shape in which 0 means "not known yet"."""
    return len(shape) == len(expected) and all(e in (0, s) for s, e in zip(shape, expected, strict=True))


def _shape(shape: tuple[int, ...]) -> tuple[Any, ...]:
    return tuple(d or "?" for d in shape)
