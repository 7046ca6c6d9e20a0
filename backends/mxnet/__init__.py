"""The MXNet backend: a spec Graph becomes a Gluon `HybridBlock` (NCHW, CPU, float32).

    >>> model = multires.build("resnet18", backend="mxnet")
    >>> model.layer1[0].conv1
    Conv2D(64 -> 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
    >>> model.hybridize(); logits = model(mx.nd.array(x))
    >>> model.export("resnet18")          # resnet18-symbol.json, resnet18-0000.params

MXNet 1.9.1 is retired upstream and needs `numpy<1.24`; install it in its own environment
(`pip install 'multires[mxnet]'`). `lowering` holds the per-node-type lowering table and
`build`, `weights` the canonical <-> Gluon parameter mapping, `runner` the `Runner` (set
`MULTIRES_MXNET_HYBRIDIZE=0` to run it eagerly). TensorFlow's SAME padding works eager and
hybridized: the model sets its pads for each input size (the hybridized graph is rebuilt when
they change), and `export` fixes those of the last input size.
"""

from __future__ import annotations

from .lowering import LAYOUT_HINT, LAYOUTS, LOWERINGS, GraphBlock, build
from .runner import HYBRIDIZE_ENV, MXNetRunner, PyTorchSGD, make_runner
from .weights import GLUON_KINDS, export_weights, load_weights, name_map

NAME = "mxnet"
FRAMEWORK_MODULES = ("mxnet",)

__all__ = [
    "FRAMEWORK_MODULES",
    "GLUON_KINDS",
    "HYBRIDIZE_ENV",
    "LAYOUTS",
    "LAYOUT_HINT",
    "LOWERINGS",
    "NAME",
    "GraphBlock",
    "MXNetRunner",
    "PyTorchSGD",
    "build",
    "export_weights",
    "load_weights",
    "make_runner",
    "name_map",
]
