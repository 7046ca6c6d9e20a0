"""Timing and table helpers shared by the backend benchmarks.

`interleave` times several candidates round by round, alternating their order, so that a noisy
(shared) machine slows each of them alike; rates are medians over rounds. Each timing records
both the wall clock and the CPU time of the process (all threads): on a machine shared with
other jobs the wall clock also measures the neighbours, while CPU seconds still measure the work
a model does. On an accelerator, read the wall clock. `compare` and `compare_columns` give the
fields and table columns of a row comparing two candidates (rates, ratios, first-call seconds).
`machine` and `framework_versions` say where and with what a row was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("inference", "train_step")
"""What a benchmark times: eval-mode inference and one training step."""

Row = dict[str, Any]
"""A table row: column key -> value (`format_table` columns, `write_json` rows)."""

DISTRIBUTIONS = {
    "torch": ("torch",),
    "tf": ("tensorflow-cpu", "tensorflow", "keras"),
    "flax": ("jax", "jaxlib", "flax", "optax"),
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


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one candidate, one value per round."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def rate(self, items: int, clock: str = "wall") -> float:
        """Median items per second (per CPU-second with `clock="cpu"`)."""
        return items / statistics.median(self.wall if clock == "wall" else self.cpu)


def time_calls(
    function: Callable[[], Any], calls: int, sync: Callable[[], object] = lambda: None
) -> tuple[float, float]:
    """Wall and process-CPU seconds per call of `function`, over `calls` calls; `sync` waits for
    queued device work (e.g. `torch.cuda.synchronize`, or a Runner's `take_totals`)."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        function()
    sync()
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


def interleave(
    candidates: Mapping[str, Callable[[], Any]],
    rounds: int,
    calls: int = 1,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, Timing]:
    """Time each candidate `rounds` times (`calls` calls per round) after `warmup` calls, in an
    order that alternates round by round."""
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    sync()
    timings = {name: Timing() for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            wall, cpu = time_calls(candidates[name], calls, sync)
            timings[name].wall.append(wall)
            timings[name].cpu.append(cpu)
    return timings


@dataclass(frozen=True)
class Peak:
    """The float32 GEMM rate: GFLOP per second of wall clock and per CPU-second of the process."""

    wall: float
    cpu: float

    def __str__(self) -> str:
        return f"{self.wall:.0f} GFLOP/s, {self.cpu:.0f} GFLOP per CPU-second"

    def footnote(self) -> str:
        """The line under a table that says what its `peak` columns are."""
        return (
            f"peak = fraction of the float32 GEMM peak measured at the start of this run ({self}), by CPU "
            "time: 2 x MACs x images per CPU-second / GEMM flops per CPU-second"
        )


def gemm_peak(multiply: Callable[[], Any] | None = None, n: int = 2048, repeats: int = 8) -> Peak:
    """The machine's float32 GEMM peak: the best of `repeats` timed `n x n @ n x n` products
    (`2 n^3` flops each), the yardstick every row's `peak` fraction is measured against.
    `multiply` computes one such product and waits for it (default: NumPy, whose BLAS uses every
    core; a script passes its framework's matmul, e.g. torch on 2 threads). Measured at the start
    of each run, since a shared machine's rate changes from run to run; the rows compare CPU-time
    rates with `Peak.cpu`, which neighbours on a busy machine disturb far less than the wall clock."""
    if multiply is None:
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))

        def multiply() -> Any:
            return a @ b

    multiply()
    wall, cpu = zip(*(time_calls(multiply, 1) for _ in range(repeats)), strict=True)
    return Peak(2 * n**3 / min(wall) / 1e9, 2 * n**3 / min(cpu) / 1e9)


def peak_fraction(cpu_rate: float, macs_per_item: int, peak: Peak) -> float:
    """The fraction of the GEMM peak that `cpu_rate` items per CPU-second of `macs_per_item`
    multiply-accumulates (2 flops each) reach (on an idle machine the wall-clock fraction)."""
    return 2 * macs_per_item * cpu_rate / 1e9 / peak.cpu


def as_subject(mapping: Mapping[str, Any], name: str, subject: str = "multires") -> dict[str, Any]:
    """`mapping` (timings, first-call seconds) with candidate `name` in the role of `subject`, so a
    variant timed in the same rounds (e.g. BatchNorm folded) gets a row with the same columns."""
    return {**mapping, subject: mapping[name]}


def compare(
    timings: Mapping[str, Timing],
    first: Mapping[str, float],
    items: int,
    subject: str = "multires",
    baseline: str = "handwritten",
    peak: tuple[int, Peak] | None = None,
) -> dict[str, float]:
    """The measured fields of a row that compares `subject` with `baseline`: items/s of each by wall
    clock (keyed by their names) and per CPU-second (`{name}_cpu`), the ratios subject / baseline
    (`ratio`, `cpu_ratio`), and the seconds of each one's first call (`{name}_first_s`, from
    `first`: tracing and compiling, where there are any). With `peak` = (MACs per item, `Peak`),
    also each one's fraction of that peak, by CPU time (`{name}_peak`, see `peak_fraction`)."""
    wall = {name: timings[name].rate(items) for name in (baseline, subject)}
    cpu = {name: timings[name].rate(items, "cpu") for name in (baseline, subject)}
    fields = {
        baseline: wall[baseline],
        subject: wall[subject],
        "ratio": wall[subject] / wall[baseline],
        f"{baseline}_cpu": cpu[baseline],
        f"{subject}_cpu": cpu[subject],
        "cpu_ratio": cpu[subject] / cpu[baseline],
        f"{baseline}_first_s": first[baseline],
        f"{subject}_first_s": first[subject],
    }
    if peak is not None:
        for name in (baseline, subject):
            fields[f"{name}_peak"] = peak_fraction(cpu[name], *peak)
    return fields


def folded_rows(
    timings: Mapping[str, Timing],
    first: Mapping[str, float],
    items: int,
    row: Mapping[str, Any],
    key: str,
    peak: tuple[int, Peak] | None = None,
) -> list[Row]:
    """`compare`'s rows for the multires candidates timed in the same rounds: `multires` (as built)
    and, where it was timed, `folded` (BatchNorm folded), each against `handwritten`. `row` holds
    the identifying fields; the folded row's field `key` gets ", BN folded"."""
    rows = []
    for subject in [name for name in ("multires", "folded") if name in timings]:
        label = {**row, key: row[key] if subject == "multires" else f"{row[key]}, BN folded"}
        rows.append(
            {**label, **compare(as_subject(timings, subject), as_subject(first, subject), items, peak=peak)}
        )
    return rows


def compare_columns(
    subject: str = "multires",
    baseline: str = "handwritten",
    labels: tuple[str, str] = ("multires", "hand-written"),
    first: str = ".1f",
    peak: bool = False,
) -> list[tuple[str, str, str]]:
    """The `format_table` columns of `compare`'s fields, rates in images/s; `labels` name subject
    and baseline in the headers, `first` formats the first-call seconds, `peak` adds the fractions
    of the GEMM peak."""
    ours, theirs = labels
    fractions = [(f"{baseline}_peak", f"{theirs} peak", ".0%"), (f"{subject}_peak", f"{ours} peak", ".0%")]
    return [
        (baseline, f"{theirs} img/s", ".1f"),
        (subject, f"{ours} img/s", ".1f"),
        ("ratio", "ratio", ".3f"),
        *(fractions if peak else []),
        (f"{baseline}_cpu", f"{theirs} img/CPU-s", ".2f"),
        (f"{subject}_cpu", f"{ours} img/CPU-s", ".2f"),
        ("cpu_ratio", "CPU ratio", ".3f"),
        (f"{baseline}_first_s", f"{theirs} 1st call s", first),
        (f"{subject}_first_s", f"{ours} 1st call s", first),
    ]


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table of `rows`; `columns` are (key, header, format spec) triples."""
    cells = [[format(row[key], spec) for key, _, spec in columns] for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    right = [bool(spec) for _, _, spec in columns]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right, strict=True)
        )
        + "|"
    )
    return "\n".join([line(headers), rule, *(line(c) for c in cells)])


def write_json(path: str | Path, rows: Sequence[Any], **meta: Any) -> None:
    """Write benchmark rows (dataclasses or mappings) and metadata as JSON."""
    data = {**meta, "rows": [asdict(r) if hasattr(r, "__dataclass_fields__") else dict(r) for r in rows]}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def benchmark_parser(
    doc: str,
    models: Sequence[str],
    rounds: int,
    calls: int,
    quick: str = "batch 4, 64x64 images, 1 round",
    modes: bool = True,
) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes (`--quick`, `--models`, `--batch`, `--size`,
    `--rounds`, `--calls`, `--json`, and with `modes` also `--modes`); a script adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"CI smoke run: {quick}")
    parser.add_argument("--models", nargs="+", choices=sorted(models), default=list(models))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, help="image size (default: each model's own)")
    parser.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds (median taken)")
    parser.add_argument("--calls", "--iters", type=int, default=calls, help="timed calls per round")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    if modes:
        parser.add_argument(
            "--modes", nargs="+", choices=MODES, default=list(MODES), help="what to time (default: both)"
        )
    return parser
