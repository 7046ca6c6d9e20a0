"""The PyTorch backend: a spec Graph becomes a plain `torch.nn.Module` (an `fx.GraphModule`).

    >>> model = multires.build("resnet18", backend="torch")
    >>> model.layer1[0].conv1
    Conv2d(64, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)

`lowering` holds the per-node-type lowering table and `build`, `weights` the canonical <->
state_dict mapping (with the checkpoint rename table), `runner` the `Runner`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from multires.backend import SGD
from multires.graph import Graph

from .lowering import LAYOUTS, LOWERINGS, build
from .runner import TorchRunner
from .weights import CHECKPOINT_RENAMES, export_weights, from_state_dict, load_weights

NAME = "torch"
FRAMEWORK_MODULES = ("torch",)


def make_runner(graph: Graph, weights: Mapping[str, np.ndarray], layout: str, optimizer: SGD) -> TorchRunner:
    """A `multires.Runner` for `graph` with canonical `weights`, inputs in `layout`."""
    return TorchRunner(graph, weights, layout, optimizer)


__all__ = [
    "CHECKPOINT_RENAMES",
    "FRAMEWORK_MODULES",
    "LAYOUTS",
    "LOWERINGS",
    "NAME",
    "TorchRunner",
    "build",
    "export_weights",
    "from_state_dict",
    "load_weights",
    "make_runner",
]
