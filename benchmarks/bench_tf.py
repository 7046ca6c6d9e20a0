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

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import (  # noqa: E402
    Peak,
    Row,
    benchmark_parser,
    compare_columns,
    folded_rows,
    format_table,
    gemm_peak,
    interleave,
    time_calls,
    write_json,
)
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


COLUMNS = [
    ("model", "model", ""),
    ("input", "input (NHWC)", ""),
    ("mode", "mode", ""),
    ("variant", "variant", ""),
    *compare_columns(peak=True),
]


def bench(
    case: Case,
    batch: int,
    size: int,
    rounds: int,
    calls: int,
    jit_modes: list[bool],
    peak: Peak,
    modes: list[str],
) -> list[Row]:
    """Rows for `case`: each function of the models timed alternately, round by round; inference
    also with BatchNorm folded (`inference=True`). `peak` is the GEMM peak of the peak fractions."""
    graph = multires.spec(case.model)
    weights = multires.random_weights(graph, seed=0)
    models = {"multires": multires.build(graph, backend="tf", weights=weights)}
    models["handwritten"] = tfb.load_weights(case.hand(size), weights)
    models["folded"] = multires.build(graph, backend="tf", weights=weights, inference=True)
    macs = (multires.macs(graph, (1, case.channels, size, size)), peak)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, size, size, case.channels)).astype(np.float32))
    labels = tf.constant(rng.integers(0, case.classes, size=batch))
    outputs = {name: model(x, training=False).numpy() for name, model in models.items()}
    error = max(reference.relative_error(outputs[k], outputs["handwritten"]) for k in ("multires", "folded"))
    print(
        f"{case.model} {size}x{size}: multires vs hand-written outputs, relative error {error:.1e}",
        flush=True,
    )
    if error > 1e-4:
        raise SystemExit(f"{case.model}: the hand-written model computes something else (error {error:.1e}).")
    rows = []
    for jit in jit_modes:
        functions = {name: _step_functions(model, jit) for name, model in models.items()}
        for mode in modes:
            names = list(functions) if mode == "inference" else ["multires", "handwritten"]
            candidates = {name: _call(functions[name][mode], x, labels) for name in names}
            first = {name: time_calls(call, 1)[0] for name, call in candidates.items()}  # trace, compile
            timings = interleave(candidates, rounds, calls, warmup=0)
            fields = {
                "model": case.model,
                "input": f"{batch}x{size}x{size}x{case.channels}",
                "mode": mode,
                "variant": "xla" if jit else "graph",
            }
            for row in folded_rows(timings, first, batch, fields, "variant", peak=macs):
                print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
                rows.append(row)
    return rows


def _call(function: Callable[[Any, Any], Any], x: Any, labels: Any) -> Callable[[], Any]:
    """A no-argument call that waits for its result (`.numpy()`), as the timing helpers need."""
    return lambda: function(x, labels).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(
        __doc__, sorted(CASES), rounds=3, calls=1, quick="batch 2, 32x32 images, 1 round of 1 step, no XLA"
    )
    parser.add_argument("--no-jit", action="store_true", help="skip the jit_compile=True runs")
    args = parser.parse_args(argv)
    batch, rounds, calls = (2, 1, 1) if args.quick else (args.batch, args.rounds, args.calls)
    jit_modes = [False] if args.no_jit or args.quick else [False, True]
    devices = ", ".join(d.device_type for d in tf.config.list_physical_devices())
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, devices: {devices}, {os.cpu_count()} CPUs"
    )
    peak = gemm_peak()
    print(f"float32 GEMM peak (NumPy matmul 2048, all cores): {peak}", flush=True)
    rows = []
    for name in args.models:
        case = CASES[name]
        rows += bench(
            case,
            batch,
            32 if args.quick else args.size or case.size,
            rounds,
            calls,
            jit_modes,
            peak,
            args.modes,
        )
    print("\nmultires vs hand-written Keras; ratio = multires / hand-written (target >= 0.97):")
    print(format_table(rows, COLUMNS))
    print(peak.footnote())
    if args.json:
        write_json(
            args.json,
            rows,
            tensorflow=tf.__version__,
            keras=keras.__version__,
            devices=devices,
            gemm_peak=vars(peak),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
