"""Images/s of multires-built Keras models against hand-written Keras models of the same architecture.

For `d2l_resnet18` at 96x96 and `resnet50` at 224x224 (batch 64), in one process and interleaved
round by round (so machine noise hits both alike): inference (`training=False`) and one training
step (softmax cross-entropy, `keras.optimizers.SGD`, the same step function for both models),
each inside `tf.function`, with and without `jit_compile=True` (XLA). Prints images/s and the
ratio multires / hand-written (target >= 0.97), by wall clock and per CPU-second of the process:
on a machine shared with other jobs the wall clock mostly measures the neighbours, while the
CPU time still measures the work each model does (on a GPU, read the wall clock).

The hand-written models below are what one would write from the book (D2L's ResNet chapter) and
from torchvision's ResNet-50 with plain Keras layers, with explicit `ZeroPadding2D` rather than
`padding="same"` so that both compute the same function: the benchmark loads the same canonical
weights into both and checks their outputs agree before timing.

    python benchmarks/bench_tf.py            # full run (slow on CPU)
    python benchmarks/bench_tf.py --quick    # CI smoke run: tiny batch and images, no XLA
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
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

import multires  # noqa: E402
from multires import reference  # noqa: E402

tfb = multires.get_backend("tf")

# --------------------------------------------------------------------------------------------
# Hand-written models (layer names chosen to match the canonical weight names, for loading).


def _conv_bn(x: Any, filters: int, kernel: int, stride: int, conv: str, bn: str, bias: bool) -> Any:
    if kernel > 1:
        x = layers.ZeroPadding2D(kernel // 2, name=f"{conv}_pad")(x)
    x = layers.Conv2D(filters, kernel, strides=stride, use_bias=bias, name=conv)(x)
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=bn)(x)


def _stem(x: Any, conv: str, bn: str, pool: str, bias: bool) -> Any:
    x = layers.ReLU()(_conv_bn(x, 64, 7, 2, conv, bn, bias))
    x = layers.ZeroPadding2D(1)(x)  # after a ReLU, zero padding never wins the max
    return layers.MaxPooling2D(3, 2, name=pool)(x)


def d2l_resnet18(size: int, classes: int = 10) -> keras.Model:
    """The Dive into Deep Learning ResNet-18: residual blocks with conv bias and a 1x1 shortcut."""
    inputs = keras.Input((size, size, 1))
    x = _stem(inputs, "b1.0", "b1.1", "b1.3", bias=True)
    for stage, channels in enumerate((64, 128, 256, 512), start=2):
        for block in range(2):
            name = f"b{stage}.{block}"
            stride = 2 if block == 0 and stage > 2 else 1
            y = layers.ReLU()(_conv_bn(x, channels, 3, stride, f"{name}.conv1", f"{name}.bn1", True))
            y = _conv_bn(y, channels, 3, 1, f"{name}.conv2", f"{name}.bn2", True)
            if block == 0 and stage > 2:
                x = layers.Conv2D(channels, 1, strides=stride, name=f"{name}.conv3")(x)
            x = layers.ReLU()(layers.Add()([y, x]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(classes, name="last.2")(x), name="hand_d2l_resnet18")


def resnet50(size: int, classes: int = 1000) -> keras.Model:
    """torchvision's ResNet-50 (v1.5: stride on the 3x3 conv, no conv bias)."""
    inputs = keras.Input((size, size, 3))
    x = _stem(inputs, "conv1", "bn1", "maxpool", bias=False)
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for block in range(blocks):
            name = f"layer{stage}.{block}"
            stride = 2 if block == 0 and stage > 1 else 1
            y = layers.ReLU()(_conv_bn(x, width, 1, 1, f"{name}.conv1", f"{name}.bn1", False))
            y = layers.ReLU()(_conv_bn(y, width, 3, stride, f"{name}.conv2", f"{name}.bn2", False))
            y = _conv_bn(y, width * 4, 1, 1, f"{name}.conv3", f"{name}.bn3", False)
            if block == 0:
                x = _conv_bn(x, width * 4, 1, stride, f"{name}.downsample.0", f"{name}.downsample.1", False)
            x = layers.ReLU()(layers.Add()([y, x]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(classes, name="fc")(x), name="hand_resnet50")


@dataclass(frozen=True)
class Case:
    model: str
    size: int
    classes: int
    channels: int
    hand: Callable[[int], keras.Model]


CASES = {
    "d2l_resnet18": Case("d2l_resnet18", 96, 10, 1, d2l_resnet18),
    "resnet50": Case("resnet50", 224, 1000, 3, resnet50),
}

# --------------------------------------------------------------------------------------------
# Timing.


def _step_functions(model: keras.Model, jit: bool) -> dict[str, Callable[[Any, Any], Any]]:
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    optimizer.build(model.trainable_variables)

    @tf.function(jit_compile=jit)
    def infer(x: Any, labels: Any) -> Any:
        return model(x, training=False)

    @tf.function(jit_compile=jit)
    def train(x: Any, labels: Any) -> Any:
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    return {"inference": infer, "train_step": train}


def _time(function: Callable[[Any, Any], Any], x: Any, labels: Any, iters: int) -> tuple[float, float]:
    """Wall-clock and process CPU seconds for `iters` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        out = function(x, labels)
    np.asarray(out)  # wait for the last result
    return time.perf_counter() - wall, time.process_time() - cpu


@dataclass(frozen=True)
class Row:
    """Images/s by wall clock and per CPU-second (robust on a shared machine), first-call seconds."""

    model: str
    size: int
    batch: int
    mode: str
    jit: bool
    multires: float
    hand: float
    multires_cpu: float
    hand_cpu: float
    first_call_s: float
    hand_first_call_s: float

    @property
    def ratio(self) -> float:
        return self.multires / self.hand

    @property
    def cpu_ratio(self) -> float:
        return self.multires_cpu / self.hand_cpu


def bench(case: Case, batch: int, size: int, rounds: int, iters: int, jit_modes: list[bool]) -> list[Row]:
    """Rows of images/s for `case`, the two models timed alternately in each round."""
    graph = multires.spec(case.model)
    weights = multires.init_weights(graph, seed=0)
    ours = multires.build(graph, backend="tf", weights=weights)
    hand = tfb.load_weights(case.hand(size), weights)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, size, size, case.channels)).astype(np.float32))
    labels = tf.constant(rng.integers(0, case.classes, size=batch))
    error = reference.relative_error(ours(x, training=False).numpy(), hand(x, training=False).numpy())
    print(
        f"{case.model} {size}x{size}: multires vs hand-written outputs, relative error {error:.1e}",
        flush=True,
    )
    if error > 1e-4:
        raise SystemExit(f"{case.model}: the hand-written model computes something else (error {error:.1e}).")
    rows = []
    for jit in jit_modes:
        functions = {"multires": _step_functions(ours, jit), "hand": _step_functions(hand, jit)}
        for mode in ("inference", "train_step"):
            warmup = {which: _time(functions[which][mode], x, labels, 1)[0] for which in ("multires", "hand")}
            wall: dict[str, list[float]] = {"multires": [], "hand": []}
            cpu: dict[str, list[float]] = {"multires": [], "hand": []}
            for round_ in range(rounds):
                order = ("multires", "hand") if round_ % 2 == 0 else ("hand", "multires")
                for which in order:
                    seconds, cpu_seconds = _time(functions[which][mode], x, labels, iters)
                    wall[which].append(seconds)
                    cpu[which].append(cpu_seconds)
            speed = {k: batch * iters / statistics.median(v) for k, v in wall.items()}
            cpu_speed = {k: batch * iters / statistics.median(v) for k, v in cpu.items()}
            row = Row(
                case.model,
                size,
                batch,
                mode,
                jit,
                speed["multires"],
                speed["hand"],
                cpu_speed["multires"],
                cpu_speed["hand"],
                warmup["multires"],
                warmup["hand"],
            )
            print(_format(row), flush=True)
            rows.append(row)
    return rows


def _format(row: Row) -> str:
    return (
        f"{row.model:>13} {row.size:>3}px b{row.batch:<3} {row.mode:<10} {'xla' if row.jit else 'graph':<5} "
        f"img/s {row.multires:7.1f} vs {row.hand:7.1f}  ratio {row.ratio:.3f}  "
        f"img/cpu-s {row.multires_cpu:7.1f} vs {row.hand_cpu:7.1f}  ratio {row.cpu_ratio:.3f}  "
        f"first call {row.first_call_s:.1f}s vs {row.hand_first_call_s:.1f}s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke run: batch 2, 32x32 images, 1 round of 1 step, no XLA"
    )
    parser.add_argument("--models", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median taken)")
    parser.add_argument("--iters", type=int, default=3, help="steps per round")
    parser.add_argument("--no-jit", action="store_true", help="skip the jit_compile=True runs")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    batch, rounds, iters = (2, 1, 1) if args.quick else (args.batch, args.rounds, args.iters)
    jit_modes = [False] if args.no_jit or args.quick else [False, True]
    devices = ", ".join(d.device_type for d in tf.config.list_physical_devices()) or "CPU"
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, devices: {devices}, {os.cpu_count()} CPUs"
    )
    rows = []
    for name in args.models:
        case = CASES[name]
        rows += bench(case, batch, 32 if args.quick else case.size, rounds, iters, jit_modes)
    print("\nmultires vs hand-written; ratio = multires / hand-written (target >= 0.97):")
    for row in rows:
        print(_format(row))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                [asdict(r) | {"ratio": r.ratio, "cpu_ratio": r.cpu_ratio} for r in rows], handle, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
