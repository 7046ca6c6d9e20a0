"""Where and how an MXNet Runner computes (`multires.backend.Execution`): contexts, AMP's mixed
precision, and data-parallel forward passes with BatchNorm synchronised over the contexts.

- Devices are MXNet contexts: `cpu` (or `cpu(N)`, `cpu:N`) and `gpu` (or `gpu(N)`, `gpu:N`).
  `devices=N` takes N consecutive contexts from there, `mx.cpu(0)`, `mx.cpu(1)`, ... on the CPU,
  as the book's MXNet edition and `gluon.Trainer` use several GPUs: every parameter has a copy on
  every context, `split_and_load`-style shards run on each, a kvstore sums the gradients and each
  context applies the same update. CPU contexts are MXNet's own (each has its engine workers, all
  over the same cores); this machine's core count, or `MULTIRES_CPU_DEVICES` if larger, bounds them.
- Mixed precision is MXNet AMP's: the ops AMP lists for the target dtype
  (`amp.list_lp16_ops`: Convolution and FullyConnected for bfloat16, with Deconvolution and RNN for
  float16) compute in it through `amp_cast`, everything else in float32, and float16 gets AMP's
  dynamic `LossScaler` on the `gluon.Trainer`. As in MXNet 1.9 AMP, bfloat16 runs on the CPU
  (oneDNN) and float16 on GPUs. `amp.init()` is not called: it rewrites `mx.nd` and `mx.sym`
  for the whole process, irreversibly, so every model built after it (float32 runners too)
  would compute in low precision; the casts live in the model's own blocks instead
  (`lowering.set_compute_dtype`).
- Synchronised BatchNorm is `synchronised_forward`. `mx.gluon.contrib.nn.SyncBatchNorm` does
  not fit the spec: its C++ op (`sync_batch_norm-inl.h`) averages each device's E[x] and E[x^2]
  with equal weights (wrong for shards of different sizes), takes the variance as
  E[x^2] - E[x]^2 in one pass, updates the running variance in backward with the biased
  variance, and needs every device's forward running at once behind a barrier.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, nd
from mxnet.contrib import amp
from mxnet.runtime import Features

from multires.backend import CPU_DEVICES_ENV, PRECISIONS, Execution, too_many_devices, unknown_device
from multires.errors import DeviceError
from multires.graph import BatchNorm

from .lowering import BatchNorm2D, GraphBlock

AMP_DTYPES: dict[str, Any] = {"bf16": amp.amp.bfloat16, "fp16": np.dtype("float16")}
"""`Execution.precision` -> the dtype MXNet AMP computes its listed ops in."""

_DEVICE = re.compile(r"^(cpu|gpu)(?:\((\d+)\)|:(\d+))?$")


def _gpu_count() -> int:
    try:
        return mx.context.num_gpus()
    except mx.base.MXNetError:  # a CUDA build without a driver
        return 0


def available_devices() -> list[str]:
    """The devices this MXNet build sees: `cpu`, then `gpu(N)` for each GPU."""
    return ["cpu", *(f"gpu({index})" for index in range(_gpu_count()))]


def cpu_contexts() -> int:
    """How many CPU contexts data parallelism may use: the core count, or `MULTIRES_CPU_DEVICES`
    where that is larger."""
    value = os.environ.get(CPU_DEVICES_ENV, "").strip()
    if value and not value.isdigit():
        raise DeviceError(f"{CPU_DEVICES_ENV} must be a number of CPU devices; got {value!r}.")
    return max(os.cpu_count() or 1, int(value or 0))


def resolve_contexts(execution: Execution) -> list[mx.Context]:
    """The `execution.devices` contexts to compute on, from `execution.device` (None: the CPU);
    a DeviceError listing the devices there are, or saying how to expose more."""
    name = (execution.device or "cpu").strip().lower().replace(" ", "")
    match = _DEVICE.match(name)
    available = available_devices()
    if not match:
        raise unknown_device("mxnet", str(execution.device), available, " Use cpu, gpu, gpu(N) or gpu:N.")
    kind, first = match[1], int(match[2] or match[3] or 0)
    devices = execution.devices
    if kind == "cpu":
        limit = cpu_contexts()
        if first + devices > limit:
            raise too_many_devices(
                "mxnet",
                devices,
                [f"cpu({index})" for index in range(first, limit)],
                f"MXNet's CPU contexts share this machine's cores, one per core by default; set "
                f"{CPU_DEVICES_ENV}={first + devices} to allow more.",
            )
        return [mx.cpu(first + index) for index in range(devices)]
    gpus = _gpu_count()
    if first >= gpus:
        hint = (
            " This MXNet build has no CUDA: install a CUDA build (e.g. mxnet-cu112)."
            if not Features().is_enabled("CUDA")
            else " MXNet sees no such GPU: check the driver and CUDA_VISIBLE_DEVICES."
        )
        raise unknown_device("mxnet", str(execution.device), available, hint)
    if first + devices > gpus:
        raise too_many_devices(
            "mxnet",
            devices,
            [f"gpu({index})" for index in range(first, gpus)],
            f"MXNet sees {gpus} GPU(s) (mx.context.num_gpus()); expose more with CUDA_VISIBLE_DEVICES, "
            "or use fewer devices.",
        )
    return [mx.gpu(first + index) for index in range(devices)]


def compute_dtype(precision: str, context: mx.Context) -> Any | None:
    """The dtype AMP computes its listed ops in for `precision` on `context` (None for fp32); a
    DeviceError where MXNet AMP has no such precision there."""
    if precision == "fp32":
        return None
    on_gpu = context.device_type == "gpu"
    if precision == "fp16" and not on_gpu:
        raise DeviceError(
            "precision 'fp16': MXNet AMP computes float16 on GPUs only (its CPU kernels have no "
            "float16 matrix products; they take bfloat16, through oneDNN): on the CPU use "
            "precision='bf16' or 'fp32', or device='gpu' for fp16."
        )
    if precision == "bf16" and on_gpu:
        raise DeviceError(
            "precision 'bf16': MXNet 1.9 AMP computes bfloat16 on the CPU only (oneDNN; it has no "
            "GPU bfloat16 kernels): on a GPU use precision='fp16' (float16 with loss scaling) or "
            "'fp32', or the torch, tf or flax backend for bfloat16."
        )
    if precision == "bf16":
        _check_bfloat16(context)
    return AMP_DTYPES[precision]


def precisions(context: mx.Context | None = None) -> tuple[str, ...]:
    """The `multires.PRECISIONS` a Runner computes in on `context` (default: the CPU) with this
    MXNet build and machine: fp32, and bf16 on a CPU with oneDNN and AVX-512, or fp16 on a GPU."""
    found = []
    for precision in PRECISIONS:
        try:
            compute_dtype(precision, context or mx.cpu())
        except DeviceError:
            continue
        found.append(precision)
    return tuple(found)


def _check_bfloat16(context: mx.Context) -> None:
    """A DeviceError unless this build and CPU run a bfloat16 convolution and its backward."""
    problem = None if Features().is_enabled("MKLDNN") else "this MXNet build has no oneDNN (MKLDNN)"
    if problem is None:
        try:
            x = nd.ones((1, 1, 3, 3), ctx=context)
            x.attach_grad()
            with autograd.record():
                low = nd.amp_cast(x, dtype=AMP_DTYPES["bf16"])
                y = nd.Convolution(low, low, kernel=(3, 3), num_filter=1, no_bias=True)
            y.backward()
            x.grad.wait_to_read()
        except mx.base.MXNetError as error:
            problem = str(error).strip().splitlines()[0]
    if problem is not None:
        raise DeviceError(
            f"precision 'bf16': MXNet AMP cannot compute bfloat16 on this CPU ({problem}); it needs an MXNet "
            "build with oneDNN and a CPU with AVX-512. Use precision='fp32', or the torch, tf or "
            "flax backend for bfloat16."
        )


def synchronised_forward(model: GraphBlock, shards: Sequence[Sequence[nd.NDArray]]) -> list[Any]:
    """The model's training-mode outputs for each context's shard (inputs on their contexts),
    every BatchNorm normalising with the statistics of all the shards together.

    Node by node, each context runs the node's block on its shard (hybridized blocks through
    their own cached ops), except BatchNorm, which is `_synchronised_batchnorm` over all of them;
    autograd records the cross-context copies, so each context's gradients include the other
    contexts' losses through the shared statistics. The running statistics of every context get
    the spec's update from the global mean and variance with the global count, so they stay equal.
    """
    graph = model.graph
    shapes = tuple(tuple(v.shape) for v in shards[0])
    rows = sum(shard[0].shape[0] for shard in shards)
    counts, same_pads = model._plan(((rows, *shapes[0][1:]), *shapes[1:]), True)
    model._set_same_padding(same_pads)
    values = [dict(zip((i.name for i in graph.inputs), shard, strict=True)) for shard in shards]
    statistics: list[nd.NDArray] = []
    for node in graph.nodes:
        block = model.blocks[node.name]
        if isinstance(node, BatchNorm):
            outputs, mean, var = _synchronised_batchnorm(
                block, [v[node.inputs[0]] for v in values], counts[node.name]
            )
            statistics += [mean, var]
        else:
            outputs = [block(*(v[source] for source in node.inputs)) for v in values]
        for value, out in zip(values, outputs, strict=True):
            value[node.name] = out
    with autograd.pause():
        for context in _contexts(model):  # those without a shard (a batch smaller than the devices) too
            model._update_running(tuple(s.as_in_context(context) for s in statistics), counts, context)
    outputs = [tuple(v[name] for name in graph.outputs) for v in values]
    return [out[0] if len(out) == 1 else out for out in outputs]


def _contexts(model: GraphBlock) -> list[mx.Context]:
    """The contexts the model's parameters are on, in their order."""
    return next(iter(model.collect_params().values())).list_ctx()


def _synchronised_batchnorm(
    block: BatchNorm2D, xs: list[nd.NDArray], count: int
) -> tuple[list[nd.NDArray], nd.NDArray, nd.NDArray]:
    """BatchNorm over the union of the shards `xs` (one per context, `count` values per channel in
    all): each shard's output, and the global mean and biased variance (on the first context).

    Two passes, as the spec says: the mean, then the mean of squared deviations from it. The
    first pass sums `x - s`, with `s` one sample of each channel (the shift `BatchNorm2D` uses
    too), so the float32 sums run over values near zero even for channels far from it.
    """
    first = xs[0].context
    shift = nd.BlockGrad(xs[0][0:1, :, 0:1, 0:1])

    def total(parts: list[nd.NDArray]) -> nd.NDArray:
        return nd.add_n(*(part.as_in_context(first) for part in parts))

    shifted = total([nd.sum(x - shift.as_in_context(x.context), axis=(0, 2, 3)) for x in xs])
    mean = shift.reshape(-1) + shifted / count
    centred = [x - mean.as_in_context(x.context).reshape((1, -1, 1, 1)) for x in xs]
    var = total([nd.sum(c * c, axis=(0, 2, 3)) for c in centred]) / count
    scale = nd.rsqrt(var + block.eps)
    outputs = []
    for c in centred:
        context = c.context
        gamma, beta = block.gamma.data(context), block.beta.data(context)
        factor = (gamma * scale.as_in_context(context)).reshape((1, -1, 1, 1))
        outputs.append(nd.broadcast_add(nd.broadcast_mul(c, factor), beta.reshape((1, -1, 1, 1))))
    return outputs, mean, var
