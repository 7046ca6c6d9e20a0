"""Keras layers for the spec semantics that stock Keras layers do not have.

Stock layers do the rest: `Conv2D`, `MaxPooling2D` and `AveragePooling2D` with `padding="same"`
are TensorFlow's SAME (pads that never win the max, average pooling without the pads in the
divisor), `ZeroPadding2D` is `Pad2d`.

Each is registered with `keras.saving.register_keras_serializable(package="multires")`, so a
saved model loads with plain `keras.models.load_model` once this backend is imported.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from multires.errors import WeightsError
from multires.graph import same_padding

PACKAGE = "multires"

Padding = tuple[tuple[int, int], tuple[int, int]]


def _all_dims(padding: tuple[tuple[Any, Any], ...], data_format: str) -> tuple[tuple[Any, Any], ...]:
    if data_format == "channels_first":
        return ((0, 0), (0, 0), *padding)
    return ((0, 0), *padding, (0, 0))


def _padding(value: Any) -> Padding:
    (top, bottom), (left, right) = value
    return ((int(top), int(bottom)), (int(left), int(right)))


@keras.saving.register_keras_serializable(package=PACKAGE)
class BatchNorm(keras.layers.BatchNormalization):
    """`BatchNormalization` with batch statistics as accurate as float32 allows, and either
    running-variance convention.

    Keras' own layer sums the raw inputs for the mean (a float32 sum over N*H*W values of a
    channel that sits far from zero loses digits: 4.6e-3 relative output error on 8192 values
    of mean 1000 and deviation 0.1) and normalises as `x * inv + (beta - mean * inv)`, which
    cancels for such a channel. This layer subtracts one sample of each channel first (exact for
    nearby values), takes the mean of the differences and then the mean of their squared
    deviations (two passes), and normalises as `(x - mean) * inv + beta`.

    `unbiased` (PyTorch's convention, the spec's default) folds `var * n / (n - 1)` into
    `moving_variance`, otherwise the biased batch variance (Keras' own); normalisation uses the
    biased one in both. `momentum` keeps Keras' meaning (weight of the old value, 1 - the spec's
    momentum). Masks and batch renormalisation are not supported.

    Under a `tf.distribute` strategy with several replicas, `synchronized` (the default here)
    takes the statistics of the global batch: the replicas all-reduce their sums (`_global_moments`),
    and the running variance uses the global count. Without it each replica normalises with its own
    shard's statistics. Either way the running statistics kept are replica 0's
    (`ONLY_FIRST_REPLICA`), which with synchronized statistics all replicas share.
    """

    def __init__(self, unbiased: bool = True, synchronized: bool = True, **kwargs: Any) -> None:
        if kwargs.get("renorm"):
            raise ValueError("BatchNorm does not support batch renormalisation.")
        super().__init__(synchronized=synchronized, **kwargs)
        self.unbiased = bool(unbiased)

    def add_weight(self, *args: Any, **kwargs: Any) -> Any:
        """Keras' weights, the running statistics updated from replica 0 under a strategy."""
        if not kwargs.get("trainable", True):
            kwargs["aggregation"] = "only_first_replica"
        return super().add_weight(*args, **kwargs)

    def _broadcast(self, value: Any, ndim: int) -> Any:
        shape = [1] * ndim
        shape[self.axis] = -1
        return ops.reshape(value, shape)

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        if mask is not None:
            raise ValueError(f"{self.name} (BatchNorm): masks are not supported.")
        inputs = ops.cast(inputs, "float32")
        ndim = len(inputs.shape)
        replicas = tf.distribute.get_replica_context()
        if (
            training
            and self.trainable
            and self.synchronized
            and replicas
            and replicas.num_replicas_in_sync > 1
        ):
            centred, mean, variance, count = self._global_moments(inputs, replicas)
            self._update_running(mean, variance, count)
        elif training and self.trainable:
            axes = self._reduction_axes
            sample = ops.stop_gradient(
                inputs[tuple(slice(None) if a == self.axis % ndim else slice(0, 1) for a in range(ndim))]
            )
            centred = inputs - sample
            shift = ops.mean(centred, axis=axes, keepdims=True)
            centred = centred - shift
            variance = ops.mean(ops.square(centred), axis=axes)
            mean = ops.reshape(sample + shift, (-1,))
            shape = ops.shape(inputs)
            count = ops.cast(math.prod(shape[axis] for axis in axes), "float32")
            self._update_running(mean, variance, count)
        else:
            centred = inputs - self._broadcast(self.moving_mean, ndim)
            variance = self.moving_variance
        inv = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            inv = inv * self.gamma
        outputs = centred * self._broadcast(inv, ndim)
        if self.center:
            outputs = outputs + self._broadcast(self.beta, ndim)
        return ops.cast(outputs, self.compute_dtype)

    def _update_running(self, mean: Any, variance: Any, count: Any) -> None:
        """Move the running statistics towards a batch's mean and (biased) variance over `count`
        values per channel, the variance folded to the unbiased one if the node says so."""
        folded = variance * (count / (count - 1.0)) if self.unbiased else variance
        keep = self.momentum
        self.moving_mean.assign(self.moving_mean * keep + ops.stop_gradient(mean) * (1.0 - keep))
        self.moving_variance.assign(self.moving_variance * keep + ops.stop_gradient(folded) * (1.0 - keep))

    def _global_moments(
        self, inputs: Any, replicas: tf.distribute.ReplicaContext
    ) -> tuple[Any, Any, Any, Any]:
        """The centred inputs, mean, biased variance and count of the global batch, from sums all
        replicas add up: the corrected two-pass algorithm. Pass 1 takes a provisional mean `m0`
        (a constant to the gradient, as the result does not depend on it); pass 2 sums the
        deviations `d = x - m0` and their squares, so that `mean = m0 + mean(d)` and
        `variance = mean(d^2) - mean(d)^2`, where `mean(d)` is tiny and nothing cancels. The
        second all-reduce carries the gradient to every replica (its gradient is an all-reduce)."""
        axes = self._reduction_axes
        ndim = len(inputs.shape)
        shape = tf.shape(inputs)
        local = tf.cast(tf.reduce_prod(tf.gather(shape, axes)), tf.float32)
        total, count = replicas.all_reduce(
            tf.distribute.ReduceOp.SUM, [tf.stop_gradient(tf.reduce_sum(inputs, axes)), local]
        )
        provisional = total / count
        deviations = inputs - self._broadcast(provisional, ndim)
        sums, squares = replicas.all_reduce(
            tf.distribute.ReduceOp.SUM,
            [tf.reduce_sum(deviations, axes), tf.reduce_sum(tf.square(deviations), axes)],
        )
        shift = sums / count
        variance = tf.maximum(squares / count - tf.square(shift), 0.0)
        return deviations - self._broadcast(shift, ndim), provisional + shift, variance, count

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "unbiased": self.unbiased}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConstantPadding2D(keras.layers.Layer):
    """Pad the spatial axes per side with a constant; `-inf` gives max pooling's padding."""

    def __init__(
        self, padding: Padding, value: float, data_format: str = "channels_last", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.padding = _padding(padding)
        self.value = float(value)
        self.data_format = data_format

    def call(self, inputs: Any) -> Any:
        return ops.pad(inputs, _all_dims(self.padding, self.data_format), constant_values=self.value)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        shape = list(input_shape)
        first = 2 if self.data_format == "channels_first" else 1
        for axis, (before, after) in zip((first, first + 1), self.padding, strict=True):
            if shape[axis] is not None:
                shape[axis] += before + after
        return tuple(shape)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "padding": self.padding,
            "value": self.value,
            "data_format": self.data_format,
        }


def _same_pads(size: Any, kernel: int, stride: int, dilation: int) -> tuple[Any, Any]:
    """`multires.graph.same_padding` of an axis whose size is an int or (unknown until the model
    runs) a scalar tensor."""
    if isinstance(size, int):
        return same_padding(size, kernel, stride, dilation)
    total = ops.maximum((kernel - 1) * dilation - (size - 1) % stride, 0)
    return total // 2, total - total // 2


@keras.saving.register_keras_serializable(package=PACKAGE)
class SamePadding2D(keras.layers.Layer):
    """Zero-pad the spatial axes as TensorFlow/XLA SAME pads for a window of `kernel`, `strides`
    and `dilation`: per side, computed from each input's size, so one model serves every size.

    For the SAME windows Keras' own `padding="same"` cannot run: a strided dilated convolution
    (run at stride 1 and subsampled, but padded for its real stride) and average pooling that
    counts the pads in the divisor.
    """

    def __init__(
        self,
        kernel: tuple[int, int],
        strides: tuple[int, int],
        dilation: tuple[int, int] = (1, 1),
        data_format: str = "channels_last",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.kernel = tuple(int(k) for k in kernel)
        self.strides = tuple(int(s) for s in strides)
        self.dilation = tuple(int(d) for d in dilation)
        self.data_format = data_format

    def _pads(self, shape: tuple[Any, ...]) -> tuple[tuple[Any, Any], ...]:
        first = 2 if self.data_format == "channels_first" else 1
        sizes = (shape[first], shape[first + 1])
        return tuple(
            _same_pads(*axis) for axis in zip(sizes, self.kernel, self.strides, self.dilation, strict=True)
        )

    def call(self, inputs: Any) -> Any:
        return ops.pad(inputs, _all_dims(self._pads(ops.shape(inputs)), self.data_format))

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        shape = list(input_shape)
        first = 2 if self.data_format == "channels_first" else 1
        for axis, k, s, d in zip((first, first + 1), self.kernel, self.strides, self.dilation, strict=True):
            if shape[axis] is not None:
                shape[axis] += sum(same_padding(shape[axis], k, s, d))
        return tuple(shape)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "kernel": self.kernel,
            "strides": self.strides,
            "dilation": self.dilation,
            "data_format": self.data_format,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class AveragePooling2DExcludePad(keras.layers.Layer):
    """Average pooling over explicitly zero-padded input whose divisor counts only real inputs.

    PyTorch's `count_include_pad=False`: each window's sum is divided by the number of
    positions inside the unpadded input, computed by pooling a padded map of ones.
    """

    def __init__(
        self,
        pool_size: tuple[int, int],
        strides: tuple[int, int],
        padding: Padding,
        data_format: str = "channels_last",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.pool_size = tuple(int(k) for k in pool_size)
        self.strides = tuple(int(s) for s in strides)
        self.padding = _padding(padding)
        self.data_format = data_format

    def call(self, inputs: Any) -> Any:
        pads = _all_dims(self.padding, self.data_format)
        ones = ops.ones_like(inputs[:, :1] if self.data_format == "channels_first" else inputs[..., :1])

        def pool(x: Any) -> Any:
            return ops.average_pool(ops.pad(x, pads), self.pool_size, self.strides, "valid", self.data_format)

        return pool(inputs) / pool(ones)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "pool_size": self.pool_size,
            "strides": self.strides,
            "padding": self.padding,
            "data_format": self.data_format,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class Subsample2D(keras.layers.Layer):
    """Keep every `strides`-th row and column: the stride of a dilated convolution.

    TensorFlow's convolution refuses stride > 1 together with dilation > 1, so such a
    convolution runs at stride 1 and this layer subsamples its output (the same positions).
    """

    def __init__(self, strides: tuple[int, int], data_format: str = "channels_last", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.strides = tuple(int(s) for s in strides)
        self.data_format = data_format

    def call(self, inputs: Any) -> Any:
        sh, sw = self.strides
        if self.data_format == "channels_first":
            return inputs[:, :, ::sh, ::sw]
        return inputs[:, ::sh, ::sw, :]

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        shape = list(input_shape)
        first = 2 if self.data_format == "channels_first" else 1
        for axis, stride in zip((first, first + 1), self.strides, strict=True):
            if shape[axis] is not None:
                shape[axis] = -(-shape[axis] // stride)
        return tuple(shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "strides": self.strides, "data_format": self.data_format}


@keras.saving.register_keras_serializable(package=PACKAGE)
class DeferredDense(keras.layers.Layer):
    """Stands for a Dense layer whose input width is not known yet: that of a Flatten of a
    spatial map, which depends on the image size. Keras needs the width to create the kernel,
    so a model holding one is a placeholder until `load_weights` rebuilds it with the width the
    weights give (the role of PyTorch's `LazyLinear`)."""

    def __init__(self, units: int, use_bias: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = int(units)
        self.use_bias = bool(use_bias)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        """Creates nothing: the width comes with the weights."""

    def call(self, inputs: Any) -> Any:
        raise WeightsError(
            f"{self.name} (Dense): its input width depends on the image size and comes from the "
            "weights; load canonical weights first (load_weights returns the complete model)."
        )

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (*input_shape[:-1], self.units)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units, "use_bias": self.use_bias}
