"""The model zoo: a registry of named graph builders, and the public building blocks."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from multires.errors import ModelNotFoundError, SpecError
from multires.graph import Graph

_REGISTRY: dict[str, Callable[..., Graph]] = {}


def register(name: str) -> Callable[[Callable[..., Graph]], Callable[..., Graph]]:
    """Register a function returning a Graph under `name` (registering a name twice is an error)."""

    def decorate(builder: Callable[..., Graph]) -> Callable[..., Graph]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorate


def models() -> list[str]:
    """Names of every model in the zoo."""
    _load_zoo()
    return sorted(_REGISTRY)


def model_options(name: str) -> dict[str, Any]:
    """The options of a zoo model with their defaults."""
    builder = _builder(name)
    return {
        p.name: p.default
        for p in inspect.signature(builder).parameters.values()
        if p.default is not inspect.Parameter.empty
    }


def _builder(name: str) -> Callable[..., Graph]:
    _load_zoo()
    if name not in _REGISTRY:
        guess = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(map(repr, guess))}?" if guess else " See multires.models()."
        raise ModelNotFoundError(f"unknown model {name!r}.{hint}")
    return _REGISTRY[name]


def spec(name: str, **options: Any) -> Graph:
    """The Graph of zoo model `name`, e.g. `spec("resnet18", num_classes=10, in_channels=1)`."""
    builder = _builder(name)
    unknown = sorted(set(options) - set(model_options(name)))
    if unknown:
        raise SpecError(
            f"model {name!r} has no option(s) {unknown}; its options are {sorted(model_options(name))}."
        )
    return builder(**options)


def _load_zoo() -> None:
    from multires.zoo import d2l, gluon, keras, resnet  # noqa: F401  (registers the models)


# The public blocks and builder (they import nothing from this module, so importing late is safe).
from multires.zoo.blocks import *  # noqa: E402, F403
from multires.zoo.builder import *  # noqa: E402, F403
