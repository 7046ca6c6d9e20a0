"""Where and how a torch Runner computes (`multires.backend.Execution`): device, mixed precision
and DistributedDataParallel processes.

- Devices are torch's: `cpu`, `cuda`, `cuda:N`, `mps`.
- Mixed precision is `torch.autocast` in bfloat16 or float16 (with a `torch.amp.GradScaler`
  for float16, in the runner); parameters and buffers stay float32.
- Data parallelism is one process per device, as torchrun starts them: `devices=N` joins the
  process group of N processes (gloo on the CPU, NCCL on CUDA, where each process takes
  `cuda:LOCAL_RANK`), or starts it from torchrun's environment. BatchNorm statistics over the
  global batch are `SyncBatchNorm2d`: PyTorch's `nn.SyncBatchNorm` runs on GPUs only (2.13 raises
  "SyncBatchNorm expected input tensor to be on GPU" for CPU tensors), and it has no biased
  running variance.
"""

from __future__ import annotations

import atexit
import inspect
import os
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from multires.backend import Execution, too_many_devices, unknown_device
from multires.errors import DeviceError
from multires.launch import threads_per_process

from .lowering import BiasedVarianceBatchNorm2d

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""`Execution.precision` -> the dtype `torch.autocast` computes in."""

FP16_INITIAL_SCALE = 2.0**10
"""The float16 GradScaler's first loss scale. torch's default, 2**16, overflows float16 in the
backward of d2l_resnet18's first steps (28x28 and 64x64 images, batch 8 to 32; 2**14 too), and
GradScaler skips such steps, so the first updates would be lost; from 2**8 to 2**12 the first step is
taken with the same error (no underflow). The scale doubles after each 2000 steps without overflow."""

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""The environment torchrun gives each process, from which `join_processes` starts the group."""


def available_devices() -> list[str]:
    """The devices this PyTorch build sees: `cpu`, then `cuda:N` for each GPU, then `mps`."""
    devices = ["cpu", *(f"cuda:{index}" for index in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(name: str | None) -> torch.device:
    """The torch device called `name` (None: the CPU), or a DeviceError listing those that exist."""
    available = available_devices()
    try:
        device = torch.device(name or "cpu")
    except (RuntimeError, TypeError):
        raise unknown_device("torch", str(name), available, " Use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            hint = (
                " This PyTorch build has no CUDA: install a CUDA build of torch."
                if torch.version.cuda is None
                else " CUDA sees no GPU: check the driver and CUDA_VISIBLE_DEVICES."
            )
            raise unknown_device("torch", str(name), available, hint)
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise unknown_device("torch", str(name), available)
        return torch.device("cuda", index)
    if device.type == "mps" and torch.backends.mps.is_available():
        return torch.device("mps")
    raise unknown_device("torch", str(name), available)


@dataclass(frozen=True)
class Processes:
    """This process's place among the data-parallel processes."""

    rank: int
    device: torch.device


def join_processes(execution: Execution) -> Processes:
    """Join the torch.distributed group of `execution.devices` processes, starting it from
    torchrun's environment if the program has not; DeviceError if this is no such group.

    The group's backend is NCCL for `device="cuda"` (each process on `cuda:LOCAL_RANK`) and gloo on
    the CPU, where each process gets an equal share of the machine's cores as torch threads.
    """
    devices = execution.devices
    requested = resolve_device(execution.device)
    if requested.type == "mps":
        raise DeviceError(
            "torch.distributed has no MPS backend: data parallelism (devices > 1) runs on the CPU "
            "(gloo) or on CUDA GPUs (NCCL); use devices=1 on mps."
        )
    if requested.type == "cuda" and ":" in str(execution.device):
        raise DeviceError(
            f"devices={devices} runs one process per GPU, each on cuda:LOCAL_RANK; pass device='cuda', "
            f"not {execution.device!r} (choose the GPUs with CUDA_VISIBLE_DEVICES)."
        )
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        missing = [name for name in TORCHRUN_ENV if name not in os.environ]
        if missing:
            raise too_many_devices(
                "torch",
                devices,
                [str(requested)],
                f"PyTorch runs one process per device: launch the program with `torchrun "
                f"--nproc_per_node {devices} script.py` (or `multires train --devices {devices}`, "
                f"which relaunches itself under torchrun); on several machines, torchrun's --nnodes, "
                f"--node_rank and --master_addr. (Not set here: {', '.join(missing)}.)",
            )
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != devices:
        raise DeviceError(
            f"devices={devices}, but this torch.distributed run has {world} processes (WORLD_SIZE): "
            f"pass devices={world}, or launch {devices} processes (torchrun --nproc_per_node)."
        )
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if requested.type == "cuda":
        gpus = torch.cuda.device_count()
        if local_world > gpus:
            raise too_many_devices(
                "torch",
                local_world,
                [f"cuda:{index}" for index in range(gpus)],
                f"Each process needs its own GPU: start at most {gpus} per machine (torchrun "
                "--nproc_per_node), or add machines with torchrun's --nnodes.",
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(threads_per_process(local_world))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # A process that exits with the group alive can abort in gloo's threads ("terminate called
        # without an active exception") and take its peers down with it: close the group first.
        atexit.register(_close_processes)
    return Processes(rank, device)


def _close_processes() -> None:
    """Destroy the process group `join_processes` started, if it is still open."""
    if dist.is_initialized():
        dist.destroy_process_group()


def distributed(model: nn.Module, device: torch.device, sync_batchnorm: bool) -> DistributedDataParallel:
    """`model` in DistributedDataParallel. Without synchronised BatchNorm, DDP broadcasts rank 0's
    running statistics before each forward pass (its buffer sync: torch 2.13's
    `forward_sync_buffers`, earlier releases' `broadcast_buffers`); with it, every process
    computes the same statistics and nothing needs broadcasting."""
    sync_buffers = not sync_batchnorm
    name = "forward_sync_buffers"
    if name not in inspect.signature(DistributedDataParallel).parameters:
        name = "broadcast_buffers"
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **{name: sync_buffers})


def autocast(device: torch.device, precision: str) -> Callable[[], AbstractContextManager[object]]:
    """A factory of the context in which forward passes compute in `precision`: `torch.autocast`
    in bfloat16 or float16, nothing for fp32. A DeviceError if the device cannot (torch would
    only warn and compute in float32)."""
    if precision == "fp32":
        return nullcontext
    dtype = AUTOCAST_DTYPES[precision]
    if (
        device.type == "cuda"
        and dtype == torch.bfloat16
        and not torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        raise DeviceError(
            f"{torch.cuda.get_device_name(device)} has no bfloat16 arithmetic; use precision='fp16' "
            "(float16 with loss scaling) or 'fp32'."
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            torch.autocast(device.type, dtype=dtype)
        except (UserWarning, RuntimeError) as problem:
            other = "fp16" if precision == "bf16" else "bf16"
            reason = " ".join(str(problem).split())
            raise DeviceError(
                f"torch.autocast cannot compute in {precision} on {device}: {reason} "
                f"Use precision='{other}' or 'fp32'."
            ) from None
    return lambda: torch.autocast(device.type, dtype=dtype)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose training-mode statistics are over the global batch of every
    process in the torch.distributed group, on any device (CPU included).

    The mean is the all-reduced sum over the all-reduced count, then the variance the all-reduced
    sum of squared deviations from it (two passes, in float32 under autocast); the running
    variance takes the unbiased estimate with the global count (`n / (n - 1)`) or, with
    `unbiased=False`, the biased one. The all-reduces are differentiable (their backward
    all-reduces the gradients), so each process's gradient includes the other processes' losses
    through the shared statistics.
    Eval mode, parameters and state_dict keys are `nn.BatchNorm2d`'s.
    """

    def __init__(self, num_features: int, eps: float, momentum: float, unbiased: bool = True) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.unbiased = unbiased

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        values = x.float()
        local = torch.cat([values.sum((0, 2, 3)), values.new_tensor([values.numel() // values.shape[1]])])
        totals = _all_reduce(local)
        count = totals[-1]
        mean = (totals[:-1] / count)[:, None, None]
        centred = values - mean
        var = _all_reduce((centred * centred).sum((0, 2, 3))) / count
        with torch.no_grad():
            running = var * (count / (count - 1)) if self.unbiased else var
            self.running_mean.lerp_(mean.flatten(), self.momentum)
            self.running_var.lerp_(running, self.momentum)
            self.num_batches_tracked.add_(1)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (centred * scale[:, None, None] + self.bias[:, None, None]).to(x.dtype)

    def extra_repr(self) -> str:
        variance = "unbiased" if self.unbiased else "biased"
        return f"{super().extra_repr()}, synchronised, running_variance={variance}"

    @classmethod
    def convert(cls, model: nn.Module) -> nn.Module:
        """Replace every `nn.BatchNorm2d` of `model` (in place, before its weights are loaded) by
        one of these with the same features, eps, momentum and running-variance convention."""
        for path, module in list(model.named_modules()):
            if isinstance(module, nn.BatchNorm2d) and not isinstance(module, cls):
                unbiased = not isinstance(module, BiasedVarianceBatchNorm2d)
                synced = cls(module.num_features, module.eps, module.momentum, unbiased)
                parent, _, leaf = path.rpartition(".")
                setattr(model.get_submodule(parent), leaf, synced)
        return model


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over the process group (differentiable); itself outside one."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        return _AllReduce.apply(tensor)
    return tensor


class _AllReduce(torch.autograd.Function):
    """A summing all-reduce whose gradient is the all-reduced sum of the processes' gradients
    (as `torch.distributed.nn.functional.all_reduce`, deprecated in 2.13 for a private module)."""

    @staticmethod
    def forward(ctx: object, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduce.apply(grad)


def gather_rows(shard: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every process's `shard` stacked in rank order, process r holding `sizes[r]` rows (padded
    to the largest for the collective, as gloo's all_gather needs equal sizes)."""
    padded = F.pad(shard, (0, 0) * (shard.dim() - 1) + (0, max(sizes) - shard.shape[0]))
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])
