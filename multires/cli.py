"""The `multires` command line: `models`, `summary`, `backends`, `compare`, `export`, `convert` and `train`.

Each subcommand is one function registered with `@command` in the `COMMANDS` table, together
with the function that declares its arguments; `main` builds the parser from that table, so a
new subcommand is one decorated function. User mistakes (any `MultiresError`) print a one-line
`error: ...` to stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from multires import backend as registry
from multires import launch
from multires.errors import BackendUnavailableError, MultiresError, SpecError
from multires.graph import Graph
from multires.shapes import (
    LAYOUTS,
    NodeSummary,
    Shape,
    Summary,
    check_layout,
    param_count,
    summarize,
    to_layout,
)
from multires.zoo import models, spec

USAGE_ERROR = 2
"""Exit status for user mistakes, as argparse uses for bad arguments."""


class UsageError(MultiresError, ValueError):
    """A malformed command-line value (an `--input` or `--option` that does not parse)."""


@dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help, the function adding its arguments, and the function running it."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}
"""Every subcommand by name, in the order `multires --help` lists them."""


def command(
    name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register the decorated function as subcommand `name` (registering a name twice is an error)."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in COMMANDS:
            raise ValueError(f"command {name!r} is already registered")
        COMMANDS[name] = Command(name, help, arguments or (lambda parser: None), run)
        return run

    return register


def _console(wrap: bool = False) -> Console:
    """A console for tables, in plain text (no markup, so `multires[tf]` prints as written).

    When the output is not a terminal, tables that do not `wrap` get unbounded width, so a piped
    summary never wraps or truncates a row; wrapping tables take rich's default width.
    """
    console = Console(markup=False, highlight=False)
    if not console.is_terminal and not wrap:
        console = Console(markup=False, highlight=False, width=10_000)
    return console


def parse_shape(text: str) -> tuple[int, ...]:
    """`"1,3,224,224"` -> `(1, 3, 224, 224)`."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise UsageError(f"--input {text!r}: give four positive comma-separated sizes, like 1,3,224,224.")
    return shape


def parse_options(items: Sequence[str] | None) -> dict[str, Any]:
    """`["num_classes=10", "arch=((2, 64),)"]` -> keyword options; values are Python literals,
    and a value that is not one (`variant=v1`) stays a string."""
    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"--option {item!r}: write it as key=value, like num_classes=10.")
        try:
            options[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            options[key] = text.strip()
    return options


def _zoo_graph(name: str, options: dict[str, Any]) -> Graph:
    """A zoo graph; option values of the wrong kind become a SpecError rather than a traceback."""
    try:
        return spec(name, **options)
    except MultiresError:
        raise
    except (TypeError, ValueError) as error:
        raise SpecError(f"model {name!r}: bad option value(s) {options}: {error}.") from None


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", help="zoo model name (see `multires models`), or a .safetensors file written by multires"
    )
    parser.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="a zoo option, value as a Python literal (repeatable), e.g. --option num_classes=10",
    )


def _models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--long", action="store_true", help="whole descriptions, not their headlines")


def headline(description: str) -> str:
    """What a zoo description says before its details: `torchvision.models.resnet18, exactly: ...`
    -> `torchvision.models.resnet18`."""
    return description.split(":", 1)[0].removesuffix(", exactly").strip()


@command("models", "list the model zoo with parameter counts", _models_arguments)
def models_command(args: argparse.Namespace) -> int:
    """A table of zoo models with their parameter count at default options and description."""
    rows: list[dict[str, Any]] = []
    for name in models():
        graph = spec(name)
        try:
            params = param_count(graph)
        except SpecError:
            (first,) = graph.inputs
            params = param_count(graph, (1, first.channels, 224, 224))
        rows.append({"name": name, "params": params, "description": graph.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="multires model zoo", expand=True, show_lines=args.long)
    table.add_column("Model", no_wrap=True)
    table.add_column("Params (defaults)", justify="right", no_wrap=True)
    table.add_column("Description", ratio=1)
    for row in rows:
        description = row["description"] if args.long else headline(row["description"])
        table.add_row(row["name"], f"{row['params']:,}", description)
    _console(wrap=True).print(table)
    return 0


def _summary_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    parser.add_argument(
        "--input",
        metavar="SHAPE",
        help="input shape in the chosen layout, e.g. 1,3,224,224 (default: batch 1, 224 x 224)",
    )
    parser.add_argument(
        "--layout", default="NCHW", help=f"layout of --input and of the shapes shown: {LAYOUTS}"
    )
    parser.add_argument(
        "--depth",
        type=int,
        metavar="N",
        help="group nodes by the first N segments of their names (--depth 1 gives the book's printout)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (every node) instead of a table")


@command("summary", "per-layer output shapes, parameters and MACs of a zoo model", _summary_arguments)
def summary_command(args: argparse.Namespace) -> int:
    """The layer summary of a zoo model for one input shape, as a table or JSON."""
    layout = check_layout(args.layout)
    if args.depth is not None and args.depth < 1:
        raise UsageError(f"--depth {args.depth}: give a depth of 1 or more.")
    graph = _zoo_graph(args.name, parse_options(args.option))
    if args.input is None:
        (first,) = graph.inputs
        shape: tuple[int, ...] = to_layout((1, first.channels, 224, 224), layout)
    else:
        shape = parse_shape(args.input)
    summary = summarize(graph, shape, layout)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
        return 0
    _console().print(_summary_table(summary, args.depth))
    return 0


def group_rows(rows: Sequence[NodeSummary], depth: int) -> list[NodeSummary]:
    """Merge consecutive rows whose names share their first `depth` segments into one row named
    by that prefix: the last node's output shape, and the sum of parameters and MACs."""
    groups: list[list[NodeSummary]] = []
    prefixes: list[str] = []
    for row in rows:
        prefix = ".".join(row.name.split(".")[:depth])
        if prefixes and prefixes[-1] == prefix:
            groups[-1].append(row)
        else:
            groups.append([row])
            prefixes.append(prefix)
    return [
        NodeSummary(
            prefix,
            group[0].op if len(group) == 1 else f"{len(group)} nodes",
            group[-1].shape,
            sum(r.params for r in group),
            sum(r.macs for r in group),
        )
        for prefix, group in zip(prefixes, groups, strict=True)
    ]


def _shape_text(shape: Shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _summary_table(summary: Summary, depth: int | None) -> Table:
    rows = summary.rows if depth is None else group_rows(summary.rows, depth)
    table = Table(
        title=f"{summary.graph}: input {_shape_text(summary.input_shape)} {summary.layout}",
        show_footer=True,
    )
    table.add_column("Layer", footer="Total", no_wrap=True)
    table.add_column("Type", no_wrap=True)
    table.add_column(f"Output shape ({summary.layout})", no_wrap=True)
    table.add_column("Params", footer=f"{summary.params:,}", justify="right", no_wrap=True)
    table.add_column("MACs", footer=f"{summary.macs:,}", justify="right", no_wrap=True)
    for row in rows:
        table.add_row(row.name, row.op, _shape_text(row.shape), f"{row.params:,}", f"{row.macs:,}")
    return table


@command("backends", "list registered backends and whether their framework is installed")
def backends_command(args: argparse.Namespace) -> int:
    """A table of registered backends: installed, or the pip command that installs the framework."""
    table = Table(title="multires backends")
    table.add_column("Backend", no_wrap=True)
    table.add_column("Framework", no_wrap=True)
    table.add_column("Status")
    for name in registry.backends():
        framework = registry.FRAMEWORKS.get(name, name)
        try:
            module = registry.get_backend(name)
        except BackendUnavailableError:
            status = f"not installed: pip install 'multires[{name}]'"
        except Exception as error:  # a broken plugin must not hide the others
            status = f"broken: {type(error).__name__}: {error}"
        else:
            status = f"installed (layouts {', '.join(module.LAYOUTS)})"
        table.add_row(name, framework, status)
    if not table.row_count:
        table.add_row(
            "(none)", "", f"no package registers the entry-point group {registry.ENTRY_POINT_GROUP!r}"
        )
    _console().print(table)
    return 0


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from multires.backend import PRECISIONS
    from multires.train import SCHEDULES, train_defaults

    defaults = train_defaults()
    _add_model_arguments(parser)
    add = parser.add_argument
    add("--backend", default="torch", help="a backend (see `multires backends`) or 'reference' (NumPy, slow)")
    add(
        "--epochs",
        type=int,
        default=defaults["epochs"],
        help=f"epochs to train (default {defaults['epochs']})",
    )
    add("--lr", type=float, default=defaults["lr"], help=f"SGD learning rate (default {defaults['lr']})")
    add(
        "--schedule",
        default=defaults["schedule"],
        choices=SCHEDULES,
        help=f"learning-rate schedule: constant (the book's) or cosine, annealed to zero over the run "
        f"(default {defaults['schedule']})",
    )
    add(
        "--momentum",
        type=float,
        default=defaults["momentum"],
        help=f"SGD momentum (default {defaults['momentum']})",
    )
    add(
        "--weight-decay",
        type=float,
        default=defaults["weight_decay"],
        help=f"SGD weight decay (default {defaults['weight_decay']})",
    )
    add(
        "--batch-size",
        type=int,
        default=defaults["batch_size"],
        help=f"examples per step (default {defaults['batch_size']})",
    )
    add("--resize", type=int, metavar="SIZE", help="resize the 28 x 28 images to SIZE x SIZE (the book: 96)")
    add("--limit", type=int, metavar="N", help="keep the first N training and test examples")
    add("--seed", type=int, default=0, help="seed of the initial weights and the batch order (default 0)")
    add("--init", default="torchvision", help="torchvision (Kaiming) or d2l (the book's Xavier)")
    add("--layout", help="NCHW or NHWC (default: the backend's own)")
    add("--data", metavar="DIR", help="folder of the Fashion-MNIST files (default: see multires.data)")
    add("--out", metavar="DIR", help="run folder: history, plot, checkpoints (default runs/NAME-BACKEND)")
    add("--resume", action="store_true", help="continue the run checkpointed in --out")
    add("--checkpoint-every", type=int, default=100, metavar="STEPS", help="checkpoint period (100)")
    add("--no-plot", action="store_true", help="do not write history.png")
    add("--device", help="the framework's device, e.g. cpu, cuda, cuda:1, mps (torch), GPU (tf), gpu (flax)")
    add(
        "--devices",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel devices (default 1); on a CPU-only machine, N CPU devices",
    )
    add("--precision", default="fp32", choices=PRECISIONS, help="float32 or mixed bf16/fp16 (default fp32)")
    add(
        "--no-sync-bn",
        action="store_true",
        help="per-device BatchNorm statistics under --devices (default: synchronised over the global batch)",
    )
    add("--coordinator", metavar="HOST:PORT", help="flax multi-process: jax.distributed's coordinator")
    add("--num-processes", type=int, metavar="N", help="flax multi-process: the number of processes")
    add("--process-id", type=int, metavar="I", help="flax multi-process: this process's index")


@command("train", "train a zoo model on Fashion-MNIST and print the book's final line", _train_arguments)
def train_command(args: argparse.Namespace) -> int:
    """Train with SGD, showing a progress bar per epoch; print `loss ..., examples/sec` at the end.

    `--devices N` in torch runs one process per device: outside torchrun the command relaunches
    itself under `torch.distributed.run` with N processes on this machine. In tf and flax on the
    CPU it exposes N CPU devices (`CPU_DEVICES_ENV`) before the framework starts.
    """
    from multires.train import train

    backend = args.backend if args.backend.lower() == "reference" else registry.canonical_name(args.backend)
    if args.devices > 1 and backend == "torch" and not launch.under_torchrun():
        return launch.torchrun(args.devices, ["-m", "multires", *sys.argv[1:]])
    on_cpu = (args.device or "cpu").lower() == "cpu"
    if args.devices > 1 and backend in ("tf", "flax", "mxnet") and on_cpu and args.coordinator is None:
        os.environ.setdefault(registry.CPU_DEVICES_ENV, str(args.devices))
    if args.coordinator is not None:
        _initialize_jax(backend, args)
    history = train(
        _zoo_graph(args.name, parse_options(args.option)),
        args.backend,
        epochs=args.epochs,
        lr=args.lr,
        schedule=args.schedule,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        seed=args.seed,
        init=args.init,
        resize=args.resize,
        limit=args.limit,
        layout=args.layout,
        root=args.data,
        out=args.out or f"runs/{args.name}-{args.backend}",
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        plot=False if args.no_plot else None,
        device=args.device,
        devices=args.devices,
        precision=args.precision,
        sync_batchnorm=not args.no_sync_bn,
    )
    if history.runner is None or getattr(history.runner, "is_main", True):
        print(history.summary())
    return 0


def _initialize_jax(backend: str, args: argparse.Namespace) -> None:
    """Join a multi-process JAX run (`--coordinator`, `--num-processes`, `--process-id`)."""
    if backend != "flax":
        raise UsageError(
            f"--coordinator starts jax.distributed, for --backend flax; got --backend {backend}."
        )
    if args.num_processes is None or args.process_id is None:
        raise UsageError("--coordinator needs --num-processes and --process-id.")
    registry.get_backend("flax").initialize_distributed(args.coordinator, args.num_processes, args.process_id)


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    add = parser.add_argument
    add("--input", metavar="SHAPE", help="NCHW input shape, e.g. 1,3,224,224 (default: batch 1, 224 x 224)")
    add("--backends", metavar="LIST", help="comma-separated backends, e.g. torch,tf (default: all)")
    add("--seed", type=int, default=0, help="seed of the random weights and input (default 0)")
    add("--repeats", type=int, default=5, help="forward passes timed per backend; the median is shown (5)")
    add("--json", action="store_true", help="print JSON instead of a table")


def _graph_and_weights(name: str, options: dict[str, Any]) -> tuple[Graph, Any]:
    """A zoo graph (weights None), or the graph and weights of a multires `.safetensors` file."""
    from multires.weights import file_graph, load_file

    if not name.endswith(".safetensors"):
        return _zoo_graph(name, options), None
    graph = file_graph(name)
    if graph is None:
        raise SpecError(
            f"{name}: this .safetensors file carries no multires graph; convert it with `multires convert` "
            "or give a zoo model name."
        )
    return graph, load_file(name, graph)


@command(
    "compare",
    "run a zoo model (or a converted .safetensors file) in every installed backend against the reference",
    _compare_arguments,
)
def compare_command(args: argparse.Namespace) -> int:
    """The comparison table; exits 1 if an installed backend fails or disagrees with the reference."""
    from multires.compare import OK, compare

    if args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats}: give 1 or more.")
    graph, weights = _graph_and_weights(args.name, parse_options(args.option))
    (first,) = graph.inputs
    shape = (1, first.channels, 224, 224) if args.input is None else parse_shape(args.input)
    names = None if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    result = compare(graph, shape, names, seed=args.seed, repeats=args.repeats, weights=weights)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0 if result.ok else 1
    table = Table(
        title=f"{result.model}: input {_shape_text(result.input_shape)} NCHW, random weights (seed {result.seed})",
        caption=f"max rel. diff = max|y - y_ref| / max|y_ref| against the NumPy float64 reference; agrees if "
        f"<= {result.tolerance:.0e}. Latency: median of {result.repeats} eval forward passes, NumPy in and out.",
    )
    for column in ("Backend", "Framework", "Layout", "Output shape"):
        table.add_column(column, no_wrap=True)
    for column in ("Params", "Max rel. diff", "Latency (ms)"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("Status")
    for row in result.rows:
        status = {OK: "agrees"}.get(row.status, row.status) + (f": {row.note}" if row.note else "")
        table.add_row(
            row.backend,
            row.framework,
            row.layout or "",
            "" if row.output_shape is None else _shape_text(row.output_shape),
            "" if row.params is None else f"{row.params:,}",
            "" if row.max_rel_diff is None else f"{row.max_rel_diff:.1e}",
            "" if row.latency_ms is None else f"{row.latency_ms:,.1f}",
            status,
        )
    _console().print(table)
    return 0 if result.ok else 1


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    add = parser.add_argument
    add("--format", default="onnx", choices=("onnx",), help="file format (default onnx)")
    add(
        "--weights",
        metavar="FILE",
        help="canonical weights (.safetensors or .npz); default: those of NAME's file, else init_weights",
    )
    add("--seed", type=int, default=0, help="seed of init_weights when no --weights are given (default 0)")
    add("--layout", help="input layout of the exported model: NCHW or NHWC (default: the format's own)")
    add(
        "--fold-bn",
        action="store_true",
        help="fold eval-mode BatchNorm into the convolutions before export (inference only; faster)",
    )
    add("-o", "--output", required=True, metavar="FILE", help="the file to write, e.g. model.onnx")


@command("export", "write a zoo model with its weights as a file for other runtimes", _export_arguments)
def export_command(args: argparse.Namespace) -> int:
    """Build the model in the format's backend with the given (or initial) weights and save it."""
    from multires.weights import init_weights, is_buffer, load_file

    graph, stored = _graph_and_weights(args.name, parse_options(args.option))
    if args.weights is not None:
        weights, source = load_file(args.weights, graph), args.weights
    elif stored is not None:
        weights, source = stored, args.name
    else:
        weights, source = init_weights(graph, args.seed), f"init_weights(seed={args.seed})"
    module = registry.get_backend(args.format)
    layout = registry.resolve_layout(module, args.layout)
    if args.fold_bn:
        from multires.passes import fold_batchnorm

        graph, weights = fold_batchnorm(graph, weights)
    path = module.save(registry.build(graph, args.format, layout, weights), args.output)
    params = sum(value.size for name, value in weights.items() if not is_buffer(name))
    folded = ", BatchNorm folded" if args.fold_bn else ""
    print(f"wrote {path}: {graph.name}, {layout} input, {params:,} parameters{folded}, weights {source}")
    return 0


CONVERT_SOURCES = ("keras", "transformers", "gluon", "torchvision", "flax", "safetensors")
CONVERT_TARGETS = ("safetensors", "keras", "transformers", "torchvision", "gluon", "flax")


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("source", metavar="SRC", help="the model or checkpoint file to convert")
    add("--from", dest="source_family", required=True, choices=CONVERT_SOURCES, help="what SRC is")
    add("--to", dest="target", required=True, choices=CONVERT_TARGETS, help="what to write")
    add("-o", "--output", required=True, metavar="OUT", help="the file (or directory) to write")
    add(
        "--graph",
        metavar="NAME",
        help="zoo model describing SRC, for sources that are not recognised by themselves (flax, a "
        "Keras or Gluon model of the book; see `multires models`)",
    )
    add(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="an option of --graph's zoo model, or of the source reader (e.g. model=resnet50_v1 for a Gluon "
        ".params file), value as a Python literal (repeatable)",
    )


@command(
    "convert",
    "convert a model or checkpoint between Keras, transformers, Gluon, torchvision, Flax and safetensors",
    _convert_arguments,
)
def convert_command(args: argparse.Namespace) -> int:
    """Read SRC with its family's reader, map it to a graph and canonical weights, write it as the
    target family's model (or as a multires .safetensors carrying the graph). Nothing is written
    unless the whole conversion succeeds."""
    import importlib

    from multires import interchange
    from multires.weights import file_graph, is_buffer, load_file, save

    options = parse_options(args.option)
    graph_options = {k: v for k, v in options.items() if k in _graph_option_names(args.graph)}
    reader_options = {k: v for k, v in options.items() if k not in graph_options}
    graph = None if args.graph is None else _zoo_graph(args.graph, graph_options)
    if args.source_family == "safetensors":
        graph = graph or file_graph(args.source)
        if graph is None:
            raise SpecError(f"{args.source}: carries no multires graph; pass --graph NAME.")
        weights = load_file(args.source, graph)
    else:
        family = importlib.import_module(f"multires.interchange.{args.source_family}")
        source = family.read(args.source, **reader_options)
        importer = getattr(interchange, f"from_{args.source_family}")
        graph, weights = importer(source) if graph is None else importer(source, graph=graph)
    if args.target == "safetensors":
        path = save(weights, args.output, graph)
    else:
        family = importlib.import_module(f"multires.interchange.{args.target}")
        path = family.write(getattr(interchange, f"to_{args.target}")(graph, weights), args.output)
    params = sum(value.size for name, value in weights.items() if not is_buffer(name))
    print(f"wrote {path}: {graph.name} ({args.source_family} -> {args.target}), {params:,} parameters")
    return 0


def _graph_option_names(name: str | None) -> set[str]:
    from multires.zoo import model_options

    return set() if name is None else set(model_options(name))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subparser per entry of `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="multires",
        description="Define a residual network once; get the same native model in every framework.",
    )
    from multires import __version__

    parser.add_argument("--version", action="version", version=f"multires {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in COMMANDS.values():
        entry.arguments(sub.add_parser(entry.name, help=entry.help, description=entry.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with `argv` (default `sys.argv[1:]`); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        if exit.code is None:
            return 0
        return exit.code if isinstance(exit.code, int) else USAGE_ERROR
    try:
        return COMMANDS[args.command].run(args)
    except MultiresError as error:
        message = " ".join(str(error).split())
        if os.environ.get("RANK", "0") == "0":  # under torchrun, every process fails alike: say it once
            print(f"error: {message}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
