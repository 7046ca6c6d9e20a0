"""Benchmark: one epoch of `d2l_resnet18` on Fashion-MNIST in each backend named on the command line.

    python benchmarks/bench_train.py torch                 # the full 60,000 images at 28 x 28
    python benchmarks/bench_train.py tf flax --limit 1024  # a quick smoke run

The settings are `multires train`'s defaults (SGD; learning rate, schedule, momentum and batch
size as `multires.train.train` defines them; seed 0) at 28 x 28 rather than the book's 96 x 96,
so that a CPU finishes in minutes; the schedule spans the benchmark's epochs. Each backend usually lives in its own environment (their pins
conflict), so every run merges its rows into `benchmarks/results/train.json` (one row per
backend, layout, image size and limit; the latest wins) and rewrites the table
`benchmarks/results/train.md` from all rows, with the machine each row was measured on. This is
not a timed test: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from multires.backend import canonical_name, get_backend
from multires.errors import BackendNotFoundError, BackendUnavailableError
from multires.train import SCHEDULES, train, train_defaults

RESULTS = Path(__file__).resolve().parent / "results"

DISTRIBUTIONS = {
    "torch": ("torch",),
    "tf": ("tensorflow-cpu", "tensorflow", "keras"),
    "flax": ("jax", "flax"),
    "mxnet": ("mxnet",),
    "onnx": ("onnxruntime",),
}
"""Distributions whose versions identify a backend's framework."""


def framework_versions(backend: str) -> str:
    """`torch 2.13.0`-style versions of the framework packages installed for `backend`."""
    found = []
    for name in DISTRIBUTIONS.get(backend, (backend,)):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found) or "unknown"


def machine() -> str:
    """CPU model, logical cores and OS of this machine."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}"


def run(backend: str, args: argparse.Namespace) -> dict[str, object]:
    """Train one epoch in `backend` and return the table row."""
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
    )
    last = history.epochs[-1]
    return {
        "backend": backend,
        "framework": framework_versions(backend),
        "layout": history.config["layout"],
        "image": "x".join(map(str, history.config["image_size"])),
        "limit": args.limit,
        "epochs": args.epochs,
        "train_examples": history.config["train_examples"],
        "batch_size": args.batch_size,
        "lr": args.lr,
        "schedule": args.schedule,
        "momentum": args.momentum,
        "train_loss": round(last.train_loss, 4),
        "train_acc": round(last.train_acc, 4),
        "test_acc": round(last.test_acc, 4),
        "examples_per_sec": round(history.examples_per_sec, 1),
        "wall_seconds": round(time.perf_counter() - began, 1),
        "python": platform.python_version(),
        "machine": machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def merge(rows: list[dict[str, object]], path: Path) -> list[dict[str, object]]:
    """Rows of `path` updated with `rows` (same backend, layout, image size and limit replaced)."""
    key = ("backend", "layout", "image", "limit", "epochs", "schedule", "momentum", "lr", "batch_size")
    old = json.loads(path.read_text()) if path.is_file() else []
    fresh = {tuple(r.get(k) for k in key) for r in rows}
    kept = [r for r in old if tuple(r.get(k) for k in key) not in fresh]
    return sorted(kept + rows, key=lambda r: (r["limit"] is not None, str(r["image"]), str(r["backend"])))


def markdown(rows: list[dict[str, object]]) -> str:
    """The results as a Markdown table, one note per machine."""
    lines = [
        "# Training benchmark: d2l_resnet18 on Fashion-MNIST",
        "",
        "Written by `benchmarks/bench_train.py` (SGD, lr and batch size as shown, seed 0, canonical",
        "initial weights). Examples/s counts training steps only (as the book does); wall time includes",
        "the test-set evaluation. Rows with a limit are smoke runs on the first N train and test images.",
        "",
        "| backend | framework | layout | image | epochs | train examples | batch | lr | schedule | momentum "
        "| train loss | train acc | test acc | examples/s | wall s | limit | date | machine |",
        "|---|---|---|---|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['framework']} | {r['layout']} | {r['image']} | {r['epochs']} "
            f"| {r['train_examples']} | {r['batch_size']} | {r['lr']} | {r.get('schedule', 'constant')} "
            f"| {r.get('momentum', 0.0)} | {r['train_loss']:.3f} "
            f"| {r['train_acc']:.3f} | {r['test_acc']:.3f} | {r['examples_per_sec']:.1f} | {r['wall_seconds']:.0f} "
            f"| {r['limit'] if r['limit'] is not None else 'full'} | {r['date']} | {r['machine']} (Python {r['python']}) |"
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
    parser.add_argument("--data", metavar="DIR", help="folder of the Fashion-MNIST files")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for train.json and train.md")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    rows = []
    for name in args.backends:
        try:
            backend = canonical_name(name)
            get_backend(backend)
        except (BackendNotFoundError, BackendUnavailableError) as error:
            print(f"skipping {name}: {error}", file=sys.stderr)
            continue
        row = run(backend, args)
        print(
            f"{backend}: test acc {row['test_acc']:.3f}, {row['examples_per_sec']:.1f} examples/sec",
            flush=True,
        )
        rows.append(row)
    if not rows:
        print("no backend could run; nothing recorded", file=sys.stderr)
        return 1
    args.results.mkdir(parents=True, exist_ok=True)
    merged = merge(rows, args.results / "train.json")
    (args.results / "train.json").write_text(json.dumps(merged, indent=2) + "\n")
    (args.results / "train.md").write_text(markdown(merged))
    print(f"wrote {args.results / 'train.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
