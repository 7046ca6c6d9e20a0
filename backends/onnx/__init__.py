"""The ONNX backend: a spec Graph becomes an `onnx.ModelProto`, run with onnxruntime.

    >>> model = multires.build("resnet18", backend="onnx", weights=w)   # opset 17, weights inside
    >>> multires.get_backend("onnx").save(model, "resnet18.onnx")

ONNX is how runtimes outside the Python frameworks (DJL for Java, onnxruntime in C#, C++ or the
browser, TensorRT, OpenVINO) run a multires model. It is an inference format: the `Runner`
computes eval-mode forward passes, and training-mode calls raise `InferenceOnlyError`.

`lowering` holds the per-node-type lowering table and `build`, `weights` the canonical <->
initializer mapping, `runner` the `Runner` and the onnxruntime session.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from multires.files import atomic_write

from .lowering import IR_VERSION, LAYOUTS, LOWERINGS, OPSET, build, model_graph, model_layout
from .runner import InferenceOnlyError, OnnxRunner, available_devices, inference_session, make_runner
from .weights import export_weights, load_weights

NAME = "onnx"
FRAMEWORK_MODULES = ("onnx", "onnxruntime")

TRAINING = False
"""ONNX models are inference-only: the conformance suite skips training-mode tests for this backend."""


def save(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write `model` to `path` atomically (a complete file or none), after `onnx.checker`.

    The file gets the usual permissions (0666 less the umask), as a model meant for other
    runtimes and machines should.
    """
    onnx.checker.check_model(model)
    return atomic_write(path, lambda handle: handle.write(model.SerializeToString()))


__all__ = [
    "FRAMEWORK_MODULES",
    "IR_VERSION",
    "LAYOUTS",
    "LOWERINGS",
    "NAME",
    "OPSET",
    "TRAINING",
    "InferenceOnlyError",
    "OnnxRunner",
    "available_devices",
    "build",
    "export_weights",
    "inference_session",
    "load_weights",
    "make_runner",
    "model_graph",
    "model_layout",
    "save",
]
