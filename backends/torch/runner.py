"""The PyTorch `Runner`: a built model with its weights and a `torch.optim.SGD`, driven with NumPy."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from multires.backend import SGD
from multires.errors import ShapeError, WeightsError
from multires.graph import Graph
from multires.shapes import check_input_shape

from .. import check_batch_statistics, input_array
from .lowering import build
from .weights import export_weights, load_weights


class TorchRunner:
    """A `multires.Runner` over a model from `build`, on the CPU in float32.

    `torch.optim.SGD` with dampening 0 and no Nesterov is exactly `multires.SGD`'s rule,
    weight decay included on every parameter.
    """

    def __init__(self, graph: Graph, weights: Mapping[str, np.ndarray], layout: str, optimizer: SGD) -> None:
        self.graph = graph
        self.layout = layout
        self.model = load_weights(build(graph, layout), weights)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=optimizer.lr,
            momentum=optimizer.momentum,
            weight_decay=optimizer.weight_decay,
        )

    def _input(self, x: np.ndarray, training: bool) -> torch.Tensor:
        """`x` as a float32 tensor after the checks the reference makes (ShapeError), PyTorch's
        own one-value-per-channel check in training mode included (a bare ValueError there)."""
        array = input_array(self.graph, x)
        check_input_shape(self.graph, array.shape, self.layout)
        if training:
            check_batch_statistics(self.graph, array.shape, self.layout)
        return torch.from_numpy(array)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Logits for a float32 batch in `layout`; training mode updates the running statistics."""
        inputs = self._input(x, training)
        self.model.train(training)
        with torch.no_grad():
            return self.model(inputs).numpy()

    def set_lr(self, lr: float) -> None:
        """The learning rate of the following steps (every param group's `lr`, as a scheduler sets it)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """One SGD step on mean softmax cross-entropy in training mode; returns the loss and the
        logits before the update."""
        inputs = self._input(x, training=True)
        self.model.train()
        logits = self.model(inputs)
        targets = torch.from_numpy(_labels(labels, tuple(logits.shape)))
        loss = F.cross_entropy(logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach()), logits.detach().numpy()

    def weights(self) -> dict[str, np.ndarray]:
        """The current canonical weights, running statistics included."""
        return export_weights(self.model)

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Replace the weights in place (the optimizer keeps its parameter references)."""
        load_weights(self.model, weights)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """SGD momentum buffers by canonical parameter name."""
        state = {}
        for name, param in self.model.named_parameters():
            buffer = self.optimizer.state.get(param, {}).get("momentum_buffer")
            if buffer is not None:
                state[name] = buffer.detach().numpy().copy()
        return state

    def set_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore momentum buffers saved by `optimizer_state` (an empty mapping clears them)."""
        params = dict(self.model.named_parameters())
        problems = [f"unexpected {name}" for name in state if name not in params]
        problems += [
            f"{name}: shape {np.shape(value)}, expected {tuple(params[name].shape)}"
            for name, value in state.items()
            if name in params and tuple(np.shape(value)) != tuple(params[name].shape)
        ]
        if problems:
            raise WeightsError(
                f"optimizer state does not match {self.graph.name!r} ({len(problems)} problem(s)):\n  "
                + "\n  ".join(problems)
            )
        self.optimizer.state.clear()
        for name, value in state.items():
            buffer = torch.tensor(np.asarray(value), dtype=params[name].dtype)
            self.optimizer.state[params[name]]["momentum_buffer"] = buffer


def _labels(labels: np.ndarray, logits_shape: tuple[int, ...]) -> np.ndarray:
    """`labels` as int64 class indices, or a ShapeError saying what fits the logits."""
    labels = np.asarray(labels)
    if len(logits_shape) != 2:
        raise ShapeError(
            f"cross-entropy needs (N, classes) logits; the model returns shape {logits_shape}. "
            "End the graph with Flatten and Dense."
        )
    n, classes = logits_shape
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise ShapeError(
            f"labels must be {n} integer class indices (shape ({n},)); got {labels.dtype} of shape {labels.shape}."
        )
    if n and (labels.min() < 0 or labels.max() >= classes):
        raise ShapeError(
            f"labels must lie in [0, {classes}) for {classes} classes; got values in [{labels.min()}, {labels.max()}]."
        )
    return np.ascontiguousarray(labels, dtype=np.int64)
