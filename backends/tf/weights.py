"""Canonical weights <-> Keras variables, with the layout transposes.

A canonical name `<node>.<kind>` maps to a variable of the layer named `<node>`: convolution
kernels OIHW <-> HWIO, dense weights (out, in) <-> (in, out) (the Flatten before a dense layer
always yields channel-major features, so dense weights never depend on the layout), BatchNorm
`weight`/`bias`/`running_mean`/`running_var` <-> `gamma`/`beta`/`moving_mean`/`moving_variance`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from multires.errors import WeightsError
from multires.weights import CanonicalWeights

from .lowering import complete


def _identity(value: np.ndarray) -> np.ndarray:
    return value


def _oihw_to_hwio(value: np.ndarray) -> np.ndarray:
    return value.transpose(2, 3, 1, 0)


def _hwio_to_oihw(value: np.ndarray) -> np.ndarray:
    return value.transpose(3, 2, 0, 1)


def _transpose(value: np.ndarray) -> np.ndarray:
    return value.T


Transform = Callable[[np.ndarray], np.ndarray]

# Keras layer class -> [(canonical kind, Keras attribute, to Keras, to canonical)].
_KINDS: dict[type, list[tuple[str, str, Transform, Transform]]] = {
    keras.layers.Conv2D: [
        ("weight", "kernel", _oihw_to_hwio, _hwio_to_oihw),
        ("bias", "bias", _identity, _identity),
    ],
    keras.layers.BatchNormalization: [
        ("weight", "gamma", _identity, _identity),
        ("bias", "beta", _identity, _identity),
        ("running_mean", "moving_mean", _identity, _identity),
        ("running_var", "moving_variance", _identity, _identity),
    ],
    keras.layers.Dense: [
        ("weight", "kernel", _transpose, _transpose),
        ("bias", "bias", _identity, _identity),
    ],
}


@dataclass(frozen=True)
class Slot:
    """One canonical weight: the Keras variable holding it and the transforms between them."""

    name: str
    variable: Any
    to_keras: Transform
    to_canonical: Transform

    @property
    def shape(self) -> tuple[int, ...]:
        """The canonical shape."""
        return tuple(self.to_canonical(np.empty(tuple(self.variable.shape), np.float32)).shape)


def slots(model: keras.Model) -> dict[str, Slot]:
    """Every canonical weight of `model` by name, in layer order."""
    found: dict[str, Slot] = {}
    for layer in model.layers:
        kinds = next((k for cls, k in _KINDS.items() if isinstance(layer, cls)), [])
        for kind, attribute, to_keras, to_canonical in kinds:
            variable = getattr(layer, attribute, None)
            if variable is not None:
                found[f"{layer.name}.{kind}"] = Slot(f"{layer.name}.{kind}", variable, to_keras, to_canonical)
    return found


def export_weights(model: keras.Model) -> CanonicalWeights:
    """The canonical weights of a model built by this backend (float32, canonical layouts)."""
    return {
        name: np.ascontiguousarray(slot.to_canonical(np.asarray(slot.variable.numpy())), dtype=np.float32)
        for name, slot in slots(model).items()
    }


def load_weights(model: keras.Model, weights: Mapping[str, Any]) -> keras.Model:
    """Assign canonical weights to `model` and return it.

    Every name must be present with its canonical shape and nothing else may be given; all
    mismatches are reported in one WeightsError before anything is assigned. A model built
    without knowing the width of a Dense after a spatial Flatten is first rebuilt with the width
    the weights give (a new model is returned; otherwise `model` itself, updated in place).
    """
    model = complete(model, weights)
    targets = slots(model)
    problems = [f"missing {name} {slot.shape}" for name, slot in targets.items() if name not in weights]
    for name, value in weights.items():
        if name not in targets:
            problems.append(f"unexpected {name}")
        elif tuple(np.shape(value)) != targets[name].shape:
            problems.append(f"{name}: shape {tuple(np.shape(value))}, expected {targets[name].shape}")
        elif np.asarray(value).dtype.kind not in "iuf":
            problems.append(f"{name}: dtype {np.asarray(value).dtype}, expected real numbers (float32)")
    if problems:
        raise WeightsError(
            f"weights do not match Keras model {model.name!r} ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )
    for name, slot in targets.items():
        slot.variable.assign(np.ascontiguousarray(slot.to_keras(np.asarray(weights[name], dtype=np.float32))))
    return model
