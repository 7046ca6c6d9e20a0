"""Canonical weights <-> a built model's `state_dict`.

The state_dict keys of a model from `build` ARE the canonical names (`layer1.0.conv1.weight`),
and PyTorch's tensor layouts are the canonical ones (conv OIHW, linear (out, in)), so the mapping
is the identity apart from BatchNorm's `num_batches_tracked` counter:

- `export_weights` leaves it out: it is not part of the network's function (it only matters
  for `momentum=None`, a cumulative average, and a spec always gives a momentum).
- `load_weights` resets it to 0, so loading the same weights always gives the same state_dict.
- `from_state_dict` drops it from foreign state_dicts.

Rename table for published PyTorch checkpoints (`from_state_dict(state_dict, prefix)`):

| zoo models                                        | checkpoint keys        | prefix   |
|---------------------------------------------------|------------------------|----------|
| resnet*, resnext*, wide_resnet* (torchvision)     | torchvision's keys     | `""`     |
| d2l_resnet* (d2l.ai `ResNet`)                     | d2l's keys             | `"net."` |

For the torchvision family the keys are identical, so `model.load_state_dict(torchvision_sd)`
also works directly; d2l's module keeps its layers in `self.net`, hence the prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from multires.errors import WeightsError

NUM_BATCHES_TRACKED = "num_batches_tracked"


def _is_counter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == NUM_BATCHES_TRACKED


def export_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's canonical weights: float32 NumPy copies of its state_dict, without counters."""
    weights = {}
    for name, tensor in model.state_dict().items():
        if _is_counter(name):
            continue
        if isinstance(tensor, nn.parameter.UninitializedTensorMixin):
            raise WeightsError(
                f"{name.rsplit('.', 1)[0]}: its shape depends on the image size and is not known yet; "
                "load weights or run one forward pass before exporting."
            )
        weights[name] = tensor.detach().to("cpu", torch.float32).numpy().copy()
    return weights


def load_weights(model: nn.Module, weights: Mapping[str, Any]) -> nn.Module:
    """Copy canonical `weights` into `model` in place and return it.

    Every missing, unexpected or misshapen entry is reported in one WeightsError. Values are
    cast to each tensor's dtype and device; BatchNorm counters are reset to 0.
    """
    state = model.state_dict()
    problems = []
    for name, tensor in state.items():
        if _is_counter(name):
            continue
        if name not in weights:
            problems.append(f"missing {name} {tuple(tensor.shape)}")
            continue
        shape = tuple(np.shape(weights[name]))
        lazy = isinstance(tensor, nn.parameter.UninitializedTensorMixin)
        if not lazy and shape != tuple(tensor.shape):
            problems.append(f"{name}: shape {shape}, expected {tuple(tensor.shape)}")
    problems += [f"unexpected {name}" for name in weights if name not in state or _is_counter(name)]
    if problems:
        raise WeightsError(
            f"weights do not match the {type(model).__name__} model ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )
    new_state = {}
    for name, tensor in state.items():
        if _is_counter(name):
            new_state[name] = torch.zeros_like(tensor)
        else:
            new_state[name] = torch.as_tensor(np.asarray(weights[name]))
    model.load_state_dict(new_state, strict=True)
    return model


def from_state_dict(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Canonical weights from a PyTorch state_dict whose keys are `prefix` + canonical name.

    Keys without the prefix and BatchNorm counters are dropped; see the module docstring for the
    prefix of each model family.
    """
    weights = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix) or _is_counter(key):
            continue
        array = value.detach().to("cpu").numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        weights[key[len(prefix) :]] = array.astype(np.float32)
    return weights
