"""Canonical weights <-> the initializers of a built `onnx.ModelProto`.

`build` stores each canonical weight as an initializer under its canonical name, in its
canonical layout (conv OIHW, which is ONNX `Conv`'s; dense `(out, in)`, which `Gemm` reads with
`transB=1`; BatchNorm's four vectors as `BatchNormalization`'s scale, B, mean and var). So the
mapping is the identity on names and arrays, and the model's own initializers are the truth
about which weights it takes and their shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from multires.errors import WeightsError


def export_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The model's canonical weights: float32 copies of its initializers, by name."""
    return {
        tensor.name: np.array(numpy_helper.to_array(tensor), dtype=np.float32)
        for tensor in model.graph.initializer
    }


def load_weights(model: onnx.ModelProto, weights: Mapping[str, Any]) -> onnx.ModelProto:
    """Replace the model's initializers with canonical `weights` (cast to float32) in place and
    return the model; a model whose Dense width depends on the image size is rebuilt from its
    stored graph with the width the weights give, and the new model returned.

    Every missing, unexpected or misshapen entry is reported in one WeightsError, before
    anything is changed.
    """
    from .lowering import build, deferred_dense, model_graph, model_layout

    current = {tensor.name: tuple(tensor.dims) for tensor in model.graph.initializer}
    problems = []
    for name, shape in current.items():
        if name not in weights:
            problems.append(f"missing {name} {shape}")
        elif tuple(np.shape(weights[name])) != shape and 0 not in shape:  # 0: a width placeholder
            problems.append(f"{name}: shape {tuple(np.shape(weights[name]))}, expected {shape}")
    problems += [f"unexpected {name}" for name in weights if name not in current]
    if problems:
        raise WeightsError(
            f"weights do not match the ONNX model {model.graph.name!r} ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )
    graph = model_graph(model)
    if graph is not None and deferred_dense(graph):
        return build(graph, model_layout(model), weights)
    for tensor in model.graph.initializer:
        array = np.ascontiguousarray(weights[tensor.name], dtype=np.float32)
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return model
