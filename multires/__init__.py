"""multires: define a residual network once, lower it to native PyTorch, Keras, Flax and MXNet models.

>>> import multires
>>> multires.spec("d2l_resnet18")          # a framework-neutral Graph
>>> multires.build("resnet18", backend="torch")   # a plain torch.nn.Module
"""

from multires import reference, weights
from multires.backend import (
    SGD,
    Execution,
    Runner,
    available_backends,
    available_devices,
    backends,
    build,
    get_backend,
    make_runner,
)
from multires.errors import (
    BackendNotFoundError,
    BackendUnavailableError,
    DeviceError,
    InterchangeError,
    ModelNotFoundError,
    MultiresError,
    ShapeError,
    SpecError,
    WeightsError,
)
from multires.graph import (
    Add,
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Dense,
    Flatten,
    GlobalAvgPool,
    Graph,
    Input,
    MaxPool2d,
    Node,
    Pad2d,
    ReLU,
)
from multires.shapes import infer_shapes, macs, param_count, summarize
from multires.weights import init_weights, random_weights
from multires.zoo import model_options, models, spec

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "Add",
    "AvgPool2d",
    "BackendNotFoundError",
    "BackendUnavailableError",
    "BatchNorm",
    "DeviceError",
    "Execution",
    "InterchangeError",
    "Conv2d",
    "Dense",
    "Flatten",
    "GlobalAvgPool",
    "Graph",
    "Input",
    "MaxPool2d",
    "ModelNotFoundError",
    "MultiresError",
    "Node",
    "Pad2d",
    "ReLU",
    "Runner",
    "ShapeError",
    "SpecError",
    "WeightsError",
    "available_backends",
    "available_devices",
    "backends",
    "build",
    "get_backend",
    "infer_shapes",
    "init_weights",
    "macs",
    "make_runner",
    "model_options",
    "models",
    "param_count",
    "random_weights",
    "reference",
    "spec",
    "summarize",
    "weights",
]
