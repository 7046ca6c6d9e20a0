"""Images/s of multires-built PyTorch models against hand-written PyTorch models of the same architecture.

For `d2l_resnet18` at 96x96 and `resnet50` at 224x224 (batch 64): eval-mode inference and one
training step (softmax cross-entropy, `torch.optim.SGD` lr 0.1), each in plain NCHW and in
`channels_last`, and with `--compile` also `channels_last` under `torch.compile` (inductor;
compiling takes minutes on a CPU, hence the flag). Both models of a row run in the same process, interleaved
round by round (so machine noise hits both alike); rates are medians. The table gives images/s
and the ratio multires / hand-written (target >= 0.97) by wall clock and per CPU-second of the
process (on a shared machine the wall clock also measures the neighbours; see common.py).

The hand-written models are the book's `ResNet` (d2l.ai, "Residual Networks") and torchvision's
ResNet-50 code, written out here with plain `torch.nn`; their state_dicts map onto the multires
model through the torch backend's checkpoint rename table, and their outputs are checked equal
before timing.

    python benchmarks/bench_torch.py                  # default run (a few minutes on 2 cores)
    python benchmarks/bench_torch.py --compile        # adds torch.compile rows (slow to compile)
    python benchmarks/bench_torch.py --rounds 5 --threads 1   # steadier ratios on a busy machine
    python benchmarks/bench_torch.py --quick          # CI smoke run: small batch and images
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from common import MODES, Peak, as_subject, format_table, gemm_peak, interleave, peak_fraction, write_json
from multires.backends.torch import CHECKPOINT_RENAMES, export_weights, from_state_dict, load_weights
from torch import nn

import multires

# The d2l book's ResNet-18 (PyTorch edition), module paths included. ----------------------------


class Residual(nn.Module):
    """The book's residual block."""

    def __init__(
        self, in_channels: int, num_channels: int, use_1x1conv: bool = False, strides: int = 1
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, num_channels, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels, kernel_size=3, padding=1)
        self.conv3 = (
            nn.Conv2d(in_channels, num_channels, kernel_size=1, stride=strides) if use_1x1conv else None
        )
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.bn2 = nn.BatchNorm2d(num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.conv3 is not None:
            x = self.conv3(x)
        y += x
        return F.relu(y)


class D2lResNet18(nn.Module):
    """The book's `ResNet18(num_classes=10)` for 1-channel images."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        b1 = nn.Sequential(
            nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.net = nn.Sequential(b1)
        in_channels = 64
        for i, channels in enumerate((64, 128, 256, 512)):
            blocks = []
            for j in range(2):
                first = j == 0 and i > 0
                blocks.append(Residual(in_channels, channels, use_1x1conv=first, strides=2 if first else 1))
                in_channels = channels
            self.net.add_module(f"b{i + 2}", nn.Sequential(*blocks))
        self.net.add_module(
            "last", nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(512, num_classes))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# torchvision's ResNet-50 (torchvision.models.resnet, Bottleneck v1.5). --------------------------


class Bottleneck(nn.Module):
    """torchvision's `Bottleneck` with groups=1, base width 64."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet50(nn.Module):
    """torchvision's `resnet50()`."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 3)
        self.layer2 = self._make_layer(128, 4, stride=2)
        self.layer3 = self._make_layer(256, 6, stride=2)
        self.layer4 = self._make_layer(512, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False
                ),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# The benchmark. --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    size: int
    channels: int
    classes: int
    handwritten: Callable[[], nn.Module]
    checkpoint: str
    """The checkpoint family whose rename table maps the hand-written keys to canonical names."""


CASES = {
    "d2l_resnet18": Case("d2l_resnet18", 96, 1, 10, D2lResNet18, "d2l"),
    "resnet50": Case("resnet50", 224, 3, 1000, ResNet50, "torchvision"),
}


@dataclass(frozen=True)
class Row:
    model: str
    input: str
    mode: str
    variant: str
    handwritten: float
    multires: float
    ratio: float
    handwritten_cpu: float
    multires_cpu: float
    cpu_ratio: float
    handwritten_peak: float
    multires_peak: float


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm parameters and statistics, so the equality check means something."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.2, generator=generator)
                module.running_mean.normal_(0.0, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


def _models(case: Case) -> dict[str, nn.Module]:
    """The hand-written model, the multires-built one with the same weights, and the multires one
    built for inference (BatchNorm folded into the convolutions)."""
    torch.manual_seed(0)
    handwritten = _randomise_batchnorm(case.handwritten())
    graph = multires.spec(case.name)
    ours = multires.build(graph, backend="torch")
    load_weights(ours, from_state_dict(handwritten.state_dict(), CHECKPOINT_RENAMES[case.checkpoint]))
    folded = multires.build(graph, backend="torch", weights=export_weights(ours), inference=True)
    return {"handwritten": handwritten, "multires": ours, "folded": folded}


def _check_equal(models: dict[str, nn.Module], x: torch.Tensor, what: str) -> None:
    with torch.inference_mode():
        outputs = {name: model.eval()(x) for name, model in models.items()}
    expected = outputs["handwritten"]
    for name in ("multires", "folded"):
        error = float((outputs[name] - expected).abs().max() / expected.abs().max())
        if not error <= 1e-5:
            raise SystemExit(f"{what}: {name} and hand-written outputs differ (relative error {error:.2e})")


def _inference(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return model(x)

    return run


def _training(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], Any]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step() -> Any:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


def bench(
    case: Case,
    batch: int,
    size: int,
    variants: list[str],
    rounds: int,
    calls: int,
    warmup: int,
    peak: Peak,
    modes: list[str],
) -> list[Row]:
    """The rows of one model: inference (also BatchNorm folded) and training in each variant;
    `peak` is the GEMM peak the rows' peak fractions refer to."""
    macs = multires.macs(multires.spec(case.name), (1, case.channels, size, size))
    rows = []
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, case.channels, size, size, generator=generator)
    labels = torch.randint(0, case.classes, (batch,), generator=generator)
    for variant in variants:
        built = _models(case)
        inputs = x
        if variant in ("channels_last", "channels_last+compile"):
            built = {k: m.to(memory_format=torch.channels_last) for k, m in built.items()}
            inputs = x.to(memory_format=torch.channels_last)
        _check_equal(built, inputs, f"{case.name} ({variant})")
        for mode in modes:
            models = (
                dict(built) if mode == "inference" else {k: built[k] for k in ("handwritten", "multires")}
            )
            if variant == "channels_last+compile":
                models = {k: torch.compile(m) for k, m in models.items()}
            for model in models.values():
                model.train(mode == "train_step")
            make = _inference if mode == "inference" else _training
            candidates = {
                k: make(m, inputs) if mode == "inference" else make(m, inputs, labels)
                for k, m in models.items()
            }
            start = time.perf_counter()
            # Compiling happens in the first calls of each mode (and a recompile when it changes).
            extra = 2 if variant == "channels_last+compile" else 0
            timings = interleave(candidates, rounds=rounds, calls=calls, warmup=warmup + extra)
            print(f"  {case.name} {mode} {variant}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
            for subject in [name for name in ("multires", "folded") if name in timings]:
                hw, mr = timings["handwritten"], as_subject(timings, subject)["multires"]
                rows.append(
                    Row(
                        model=case.name,
                        input=f"{batch}x{case.channels}x{size}x{size}",
                        mode=mode,
                        variant=variant if subject == "multires" else f"{variant}, BN folded",
                        handwritten=hw.rate(batch),
                        multires=mr.rate(batch),
                        ratio=mr.rate(batch) / hw.rate(batch),
                        handwritten_cpu=hw.rate(batch, "cpu"),
                        multires_cpu=mr.rate(batch, "cpu"),
                        cpu_ratio=mr.rate(batch, "cpu") / hw.rate(batch, "cpu"),
                        handwritten_peak=peak_fraction(hw.rate(batch, "cpu"), macs, peak),
                        multires_peak=peak_fraction(mr.rate(batch, "cpu"), macs, peak),
                    )
                )
    return rows


COLUMNS = [
    ("model", "model", ""),
    ("input", "input (NCHW)", ""),
    ("mode", "mode", ""),
    ("variant", "variant", ""),
    ("handwritten", "hand-written img/s", ".1f"),
    ("multires", "multires img/s", ".1f"),
    ("ratio", "ratio", ".3f"),
    ("handwritten_cpu", "hand-written img/CPU-s", ".2f"),
    ("multires_cpu", "multires img/CPU-s", ".2f"),
    ("cpu_ratio", "CPU ratio", ".3f"),
    ("handwritten_peak", "hand-written peak", ".0%"),
    ("multires_peak", "multires peak", ".0%"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median taken)")
    parser.add_argument("--calls", type=int, default=1, help="timed calls per round")
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="untimed calls first (the output check already runs one forward)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="add channels_last + torch.compile rows (inductor)"
    )
    parser.add_argument("--no-channels-last", action="store_true", help="skip the channels_last rows")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run: batch 4, images a third the size, 3 rounds after 3 warm-up calls",
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="what to time")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [
        "plain",
        *([] if args.no_channels_last else ["channels_last"]),
        *(["channels_last+compile"] if args.compile else []),
    ]
    batch, rounds, warmup = (4, 3, 3) if args.quick else (args.batch, args.rounds, args.warmup)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch}, {warmup} warm-up call(s), "
        f"{rounds} rounds x {args.calls} call(s), variants {variants}",
        file=sys.stderr,
    )
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = gemm_peak(lambda: torch.mm(a, b))
    print(
        f"float32 GEMM peak (torch.mm 2048, {torch.get_num_threads()} threads): {peak}",
        file=sys.stderr,
    )
    rows = []
    for name in args.models:
        case = CASES[name]
        size = case.size // 3 if args.quick else args.size or case.size
        rows += bench(case, batch, size, variants, rounds, args.calls, warmup, peak, args.modes)
    print(format_table([r.__dict__ for r in rows], COLUMNS))
    print(peak.footnote())
    if args.json:
        write_json(
            args.json,
            rows,
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            batch=batch,
            gemm_peak=vars(peak),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
