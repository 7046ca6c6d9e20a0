"""The `multires.backend.Runner` of the TensorFlow backend.

Forward passes and SGD steps run as `tf.function`s over the built Keras model. The optimizer is
written out rather than `keras.optimizers.SGD`, because Keras folds the learning rate into the
momentum buffer and decouples weight decay, while the spec's SGD is PyTorch's:
`g = grad + wd * w; buf = m * buf + g; w = w - lr * buf` (`buf` starts at zero, so the first
step's `buf = g` needs no special case).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import keras
import numpy as np
import tensorflow as tf

from multires.backend import SGD
from multires.errors import ShapeError, SpecError, WeightsError
from multires.graph import BatchNorm, Dense, Graph
from multires.shapes import check_input_shape, from_layout, infer_shapes
from multires.weights import CanonicalWeights, is_buffer

from .. import input_array
from .lowering import build
from .weights import export_weights, load_weights, slots

_SPEC = tf.TensorSpec([None, None, None, None], tf.float32)


class KerasRunner:
    """A Keras model built from `graph`, with its canonical weights and SGD state."""

    def __init__(self, graph: Graph, model: keras.Model, layout: str, optimizer: SGD) -> None:
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise SpecError(
                f"{graph.name}: a runner drives graphs with one input and one output; this one has inputs "
                f"{[i.name for i in graph.inputs]} and outputs {list(graph.outputs)}."
            )
        self.graph = graph
        self.model = model
        self.layout = layout
        self.optimizer = optimizer
        self._lr = tf.Variable(optimizer.lr, trainable=False, dtype=tf.float32, name="lr")
        """The learning rate the compiled step reads, so `set_lr` needs no retracing."""
        self._params = {name: slot for name, slot in slots(model).items() if not is_buffer(name)}
        self._buffers = {
            name: tf.Variable(tf.zeros_like(slot.variable), trainable=False, name=f"{name}.momentum")
            for name, slot in self._params.items()
        }
        shapes = infer_shapes(graph)
        self._widths = {
            node.name: int(model.get_layer(node.name).kernel.shape[0])
            for node in graph.nodes
            if isinstance(node, Dense) and shapes[node.inputs[0]][1] is None
        }
        """Dense input widths that depend on the image size, as the weights fixed them."""
        output = shapes[graph.outputs[0]]
        self._classes = output[1] if len(output) == 2 else None
        self._steps = 0
        self._eval = tf.function(lambda x: model(x, training=False), input_signature=[_SPEC])
        self._train = tf.function(lambda x: model(x, training=True), input_signature=[_SPEC])
        self._step = tf.function(self._sgd_step, input_signature=[_SPEC, tf.TensorSpec([None], tf.int64)])

    def _check(self, x: np.ndarray, training: bool) -> np.ndarray:
        """`x` as float32 after the checks the reference makes, raising ShapeError."""
        x = input_array(self.graph, x)
        check_input_shape(self.graph, x.shape, self.layout)
        shapes = infer_shapes(self.graph, from_layout(x.shape, self.layout))
        for name, width in self._widths.items():
            features = shapes[self.graph[name].inputs[0]][1]
            if features != width:
                raise ShapeError(
                    f"{name} (Dense): an input of shape {x.shape} ({self.layout}) gives it {features} "
                    f"features, but its weights take {width}. Use images of the size it was trained on."
                )
        if training:
            for node in self.graph.nodes:
                if not isinstance(node, BatchNorm):
                    continue
                n, _, h, w = shapes[node.inputs[0]]
                if n * h * w < 2:
                    raise ShapeError(
                        f"{node.name} (BatchNorm): training mode needs more than one value per channel "
                        f"to estimate the batch variance; got N*H*W = {n * h * w} for input {x.shape} "
                        f"({self.layout}). Use a batch of 2 or more, or eval mode."
                    )
        return x.astype(np.float32, copy=False)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Output for a float32 batch in `layout`; training mode updates the running statistics."""
        x = self._check(x, training)
        return (self._train if training else self._eval)(x).numpy()

    def _sgd_step(self, x: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        lr, momentum, decay = self._lr, self.optimizer.momentum, self.optimizer.weight_decay
        variables = [slot.variable for slot in self._params.values()]
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
            )
        grads = tape.gradient(loss, variables)
        for variable, grad, buffer in zip(variables, grads, self._buffers.values(), strict=True):
            if decay:
                grad = grad + decay * variable
            if momentum:
                grad = buffer.assign(momentum * buffer + grad)
            variable.assign_sub(lr * grad)
        return loss, logits

    def set_lr(self, lr: float) -> None:
        """The learning rate of the following steps."""
        self.optimizer = replace(self.optimizer, lr=lr)
        self._lr.assign(lr)

    def train_step(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """One SGD step on mean softmax cross-entropy; the loss and the logits before the update."""
        if self._classes is None:
            raise ShapeError(
                f"{self.graph.name}: cross-entropy needs (N, classes) logits, but output "
                f"{self.graph.outputs[0]!r} is a 4-D map. End the graph with Flatten and Dense."
            )
        x = self._check(x, training=True)
        labels = np.asarray(labels)
        if labels.shape != (x.shape[0],) or labels.dtype.kind not in "iu":
            raise ShapeError(
                f"{self.graph.name}: labels must be integers of shape ({x.shape[0]},), one per image; "
                f"got {labels.dtype} {labels.shape}."
            )
        if labels.size and (labels.min() < 0 or labels.max() >= self._classes):
            raise ShapeError(
                f"{self.graph.name}: labels must lie in [0, {self._classes}) for {self._classes} classes; "
                f"got values in [{labels.min()}, {labels.max()}]."
            )
        loss, logits = self._step(x, labels.astype(np.int64))
        self._steps += 1
        return float(loss), logits.numpy()

    def weights(self) -> CanonicalWeights:
        """The current canonical weights, running statistics included."""
        return export_weights(self.model)

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace every weight (a full canonical mapping)."""
        load_weights(self.model, weights)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Momentum buffers by canonical parameter name (empty before a step or without momentum)."""
        if not self._steps or not self.optimizer.momentum:
            return {}
        return {
            name: np.ascontiguousarray(self._params[name].to_canonical(buffer.numpy()), dtype=np.float32)
            for name, buffer in self._buffers.items()
        }

    def set_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore buffers saved by `optimizer_state` (an empty mapping resets them)."""
        if not state:
            for buffer in self._buffers.values():
                buffer.assign(tf.zeros_like(buffer))
            self._steps = 0
            return
        missing = sorted(set(self._buffers) - set(state))
        unexpected = sorted(set(state) - set(self._buffers))
        if missing or unexpected:
            raise WeightsError(
                f"optimizer state does not match {self.graph.name!r}: missing {missing}, unexpected {unexpected}."
            )
        values = {}
        for name, slot in self._params.items():
            shape = tuple(np.shape(state[name]))
            if shape != slot.shape:
                raise WeightsError(f"optimizer state {name}: shape {shape}, expected {slot.shape}.")
            values[name] = np.ascontiguousarray(slot.to_keras(np.asarray(state[name], dtype=np.float32)))
        for name, buffer in self._buffers.items():
            buffer.assign(values[name])
        self._steps = max(self._steps, 1)


def make_runner(graph: Graph, weights: CanonicalWeights, layout: str, optimizer: SGD) -> KerasRunner:
    """A runner for `graph` with `weights` loaded, in `layout`."""
    model = load_weights(build(graph, layout, weights), weights)
    return KerasRunner(graph, model, layout, optimizer)
