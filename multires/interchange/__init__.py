"""Models and checkpoints of other libraries, in and out: one module per family.

Each family has `from_<family>(source, ...) -> (Graph, CanonicalWeights)`, which recognises the
source and builds a spec computing exactly its function, and `to_<family>(graph, weights)`, which
returns the family's own model (or checkpoint) with the weights set. The frameworks are imported
only when a function of their family is called, so `import multires.interchange` needs none.

| family         | import                          | export                        |
|----------------|---------------------------------|-------------------------------|
| Keras          | `from_keras(model, graph=None)` | `to_keras(graph, weights)`    |
| Flax           | `from_flax(variables, graph)`   | `to_flax(graph, weights)`     |
| Hugging Face   | `from_transformers(model)`      | `to_transformers(graph, w)`   |
| MXNet Gluon    | `from_gluon(block, graph=None)` | `to_gluon(graph, weights)`    |
| torchvision    | `from_torchvision(model)`       | `to_torchvision(graph, w)`    |
"""

from __future__ import annotations

import importlib
from typing import Any

FAMILIES = ("keras", "flax", "transformers", "gluon", "torchvision")
"""The supported source families, each a module `multires.interchange.<family>`."""

__all__ = [f"{direction}_{family}" for family in FAMILIES for direction in ("from", "to")]


def __getattr__(name: str) -> Any:
    """`from_<family>` / `to_<family>`, importing the family's module (and framework) on first use."""
    direction, _, family = name.partition("_")
    if direction in ("from", "to") and family in FAMILIES:
        return getattr(importlib.import_module(f"multires.interchange.{family}"), name)
    raise AttributeError(f"module 'multires.interchange' has no attribute {name!r}")
