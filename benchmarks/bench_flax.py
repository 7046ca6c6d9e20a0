"""Images/s of multires-built Flax models against hand-written Flax models of the same architecture.

For `d2l_resnet18` at 96x96 and `resnet50` at 224x224 (batch 64), in one process and interleaved
round by round (so machine noise hits both alike): jitted inference (`train=False`) and one jitted
training step (softmax cross-entropy, `jax.value_and_grad`, optax SGD with momentum and weight
decay, running statistics updated; the same step function for both models). Prints images/s and
the ratio multires / hand-written (target >= 0.97), by wall clock and per CPU-second of the
process (on a shared machine the wall clock also measures the neighbours; see common.py), and the
seconds of each model's first call.

The hand-written models below are what one would write from the book (D2L's ResNet chapter) and
from torchvision's ResNet-50 in the style of the Flax ImageNet example, with `nn.BatchNorm` and
explicit padding, submodules named so that the same canonical weights load into both: the
benchmark checks their outputs agree before timing. Both use the same matmul/conv `--precision`.

`--conv-cases` times single convolutions instead, XLA's own against the im2col matmul that the
multires lowering uses on XLA:CPU where `matmul_pays` (`multires.backends.flax`) says so, forward and
backward, with the rule's choice and whether it was the faster one in that run.

    python benchmarks/bench_flax.py            # full run (slow on CPU)
    python benchmarks/bench_flax.py --quick    # CI smoke run: small batch and images
    python benchmarks/bench_flax.py --models d2l_resnet18 --size 28 --batch 256 --modes train_step
    python benchmarks/bench_flax.py --conv-cases
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
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

import multires
from multires import reference
from multires.passes import fold_batchnorm
from multires.weights import to_variables

# --------------------------------------------------------------------------------------------
# Hand-written models (submodule names chosen to match the canonical weight names, for loading).


def _norm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class D2LResidual(nn.Module):
    """D2L's `Residual`: two 3x3 conv-BN (with conv bias), an optional strided 1x1 shortcut conv."""

    channels: int
    stride: int = 1
    shortcut: bool = False
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = partial(nn.Conv, self.channels, padding=((1, 1), (1, 1)), precision=self.precision)
        y = nn.relu(_norm(train, "bn1")(conv((3, 3), self.stride, name="conv1")(x)))
        y = _norm(train, "bn2")(conv((3, 3), name="conv2")(y))
        if self.shortcut:
            x = nn.Conv(self.channels, (1, 1), self.stride, precision=self.precision, name="conv3")(x)
        return nn.relu(y + x)


class D2LStage(nn.Module):
    channels: int
    first: bool
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        stride = 1 if self.first else 2
        x = D2LResidual(self.channels, stride, not self.first, self.precision, name="0")(x, train)
        return D2LResidual(self.channels, precision=self.precision, name="1")(x, train)


class D2LStem(nn.Module):
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(64, (7, 7), 2, padding=((3, 3), (3, 3)), precision=self.precision, name="0")(x)
        x = nn.relu(_norm(train, "1")(x))
        return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


class D2LHead(nn.Module):
    classes: int
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.classes, precision=self.precision, name="2")(jnp.mean(x, axis=(1, 2)))


class D2LResNet18(nn.Module):
    """The Dive into Deep Learning ResNet-18 (one input channel, 10 classes by default)."""

    classes: int = 10
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = D2LStem(self.precision, name="b1")(x, train)
        for stage, channels in enumerate((64, 128, 256, 512), start=2):
            x = D2LStage(channels, stage == 2, self.precision, name=f"b{stage}")(x, train)
        return D2LHead(self.classes, self.precision, name="last")(x)


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck: stride on the 3x3 conv, no conv bias, projection when needed."""

    width: int
    stride: int = 1
    project: bool = False
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = partial(nn.Conv, use_bias=False, precision=self.precision)
        y = nn.relu(_norm(train, "bn1")(conv(self.width, (1, 1), name="conv1")(x)))
        y = conv(self.width, (3, 3), self.stride, padding=((1, 1), (1, 1)), name="conv2")(y)
        y = nn.relu(_norm(train, "bn2")(y))
        y = _norm(train, "bn3")(conv(self.width * 4, (1, 1), name="conv3")(y))
        if self.project:
            x = ProjectionShortcut(self.width * 4, self.stride, self.precision, name="downsample")(x, train)
        return nn.relu(y + x)


class ProjectionShortcut(nn.Module):
    features: int
    stride: int
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = nn.Conv(self.features, (1, 1), self.stride, use_bias=False, precision=self.precision, name="0")
        return _norm(train, "1")(conv(x))


class Stage(nn.Module):
    width: int
    blocks: int
    stride: int
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Bottleneck(self.width, self.stride, True, self.precision, name="0")(x, train)
        for block in range(1, self.blocks):
            x = Bottleneck(self.width, precision=self.precision, name=str(block))(x, train)
        return x


class ResNet50(nn.Module):
    """torchvision's ResNet-50 (v1.5)."""

    classes: int = 1000
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(
            64, (7, 7), 2, padding=((3, 3), (3, 3)), use_bias=False, precision=self.precision, name="conv1"
        )(x)
        x = nn.relu(_norm(train, "bn1")(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
            x = Stage(width, blocks, 1 if stage == 1 else 2, self.precision, name=f"layer{stage}")(x, train)
        return nn.Dense(self.classes, precision=self.precision, name="fc")(jnp.mean(x, axis=(1, 2)))


@dataclass(frozen=True)
class Case:
    model: str
    size: int
    classes: int
    channels: int
    hand: Callable[..., nn.Module]


CASES = {
    "d2l_resnet18": Case("d2l_resnet18", 96, 10, 1, D2LResNet18),
    "resnet50": Case("resnet50", 224, 1000, 3, ResNet50),
}

CONV_CASES = [
    # batch, map size, channels in, out, kernel, stride, padding: ResNet's convolutions at the
    # sizes of d2l_resnet18 at 28 and 96 pixels and of ResNet-50 at 224
    (256, 7, 64, 64, 3, 1, 1),
    (256, 4, 64, 128, 3, 2, 1),
    (256, 4, 128, 128, 3, 1, 1),
    (256, 2, 256, 256, 3, 1, 1),
    (256, 1, 512, 512, 3, 1, 1),
    (64, 96, 1, 64, 7, 2, 3),
    (64, 24, 64, 64, 3, 1, 1),
    (64, 12, 128, 256, 3, 2, 1),
    (64, 6, 256, 256, 3, 1, 1),
    (64, 3, 512, 512, 3, 1, 1),
    (16, 56, 64, 256, 1, 1, 0),
    (16, 56, 256, 128, 1, 2, 0),
    (16, 28, 128, 128, 3, 1, 1),
    (16, 7, 512, 512, 3, 1, 1),
]

CONV_COLUMNS = [
    ("case", "convolution (NHWC, HWIO)", ""),
    ("xla_forward_ms", "XLA fwd ms", ".1f"),
    ("matmul_forward_ms", "matmul fwd ms", ".1f"),
    ("xla_backward_ms", "XLA fwd+bwd ms", ".1f"),
    ("matmul_backward_ms", "matmul fwd+bwd ms", ".1f"),
    ("speedup", "matmul speed-up fwd+bwd", ".2f"),
    ("choice", "lowering's choice", ""),
    ("right", "faster choice?", ""),
]


def _convolution_calls(
    conv: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, w: jax.Array
) -> tuple[jax.Array, dict[str, Callable[[], None]]]:
    """The convolution's output, and calls of it jitted forward and forward plus both gradients
    (each waits for its result)."""
    forward = jax.jit(conv)
    both = jax.jit(jax.grad(lambda x, w: (conv(x, w) ** 2).sum(), argnums=(0, 1)))
    return forward(x, w), {
        "forward": lambda: jax.block_until_ready(forward(x, w)),
        "backward": lambda: jax.block_until_ready(both(x, w)),
    }


def bench_convolutions(rounds: int, calls: int, quick: bool) -> list[dict[str, Any]]:
    """One row per `CONV_CASES` entry: XLA's convolution against the lowering's `im2col_matmul`,
    forward and forward plus both gradients, interleaved (both ways, whatever `matmul_pays` chooses)."""
    flax_backend = multires.get_backend("flax")
    rng = np.random.default_rng(0)
    rows = []
    for batch, size, c_in, c_out, k, stride, pad in CONV_CASES[:2] if quick else CONV_CASES:
        x = jnp.asarray(rng.standard_normal((batch, size, size, c_in), dtype=np.float32))
        w = jnp.asarray(rng.standard_normal((k, k, c_in, c_out), dtype=np.float32))
        numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        padding = ((pad, pad), (pad, pad))
        xla = partial(
            jax.lax.conv_general_dilated,
            window_strides=(stride, stride),
            padding=padding,
            dimension_numbers=numbers,
            precision="highest",
        )
        out_size = (size + 2 * pad - k) // stride + 1
        pays = flax_backend.matmul_pays((k, k), (stride, stride), c_in, (out_size, out_size))
        matmul = partial(
            flax_backend.im2col_matmul, strides=(stride, stride), padding=padding, precision="highest"
        )
        outputs, candidates = {}, {}
        for name, conv in (("xla", xla), ("matmul", matmul)):
            outputs[name], calls_of = _convolution_calls(conv, x, w)
            candidates.update({f"{name}_{kind}": call for kind, call in calls_of.items()})
        error = reference.relative_error(np.asarray(outputs["matmul"]), np.asarray(outputs["xla"]))
        if error > 1e-5:
            raise SystemExit(f"im2col_matmul differs from XLA's convolution by {error:.1e}")
        timings = interleave(candidates, rounds, calls, sync=jax.effects_barrier)
        ms = {name: 1e3 / timing.rate(1) for name, timing in timings.items()}
        speedup = ms["xla_backward"] / ms["matmul_backward"]
        row = {
            "case": f"{batch}x{size}x{size}x{c_in} -> {c_out}, {k}x{k} stride {stride}",
            **{f"{name}_ms": value for name, value in ms.items()},
            "speedup": speedup,
            "choice": "matmul" if pays else "XLA conv",
            "right": "yes" if pays == (speedup > 1) else "no",
        }
        print(format_table([row], CONV_COLUMNS).splitlines()[-1], flush=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Timing.

Step = Callable[[dict[str, Any], Any, jax.Array, jax.Array], tuple[dict[str, Any], Any, jax.Array]]


def _step_functions(model: nn.Module) -> tuple[Callable[..., jax.Array], Step, optax.GradientTransformation]:
    """The jitted inference and training step (buffers donated) for `model`."""
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.01, momentum=0.9))

    @jax.jit
    def infer(variables: dict[str, Any], x: jax.Array) -> jax.Array:
        return model.apply(variables, x, train=False)

    @partial(jax.jit, donate_argnums=(0, 1))
    def train(
        variables: dict[str, Any], opt_state: Any, x: jax.Array, labels: jax.Array
    ) -> tuple[dict[str, Any], Any, jax.Array]:
        def loss_fn(params: Any) -> tuple[jax.Array, Any]:
            logits, updates = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return {"params": params, "batch_stats": stats}, opt_state, loss

    return infer, train, tx


class Runner:
    """One model's jitted functions and state; `inference` and `train_step` make one call each and
    keep its (possibly still running) result in `out`."""

    def __init__(self, model: nn.Module, variables: dict[str, Any], x: jax.Array, labels: jax.Array) -> None:
        self.infer, self.train, tx = _step_functions(model)
        self.variables = jax.tree.map(jnp.array, variables)
        self.opt_state = tx.init(self.variables["params"])
        self.x, self.labels = x, labels
        self.out: Any = None

    def inference(self) -> None:
        self.out = self.infer(self.variables, self.x)

    def train_step(self) -> None:
        self.variables, self.opt_state, self.out = self.train(
            self.variables, self.opt_state, self.x, self.labels
        )


COLUMNS = [
    ("model", "model", ""),
    ("input", "input (NHWC)", ""),
    ("mode", "mode", ""),
    ("precision", "precision", ""),
    *compare_columns(peak=True),
]


def bench(
    case: Case, batch: int, size: int, rounds: int, calls: int, precision: str, peak: Peak, modes: list[str]
) -> list[Row]:
    """Rows of images/s for `case`, the models timed alternately in each round; inference also with
    BatchNorm folded (`multires.passes.fold_batchnorm`). `peak`: the GEMM peak of the peak fractions."""
    graph = multires.spec(case.model)
    weights = multires.random_weights(graph, seed=0)
    variables = to_variables(weights, graph)
    folded_graph, folded_weights = fold_batchnorm(graph, weights)
    jax_precision = None if precision == "default" else precision
    ours = multires.get_backend("flax").build(graph, "NHWC", precision=jax_precision)
    folded = multires.get_backend("flax").build(folded_graph, "NHWC", precision=jax_precision)
    hand = case.hand(precision=jax_precision)
    macs = (multires.macs(graph, (1, case.channels, size, size)), peak)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, size, size, case.channels)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, case.classes, size=batch))
    runners = {
        "multires": Runner(ours, variables, x, labels),
        "handwritten": Runner(hand, variables, x, labels),
        "folded": Runner(folded, to_variables(folded_weights, folded_graph), x, labels),
    }
    hand_tree = jax.eval_shape(hand.init, jax.random.key(0), x)
    if jax.tree.structure(hand_tree) != jax.tree.structure(variables):
        raise SystemExit(f"{case.model}: the hand-written model's variables are not the canonical tree.")
    outputs = {k: np.asarray(t.infer(t.variables, x)) for k, t in runners.items()}
    error = max(reference.relative_error(outputs[k], outputs["handwritten"]) for k in ("multires", "folded"))
    print(
        f"{case.model} {size}x{size}: multires vs hand-written outputs, relative error {error:.1e}",
        flush=True,
    )
    if error > 1e-4:
        raise SystemExit(f"{case.model}: the hand-written model computes something else (error {error:.1e}).")

    def sync() -> None:
        jax.block_until_ready([runner.out for runner in runners.values()])

    rows = []
    for mode in modes:
        names = list(runners) if mode == "inference" else ["multires", "handwritten"]
        candidates = {name: getattr(runners[name], mode) for name in names}
        first = {name: time_calls(call, 1, sync)[0] for name, call in candidates.items()}  # compile
        timings = interleave(candidates, rounds, calls, warmup=0, sync=sync)
        fields = {
            "model": case.model,
            "input": f"{batch}x{size}x{size}x{case.channels}",
            "mode": mode,
            "precision": precision,
        }
        for row in folded_rows(timings, first, batch, fields, "mode", peak=macs):
            print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, sorted(CASES), rounds=5, calls=3)
    parser.add_argument(
        "--precision",
        choices=("highest", "default"),
        default="highest",
        help="conv/matmul precision of both models: 'highest' is exact float32 (multires' default), "
        "'default' lets GPUs use TF32",
    )
    parser.add_argument(
        "--conv-cases", action="store_true", help="time single convolutions, XLA's against the matmul"
    )
    args = parser.parse_args(argv)
    batch, rounds, calls = (4, 1, 1) if args.quick else (args.batch, args.rounds, args.calls)
    devices = ", ".join(str(d) for d in jax.devices())
    print(
        f"JAX {jax.__version__}, Flax {flax.__version__}, optax {optax.__version__}, devices: {devices}, "
        f"{os.cpu_count()} CPUs, precision {args.precision}"
    )
    if args.conv_cases:
        conv_rows = bench_convolutions(rounds, calls, args.quick)
        print("\nXLA's convolution against im2col and one matmul (medians):")
        print(format_table(conv_rows, CONV_COLUMNS))
        if args.json:
            write_json(args.json, conv_rows, jax=jax.__version__, devices=devices)
        return 0
    peak = gemm_peak()
    print(f"float32 GEMM peak (NumPy matmul 2048, all cores): {peak}", flush=True)
    rows = []
    for name in args.models:
        case = CASES[name]
        size = 64 if args.quick else args.size or case.size
        rows += bench(case, batch, size, rounds, calls, args.precision, peak, args.modes)
    print("\nmultires vs hand-written Flax; ratio = multires / hand-written (target >= 0.97):")
    print(format_table(rows, COLUMNS))
    print(peak.footnote())
    if args.json:
        write_json(
            args.json,
            rows,
            jax=jax.__version__,
            flax=flax.__version__,
            optax=optax.__version__,
            devices=devices,
            gemm_peak=vars(peak),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
