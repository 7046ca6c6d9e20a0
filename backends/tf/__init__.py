"""The TensorFlow/Keras backend: a spec Graph becomes a Keras 3 functional `keras.Model`.

    >>> model = multires.build("resnet18", backend="tf")     # NHWC in, (N, 1000) out
    >>> model.get_layer("layer1.0.conv1")
    <Conv2D name=layer1.0.conv1, built=True>

`lowering` holds the per-node-type lowering table and `build`, `layers` the Keras layers the
spec needs beyond stock Keras (registered for `keras.models.load_model`), `weights` the
canonical <-> Keras variable mapping, `runner` the `Runner`.
"""

from __future__ import annotations

import tensorflow as tf

from .lowering import LOWERINGS, build
from .runner import KerasRunner, make_runner
from .weights import export_weights, load_weights

NAME = "tf"
FRAMEWORK_MODULES = ("keras", "tensorflow")

LAYOUTS: tuple[str, ...] = ("NHWC", "NCHW") if tf.config.list_physical_devices("GPU") else ("NHWC",)
"""NHWC everywhere; NCHW only with a GPU (TensorFlow's CPU convolution and pooling are NHWC only)."""

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
    "KerasRunner",
    "build",
    "export_weights",
    "load_weights",
    "make_runner",
]
