"""The MXNet `Runner`: a built Gluon model, a `gluon.Trainer` with PyTorch's SGD, driven with NumPy.

Set `MULTIRES_MXNET_HYBRIDIZE=0` to run the model eagerly (default `1`: hybridized with
`static_alloc`), so the conformance suite checks both ways without changes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd

from multires.backend import SGD
from multires.errors import MultiresError, ShapeError, SpecError, WeightsError
from multires.graph import Graph
from multires.shapes import infer_shapes
from multires.weights import is_buffer

from .. import input_array
from .lowering import GraphBlock, build
from .weights import export_weights, load_weights, parameters

HYBRIDIZE_ENV = "MULTIRES_MXNET_HYBRIDIZE"


class HybridizeSettingError(MultiresError, ValueError):
    """An unreadable MULTIRES_MXNET_HYBRIDIZE value."""


def hybridize_default() -> bool:
    """Whether runners hybridize: `MULTIRES_MXNET_HYBRIDIZE` (`0`/`1`), on by default."""
    value = os.environ.get(HYBRIDIZE_ENV, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise HybridizeSettingError(f"{HYBRIDIZE_ENV} must be 0 or 1; got {value!r}.")


class PyTorchSGD(mx.optimizer.Optimizer):
    """`multires.SGD` (PyTorch's rule) as an MXNet optimizer for `gluon.Trainer`.

    MXNet's own `sgd` keeps `mom = momentum * mom - lr * g` and adds it to the weight: the same
    steps for a fixed learning rate, but its state carries the learning rate, so it differs from
    PyTorch after a learning-rate change and its state is not PyTorch's buffer. Here the state
    is PyTorch's `buf = momentum * buf + (grad + weight_decay * w)` (held in `buffers`, by
    parameter index) and `w -= lr * buf`, both with MXNet's fused update kernels. Without
    momentum it is MXNet's `sgd_update`, `w = (1 - lr * wd) * w - lr * grad`.
    """

    def __init__(self, learning_rate: float, momentum: float = 0.0, wd: float = 0.0, **kwargs: Any) -> None:
        super().__init__(learning_rate=learning_rate, wd=wd, **kwargs)
        self.momentum = momentum
        self.buffers: dict[int, nd.NDArray] = {}
        self._scratch: dict[int, nd.NDArray] = {}

    def create_state(self, index: int, weight: nd.NDArray) -> None:
        """No Trainer-held state: the momentum buffers live in `buffers`."""
        return None

    def update(self, index: int, weight: nd.NDArray, grad: nd.NDArray, state: None) -> None:
        """One step for the parameter at `index`, in place."""
        self._update_count(index)
        lr, wd = self._get_lr(index), self._get_wd(index)
        clip = -1.0 if self.clip_gradient is None else self.clip_gradient
        if not self.momentum:
            nd.sgd_update(
                weight, grad, out=weight, lr=lr, wd=wd, rescale_grad=self.rescale_grad, clip_gradient=clip
            )
            return
        if index not in self.buffers:
            self.buffers[index] = nd.zeros_like(weight)  # momentum * 0 + g == g: PyTorch's first step
        if index not in self._scratch:
            self._scratch[index] = nd.empty(weight.shape, weight.context, weight.dtype)
        buffer = self.buffers[index]
        # sgd_mom_update with lr = -1 computes mom = momentum * mom + wd * w + rescale * grad in
        # place; its weight output (w + mom) is not needed and goes to scratch.
        nd.sgd_mom_update(
            weight,
            grad,
            buffer,
            out=self._scratch[index],
            lr=-1.0,
            momentum=self.momentum,
            wd=wd,
            rescale_grad=self.rescale_grad,
            clip_gradient=clip,
        )
        nd.sgd_update(weight, buffer, out=weight, lr=lr, wd=0.0, rescale_grad=1.0)


class MXNetRunner:
    """A `multires.Runner` over a model from `build`, on the CPU in float32.

    Training-mode forward passes run under `autograd.train_mode()`; `train_step` records with
    `autograd.record(train_mode=True)`, takes the batch-mean softmax cross-entropy, calls
    `backward()` and `trainer.step(1)` (so `rescale_grad` is 1: the loss is already a mean).
    """

    def __init__(
        self,
        graph: Graph,
        weights: Mapping[str, np.ndarray],
        layout: str = "NCHW",
        optimizer: SGD | None = None,
        hybridize: bool | None = None,
    ) -> None:
        optimizer = optimizer or SGD()
        self.graph = graph
        self.layout = layout
        self.model: GraphBlock = load_weights(build(graph, layout, initialize=False), weights)
        self.hybridized = hybridize_default() if hybridize is None else hybridize
        if self.hybridized:
            self.model.hybridize(static_alloc=True)
        params = parameters(self.model)
        self._trainable = [name for name in params if not is_buffer(name)]
        self.sgd = PyTorchSGD(optimizer.lr, momentum=optimizer.momentum, wd=optimizer.weight_decay)
        self.trainer = gluon.Trainer([params[name] for name in self._trainable], self.sgd, kvstore=None)
        self._loss = gluon.loss.SoftmaxCrossEntropyLoss()

    def _inputs(self, x: np.ndarray | Mapping[str, np.ndarray]) -> list[nd.NDArray]:
        if isinstance(x, Mapping):
            missing = [i.name for i in self.graph.inputs if i.name not in x]
            if missing:
                raise ShapeError(f"{self.graph.name}: no array given for input(s) {missing}.")
            arrays = [x[i.name] for i in self.graph.inputs]
        else:
            arrays = [x]
        return [nd.array(input_array(self.graph, a), dtype="float32") for a in arrays]

    def forward(self, x: np.ndarray | Mapping[str, np.ndarray], training: bool = False) -> Any:
        """The float32 output (a dict by name for several) for a batch in NCHW; training mode
        uses batch statistics and updates the running statistics."""
        inputs = self._inputs(x)
        with autograd.train_mode() if training else autograd.predict_mode():
            out = self.model(*inputs)
        if isinstance(out, tuple):
            return {name: value.asnumpy() for name, value in zip(self.graph.outputs, out, strict=True)}
        return out.asnumpy()

    def set_lr(self, lr: float) -> None:
        """The learning rate of the following steps (`Trainer.set_learning_rate`)."""
        self.trainer.set_learning_rate(lr)

    def train_step(
        self, x: np.ndarray | Mapping[str, np.ndarray], labels: np.ndarray
    ) -> tuple[float, np.ndarray]:
        """One SGD step on mean softmax cross-entropy in training mode; returns the loss and the
        logits of the forward pass before the update."""
        if len(self.graph.outputs) != 1:
            raise SpecError(
                f"{self.graph.name}: training needs a graph with one output (the logits); it has "
                f"{list(self.graph.outputs)}."
            )
        inputs = self._inputs(x)
        targets = nd.array(self._labels(inputs, labels), dtype="float32")
        with autograd.record(train_mode=True):
            logits = self.model(*inputs)
            loss = self._loss(logits, targets).mean()
        loss.backward()
        self.trainer.step(1)
        return float(loss.asscalar()), logits.asnumpy()

    def _labels(self, inputs: list[nd.NDArray], labels: np.ndarray) -> np.ndarray:
        """Labels as integer class indices checked against the batch and the class count."""
        labels = np.asarray(labels)
        shapes = {i.name: tuple(v.shape) for i, v in zip(self.graph.inputs, inputs, strict=True)}
        try:
            out_shape = infer_shapes(self.graph, shapes)[self.graph.outputs[0]]
        except SpecError as error:
            raise ShapeError(f"{self.graph.name}: the input does not fit: {error}") from None
        if len(out_shape) != 2:
            raise ShapeError(
                f"cross-entropy needs (N, classes) logits; got shape {out_shape}. "
                "End the graph with Flatten and Dense (or GlobalAvgPool, Flatten)."
            )
        n, k = out_shape
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise ShapeError(
                f"labels must be {n} integer class indices (shape ({n},)); got {labels.dtype} of shape "
                f"{labels.shape}."
            )
        if n and (labels.min() < 0 or labels.max() >= k):
            raise ShapeError(
                f"labels must lie in [0, {k}) for {k} classes; got values in [{labels.min()}, {labels.max()}]."
            )
        return labels

    def weights(self) -> dict[str, np.ndarray]:
        """The current canonical weights, running statistics included."""
        return export_weights(self.model)

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace the weights in place (the trainer keeps its parameter references)."""
        load_weights(self.model, weights)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Momentum buffers (PyTorch's `buf`) by canonical parameter name; empty before the first
        step or without momentum."""
        return {self._trainable[i]: buffer.asnumpy() for i, buffer in sorted(self.sgd.buffers.items())}

    def set_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore buffers saved by `optimizer_state` (an empty mapping clears them)."""
        params = parameters(self.model)
        problems = []
        for name, value in state.items():
            if name not in params or is_buffer(name):
                problems.append(f"{name}: not a trainable parameter")
            elif tuple(np.shape(value)) != tuple(params[name].shape):
                problems.append(
                    f"{name}: shape {tuple(np.shape(value))}, expected {tuple(params[name].shape)}"
                )
        if problems:
            raise WeightsError(
                f"optimizer state does not match {self.graph.name!r} ({len(problems)} problem(s)):\n  "
                + "\n  ".join(problems)
            )
        index = {name: i for i, name in enumerate(self._trainable)}
        self.sgd.buffers = {
            index[name]: nd.array(np.asarray(value, dtype=np.float32), dtype="float32")
            for name, value in state.items()
        }


def make_runner(
    graph: Graph,
    weights: Mapping[str, np.ndarray],
    layout: str,
    optimizer: SGD,
    hybridize: bool | None = None,
) -> MXNetRunner:
    """A `multires.Runner` for `graph` with canonical `weights`; `hybridize` defaults to
    `MULTIRES_MXNET_HYBRIDIZE` (on unless set to 0)."""
    return MXNetRunner(graph, weights, layout, optimizer, hybridize)
