"""Launching one process per device: torch's data parallelism runs under torchrun.

`multires train --devices N` and `benchmarks/bench_train.py` call `torchrun` when they are not
already one of torchrun's processes, so a user needs no launcher on one machine; across machines
they run `torchrun` themselves (docs/devices.md).
"""

from __future__ import annotations

import os
import subprocess
import sys

from multires.errors import BackendUnavailableError

WORLD_SIZE_ENV = "WORLD_SIZE"
"""Set in every process torchrun starts: its presence means "already launched"."""


def under_torchrun() -> bool:
    """Whether this process is one of torchrun's."""
    return WORLD_SIZE_ENV in os.environ


def cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_per_process(processes: int) -> int:
    """CPU threads for each of `processes` sharing this machine's cores (at least one)."""
    return max(1, cores() // processes)


def torchrun(devices: int, arguments: list[str]) -> int:
    """Run `python ARGUMENTS` under torchrun with `devices` processes on this machine, each with its
    share of the CPU threads (unless OMP_NUM_THREADS is set); returns the exit status."""
    try:
        import torch.distributed.run  # noqa: F401
    except ModuleNotFoundError:
        raise BackendUnavailableError(
            "--devices in torch needs PyTorch: pip install 'multires[torch]'"
        ) from None
    threads = os.environ.get("OMP_NUM_THREADS", str(threads_per_process(devices)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}"]
    return subprocess.call([*command, *arguments], env={**os.environ, "OMP_NUM_THREADS": threads})
