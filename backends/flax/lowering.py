"""Lowering a spec Graph to a `flax.linen` Module: one small function per node type, in a table.

Each lowering turns a node into a `Layer`, a function `(inputs, mode) -> output` called inside
the enclosing module's compact method, so the Flax modules it creates are named after the node.
Canonical names nest: the node `layer1.0.conv1` is the module `conv1` inside the namespace
modules `layer1` and `0`, so its kernel is `params['layer1']['0']['conv1']['kernel']` and
`multires.weights.to_variables` / `from_variables` map the two one-to-one.

Computation is NHWC. What the spec pins is matched exactly, natively where Flax has it: explicit
per-side padding and SAME (`padding="SAME"` is XLA's, so TensorFlow's) are Flax's own, max-pool
pads are -inf, a BatchNorm node with the biased running variance is `nn.BatchNorm` and one with
the unbiased one (PyTorch's) `SpecBatchNorm`, Flatten reads channel-major. Convolutions and
matmuls run at `precision` ("highest" by default: full float32 on accelerators that would
otherwise round to TF32/bfloat16; CPU is float32 anyway).

Mixed precision is Flax's own: a compute `dtype` (bfloat16 or float16) given to every Conv and
Dense (`dtype=`, with float32 `param_dtype`) and to BatchNorm, which computes its statistics and
normalises in float32 and returns the compute dtype. Data parallelism needs two more things of
training-mode BatchNorm, both given through `Mode`: a `mask` of the rows that count (padding rows
that even out the devices' shards are left out of the statistics and get no gradient), and
`groups`, separate statistics for each of that many equal contiguous parts of the batch (one per
device without synchronised BatchNorm; XLA keeps each part's reduction on its device).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from multires.backend import LoweringTable
from multires.errors import ShapeError, SpecError
from multires.graph import (
    SAME,
    Add,
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Dense,
    Flatten,
    GlobalAvgPool,
    Graph,
    MaxPool2d,
    Pad2d,
    ReLU,
    WindowPadding,
)
from multires.shapes import check_input_shape, check_layout, infer_shapes


@dataclass(frozen=True)
class Compute:
    """How the lowered layers compute, fixed when the model is built: the matmul and convolution
    `precision`, the compute `dtype` (None: float32, the parameters' own; `jnp.bfloat16` or
    `jnp.float16` for mixed precision, parameters staying float32), the number of BatchNorm
    statistics `groups` (see the module docstring) and whether convolutions run as matmuls where
    that pays on XLA:CPU (`conv_as_matmul`)."""

    precision: Any = "highest"
    dtype: Any = None
    groups: int = 1
    conv_as_matmul: bool = False


@dataclass(frozen=True)
class Mode:
    """How one call computes: training or evaluation, and in training the batch's row `mask`
    (1 for rows that count, 0 for padding; None: every row counts)."""

    train: bool = False
    mask: jax.Array | None = None


Layer = Callable[[Sequence[jax.Array], Mode], jax.Array]
"""A lowered node: `(inputs, mode) -> output`, called inside the parent module's compact method."""

Lowering = Callable[[Any, str, Compute], Layer]
"""`(node, module_name, compute) -> Layer`."""

LOWERINGS = LoweringTable("flax")
"""The table: spec node type -> its Flax lowering."""
lowers = LOWERINGS.register


def _uniform(bound: float) -> Callable[..., jax.Array]:
    """U(-bound, bound), PyTorch's default for biases and dense kernels."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
"""torchvision's ResNet convolution init, as `multires.init_weights` uses."""


def _padding(padding: WindowPadding) -> str | tuple[tuple[int, int], ...]:
    """Flax's padding argument: per side as given, or "SAME", which is XLA's (and TensorFlow's)."""
    return "SAME" if padding == SAME else padding


MATMUL_MIN_STRIDED_CHANNELS = 16
"""A strided convolution with at least this many input channels runs as a matmul on XLA:CPU."""

MATMUL_MAX_OUTPUT_PIXELS = 9
"""A convolution with at most this many output positions (3 x 3) runs as a matmul on XLA:CPU."""

MATMUL_WIDE = (512, 49)
"""So does one of at least 512 input channels with at most 49 output positions (7 x 7)."""


def matmul_pays(
    kernel: Sequence[int], stride: Sequence[int], in_channels: int, output: Sequence[int]
) -> bool:
    """Whether XLA:CPU computes this ungrouped, undilated convolution faster as im2col and one
    matmul than as its own convolution, forward and backward (`benchmarks/bench_flax.py
    --conv-cases` measures each case).

    XLA:CPU's convolution emitter is slow on small maps and strided windows: a 3 x 3 convolution
    of 256 channels on a 2 x 2 map, batch 256, takes 210 ms forward and 448 ms forward and
    backward, 20x and 18x the matmul. A 1 x 1 convolution is a matmul already (56 x 56 x 64 -> 256,
    batch 16: 1.6x faster forward, 4.4x with the backward pass), and a strided window gathers a
    quarter of the input or less. On larger maps at stride 1 the emitter wins (28 x 28 x 128,
    batch 16: 2.9x faster forward than the matmul, which first copies each input nine times)
    unless the channels are many (7 x 7 x 512: the matmul is 1.2x faster), as it does on the
    stem's few channels (2.3x faster forward). Figures: `benchmarks/results/flax-conv.json`.
    """
    if all(k == 1 for k in kernel):
        return True
    if any(s > 1 for s in stride) and in_channels >= MATMUL_MIN_STRIDED_CHANNELS:
        return True
    pixels = math.prod(output)
    wide_channels, wide_pixels = MATMUL_WIDE
    return pixels <= MATMUL_MAX_OUTPUT_PIXELS or (in_channels >= wide_channels and pixels <= wide_pixels)


def conv_as_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **options: Any,
) -> jax.Array:
    """`lax.conv_general_dilated` for `nn.Conv` (NHWC input, HWIO kernel) that runs a 2-D,
    ungrouped, undilated convolution as im2col and one matmul where `matmul_pays`, and anything
    else as XLA's convolution. The sum is over the same products, so only float32 rounding
    differs; parameters and their layout are `nn.Conv`'s own."""
    dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    if lhs.ndim == 4 and feature_group_count == 1 and not dilated and not options:
        kernel, in_channels = rhs.shape[:2], rhs.shape[2]
        pads = (
            lax.padtype_to_pads(lhs.shape[1:3], kernel, window_strides, padding)
            if isinstance(padding, str)
            else padding
        )
        padded = [size + before + after for size, (before, after) in zip(lhs.shape[1:3], pads, strict=True)]
        output = [(size - k) // s + 1 for size, k, s in zip(padded, kernel, window_strides, strict=True)]
        if matmul_pays(kernel, window_strides, in_channels, output):
            return im2col_matmul(lhs, rhs, window_strides, pads, precision)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        precision=precision,
        **options,
    )


def im2col_matmul(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    precision: Any = None,
) -> jax.Array:
    """A 2-D convolution (NHWC input, HWIO kernel, per-side `padding`) as one matmul: the padded
    input's windows side by side along the channels (im2col), times the kernel as a matrix."""
    (kh, kw, _, out_channels), (sh, sw) = kernel.shape, strides
    if any(any(pads) for pads in padding):
        x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    windows = [
        x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    columns = windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)
    y = jnp.matmul(
        columns.reshape(-1, columns.shape[-1]), kernel.reshape(-1, out_channels), precision=precision
    )
    return y.reshape(x.shape[0], oh, ow, out_channels)


@lowers(Conv2d)
def conv2d(node: Conv2d, name: str, compute: Compute) -> Layer:
    def layer(inputs: Sequence[jax.Array], mode: Mode) -> jax.Array:
        (x,) = inputs
        fan_in = x.shape[-1] // node.groups * math.prod(node.kernel)
        conv = nn.Conv(
            node.out_channels,
            node.kernel,
            strides=node.stride,
            padding=_padding(node.padding),
            kernel_dilation=node.dilation,
            feature_group_count=node.groups,
            use_bias=node.bias,
            precision=compute.precision,
            dtype=compute.dtype,
            kernel_init=_KAIMING_FAN_OUT,
            bias_init=_uniform(1 / math.sqrt(fan_in)),
            conv_general_dilated=conv_as_matmul if compute.conv_as_matmul else None,
            name=name,
        )
        return conv(x)

    return layer


def _batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-channel mean, biased variance and `x - mean` over all but the last axis, as accurate
    as float32 allows: one sample of each channel is subtracted first (exact for values near it,
    so a channel far from zero loses no digits in the sum), then the mean of the differences is
    taken, then the mean of their squared deviations (two passes, no `E[x^2] - E[x]^2`)."""
    axes = tuple(range(x.ndim - 1))
    sample = jax.lax.stop_gradient(x[(0,) * (x.ndim - 1)])
    shift = jnp.mean(x - sample, axes)
    centred = x - sample - shift
    return sample + shift, jnp.mean(jnp.square(centred), axes), centred


def _rows(mask: jax.Array, x: jax.Array) -> jax.Array:
    """The row mask `(N,)` shaped to broadcast against `x` `(N, ..., C)`."""
    return mask.reshape(-1, *(1,) * (x.ndim - 1))


def _masked_batch_stats(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`_batch_stats` over the rows where `mask` is 1 (the first row must be one of them unless
    none is), and their count per channel: padding rows count for nothing and their `centred`
    is 0. The count is at least 1, so an all-padding batch (an empty shard) gives zeros, not NaN."""
    axes = tuple(range(x.ndim - 1))
    weight = _rows(mask, x)
    count = jnp.maximum(jnp.sum(mask) * (x.size // (x.shape[0] * x.shape[-1])), 1)
    sample = jax.lax.stop_gradient(x[(0,) * (x.ndim - 1)])
    shift = jnp.sum((x - sample) * weight, axes) / count
    centred = (x - sample - shift) * weight
    return sample + shift, jnp.sum(jnp.square(centred), axes) / count, centred, count


def _normalize_backward(
    saved: tuple[jax.Array, ...], grad: jax.Array, count: Any, weight: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The closed-form BatchNorm gradient (as in `multires.reference`); `weight`, the row mask,
    keeps padding rows out of the sums and gives them a zero input gradient."""
    centred, inv_std, scale = saved
    axes = tuple(range(centred.ndim - 1))
    x_hat = centred * inv_std
    if weight is not None:
        grad = grad * weight
    grad_bias = jnp.sum(grad, axes)
    grad_scale = jnp.sum(grad * x_hat, axes)
    grad_x = (scale * inv_std) * (grad - grad_bias / count - x_hat * (grad_scale / count))
    return (grad_x if weight is None else grad_x * weight), grad_scale, grad_bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """Training-mode BatchNorm output, normalised with the batch statistics.

    Its gradient is the closed form (as in `multires.reference`), which needs two reductions
    per channel where autodiff through the two-pass variance needs three: the training step then
    moves as much memory as one built from `nn.BatchNorm`. Reverse mode only (no `jax.jvp`).
    """
    return _batch_normalize_forward(x, scale, bias, epsilon)[0]


def _batch_normalize_forward(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    _, var, centred = _batch_stats(x)
    inv_std = jax.lax.rsqrt(var + epsilon)
    return centred * (scale * inv_std) + bias, (centred, inv_std, scale)


def _batch_normalize_backward(
    epsilon: float, saved: tuple[jax.Array, ...], grad: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    centred = saved[0]
    return _normalize_backward(saved, grad, centred.size // centred.shape[-1])


batch_normalize.defvjp(_batch_normalize_forward, _batch_normalize_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def masked_batch_normalize(
    x: jax.Array, scale: jax.Array, bias: jax.Array, mask: jax.Array, epsilon: float
) -> jax.Array:
    """`batch_normalize` with the statistics of the rows where `mask` is 1; the other rows
    come out as `bias` and get no gradient."""
    return _masked_normalize_forward(x, scale, bias, mask, epsilon)[0]


def _masked_normalize_forward(
    x: jax.Array, scale: jax.Array, bias: jax.Array, mask: jax.Array, epsilon: float
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    _, var, centred, count = _masked_batch_stats(x, mask)
    inv_std = jax.lax.rsqrt(var + epsilon)
    return centred * (scale * inv_std) + bias, (centred, inv_std, scale, mask, count)


def _masked_normalize_backward(
    epsilon: float, saved: tuple[jax.Array, ...], grad: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    centred, inv_std, scale, mask, count = saved
    grads = _normalize_backward((centred, inv_std, scale), grad, count, _rows(mask, centred))
    return (*grads, jnp.zeros_like(mask))


masked_batch_normalize.defvjp(_masked_normalize_forward, _masked_normalize_backward)


class SpecBatchNorm(nn.Module):
    """BatchNorm over the last axis with batch statistics as accurate as float32 allows
    (`_batch_stats`; `flax.linen.BatchNorm` sums the raw values) and either running-variance
    convention.

    With `unbiased` (PyTorch's convention) the running variance takes `n / (n - 1)` times the
    biased batch variance, otherwise the biased one (`flax.linen.BatchNorm`'s); normalisation
    uses the biased one in both. `momentum` is Flax's convention, the weight of the old running value:
    `running = momentum * running + (1 - momentum) * batch` (the spec's momentum m becomes 1 - m).
    Variables are named as flax.linen's: `scale`, `bias` in params, `mean`, `var` in batch_stats.
    Running statistics update only when `batch_stats` is mutable and the module is not
    initialising, as with `nn.BatchNorm`.

    With a compute `dtype` (mixed precision) the statistics and the normalisation are float32
    and the output is `dtype`. A training-mode `mask` (N,) leaves padding rows out of the
    statistics; `groups` > 1 normalises each of that many equal contiguous parts of the batch
    with its own statistics and keeps the first part's as the running ones (device 0's, in data
    parallelism without synchronised BatchNorm).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    unbiased: bool = True
    dtype: Any = None
    groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
        features = (x.shape[-1],)
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        if not train:
            y = (x - running_mean.value) * (scale * jax.lax.rsqrt(running_var.value + self.epsilon)) + bias
            return y if self.dtype is None else y.astype(self.dtype)
        if self.dtype is not None:
            x = x.astype(jnp.float32)
        if mask is None and self.groups == 1:
            if not self.is_initializing():
                # The same statistics as batch_normalize computes (XLA computes them once).
                mean, var, _ = _batch_stats(jax.lax.stop_gradient(x))
                count = x.size // x.shape[-1]
                self._update(running_mean, running_var, mean, var, count)
            y = batch_normalize(x, scale, bias, self.epsilon)
        else:
            if mask is None:
                mask = jnp.ones(x.shape[0], jnp.float32)
            if x.shape[0] % self.groups:
                raise ShapeError(
                    f"{self.name} (BatchNorm): a batch of {x.shape[0]} does not split into {self.groups} "
                    "equal groups; pad it to a multiple (padding rows masked out)."
                )
            parts = x.reshape(self.groups, -1, *x.shape[1:])
            masks = mask.astype(jnp.float32).reshape(self.groups, -1)
            if not self.is_initializing():
                mean, var, _, count = jax.vmap(_masked_batch_stats)(jax.lax.stop_gradient(parts), masks)
                self._update(running_mean, running_var, mean[0], var[0], count[0])
            y = jax.vmap(lambda part, rows: masked_batch_normalize(part, scale, bias, rows, self.epsilon))(
                parts, masks
            )
            y = y.reshape(x.shape)
        return y if self.dtype is None else y.astype(self.dtype)

    def _update(
        self, running_mean: Any, running_var: Any, mean: jax.Array, var: jax.Array, count: Any
    ) -> None:
        """The running statistics after a batch of `count` values per channel."""
        if self.unbiased:
            var = var * (count / (count - 1))
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var


@lowers(BatchNorm)
def batchnorm(node: BatchNorm, name: str, compute: Compute) -> Layer:
    """`SpecBatchNorm` with Flax's momentum convention (1 - the spec's), the node's
    running-variance convention (its variables are `nn.BatchNorm`'s) and the compute settings."""

    def layer(inputs: Sequence[jax.Array], mode: Mode) -> jax.Array:
        (x,) = inputs
        if mode.train and mode.mask is None and x.size // x.shape[-1] < 2:
            raise ShapeError(
                f"{node.name} (BatchNorm): training mode needs more than one value per channel; got "
                f"a batch of shape {x.shape} (NHWC). Use a larger batch or evaluation mode."
            )
        module = SpecBatchNorm(
            momentum=1 - node.momentum,
            epsilon=node.eps,
            unbiased=node.running_variance == "unbiased",
            dtype=compute.dtype,
            groups=compute.groups,
            name=name,
        )
        return module(x, mode.train, mode.mask)

    return layer


@lowers(ReLU)
def relu(node: ReLU, name: str, compute: Compute) -> Layer:
    return lambda inputs, mode: nn.relu(inputs[0])


@lowers(Add)
def add(node: Add, name: str, compute: Compute) -> Layer:
    return lambda inputs, mode: functools.reduce(jnp.add, inputs)


@lowers(MaxPool2d)
def maxpool2d(node: MaxPool2d, name: str, compute: Compute) -> Layer:
    """`nn.max_pool` pads with -inf, explicit or SAME."""
    return lambda inputs, mode: nn.max_pool(inputs[0], node.kernel, node.stride, _padding(node.padding))


@lowers(AvgPool2d)
def avgpool2d(node: AvgPool2d, name: str, compute: Compute) -> Layer:
    """`nn.avg_pool`, whose `count_include_pad=False` divides by a pooled map of ones (explicit or SAME)."""

    def layer(inputs: Sequence[jax.Array], mode: Mode) -> jax.Array:
        padding, include = _padding(node.padding), node.count_include_pad
        return nn.avg_pool(inputs[0], node.kernel, node.stride, padding, count_include_pad=include)

    return layer


@lowers(Pad2d)
def pad2d(node: Pad2d, name: str, compute: Compute) -> Layer:
    """Zeros on the spatial axes of NHWC."""
    return lambda inputs, mode: jnp.pad(inputs[0], ((0, 0), *node.padding, (0, 0)))


@lowers(GlobalAvgPool)
def global_avgpool(node: GlobalAvgPool, name: str, compute: Compute) -> Layer:
    return lambda inputs, mode: jnp.mean(inputs[0], axis=(1, 2), keepdims=True)


@lowers(Flatten)
def flatten(node: Flatten, name: str, compute: Compute) -> Layer:
    """NHWC -> (N, C*H*W) in the spec's channel-major order, so Dense weights need no permuting."""

    def layer(inputs: Sequence[jax.Array], mode: Mode) -> jax.Array:
        (x,) = inputs
        return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)

    return layer


@lowers(Dense)
def dense(node: Dense, name: str, compute: Compute) -> Layer:
    def layer(inputs: Sequence[jax.Array], mode: Mode) -> jax.Array:
        (x,) = inputs
        bound = 1 / math.sqrt(x.shape[-1])
        linear = nn.Dense(
            node.out_features,
            use_bias=node.bias,
            precision=compute.precision,
            dtype=compute.dtype,
            kernel_init=_uniform(bound),
            bias_init=_uniform(bound),
            name=name,
        )
        return linear(x)

    return layer


def _run(
    graph: Graph, depth: int, env: dict[str, jax.Array], names: Sequence[str], mode: Mode, compute: Compute
) -> dict[str, jax.Array]:
    """Evaluate the nodes `names` (in order) inside the current module, whose names share the
    first `depth` segments; consecutive nodes under a deeper prefix go to a namespace module."""
    env = dict(env)
    namespaces: dict[str, Namespace] = {}
    for segment, run in groupby(names, key=lambda name: name.split(".")[depth]):
        run = tuple(run)
        if run[0].count(".") == depth:
            node = graph[run[0]]
            lowered = LOWERINGS[type(node)](node, segment, compute)
            env[node.name] = lowered([env[source] for source in node.inputs], mode)
        else:
            if segment not in namespaces:
                namespaces[segment] = Namespace(graph, depth + 1, compute, name=segment)
            env = namespaces[segment](env, run, mode)
    return env


class Namespace(nn.Module):
    """A level of the canonical name hierarchy (`layer1`, then `0` in `layer1.0.conv1`).

    It holds no variables of its own; it scopes the modules of the nodes below it. The graph is
    evaluated in its order, so a namespace whose nodes are not consecutive is simply called again.
    """

    graph: Graph
    depth: int
    compute: Compute = Compute()

    @nn.compact
    def __call__(self, env: dict[str, jax.Array], names: Sequence[str], mode: Mode) -> dict[str, jax.Array]:
        return _run(self.graph, self.depth, env, names, mode, self.compute)


class Model(nn.Module):
    """A spec Graph as a flax.linen Module; submodules are named by the canonical node names.

    Call it as any linen module: `variables = model.init(key, x)`, `model.apply(variables, x)`,
    and in training `model.apply(variables, x, train=True, mutable=['batch_stats'])`. `layout`
    is that of inputs and 4-D outputs: "NHWC" (native) or "NCHW" (transposed at the boundary,
    exactly equivalent). One output is returned as an array, several as a tuple. With a compute
    `dtype` the inputs are cast to it and the outputs come in it; `groups` and the training
    `mask` are BatchNorm's (see `SpecBatchNorm`). `conv_as_matmul` (None: when JAX's default
    backend is the CPU) runs convolutions as im2col and a matmul where `matmul_pays`.
    """

    graph: Graph
    layout: str = "NHWC"
    precision: Any = "highest"
    dtype: Any = None
    groups: int = 1
    conv_as_matmul: bool | None = None

    @nn.compact
    def __call__(
        self, *inputs: jax.Array, train: bool = False, mask: jax.Array | None = None
    ) -> jax.Array | tuple[jax.Array, ...]:
        env = {}
        for x, name in zip(inputs, self._check_inputs(inputs), strict=True):
            x = jnp.asarray(x) if self.dtype is None else jnp.asarray(x, self.dtype)
            env[name] = jnp.transpose(x, (0, 2, 3, 1)) if self.layout == "NCHW" else x
        names = [node.name for node in self.graph.nodes]
        as_matmul = jax.default_backend() == "cpu" if self.conv_as_matmul is None else self.conv_as_matmul
        compute = Compute(self.precision, self.dtype, self.groups, as_matmul)
        env = _run(self.graph, 0, env, names, Mode(train, mask), compute)
        outputs = tuple(
            jnp.transpose(env[o], (0, 3, 1, 2)) if self.layout == "NCHW" and env[o].ndim == 4 else env[o]
            for o in self.graph.outputs
        )
        return outputs[0] if len(outputs) == 1 else outputs

    def _check_inputs(self, inputs: Sequence[jax.Array]) -> list[str]:
        """Input names in order, after checking the shapes (a ShapeError says what was expected)."""
        graph, layout = self.graph, check_layout(self.layout)
        names = [spec.name for spec in graph.inputs]
        if len(inputs) != len(names):
            raise ShapeError(f"{graph.name}: expects {len(names)} input(s) {names}; got {len(inputs)}.")
        if len(inputs) == 1:
            check_input_shape(graph, np.shape(inputs[0]), layout)
            return names
        shapes = {}
        for spec, x in zip(graph.inputs, inputs, strict=True):
            shape = tuple(np.shape(x))
            if len(shape) != 4:
                raise ShapeError(f"{graph.name}: input {spec.name!r} must be 4-D in {layout}; got {shape}.")
            shapes[spec.name] = (shape[0], shape[3], shape[1], shape[2]) if layout == "NHWC" else shape
        try:
            infer_shapes(graph, shapes)
        except SpecError as error:
            raise ShapeError(f"{graph.name}: inputs do not fit: {error}") from None
        return names


def build(
    graph: Graph,
    layout: str = "NHWC",
    precision: Any = "highest",
    dtype: Any = None,
    groups: int = 1,
    conv_as_matmul: bool | None = None,
) -> Model:
    """The linen Module of `graph`, unbound: get variables from `model.init` or `load_variables`.

    `precision` applies to convolutions and dense layers; "highest" keeps float32 exact on
    accelerators (pass None for the faster TF32/bfloat16 defaults of GPUs and TPUs). `dtype` is
    the compute dtype of mixed precision (`jnp.bfloat16`, `jnp.float16`; parameters stay
    float32) and `groups` the number of separate BatchNorm statistics (see `SpecBatchNorm`).
    `conv_as_matmul` runs the convolutions that XLA:CPU computes faster as a matmul that way
    (`matmul_pays`); None decides by JAX's default backend (the CPU: yes; GPUs and TPUs: no).
    """
    return Model(graph, check_layout(layout), precision, dtype, groups, conv_as_matmul)
