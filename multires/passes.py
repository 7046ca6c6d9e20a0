"""Graph transformations: functions from (Graph, canonical weights) to an equivalent pair.

A pass is framework-neutral, so every backend profits from it, and exact: the transformed graph
computes the same function as the original (to float32 rounding of the new weights, which are
computed in float64), which `tests/core/test_passes.py` checks against `multires.reference`.

- `fold_batchnorm`: eval-mode BatchNorm folded into the Conv2d before it, for inference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from multires.errors import WeightsError
from multires.graph import BatchNorm, Conv2d, Graph, Node
from multires.weights import CanonicalWeights, check_weights


def foldable_batchnorms(graph: Graph) -> dict[str, str]:
    """BatchNorm name -> the Conv2d it folds into, for every BatchNorm `fold_batchnorm` folds.

    A BatchNorm folds when its input is a Conv2d whose output nothing else reads (no other node,
    and not a graph output), and it is not a graph output itself (outputs keep their names).
    BatchNorm only takes 4-D maps, so a Dense is never followed by one; a BatchNorm after a pool,
    an Add or a graph input stays (pre-activation blocks keep theirs: folding into the *next*
    conv is not exact where that conv zero-pads).
    """
    outputs = set(graph.outputs)
    folds = {}
    for node in graph.nodes:
        if not isinstance(node, BatchNorm) or node.name in outputs:
            continue
        (source,) = node.inputs
        conv = graph.by_name.get(source)
        if isinstance(conv, Conv2d) and graph.consumers[source] == (node.name,) and source not in outputs:
            folds[node.name] = source
    return folds


def fold_batchnorm(graph: Graph, weights: Mapping[str, np.ndarray]) -> tuple[Graph, CanonicalWeights]:
    """Fold each eval-mode BatchNorm into the Conv2d that feeds it (see `foldable_batchnorms`).

    `bn(conv(x)) = conv'(x)` with `s = gamma / sqrt(running_var + eps)` per output channel,
    `W' = W * s` and `b' = (b - running_mean) * s + beta` (`b = 0` for a conv without bias, which
    gains one). The conv keeps its name, so the new weights are `<conv>.weight` and `<conv>.bias`;
    the BatchNorm's readers read the conv instead. Only inference is preserved: the folded graph
    has no batch statistics to train. Returns the new graph (same name, description noting the
    fold) and a new weight mapping; unfolded weights are the same arrays.
    """
    check_weights(graph, weights)
    folds = foldable_batchnorms(graph)
    if not folds:
        return graph, dict(weights)
    by_conv = {conv: graph[bn] for bn, conv in folds.items()}
    new_weights: CanonicalWeights = {}
    nodes: list[Node] = []
    for node in graph.nodes:
        if node.name in folds:
            continue
        bn = by_conv.get(node.name)
        if isinstance(node, Conv2d) and isinstance(bn, BatchNorm):
            kernel, bias = _folded(node, bn, weights)
            new_weights[f"{node.name}.weight"] = kernel
            new_weights[f"{node.name}.bias"] = bias
            nodes.append(dataclasses.replace(node, bias=True))
            continue
        for kind in _WEIGHT_KINDS:
            key = f"{node.name}.{kind}"
            if key in weights:
                new_weights[key] = weights[key]
        inputs = tuple(folds.get(source, source) for source in node.inputs)
        nodes.append(node if inputs == node.inputs else dataclasses.replace(node, inputs=inputs))
    note = f"BatchNorm folded into {len(folds)} conv(s) for inference"
    description = f"{graph.description} ({note})" if graph.description else note
    folded = Graph(graph.name, graph.inputs, tuple(nodes), graph.outputs, description)
    return folded, new_weights


_WEIGHT_KINDS = ("weight", "bias", "running_mean", "running_var")


def _folded(conv: Conv2d, bn: BatchNorm, weights: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The float32 kernel and bias of `bn(conv(x))`, computed in float64."""

    def get(name: str) -> np.ndarray:
        return np.asarray(weights[name], dtype=np.float64)

    variance = get(f"{bn.name}.running_var")
    if np.any(variance + bn.eps <= 0):
        raise WeightsError(
            f"{bn.name} (BatchNorm): running_var + eps must be positive to fold it into {conv.name}; "
            f"its smallest value is {float(np.min(variance + bn.eps))}. Check the weights."
        )
    scale = get(f"{bn.name}.weight") / np.sqrt(variance + bn.eps)
    bias = get(f"{conv.name}.bias") if conv.bias else np.zeros(conv.out_channels)
    kernel = get(f"{conv.name}.weight") * scale[:, None, None, None]
    new_bias = (bias - get(f"{bn.name}.running_mean")) * scale + get(f"{bn.name}.bias")
    return kernel.astype(np.float32), new_bias.astype(np.float32)
