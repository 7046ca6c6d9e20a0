"""Inference images/s of a multires model exported to ONNX and run by onnxruntime, against the same
model built by the multires PyTorch backend, with the same canonical weights.

For `resnet50` at 224x224 and `d2l_resnet18` at 96x96 (batch 64), in one process and interleaved
round by round (so machine noise hits both alike): onnxruntime's CPU session with full graph
optimisation against the torch model in eval mode under `torch.inference_mode()`, both on the
same number of threads, each also with BatchNorm folded (`multires.passes.fold_batchnorm`). The
outputs are checked to agree before timing. Prints images/s and the
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
    Peak,
    Row,
    as_subject,
    benchmark_parser,
    compare,
    compare_columns,
    format_table,
    gemm_peak,
    interleave,
    time_calls,
    write_json,
)

import multires
from multires import reference
from multires.passes import fold_batchnorm

CASES = {"resnet50": 224, "d2l_resnet18": 96}
"""Zoo model -> image size."""


COLUMNS = [
    ("model", "model", ""),
    ("input", "input (NCHW)", ""),
    ("mode", "mode", ""),
    ("threads", "threads", "d"),
    *compare_columns("onnxruntime", "torch", ("onnxruntime", "torch"), first=".2f", peak=True),
]


def bench(model: str, batch: int, size: int, rounds: int, calls: int, threads: int, peak: Peak) -> list[Row]:
    """Two rows, as built and with BatchNorm folded: images/s of both runtimes on `model`, all four
    timed alternately in each round; `peak` is the GEMM peak of the peak fractions."""
    graph = multires.spec(model)
    weights = multires.random_weights(graph, seed=0)
    onnx_backend = multires.get_backend("onnx")
    channels = graph.inputs[0].channels
    x = np.random.default_rng(0).standard_normal((batch, channels, size, size)).astype(np.float32)
    x_torch = torch.from_numpy(x)
    feed = {graph.inputs[0].name: x}
    candidates = {}
    for suffix, (g, w) in {"": (graph, weights), "_folded": fold_batchnorm(graph, weights)}.items():
        session = onnx_backend.inference_session(onnx_backend.build(g, "NCHW", w), threads=threads)
        net = multires.build(g, backend="torch", weights=w).eval()
        candidates[f"onnxruntime{suffix}"] = lambda session=session: session.run(None, feed)[0]

        def run_torch(net: torch.nn.Module = net) -> np.ndarray:
            with torch.inference_mode():
                return net(x_torch).numpy()

        candidates[f"torch{suffix}"] = run_torch
    first = {name: time_calls(call, 1)[0] for name, call in candidates.items()}
    outputs = {name: call() for name, call in candidates.items()}
    error = max(reference.relative_error(y, outputs["torch"]) for y in outputs.values())
    print(f"{model} {size}x{size}: onnxruntime vs torch outputs, relative error {error:.1e}", flush=True)
    if error > 1e-4:
        raise SystemExit(f"{model}: onnxruntime and torch disagree (relative error {error:.1e}).")
    timings = interleave(candidates, rounds, calls, warmup=0)
    macs = (multires.macs(graph, (1, channels, size, size)), peak)
    rows = []
    for suffix, mode in (("", "inference"), ("_folded", "inference, BN folded")):
        pair = [as_subject(m, f"onnxruntime{suffix}", "onnxruntime") for m in (timings, first)]
        pair = [as_subject(m, f"torch{suffix}", "torch") for m in pair]
        row = {
            "model": model,
            "input": f"{batch}x{channels}x{size}x{size}",
            "mode": mode,
            "threads": threads,
            **compare(*pair, batch, subject="onnxruntime", baseline="torch", peak=macs),
        }
        print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, list(CASES), rounds=5, calls=3, modes=False)
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
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = gemm_peak(lambda: torch.mm(a, b))
    print(f"float32 GEMM peak (torch.mm 2048, {args.threads} threads): {peak}", flush=True)
    rows = []
    for name in args.models:
        rows += bench(
            name, batch, 64 if args.quick else args.size or CASES[name], rounds, calls, args.threads, peak
        )
    print("\nratio onnxruntime / PyTorch (inference, images/s):")
    print(format_table(rows, COLUMNS))
    print(peak.footnote())
    if args.json:
        write_json(
            args.json,
            rows,
            onnxruntime=ort.__version__,
            torch=torch.__version__,
            opset=opset,
            gemm_peak=vars(peak),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
