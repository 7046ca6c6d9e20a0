"""Where and how a TensorFlow Runner computes (`multires.backend.Execution`): device names,
logical CPU devices, the `tf.distribute` strategy and the Keras dtype policy.

TensorFlow fixes its device list when its runtime starts (the first op, variable or device
query), so the number of logical CPU devices that data parallelism needs on a CPU-only machine
is configured when this backend is imported, from `MULTIRES_CPU_DEVICES`
(`multires.backend.CPU_DEVICES_ENV`), or by `use_cpu_devices(n)` before TensorFlow starts.

Devices are named as TensorFlow names them, case-insensitively: "CPU", "GPU", "GPU:1" ("cuda"
is an alias of "GPU", and "/device:" or "/" prefixes are accepted). No device means
TensorFlow's default placement: the first GPU if there is one, else the CPU.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from functools import cache

import tensorflow as tf

from multires.backend import CPU_DEVICES_ENV, Execution, too_many_devices, unknown_device
from multires.errors import DeviceError

POLICIES = {"fp32": None, "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
"""Precision -> the Keras dtype policy given to each layer of the model (None: float32)."""

_NAME = re.compile(r"^(?:/?device:|/)?(cpu|gpu|cuda)(?::(\d+))?$", re.IGNORECASE)


def _cpu_hint(devices: int) -> str:
    return (
        f"TensorFlow fixes its devices when it starts: set {CPU_DEVICES_ENV}={devices} before the first "
        f"use of TensorFlow (multires train --devices {devices} does), or call "
        f"multires.backends.tf.use_cpu_devices({devices}) before anything else starts it."
    )


def use_cpu_devices(n: int) -> None:
    """Split the CPU into `n` logical devices, so `devices=n` runs data parallel on a CPU-only
    machine. TensorFlow allows this only before its runtime starts; once started with fewer
    CPU devices it raises a DeviceError saying to set `MULTIRES_CPU_DEVICES=n` beforehand."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DeviceError(f"use_cpu_devices takes a positive number of devices; got {n!r}.")
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or [None]) >= n:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:
        have = [d.name for d in tf.config.list_logical_devices("CPU")]
        if len(have) < n:
            raise DeviceError(
                f"TensorFlow already started with {len(have)} CPU device(s) ({', '.join(have)}); "
                f"{n} were asked for. {_cpu_hint(n)}"
            ) from None


def configure_from_environment() -> None:
    """Apply `MULTIRES_CPU_DEVICES` at import; a runtime that already started is left as it is
    (a Runner asking for more devices then says how to get them)."""
    value = os.environ.get(CPU_DEVICES_ENV, "").strip()
    if not value:
        return
    if not value.isdigit() or int(value) < 1:
        raise DeviceError(
            f"{CPU_DEVICES_ENV} must be a positive integer (a number of CPU devices); got {value!r}."
        )
    with contextlib.suppress(DeviceError):
        use_cpu_devices(int(value))


def available_devices() -> list[str]:
    """The logical devices TensorFlow sees, as "CPU:0", "GPU:0", ... (starts its runtime)."""
    return [device.name.removeprefix("/device:") for device in tf.config.list_logical_devices()]


@dataclass(frozen=True)
class Placement:
    """The resolved `Execution`: device names, the strategy over them and the Keras dtype policy."""

    devices: tuple[str, ...]
    strategy: tf.distribute.Strategy
    policy: str | None

    @property
    def replicas(self) -> int:
        """How many devices share each batch."""
        return len(self.devices)


def place(execution: Execution) -> Placement:
    """The devices, strategy and dtype policy `execution` asks for, or a DeviceError naming what
    is missing: an unknown or absent device lists those that exist, too many devices says how to
    expose more, a precision the device cannot run says what to use instead.

    One device computes under a `OneDeviceStrategy`, several under a `MirroredStrategy`, so the
    step is the same replica function either way."""
    kind, first = _parse(execution.device)
    present = [name for name in available_devices() if name.startswith(f"{kind}:")]
    wanted = [f"{kind}:{index}" for index in range(first, first + execution.devices)]
    if wanted[0] not in present:
        hint = ""
        if kind == "GPU" and not present:
            hint = (
                " This TensorFlow build sees no GPU (tensorflow-cpu, a build without CUDA, or no driver); "
                "use device='CPU'."
            )
        raise unknown_device("tf", execution.device or kind, available_devices(), hint)
    if not set(wanted) <= set(present):
        how = (
            _cpu_hint(execution.devices)
            if kind == "CPU"
            else f"Use devices <= {len(present) - first} from {wanted[0]}, or make more GPUs visible "
            "(CUDA_VISIBLE_DEVICES)."
        )
        raise too_many_devices("tf", execution.devices, present, how)
    _check_precision(execution.precision, kind, wanted)
    return Placement(tuple(wanted), _strategy(tuple(wanted)), POLICIES[execution.precision])


@cache
def _strategy(devices: tuple[str, ...]) -> tf.distribute.Strategy:
    """One strategy per device set, shared by the runners on it: every `MirroredStrategy` numbers
    its collective operations from the same start, so a second one over the same devices would
    reuse the first one's keys and its all-reduces would meet the other's ("Shape mismatch in
    the collective instance 100")."""
    if len(devices) == 1:
        return tf.distribute.OneDeviceStrategy(devices[0])
    return tf.distribute.MirroredStrategy(list(devices))


def _parse(device: str | None) -> tuple[str, int]:
    """("CPU" or "GPU", first index) of a device name; None is TensorFlow's default device."""
    if device is None:
        return ("GPU" if tf.config.list_physical_devices("GPU") else "CPU"), 0
    match = _NAME.match(device.strip())
    if match is None:
        raise unknown_device(
            "tf", device, available_devices(), " Name a device as TensorFlow does: 'CPU', 'GPU' or 'GPU:1'."
        )
    kind = "CPU" if match[1].lower() == "cpu" else "GPU"
    return kind, int(match[2] or 0)


def _check_precision(precision: str, kind: str, devices: list[str]) -> None:
    """bfloat16 needs a GPU of compute capability 8.0 (Ampere) or later; CPUs run both mixed
    precisions (bfloat16 natively with oneDNN, float16 emulated and slow)."""
    if precision != "bf16" or kind != "GPU":
        return
    gpus = tf.config.list_physical_devices("GPU")
    for name in devices:
        index = int(name.split(":")[1])
        if index >= len(gpus):  # a logical GPU beyond the physical ones: nothing to ask
            continue
        details = tf.config.experimental.get_device_details(gpus[index])
        capability = details.get("compute_capability")
        if capability is not None and tuple(capability) < (8, 0):
            raise DeviceError(
                f"backend 'tf': {name} ({details.get('device_name', 'a GPU')}, compute capability "
                f"{capability[0]}.{capability[1]}) has no bfloat16 arithmetic (it needs 8.0 or later); "
                "use precision='fp16' (float16 with loss scaling) or 'fp32'."
            )
