"""The MXNet backend: a spec Graph becomes a Gluon `HybridBlock` (NCHW, float32 parameters).

    >>> model = multires.build("resnet18", backend="mxnet")
    >>> model.layer1[0].conv1
    Conv2D(64 -> 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
    >>> model.hybridize(); logits = model(mx.nd.array(x))
    >>> model.export("resnet18")          # resnet18-symbol.json, resnet18-0000.params

MXNet 1.9.1 is retired upstream and needs `numpy<1.24`; install it in its own environment
(`pip install 'multires[mxnet]'`). `lowering` holds the per-node-type lowering table and
`build`, `weights` the canonical <-> Gluon parameter mapping, `runner` the `Runner` (set
`MULTIRES_MXNET_HYBRIDIZE=0` to run it eagerly), `execution` its contexts (`cpu`, `gpu(N)`;
`devices=N` over several, gradients summed by a kvstore), MXNet AMP's mixed precision (bf16 on
the CPU, fp16 on GPUs) and BatchNorm synchronised over the contexts. TensorFlow's SAME padding
works eager and hybridized: the model sets its pads for each input size (the hybridized graph is
rebuilt when they change), and `export` fixes those of the last input size.
"""

from __future__ import annotations

from .execution import available_devices, precisions
from .lowering import LAYOUT_HINT, LAYOUTS, LOWERINGS, GraphBlock, build, set_compute_dtype
from .runner import HYBRIDIZE_ENV, Batch, MXNetRunner, PyTorchSGD, make_runner
from .weights import GLUON_KINDS, export_weights, load_weights, name_map

NAME = "mxnet"
FRAMEWORK_MODULES = ("mxnet",)
PRECISIONS = precisions()
"""The precisions its Runner computes in on the CPU here: float32, and MXNet AMP's bfloat16 where
the build has oneDNN and the CPU AVX-512. MXNet AMP's float16 runs on GPUs (`device="gpu"`,
with AMP's loss scaling; `precisions(mx.gpu())`); elsewhere a precision is a DeviceError."""

__all__ = [
    "FRAMEWORK_MODULES",
    "GLUON_KINDS",
    "HYBRIDIZE_ENV",
    "LAYOUTS",
    "LAYOUT_HINT",
    "LOWERINGS",
    "NAME",
    "PRECISIONS",
    "Batch",
    "GraphBlock",
    "MXNetRunner",
    "PyTorchSGD",
    "available_devices",
    "build",
    "export_weights",
    "load_weights",
    "make_runner",
    "name_map",
    "precisions",
    "set_compute_dtype",
]
