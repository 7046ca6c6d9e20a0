"""Timing and table helpers shared by the backend benchmarks.

`interleave` times several candidates round by round, alternating their order, so that a noisy
(shared) machine slows each of them alike; rates are medians over rounds. Each timing records
both the wall clock and the CPU time of the process (all threads): on a machine shared with
other jobs the wall clock also measures the neighbours, while CPU seconds still measure the work
a model does. On an accelerator, read the wall clock. `compare` and `compare_columns` give the
fields and table columns of a row comparing two candidates (rates, ratios, first-call seconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Row = dict[str, Any]
"""A table row: column key -> value (`format_table` columns, `write_json` rows)."""


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one candidate, one value per round."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def rate(self, items: int, clock: str = "wall") -> float:
        """Median items per second (per CPU-second with `clock="cpu"`)."""
        return items / statistics.median(self.wall if clock == "wall" else self.cpu)


def time_calls(
    function: Callable[[], Any], calls: int, sync: Callable[[], None] = lambda: None
) -> tuple[float, float]:
    """Wall and process-CPU seconds per call of `function`, over `calls` calls; `sync` waits for
    queued device work (e.g. `torch.cuda.synchronize`)."""
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


def compare(
    timings: Mapping[str, Timing],
    first: Mapping[str, float],
    items: int,
    subject: str = "multires",
    baseline: str = "handwritten",
) -> dict[str, float]:
    """The measured fields of a row that compares `subject` with `baseline`: items/s of each by wall
    clock (keyed by their names) and per CPU-second (`{name}_cpu`), the ratios subject / baseline
    (`ratio`, `cpu_ratio`), and the seconds of each one's first call (`{name}_first_s`, from
    `first`: tracing and compiling, where there are any)."""
    wall = {name: timings[name].rate(items) for name in (baseline, subject)}
    cpu = {name: timings[name].rate(items, "cpu") for name in (baseline, subject)}
    return {
        baseline: wall[baseline],
        subject: wall[subject],
        "ratio": wall[subject] / wall[baseline],
        f"{baseline}_cpu": cpu[baseline],
        f"{subject}_cpu": cpu[subject],
        "cpu_ratio": cpu[subject] / cpu[baseline],
        f"{baseline}_first_s": first[baseline],
        f"{subject}_first_s": first[subject],
    }


def compare_columns(
    subject: str = "multires",
    baseline: str = "handwritten",
    labels: tuple[str, str] = ("multires", "hand-written"),
    first: str = ".1f",
) -> list[tuple[str, str, str]]:
    """The `format_table` columns of `compare`'s fields, rates in images/s; `labels` name subject
    and baseline in the headers, `first` formats the first-call seconds."""
    ours, theirs = labels
    return [
        (baseline, f"{theirs} img/s", ".1f"),
        (subject, f"{ours} img/s", ".1f"),
        ("ratio", "ratio", ".3f"),
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
    doc: str, models: Sequence[str], rounds: int, calls: int, quick: str = "batch 4, 64x64 images, 1 round"
) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes (`--quick`, `--models`, `--batch`,
    `--rounds`, `--calls`, `--json`); a script adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"CI smoke run: {quick}")
    parser.add_argument("--models", nargs="+", choices=sorted(models), default=list(models))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds (median taken)")
    parser.add_argument("--calls", "--iters", type=int, default=calls, help="timed calls per round")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    return parser
