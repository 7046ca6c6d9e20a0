"""The PyTorch backend: a spec Graph becomes a plain `torch.nn.Module` (an `fx.GraphModule`).

    >>> model = multires.build("resnet18", backend="torch")
    >>> model.layer1[0].conv1
    Conv2d(64, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)

`lowering` holds the per-node-type lowering table and `build`, `weights` the canonical <->
state_dict mapping (with the checkpoint rename table), `runner` the `Runner`, `execution` its
device, mixed precision and DistributedDataParallel processes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from multires.backend import SGD, Execution
from multires.graph import Graph

from .execution import SyncBatchNorm2d, available_devices
from .lowering import LAYOUTS, LOWERINGS, build
from .runner import TorchRunner
from .weights import CHECKPOINT_RENAMES, export_weights, from_state_dict, load_weights

NAME = "torch"
FRAMEWORK_MODULES = ("torch",)
PRECISIONS = ("fp32", "bf16", "fp16")
"""The precisions its Runner computes in: float32, and torch.autocast in bfloat16 or float16
(with a GradScaler)."""


def make_runner(
    graph: Graph,
    weights: Mapping[str, np.ndarray],
    layout: str,
    optimizer: SGD,
    execution: Execution | None = None,
) -> TorchRunner:
    """A `multires.Runner` for `graph` with canonical `weights`, inputs in `layout`, placed as
    `execution` says (default: the CPU, one process, float32)."""
    return TorchRunner(graph, weights, layout, optimizer, execution)


__all__ = [
    "CHECKPOINT_RENAMES",
    "FRAMEWORK_MODULES",
    "LAYOUTS",
    "LOWERINGS",
    "NAME",
    "PRECISIONS",
    "SyncBatchNorm2d",
    "TorchRunner",
    "available_devices",
    "build",
    "export_weights",
    "from_state_dict",
    "load_weights",
    "make_runner",
]
