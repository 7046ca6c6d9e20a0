"""Where the Flax runner computes: JAX devices by name, XLA host devices for data parallelism on
a CPU-only machine, and multi-process JAX.

A device is a JAX platform and an index: "cpu", "gpu", "gpu:1" ("cuda" and "cuda:1" spell the
GPU as torch does). JAX fixes its device list when it starts, so the CPU device count
(`multires.backend.CPU_DEVICES_ENV`) is applied when this backend is imported, before JAX's
first use; `initialize_distributed` joins several processes into one device list.
"""

from __future__ import annotations

import os
import re

import jax

from multires.backend import CPU_DEVICES_ENV, Execution, too_many_devices, unknown_device
from multires.errors import DeviceError

PLATFORM_ALIASES = {"cuda": "gpu"}
"""Other names of a JAX platform."""

_BACKEND = "flax"


def expose_cpu_devices() -> None:
    """Start JAX with `MULTIRES_CPU_DEVICES` CPU devices (XLA host devices) if it is set, so data
    parallelism runs on a CPU-only machine. Once JAX has started its count stands (`resolve`
    then reports a shortfall)."""
    value = os.environ.get(CPU_DEVICES_ENV, "").strip()
    if not value:
        return
    if not value.isdigit() or int(value) < 1:
        raise DeviceError(f"{CPU_DEVICES_ENV} must be a positive number of CPU devices; got {value!r}.")
    try:
        jax.config.update("jax_num_cpu_devices", int(value))
    except AttributeError:  # an older JAX, without the option, reads the XLA flag when it starts
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={value}".strip()
    except RuntimeError:
        pass  # JAX has started: its device count is fixed


def _platforms() -> list[str]:
    """The JAX platforms present: the CPU, a GPU where jaxlib has CUDA or ROCm, the default one."""
    found = []
    for platform in dict.fromkeys(("cpu", "gpu", jax.default_backend())):
        try:
            jax.devices(platform)
        except RuntimeError:
            continue
        found.append(platform)
    return found


def _names(platform: str, devices: list[jax.Device]) -> list[str]:
    return [f"{platform}:{index}" for index in range(len(devices))]


def available_devices() -> list[str]:
    """Every JAX device, as `platform:index` (over all processes after `initialize_distributed`)."""
    return [name for platform in _platforms() for name in _names(platform, jax.devices(platform))]


def _platform_devices(platform: str, everywhere: bool) -> list[jax.Device]:
    """The devices of `platform`, of every process or (not `everywhere`) of this one; none for a
    platform JAX lacks (`jax.devices("")` would be the default platform's)."""
    if not platform:
        return []
    try:
        return jax.devices(platform) if everywhere else jax.local_devices(backend=platform)
    except RuntimeError:
        return []


def resolve(execution: Execution) -> list[jax.Device]:
    """The devices a runner computes on: the named one (the CPU by default), or under data
    parallelism `execution.devices` of its platform from that index on (over every process's
    devices after `initialize_distributed`; one device is one of this process's own)."""
    name = execution.device or "cpu"
    platform, _, index = name.strip().lower().partition(":")
    platform = PLATFORM_ALIASES.get(platform, platform)
    found = _platform_devices(platform, everywhere=execution.devices > 1)
    if not found:
        cuda = " JAX sees GPUs only with a CUDA build of jaxlib: pip install -U 'jax[cuda12]'."
        raise unknown_device(_BACKEND, name, available_devices(), cuda if platform == "gpu" else "")
    if not (index or "0").isdigit() or int(index or 0) >= len(found):
        raise unknown_device(_BACKEND, name, _names(platform, found))
    start = int(index or 0)
    chosen = found[start : start + execution.devices]
    if len(chosen) < execution.devices:
        raise too_many_devices(
            _BACKEND, execution.devices, _names(platform, found), _more(platform, execution)
        )
    return chosen


def _more(platform: str, execution: Execution) -> str:
    """How to expose `execution.devices` devices of `platform`."""
    n = execution.devices
    spread = "or spread the devices over processes with multires.backends.flax.initialize_distributed."
    if platform == "cpu":
        return (
            f"JAX fixes its CPU device count when it starts: set {CPU_DEVICES_ENV}={n} before the first "
            f"JAX use (`multires train --devices {n}` sets it), {spread}"
        )
    return f"JAX uses every {platform} device it can see: check CUDA_VISIBLE_DEVICES, {spread}"


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Join a multi-process JAX run (several machines, or processes on one) through
    `jax.distributed.initialize`, with gloo collectives on CPU.

    Call it in every process, before any other JAX use, with the same `coordinator_address`
    (`host:port` where process 0 listens). Afterwards data parallelism spans every process's
    devices (`devices=jax.device_count()`), each process feeds its own rows of the global batch,
    and process 0 is the main one (`Runner.is_main`) that writes files.
    """
    if not isinstance(num_processes, int) or num_processes < 1:
        raise DeviceError(f"num_processes must be a positive int; got {num_processes!r}.")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise DeviceError(f"process_id must be in [0, {num_processes}); got {process_id!r}.")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except (RuntimeError, ValueError) as error:
        raise DeviceError(
            f"jax.distributed.initialize({coordinator_address!r}, num_processes={num_processes}, "
            f"process_id={process_id}) failed: {error}. Call initialize_distributed once in each process, "
            "before any other JAX use, with process 0's host:port in all of them."
        ) from None
