"""Inference images/s of a multires model exported to ONNX and run by onnxruntime, against the same
model built by the multires PyTorch backend, with the same canonical weights.

For `resnet50` at 224x224 and `d2l_resnet18` at 96x96 (batch 64), in one process and interleaved
round by round (so machine noise hits both alike): onnxruntime's CPU session with full graph
optimisation against the torch model in eval mode under `torch.inference_mode()`, both on the
same number of threads. The outputs are checked to agree before timing. Prints images/s and the
ratio onnxruntime / PyTorch.

    python benchmarks/bench_onnx.py            # full run
    python benchmarks/bench_onnx.py --quick    # CI smoke run: small batch and images
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort
import torch

import multires
from multires import reference

CASES = {"resnet50": 224, "d2l_resnet18": 96}
"""Zoo model -> image size."""


@dataclass(frozen=True)
class Row:
    model: str
    size: int
    batch: int
    threads: int
    onnxruntime: float
    torch: float
    first_call_s: float
    torch_first_call_s: float

    @property
    def ratio(self) -> float:
        return self.onnxruntime / self.torch


def _seconds(call: Callable[[], object], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        call()
    return time.perf_counter() - start


def bench(model: str, batch: int, size: int, rounds: int, iters: int, threads: int) -> Row:
    """One row: images/s of both runtimes on `model`, timed alternately in each round."""
    graph = multires.spec(model)
    weights = multires.random_weights(graph, seed=0)
    onnx_backend = multires.get_backend("onnx")
    session = onnx_backend.inference_session(onnx_backend.build(graph, "NCHW", weights), threads=threads)
    net = multires.build(graph, backend="torch", weights=weights).eval()
    x = (
        np.random.default_rng(0)
        .standard_normal((batch, graph.inputs[0].channels, size, size))
        .astype(np.float32)
    )
    x_torch = torch.from_numpy(x)
    feed = {graph.inputs[0].name: x}

    def run_onnx() -> np.ndarray:
        return session.run(None, feed)[0]

    def run_torch() -> torch.Tensor:
        with torch.inference_mode():
            return net(x_torch)

    calls = {"onnxruntime": run_onnx, "torch": run_torch}
    first = {which: _seconds(call, 1) for which, call in calls.items()}
    error = reference.relative_error(run_onnx(), run_torch().numpy())
    print(f"{model} {size}x{size}: onnxruntime vs torch outputs, relative error {error:.1e}", flush=True)
    if error > 1e-4:
        raise SystemExit(f"{model}: onnxruntime and torch disagree (relative error {error:.1e}).")
    seconds: dict[str, list[float]] = {which: [] for which in calls}
    for round_ in range(rounds):
        order = list(calls) if round_ % 2 == 0 else list(reversed(calls))
        for which in order:
            seconds[which].append(_seconds(calls[which], iters))
    speed = {which: batch * iters / statistics.median(times) for which, times in seconds.items()}
    row = Row(
        model,
        size,
        batch,
        threads,
        speed["onnxruntime"],
        speed["torch"],
        first["onnxruntime"],
        first["torch"],
    )
    print(_format(row), flush=True)
    return row


def _format(row: Row) -> str:
    return (
        f"{row.model:>13} {row.size:>3}px b{row.batch:<3} {row.threads} threads  "
        f"onnxruntime {row.onnxruntime:8.1f} img/s  torch {row.torch:8.1f} img/s  ratio {row.ratio:.3f}  "
        f"(first call {row.first_call_s:.2f}s / {row.torch_first_call_s:.2f}s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run: batch 4, 64x64 images, 1 round")
    parser.add_argument("--models", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median taken)")
    parser.add_argument("--iters", type=int, default=3, help="forward passes per round")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="intra-op threads of both (torch's default)",
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    batch, rounds, iters = (4, 1, 1) if args.quick else (args.batch, args.rounds, args.iters)
    torch.set_num_threads(args.threads)
    print(
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{args.threads} threads, ONNX opset {multires.get_backend('onnx').OPSET}"
    )
    rows = [
        bench(name, batch, 64 if args.quick else CASES[name], rounds, iters, args.threads)
        for name in args.models
    ]
    print("\nratio onnxruntime / PyTorch (inference, images/s):")
    for row in rows:
        print(_format(row))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) | {"ratio": r.ratio} for r in rows], handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
