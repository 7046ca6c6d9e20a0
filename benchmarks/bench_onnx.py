"""Inference images/s of a multires model exported to ONNX and run by onnxruntime, against the same
model built by the multires PyTorch backend, with the same canonical weights.

For `resnet50` at 224x224 and `d2l_resnet18` at 96x96 (batch 64), in one process and interleaved
round by round (so machine noise hits both alike): onnxruntime's CPU session with full graph
optimisation against the torch model in eval mode under `torch.inference_mode()`, both on the
same number of threads. The outputs are checked to agree before timing. Prints images/s and the
ratio onnxruntime / PyTorch, by wall clock and per CPU-second of the process (on a shared machine
the wall clock also measures the neighbours; see common.py), and the seconds of each first call.

    python benchmarks/bench_onnx.py            # full run
    python benchmarks/bench_onnx.py --quick    # CI smoke run: small batch and images
"""

from __future__ import annotations

import os
import sys

import numpy as np
import onnxruntime as ort
import torch
from common import (
    Row,
    benchmark_parser,
    compare,
    compare_columns,
    format_table,
    interleave,
    time_calls,
    write_json,
)

import multires
from multires import reference

CASES = {"resnet50": 224, "d2l_resnet18": 96}
"""Zoo model -> image size."""


COLUMNS = [
    ("model", "model", ""),
    ("input", "input (NCHW)", ""),
    ("mode", "mode", ""),
    ("threads", "threads", "d"),
    *compare_columns("onnxruntime", "torch", ("onnxruntime", "torch"), first=".2f"),
]


def bench(model: str, batch: int, size: int, rounds: int, calls: int, threads: int) -> Row:
    """One row: images/s of both runtimes on `model`, timed alternately in each round."""
    graph = multires.spec(model)
    weights = multires.random_weights(graph, seed=0)
    onnx_backend = multires.get_backend("onnx")
    session = onnx_backend.inference_session(onnx_backend.build(graph, "NCHW", weights), threads=threads)
    net = multires.build(graph, backend="torch", weights=weights).eval()
    channels = graph.inputs[0].channels
    x = np.random.default_rng(0).standard_normal((batch, channels, size, size)).astype(np.float32)
    x_torch = torch.from_numpy(x)
    feed = {graph.inputs[0].name: x}

    def run_onnx() -> np.ndarray:
        return session.run(None, feed)[0]

    def run_torch() -> torch.Tensor:
        with torch.inference_mode():
            return net(x_torch)

    candidates = {"onnxruntime": run_onnx, "torch": run_torch}
    first = {name: time_calls(call, 1)[0] for name, call in candidates.items()}
    error = reference.relative_error(run_onnx(), run_torch().numpy())
    print(f"{model} {size}x{size}: onnxruntime vs torch outputs, relative error {error:.1e}", flush=True)
    if error > 1e-4:
        raise SystemExit(f"{model}: onnxruntime and torch disagree (relative error {error:.1e}).")
    timings = interleave(candidates, rounds, calls, warmup=0)
    row = {
        "model": model,
        "input": f"{batch}x{channels}x{size}x{size}",
        "mode": "inference",
        "threads": threads,
        **compare(timings, first, batch, subject="onnxruntime", baseline="torch"),
    }
    print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, list(CASES), rounds=5, calls=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="intra-op threads of both (torch's default)",
    )
    args = parser.parse_args(argv)
    batch, rounds, calls = (4, 1, 1) if args.quick else (args.batch, args.rounds, args.calls)
    torch.set_num_threads(args.threads)
    opset = multires.get_backend("onnx").OPSET
    print(
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{args.threads} threads, ONNX opset {opset}"
    )
    rows = [
        bench(name, batch, 64 if args.quick else CASES[name], rounds, calls, args.threads)
        for name in args.models
    ]
    print("\nratio onnxruntime / PyTorch (inference, images/s):")
    print(format_table(rows, COLUMNS))
    if args.json:
        write_json(args.json, rows, onnxruntime=ort.__version__, torch=torch.__version__, opset=opset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
