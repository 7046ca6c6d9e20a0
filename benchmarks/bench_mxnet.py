"""Images/s of multires-built Gluon models against hand-written Gluon models of the same architecture.

For `d2l_resnet18` at 96x96 and `resnet50` at 224x224 (batch 64), in one process and interleaved
round by round (so machine noise hits both alike): inference (predict mode) and one training step
(`autograd.record(train_mode=True)`, batch-mean softmax cross-entropy, `backward()`,
`gluon.Trainer.step`: the same step function and optimizer for both models), both models
hybridized. Prints images/s and the ratio multires / hand-written (target >= 0.97), by wall
clock and per CPU-second of the process (on a shared machine the wall clock also measures the
neighbours; see common.py), and the seconds of each model's first hybridized call.

Inference runs with `static_alloc=True, static_shape=True`; training steps without, because
static buffers are per model and ResNet-50 training keeps about 0.3 GB of them per image (the
two models at batch 64 would need ~40 GB), while the shared memory pool serves both models one
step at a time (~9 GB at batch 64).

The hand-written models are what one writes from the book (D2L's MXNet ResNet chapter) and from
torchvision's ResNet-50 with plain Gluon layers (`nn.BatchNorm` included, so their running
statistics follow MXNet's rule rather than the spec's; the multires model pays for the spec's).
The benchmark loads the same canonical weights into both and checks that their outputs agree
before timing.

    python benchmarks/bench_mxnet.py            # full run (slow on CPU)
    python benchmarks/bench_mxnet.py --quick    # CI smoke run: batch 4, 64x64 images, 1 round

MXNet sizes its OpenMP pool from the CPU count; set OMP_NUM_THREADS to the cores you own on a
shared machine.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import mxnet as mx
import numpy as np
from common import (
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
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn

import multires
from multires import reference

mxb = multires.get_backend("mxnet")

# --------------------------------------------------------------------------------------------
# Hand-written models. Child names follow the canonical weight names so that Gluon's structural
# parameter names (`load_dict`) equal `mxb.name_map(graph)`'s.


class Residual(nn.HybridBlock):
    """The book's residual block: two 3x3 convs with BN, optional 1x1 conv shortcut."""

    def __init__(self, channels: int, use_1x1conv: bool = False, strides: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(channels, kernel_size=3, padding=1, strides=strides)
        self.bn1 = nn.BatchNorm()
        self.conv2 = nn.Conv2D(channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm()
        self.conv3 = nn.Conv2D(channels, kernel_size=1, strides=strides) if use_1x1conv else None

    def hybrid_forward(self, F: Any, X: Any) -> Any:
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3 is not None:
            X = self.conv3(X)
        return F.relu(Y + X)


class D2LResNet18(nn.HybridBlock):
    """The Dive into Deep Learning ResNet-18 (MXNet edition), named b1..b5 and last."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.b1 = nn.HybridSequential()
        self.b1.add(
            nn.Conv2D(64, kernel_size=7, strides=2, padding=3),
            nn.BatchNorm(),
            nn.Activation("relu"),
            nn.MaxPool2D(pool_size=3, strides=2, padding=1),
        )
        for index, channels in enumerate((64, 128, 256, 512), start=2):
            stage = nn.HybridSequential()
            first = index > 2
            stage.add(Residual(channels, use_1x1conv=first, strides=2 if first else 1), Residual(channels))
            setattr(self, f"b{index}", stage)
        self.last = nn.HybridSequential()
        self.last.add(nn.GlobalAvgPool2D(), nn.Flatten(), nn.Dense(classes))

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        for stage in (self.b1, self.b2, self.b3, self.b4, self.b5, self.last):
            x = stage(x)
        return x


class Bottleneck(nn.HybridBlock):
    """torchvision's ResNet-50 bottleneck (v1.5: stride on the 3x3 conv, no conv bias)."""

    def __init__(self, width: int, strides: int, downsample: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(width, kernel_size=1, use_bias=False)
        self.bn1 = nn.BatchNorm()
        self.conv2 = nn.Conv2D(width, kernel_size=3, strides=strides, padding=1, use_bias=False)
        self.bn2 = nn.BatchNorm()
        self.conv3 = nn.Conv2D(width * 4, kernel_size=1, use_bias=False)
        self.bn3 = nn.BatchNorm()
        self.downsample = None
        if downsample:
            self.downsample = nn.HybridSequential()
            self.downsample.add(
                nn.Conv2D(width * 4, kernel_size=1, strides=strides, use_bias=False), nn.BatchNorm()
            )

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(y + shortcut)


class ResNet50(nn.HybridBlock):
    """torchvision's ResNet-50 in plain Gluon."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(64, kernel_size=7, strides=2, padding=3, use_bias=False)
        self.bn1 = nn.BatchNorm()
        self.maxpool = nn.MaxPool2D(pool_size=3, strides=2, padding=1)
        for index, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
            stage = nn.HybridSequential()
            for block in range(blocks):
                stage.add(Bottleneck(width, 2 if block == 0 and index > 1 else 1, downsample=block == 0))
            setattr(self, f"layer{index}", stage)
        self.avgpool = nn.GlobalAvgPool2D()
        self.fc = nn.Dense(classes)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return self.fc(self.avgpool(x))


@dataclass(frozen=True)
class Case:
    model: str
    size: int
    classes: int
    channels: int
    hand: Callable[[], nn.HybridBlock]


CASES = {
    "d2l_resnet18": Case("d2l_resnet18", 96, 10, 1, D2LResNet18),
    "resnet50": Case("resnet50", 224, 1000, 3, ResNet50),
}


def load_canonical(model: nn.HybridBlock, graph: multires.Graph, weights: dict[str, np.ndarray]) -> None:
    """Load canonical weights into a hand-written model by structural Gluon names (through a
    `save_parameters`-format file, which is what `load_parameters` reads)."""
    names = mxb.name_map(graph)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "weights.params")
        nd.save(path, {names[k]: nd.array(v) for k, v in weights.items()})
        model.load_parameters(path, ctx=mx.cpu())


# --------------------------------------------------------------------------------------------
# Timing.


def _step_functions(model: nn.HybridBlock, optimizer: str) -> dict[str, Callable[[Any, Any], Any]]:
    if optimizer == "pytorch":
        trainer = gluon.Trainer(model.collect_params(), mxb.PyTorchSGD(0.01, momentum=0.9), kvstore=None)
    else:
        trainer = gluon.Trainer(
            model.collect_params(), "sgd", {"learning_rate": 0.01, "momentum": 0.9}, kvstore=None
        )
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    def infer(x: Any, labels: Any) -> Any:
        with autograd.predict_mode():
            return model(x)

    def train(x: Any, labels: Any) -> Any:
        with autograd.record(train_mode=True):
            loss = loss_fn(model(x), labels).mean()
        loss.backward()
        trainer.step(1)
        return loss

    return {"inference": infer, "train_step": train}


COLUMNS = [
    ("model", "model", ""),
    ("input", "input (NCHW)", ""),
    ("mode", "mode", ""),
    ("variant", "variant", ""),
    *compare_columns(peak=True),
]


def bench(
    case: Case, batch: int, size: int, rounds: int, calls: int, optimizer: str, peak: Peak, modes: list[str]
) -> list[Row]:
    """Rows of images/s for `case`, the models timed alternately in each round; inference also with
    BatchNorm folded (`inference=True`). `peak`: the GEMM peak of the peak fractions."""
    graph = multires.spec(case.model)
    weights = multires.random_weights(graph, seed=0)
    ours = mxb.load_weights(mxb.build(graph, initialize=False), weights)
    folded = multires.build(graph, backend="mxnet", weights=weights, inference=True)
    macs = (multires.macs(graph, (1, case.channels, size, size)), peak)
    hand = case.hand()
    load_canonical(hand, graph, weights)
    rng = np.random.default_rng(0)
    x = nd.array(rng.normal(size=(batch, case.channels, size, size)).astype(np.float32))
    labels = nd.array(rng.integers(0, case.classes, size=batch))
    expected = hand(x).asnumpy()
    error = max(reference.relative_error(m(x).asnumpy(), expected) for m in (ours, folded))
    print(
        f"{case.model} {size}x{size}: multires vs hand-written outputs, relative error {error:.1e}",
        flush=True,
    )
    if error > 1e-4:
        raise SystemExit(f"{case.model}: the hand-written model computes something else (error {error:.1e}).")
    models = {"multires": ours, "handwritten": hand, "folded": folded}
    functions = {name: _step_functions(model, optimizer) for name, model in models.items()}
    rows = []
    for mode in modes:
        static = mode == "inference"
        names = list(models) if static else ["multires", "handwritten"]
        for name in names:
            models[name].hybridize(static_alloc=static, static_shape=static)
        candidates = {name: partial(functions[name][mode], x, labels) for name in names}
        first = {name: time_calls(call, 1, nd.waitall)[0] for name, call in candidates.items()}
        timings = interleave(candidates, rounds, calls, warmup=0, sync=nd.waitall)
        fields = {
            "model": case.model,
            "input": f"{batch}x{case.channels}x{size}x{size}",
            "mode": mode,
            "variant": "hybridized, static" if static else "hybridized",
        }
        for row in folded_rows(timings, first, batch, fields, "variant", peak=macs):
            print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, sorted(CASES), rounds=5, calls=3)
    parser.add_argument(
        "--optimizer",
        choices=("sgd", "pytorch"),
        default="sgd",
        help="MXNet's 'sgd' or the runner's PyTorchSGD, the same for both models (momentum 0.9)",
    )
    args = parser.parse_args(argv)
    batch, rounds, calls = (4, 1, 1) if args.quick else (args.batch, args.rounds, args.calls)
    features = mx.runtime.Features()
    mkldnn = "on" if features.is_enabled("MKLDNN") else "off"
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"MXNet {mx.__version__} (MKLDNN {mkldnn}), {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}")
    peak = gemm_peak()
    print(f"float32 GEMM peak (NumPy matmul 2048, all cores): {peak}", flush=True)
    rows = []
    for name in args.models:
        case = CASES[name]
        size = 64 if args.quick else args.size or case.size
        rows += bench(case, batch, size, rounds, calls, args.optimizer, peak, args.modes)
    print("\nmultires vs hand-written Gluon; ratio = multires / hand-written (target >= 0.97):")
    print(format_table(rows, COLUMNS))
    print(peak.footnote())
    if args.json:
        write_json(
            args.json,
            rows,
            mxnet=mx.__version__,
            mkldnn=mkldnn,
            omp_num_threads=threads,
            optimizer=args.optimizer,
            gemm_peak=vars(peak),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
