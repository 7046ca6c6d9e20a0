"""Canonical weights <-> a built model's `state_dict`.

The state_dict keys of a model from `build` ARE the canonical names (`layer1.0.conv1.weight`),
and PyTorch's tensor layouts are the canonical ones (conv OIHW, linear (out, in)), so the mapping
is the identity apart from BatchNorm's `num_batches_tracked` counter:

- `export_weights` leaves it out: it is not part of the network's function (it only matters
  for `momentum=None`, a cumulative average, and a spec always gives a momentum).
- `load_weights` resets it to 0, so loading the same weights always gives the same state_dict.
- `from_state_dict` drops it from checkpoints.

Rename table for published PyTorch checkpoints (`CHECKPOINT_RENAMES`, used by
`from_state_dict(state_dict, CHECKPOINT_RENAMES[family])`):

| zoo models                                    | checkpoint                   | key prefix renames            |
|-----------------------------------------------|------------------------------|-------------------------------|
| resnet*, resnext*, wide_resnet* (torchvision) | `torchvision.models.*`       | none: the keys are canonical  |
| d2l_resnet18, d2l_resnet (d2l.ai book)        | the book's `ResNet` module   | `net.0.` -> `b1.`, `net.` -> ``|

torchvision keys are identical, so `model.load_state_dict(torchvision_state_dict)` also works
directly. The book keeps its layers in `self.net`, a Sequential whose first entry is the stem
`b1` (added by position, hence `net.0`) and whose later entries are added by name (`net.b2`...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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

    Every missing, unexpected, misshapen or non-real entry is reported in one WeightsError. Values
    are cast to each tensor's dtype and device; BatchNorm counters are reset to 0.
    """
    _materialize_lazy_linears(model, weights)
    state = model.state_dict()
    problems = []
    for name, tensor in state.items():
        if _is_counter(name):
            continue
        if isinstance(tensor, nn.parameter.UninitializedTensorMixin):
            got = f"shape {tuple(np.shape(weights[name]))}" if name in weights else "missing"
            problems.append(f"{name}: {got}, expected (out_features, in_features) for its lazy Dense")
            continue
        if name not in weights:
            problems.append(f"missing {name} {tuple(tensor.shape)}")
            continue
        shape = tuple(np.shape(weights[name]))
        if shape != tuple(tensor.shape):
            problems.append(f"{name}: shape {shape}, expected {tuple(tensor.shape)}")
        elif np.asarray(weights[name]).dtype.kind not in "iuf":
            problems.append(
                f"{name}: dtype {np.asarray(weights[name]).dtype}, expected real numbers (float32)"
            )
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


def _materialize_lazy_linears(model: nn.Module, weights: Mapping[str, Any]) -> None:
    """Replace each `nn.LazyLinear` (a Dense whose width depends on the image size) by an
    `nn.Linear` as wide as its weight in `weights`; ill-shaped weights are left to be reported."""
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.LazyLinear) or not module.has_uninitialized_params():
            continue
        shape = np.shape(weights.get(f"{path}.weight", ()))
        if len(shape) != 2 or shape[0] != module.out_features:
            continue
        linear = nn.Linear(shape[1], module.out_features, bias=module.bias is not None)
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, linear)


CHECKPOINT_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "torchvision": (),
    "d2l": (("net.0.", "b1."), ("net.", "")),
}
"""Per checkpoint family, (old prefix, new prefix) pairs mapping its keys to canonical names."""


def from_state_dict(
    state_dict: Mapping[str, Any], renames: Sequence[tuple[str, str]] = ()
) -> dict[str, np.ndarray]:
    """Canonical weights from a PyTorch state_dict: each key renamed by the first matching
    `(old prefix, new prefix)` pair (others kept as they are), BatchNorm counters dropped,
    values as float32 arrays."""
    weights = {}
    for key, value in state_dict.items():
        if _is_counter(key):
            continue
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        array = value.detach().to("cpu").numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        weights[key] = array.astype(np.float32)
    return weights
