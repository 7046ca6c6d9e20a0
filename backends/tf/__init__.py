"""The TensorFlow/Keras backend: a spec Graph becomes a Keras 3 functional `keras.Model`.

    >>> model = multires.build("resnet18", backend="tf")     # NHWC in, (N, 1000) out
    >>> model.get_layer("layer1.0.conv1")
    <Conv2D name=layer1.0.conv1, built=True>

`lowering` holds the per-node-type lowering table and `build`, `layers` the Keras layers the
spec needs beyond stock Keras (registered for `keras.models.load_model`), `weights` the
canonical <-> Keras variable mapping, `execution` the devices, strategy and precision, `runner`
the `Runner`.

Importing this backend applies `MULTIRES_CPU_DEVICES` (logical CPU devices for data parallelism
on a CPU-only machine) before anything starts TensorFlow's runtime; `use_cpu_devices(n)` does
the same later, as long as TensorFlow has not started.
"""

from __future__ import annotations

import tensorflow as tf

from .execution import available_devices, configure_from_environment, use_cpu_devices

configure_from_environment()

from .lowering import LOWERINGS, build  # noqa: E402
from .runner import KerasRunner, make_runner  # noqa: E402
from .weights import export_weights, load_weights  # noqa: E402

NAME = "tf"
FRAMEWORK_MODULES = ("keras", "tensorflow")

LAYOUTS: tuple[str, ...] = ("NHWC", "NCHW") if tf.config.list_physical_devices("GPU") else ("NHWC",)
"""NHWC everywhere; NCHW only with a GPU (TensorFlow's CPU convolution and pooling are NHWC only)."""

PRECISIONS = ("fp32", "bf16", "fp16")
"""Every `multires.backend.PRECISIONS`: a Keras mixed-precision policy on this model's layers
(float32 variables), fp16 with Keras' `LossScaleOptimizer`; bf16 on a GPU needs compute
capability 8.0 or later (a DeviceError says so)."""

LAYOUT_HINT = (
    " TensorFlow's CPU kernels for convolution and pooling only run channels-last and this machine "
    "has no GPU, so use layout='NHWC' (the default) and transpose NCHW input with "
    "x.transpose(0, 2, 3, 1); the weights are the same canonical ones in either layout."
)
"""Appended by `multires.backend.resolve_layout` to the error for an unsupported layout."""

__all__ = [
    "FRAMEWORK_MODULES",
    "LAYOUTS",
    "LAYOUT_HINT",
    "LOWERINGS",
    "NAME",
    "PRECISIONS",
    "KerasRunner",
    "available_devices",
    "build",
    "export_weights",
    "load_weights",
    "make_runner",
    "use_cpu_devices",
]
