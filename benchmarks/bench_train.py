"""Benchmark: one epoch of `d2l_resnet18` on Fashion-MNIST in each backend named on the command line.

    python benchmarks/bench_train.py torch                 # the full 60,000 images at 28 x 28
    python benchmarks/bench_train.py tf flax --limit 1024  # a quick smoke run
    python benchmarks/bench_train.py torch tf flax --devices 2 --precision bf16 --limit 4096

The settings are `multires train`'s defaults (SGD; learning rate, schedule, momentum and batch
size as `multires.train.train` defines them; seed 0) at 28 x 28 rather than the book's 96 x 96,
so that a CPU finishes in minutes; the schedule spans the benchmark's epochs. `--device`,
`--devices` and `--precision` place the run as `multires train` does (`multires.backend.Execution`):
in torch, `--devices N` outside torchrun runs the torch part again under `torch.distributed.run`
with N processes on this machine, of which rank 0 records the row; in tf and flax on the CPU it
exposes N CPU devices (`multires.backend.CPU_DEVICES_ENV`) before the framework starts.

After each run, the trainer's overhead: the trainer's time per step against the runner's bare
step, both warm (compiled) and on the same runner. The bare step is the runner's `step` on one
prepared batch, `--overhead-steps` times, with `take_totals` at the end; the trainer's is
`multires.train.train` over as many full batches (synthetic images of the same size), which adds
the prefetch thread, the learning-rate schedule and the progress totals (read after every step in
an epoch under 50 steps, every `steps // 50` in longer ones). Both are timed once per round for
`--overhead-rounds` rounds, in the order bare, trainer, trainer, bare, ... (so a load that drifts
favours neither); the table shows the median over rounds of the trainer's time over the bare
time, less one, and in brackets the lowest and highest round (the noise of that run).

Each backend usually lives in its own environment (their pins conflict), so every run merges its
rows into `benchmarks/results/train.json` (one row per backend, layout, image size, limit, device,
device count and precision; the latest wins) and rewrites the table `benchmarks/results/train.md`
from all rows, with the machine each row was measured on. This is not a timed test: run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from common import framework_versions, machine, time_calls

from multires.backend import CPU_DEVICES_ENV, PRECISIONS, Runner, canonical_name, get_backend
from multires.data import CLASSES, Dataset, to_input
from multires.errors import BackendNotFoundError, BackendUnavailableError
from multires.graph import Graph
from multires.launch import torchrun, under_torchrun
from multires.train import SCHEDULES, train, train_defaults
from multires.zoo import spec

RESULTS = Path(__file__).resolve().parent / "results"

MERGE_KEY = (
    "backend",
    "layout",
    "image",
    "limit",
    "epochs",
    "schedule",
    "momentum",
    "lr",
    "batch_size",
    "device",
    "devices",
    "precision",
)
"""Row fields that identify a measurement: a new row replaces an old one with the same values."""

ROW_DEFAULTS = {"device": "cpu", "devices": 1, "precision": "fp32"}
"""Values of the fields that rows written before they existed had."""


def run(backend: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """Train in `backend`, measure the trainer's overhead, and return the table row (None in a
    process other than the main one of a data-parallel run)."""
    began = time.perf_counter()
    history = train(
        "d2l_resnet18",
        backend,
        epochs=args.epochs,
        lr=args.lr,
        schedule=args.schedule,
        momentum=args.momentum,
        batch_size=args.batch_size,
        seed=0,
        resize=args.resize,
        limit=args.limit,
        layout=args.layout,
        root=args.data,
        progress=not args.quiet,
        device=args.device,
        devices=args.devices,
        precision=args.precision,
    )
    wall = time.perf_counter() - began
    runner = history.runner
    assert runner is not None
    config = history.config
    overhead = (
        {} if args.overhead_steps == 0 else measure_overhead(runner, spec("d2l_resnet18"), config, args)
    )
    if not getattr(runner, "is_main", True):
        return None
    last = history.epochs[-1]
    return {
        "backend": backend,
        "framework": framework_versions(backend),
        "layout": config["layout"],
        "image": "x".join(map(str, config["image_size"])),
        "limit": args.limit,
        "epochs": args.epochs,
        "train_examples": config["train_examples"],
        "batch_size": args.batch_size,
        "lr": args.lr,
        "schedule": args.schedule,
        "momentum": args.momentum,
        "device": config["device"] or "cpu",
        "devices": config["devices"],
        "precision": config["precision"],
        "train_loss": round(last.train_loss, 4),
        "train_acc": round(last.train_acc, 4),
        "test_acc": round(last.test_acc, 4),
        "examples_per_sec": round(history.examples_per_sec, 1),
        **overhead,
        "wall_seconds": round(wall, 1),
        "python": platform.python_version(),
        "machine": machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def measure_overhead(
    runner: Runner, graph: Graph, config: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """The trainer's time per step against the runner's bare step (see the module docstring):
    `overhead_pct` and both rates in examples/s. Every process of a data-parallel run takes part."""
    if not hasattr(runner, "step"):
        return {}
    steps, batch = args.overhead_steps, args.batch_size
    height, width = config["image_size"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (steps * batch, height, width), dtype=np.uint8)
    labels = rng.integers(0, len(CLASSES), steps * batch).astype(np.uint8)
    data = (Dataset(images, labels, CLASSES), Dataset(images[:batch], labels[:batch], CLASSES))
    prepared = runner.prepare(to_input(images[:batch], runner.layout), labels[:batch].astype(np.int64))

    def bare() -> float:
        return time_calls(lambda: runner.step(prepared), steps, runner.take_totals)[0]

    def trainer() -> float:
        history = train(
            graph,
            lambda *_: runner,  # the warm runner, in place of a new one
            epochs=1,
            lr=args.lr,
            schedule=args.schedule,
            momentum=args.momentum,
            batch_size=batch,
            data=data,
            layout=runner.layout,
            checkpoint_every=None,
            progress=False,
        )
        return history.epochs[0].seconds / steps

    bare()  # warm-up: the step is compiled already; this settles caches and clocks
    trainer()
    ratios: list[float] = []
    bares: list[float] = []
    trainers: list[float] = []
    for round_ in range(args.overhead_rounds):  # in the order ABBA..., so a drifting load biases neither
        order = ("bare", "trainer") if round_ % 2 == 0 else ("trainer", "bare")
        times = {which: bare() if which == "bare" else trainer() for which in order}
        bares.append(times["bare"])
        trainers.append(times["trainer"])
        ratios.append(times["trainer"] / times["bare"])
    percents = sorted(round(100 * (ratio - 1), 1) for ratio in ratios)
    if getattr(runner, "is_main", True):
        print(f"trainer overhead per round, %: {percents}", flush=True)
    return {
        "overhead_pct": round(100 * (statistics.median(ratios) - 1), 1),
        "overhead_range_pct": [percents[0], percents[-1]],
        "bare_examples_per_sec": round(batch / statistics.median(bares), 1),
        "trainer_examples_per_sec": round(batch / statistics.median(trainers), 1),
        "overhead_steps": steps,
        "overhead_rounds": args.overhead_rounds,
    }


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row.get(k, ROW_DEFAULTS.get(k)) for k in MERGE_KEY)


def merge(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Rows of `path` updated with `rows` (a row with the same `MERGE_KEY` values replaced)."""
    old = json.loads(path.read_text()) if path.is_file() else []
    fresh = {_key(r) for r in rows}
    kept = [{**ROW_DEFAULTS, **r} for r in old if _key(r) not in fresh]
    return sorted(
        kept + rows,
        key=lambda r: (
            r["limit"] is not None,
            str(r["image"]),
            str(r["backend"]),
            str(r["device"]),
            r["devices"],
            r["precision"],
        ),
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table, one note per machine."""
    lines = [
        "# Training benchmark: d2l_resnet18 on Fashion-MNIST",
        "",
        "Written by `benchmarks/bench_train.py` (SGD, lr and batch size as shown, seed 0, canonical",
        "initial weights). Examples/s counts training steps only (as the book does); wall time includes",
        "the test-set evaluation. Rows with a limit are smoke runs on the first N train and test images.",
        "Devices > 1 is data parallelism over that many devices (processes under torchrun in torch, CPU",
        "devices in tf and flax on a CPU); precision is fp32 or the framework's mixed bf16/fp16.",
        "Overhead % is the trainer's time per step over the same runner's bare `step` on one prepared",
        "batch, both warm, less one: the median of paired rounds, the lowest and highest round in brackets",
        "(see the script's docstring).",
        "",
        "| backend | framework | layout | image | device | devices | precision | epochs | train examples "
        "| batch | lr | schedule | momentum | train loss | train acc | test acc | examples/s | overhead % "
        "| wall s | limit | date | machine |",
        "|---|---|---|---|---|--:|---|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in rows:
        overhead = f"{r['overhead_pct']:.1f}" if r.get("overhead_pct") is not None else "-"
        if r.get("overhead_range_pct"):
            overhead += " ({} to {})".format(*r["overhead_range_pct"])
        lines.append(
            f"| {r['backend']} | {r['framework']} | {r['layout']} | {r['image']} | {r['device']} | {r['devices']} "
            f"| {r['precision']} | {r['epochs']} "
            f"| {r['train_examples']} | {r['batch_size']} | {r['lr']} | {r.get('schedule', 'constant')} "
            f"| {r.get('momentum', 0.0)} | {r['train_loss']:.3f} "
            f"| {r['train_acc']:.3f} | {r['test_acc']:.3f} | {r['examples_per_sec']:.1f} | {overhead} "
            f"| {r['wall_seconds']:.0f} | {r['limit'] if r['limit'] is not None else 'full'} | {r['date']} "
            f"| {r['machine']} (Python {r['python']}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("backends", nargs="+", help="backends to train in, e.g. torch tf flax mxnet")
    defaults = train_defaults()
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=defaults["lr"])
    parser.add_argument("--schedule", choices=SCHEDULES, default=defaults["schedule"])
    parser.add_argument("--momentum", type=float, default=defaults["momentum"])
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--resize", type=int, help="image size (default: the original 28 x 28)")
    parser.add_argument("--limit", type=int, metavar="N", help="first N train and test images (smoke run)")
    parser.add_argument("--layout", help="NCHW or NHWC (default: each backend's own)")
    parser.add_argument(
        "--device", help="the framework's device, e.g. cuda, cuda:1 (torch), GPU (tf), gpu (flax)"
    )
    parser.add_argument(
        "--devices", type=int, default=1, metavar="N", help="data-parallel devices (default 1)"
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32 or mixed bf16/fp16")
    parser.add_argument(
        "--overhead-steps", type=int, default=10, metavar="N", help="steps per overhead timing (0: none)"
    )
    parser.add_argument(
        "--overhead-rounds", type=int, default=6, metavar="N", help="paired overhead timings (median ratio)"
    )
    parser.add_argument("--data", metavar="DIR", help="folder of the Fashion-MNIST files")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for train.json and train.md")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    spawned = under_torchrun()  # a torchrun process: this run's other processes do the same
    on_cpu = (args.device or "cpu").lower() == "cpu"
    if args.devices > 1 and on_cpu:
        os.environ.setdefault(CPU_DEVICES_ENV, str(args.devices))  # tf and flax read it when they start
    rows, status, relaunched = [], 0, False
    for name in args.backends:
        try:
            backend = canonical_name(name)
        except BackendNotFoundError as error:
            print(f"skipping {name}: {error}", file=sys.stderr)
            continue
        if backend == "torch" and args.devices > 1 and not spawned:
            others = [a for a in argv if a not in args.backends]
            print(f"torch: {args.devices} processes under torchrun", flush=True)
            status = torchrun(args.devices, [str(Path(__file__).resolve()), "torch", *others]) or status
            relaunched = True
            continue
        try:
            get_backend(backend)
        except BackendUnavailableError as error:
            print(f"skipping {name}: {error}", file=sys.stderr)
            continue
        row = run(backend, args)
        if row is None:
            continue
        overhead = f", trainer overhead {row['overhead_pct']:.1f}%" if "overhead_pct" in row else ""
        print(
            f"{backend} ({row['devices']} x {row['device']}, {row['precision']}): test acc {row['test_acc']:.3f}, "
            f"{row['examples_per_sec']:.1f} examples/sec{overhead}",
            flush=True,
        )
        rows.append(row)
    if spawned and int(os.environ.get("RANK", "0")) != 0:
        return 0
    if not rows:
        if not relaunched:
            print("no backend could run; nothing recorded", file=sys.stderr)
            return 1
        return status
    args.results.mkdir(parents=True, exist_ok=True)
    merged = merge(rows, args.results / "train.json")
    (args.results / "train.json").write_text(json.dumps(merged, indent=2) + "\n")
    (args.results / "train.md").write_text(markdown(merged))
    print(f"wrote {args.results / 'train.md'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
