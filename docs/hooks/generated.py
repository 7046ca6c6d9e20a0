"""MkDocs hook: pages carry markers that are replaced by tables generated from the code, so the
zoo's parameter counts, MACs and the node semantics in the docs are never typed by hand."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import multires
from multires import reference
from multires.graph import NODE_TYPES


def zoo_table() -> str:
    """Every zoo model: options, parameters and MACs at 224x224, and what it matches."""
    rows = [
        "| model | in / classes | parameters | MACs at 224x224 | matches |",
        "|---|---|---:|---:|---|",
    ]
    for name in multires.models():
        graph = multires.spec(name)
        options = multires.model_options(name)
        channels = options.get("in_channels", 3)
        macs = multires.macs(graph, (1, channels, 224, 224))
        matches = re.split(r", exactly|: ", graph.description)[0].replace("|", "\\|")
        rows.append(
            f"| `{name}` | {channels} / {options.get('num_classes')} | {multires.param_count(graph):,} "
            f"| {macs / 1e9:.2f} G | {matches} |"
        )
    return "\n".join(rows)


def node_table() -> str:
    """Every node type with its fields and their defaults."""
    rows = ["| node | `op` | fields (defaults) |", "|---|---|---|"]
    for op, cls in NODE_TYPES.items():
        fields = [
            f"`{f.name}={f.default!r}`" for f in dataclasses.fields(cls) if f.name not in ("name", "inputs")
        ]
        rows.append(f"| `{cls.__name__}` | `{op}` | {', '.join(fields) or '—'} |")
    return "\n".join(rows)


def semantics() -> str:
    """The NumPy reference's definition of every node, from its module docstring."""
    doc = reference.__doc__ or ""
    start = doc.index("What each node computes")
    return doc[start:].strip()


def editions_table() -> str:
    """The book's framework editions and what each pins."""
    from multires.zoo.editions import EDITIONS

    rows = [
        "| `edition=` | padding of 'same' convs and pools | BN eps | BN momentum (spec / framework) "
        "| running variance |",
        "|---|---|---:|---:|---|",
    ]
    for name, ed in EDITIONS.items():
        padding = "TF/XLA SAME (asymmetric at stride 2)" if ed.same_padding else "symmetric, kernel // 2"
        rows.append(
            f"| `{name}` | {padding} | {ed.eps:g} | {ed.momentum:g} / {1 - ed.momentum:g} "
            f"| {ed.running_variance} |"
        )
    return "\n".join(rows)


MARKERS = {
    "<!-- generated:editions-table -->": editions_table,
    "<!-- generated:zoo-table -->": zoo_table,
    "<!-- generated:node-table -->": node_table,
    "<!-- generated:semantics -->": semantics,
}


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace each marker on a page with its generated Markdown."""
    for marker, make in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
