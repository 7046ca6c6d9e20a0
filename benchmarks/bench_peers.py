"""Images/s and GMAC/s of multires against Keras 3's own `keras.applications.ResNet50`, per Keras backend.

What a user would otherwise pick: Keras 3 runs `keras.applications.ResNet50` on PyTorch, JAX or
TensorFlow. multires imports that very model (`multires.interchange.from_keras`: the same
architecture, Keras' ResNet50 v1, and the same weights; outputs checked to agree) and runs it in
the matching backend: torch (NCHW, channels_last, and channels_last with BatchNorm folded by
`inference=True`), flax (jitted, and folded) or tf (and folded). Inference is Keras'
`predict_on_batch` against the native multires model; training is Keras' `train_on_batch`
(SGD 0.01, momentum 0.9, sparse cross-entropy from logits) against the multires Runner's
`train_step` with the same optimizer. Every row also gives each side's fraction of the float32
GEMM peak measured at the start of the same process (torch.mm on torch's threads, NumPy's matmul
otherwise) and GMAC/s (identical architectures, so the img/s ratio is also the per-MAC ratio).

Keras picks its backend when it is first imported, so each backend runs in its own process (this
script re-runs itself with `KERAS_BACKEND` set); within it, all candidates are interleaved round
by round (see common.py), and the ratios are what a busy machine still measures fairly.

    python benchmarks/bench_peers.py                           # torch, jax and tensorflow
    python benchmarks/bench_peers.py --keras-backends torch    # one backend
    python benchmarks/bench_peers.py --quick                   # CI smoke run: batch 2, 64x64
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
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

KERAS_BACKENDS = {"torch": "torch", "jax": "flax", "tensorflow": "tf"}
"""Keras backend -> the multires backend it is compared with."""

COLUMNS = [
    ("keras_backend", "Keras backend", ""),
    ("input", "input (NHWC)", ""),
    ("mode", "mode", ""),
    ("variant", "multires", ""),
    *compare_columns("multires", "keras", ("multires", "Keras"), peak=True)[:5],
    ("keras_gmacs", "Keras GMAC/s", ".1f"),
    ("multires_gmacs", "multires GMAC/s", ".1f"),
    ("cpu_ratio", "CPU ratio", ".3f"),
]


def _candidates_torch(graph: Any, weights: dict, x: np.ndarray) -> dict[str, tuple[str, Callable[[], Any]]]:
    import torch

    import multires

    def call(model: torch.nn.Module, inputs: torch.Tensor) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return model(inputs).numpy()

        return run

    nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    last = nchw.to(memory_format=torch.channels_last)
    plain = multires.build(graph, backend="torch", weights=weights).eval()
    folded = multires.build(graph, backend="torch", weights=weights, inference=True).eval()
    return {
        "nchw": ("torch NCHW", call(plain, nchw)),
        "channels_last": ("torch channels_last", call(plain.to(memory_format=torch.channels_last), last)),
        "folded": (
            "torch channels_last, BN folded",
            call(folded.to(memory_format=torch.channels_last), last),
        ),
    }


def _candidates_flax(graph: Any, weights: dict, x: np.ndarray) -> dict[str, tuple[str, Callable[[], Any]]]:
    import jax

    import multires
    from multires.passes import fold_batchnorm
    from multires.weights import to_variables

    flax_backend = multires.get_backend("flax")
    inputs = jax.numpy.asarray(x)
    candidates = {}
    for key, label, (g, w) in (
        ("jit", "flax jit", (graph, weights)),
        ("folded", "flax jit, BN folded", fold_batchnorm(graph, weights)),
    ):
        apply = jax.jit(flax_backend.build(g, "NHWC").apply)
        variables = jax.tree.map(jax.numpy.asarray, to_variables(w, g))
        candidates[key] = (
            label,
            lambda apply=apply, variables=variables: np.asarray(apply(variables, inputs)),
        )
    return candidates


def _candidates_tf(graph: Any, weights: dict, x: np.ndarray) -> dict[str, tuple[str, Callable[[], Any]]]:
    import multires

    plain = multires.build(graph, backend="tf", weights=weights)
    folded = multires.build(graph, backend="tf", weights=weights, inference=True)
    return {
        "predict": ("tf predict_on_batch", lambda: plain.predict_on_batch(x)),
        "folded": ("tf predict_on_batch, BN folded", lambda: folded.predict_on_batch(x)),
    }


def _peak(keras_backend: str) -> tuple[Peak, str]:
    if keras_backend == "torch":
        import torch

        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        return gemm_peak(lambda: torch.mm(a, b)), f"torch.mm, {torch.get_num_threads()} threads"
    return gemm_peak(), "NumPy matmul, all cores"


def run_backend(
    keras_backend: str, batch: int, sizes: tuple[int, int], rounds: int, calls: int, modes: list[str]
) -> list[Row]:
    """The rows of one Keras backend (KERAS_BACKEND must already name it): inference at
    `sizes[0]`, training at `sizes[1]`."""
    import keras

    import multires
    from multires.interchange import from_keras

    peak, how = _peak(keras_backend)
    backend = KERAS_BACKENDS[keras_backend]
    print(
        f"Keras {keras.__version__} on {keras.backend.backend()}, multires {backend}: float32 GEMM peak "
        f"{peak} ({how})",
        flush=True,
    )
    rows = []
    rng = np.random.default_rng(0)
    for mode, size in zip(("inference", "train_step"), sizes, strict=True):
        if mode not in modes:
            continue
        source = keras.applications.ResNet50(
            weights=None, input_shape=(size, size, 3), classifier_activation=None
        )
        graph, weights = from_keras(source)
        macs = multires.macs(graph, (1, 3, size, size))
        x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
        labels = rng.integers(0, 1000, batch)
        if mode == "inference":
            ours = {"torch": _candidates_torch, "flax": _candidates_flax, "tf": _candidates_tf}[backend](
                graph, weights, x
            )
            expected = source.predict_on_batch(x)
            for label, call in ours.values():
                error = multires.reference.relative_error(np.asarray(call()), expected)
                if error > 1e-4:
                    raise SystemExit(f"{label}: output differs from Keras' (relative error {error:.1e}).")
            candidates = {"keras": partial(source.predict_on_batch, x)} | {k: c for k, (_, c) in ours.items()}
            labels_of = {k: label for k, (label, _) in ours.items()}
        else:
            source.compile(
                optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
            runner = multires.make_runner(graph, weights, backend, "NHWC", multires.SGD(0.01, momentum=0.9))
            candidates = {
                "keras": partial(source.train_on_batch, x, labels),
                "runner": partial(runner.train_step, x, labels),
            }
            labels_of = {"runner": f"{backend} Runner.train_step (NHWC)"}
        first = {name: time_calls(call, 1)[0] for name, call in candidates.items()}
        timings = interleave(candidates, rounds, calls, warmup=0)
        for key, label in labels_of.items():
            fields = compare(
                as_subject(timings, key), as_subject(first, key), batch, baseline="keras", peak=(macs, peak)
            )
            row = {
                "keras_backend": keras_backend,
                "input": f"{batch}x{size}x{size}x3",
                "mode": mode,
                "variant": label,
                **fields,
                "keras_gmacs": fields["keras"] * macs / 1e9,
                "multires_gmacs": fields["multires"] * macs / 1e9,
                "gemm_peak": vars(peak),
            }
            print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(
        __doc__, ["resnet50"], rounds=3, calls=1, quick="batch 2, 64x64 images, 1 round"
    )
    parser.add_argument(
        "--keras-backends", nargs="+", choices=list(KERAS_BACKENDS), default=list(KERAS_BACKENDS)
    )
    parser.add_argument("--train-size", type=int, default=160, help="training image size (default 160)")
    parser.set_defaults(batch=16, size=224)  # --size: the inference image size
    args = parser.parse_args(argv)
    batch, rounds, calls = (2, 1, 1) if args.quick else (args.batch, args.rounds, args.calls)
    sizes = (64, 64) if args.quick else (args.size, args.train_size)
    rows: list[Row] = []
    if len(args.keras_backends) == 1 and os.environ.get("KERAS_BACKEND") == args.keras_backends[0]:
        rows = run_backend(args.keras_backends[0], batch, sizes, rounds, calls, args.modes)
    else:
        for name in args.keras_backends:
            with tempfile.TemporaryDirectory() as folder:
                out = Path(folder) / "rows.json"
                child = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in ("batch", "rounds", "calls")]
                child += [
                    f"--size={args.size}",
                    f"--train-size={args.train_size}",
                    *(["--quick"] * args.quick),
                    "--modes",
                    *args.modes,
                ]
                command = [sys.executable, __file__, *child, "--keras-backends", name, "--json", str(out)]
                subprocess.run(command, check=True, env={**os.environ, "KERAS_BACKEND": name})
                rows += json.loads(out.read_text())["rows"]
    print(
        "\nmultires vs Keras 3 keras.applications.ResNet50 (same architecture and weights); ratio = multires / Keras:"
    )
    print(format_table(rows, COLUMNS))
    print(
        "peak = fraction of the float32 GEMM peak measured at the start of each backend's process, by CPU "
        "time: 2 x MACs x images per CPU-second / GEMM flops per CPU-second"
    )
    if args.json:
        write_json(args.json, rows, batch=batch, sizes=list(sizes), rounds=rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
