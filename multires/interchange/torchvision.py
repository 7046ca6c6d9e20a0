"""torchvision's ResNets in and out: their state dicts (or a module's `state_dict()`), `.pth` and
`.safetensors` checkpoints.

The mapping is the identity: canonical names ARE torchvision's state-dict keys
(`layer2.0.downsample.0.weight`) and torchvision's layouts are the canonical ones (conv OIHW,
linear `(out, in)`); only BatchNorm's `num_batches_tracked` counters are dropped on import and
added back, as 0, on export (see `multires.backends.torch.weights`, `CHECKPOINT_RENAMES["torchvision"]`).

The architecture is recognised from the keys and shapes: the block type (a `conv3` means
bottleneck), the blocks per stage, and the width and groups of `layer1.0.conv2`; `num_classes`
comes from `fc.weight`, the input channels from `conv1.weight`:

| torchvision model   | blocks per stage | block      | `layer1.0.conv2.weight` |
|---------------------|------------------|------------|-------------------------|
| `resnet18`          | 2, 2, 2, 2       | BasicBlock | (64, 64, 3, 3)          |
| `resnet34`          | 3, 4, 6, 3       | BasicBlock | (64, 64, 3, 3)          |
| `resnet50`          | 3, 4, 6, 3       | Bottleneck | (64, 64, 3, 3)          |
| `resnet101`         | 3, 4, 23, 3      | Bottleneck | (64, 64, 3, 3)          |
| `resnet152`         | 3, 8, 36, 3      | Bottleneck | (64, 64, 3, 3)          |
| `resnext50_32x4d`   | 3, 4, 6, 3       | Bottleneck | (128, 4, 3, 3), 32 groups |
| `resnext101_32x8d`  | 3, 4, 23, 3      | Bottleneck | (256, 8, 3, 3), 32 groups |
| `wide_resnet50_2`   | 3, 4, 6, 3       | Bottleneck | (128, 128, 3, 3)        |

Each is the zoo model of the same name (torchvision v1.5: stride on the bottleneck's 3x3, BN eps
1e-5, momentum 0.1). With `graph=` any graph whose canonical names are the checkpoint's keys maps.

timm: the plain `resnet18` ... `resnet152` of timm (`timm.models.resnet`) have exactly torchvision's
state-dict keys and shapes (`conv1`, `bn1`, `layer{i}.{j}.conv1`, `downsample.0`/`.1`, `fc`) and
the same architecture, so their state dicts import here unchanged. timm itself cannot be
installed on this project's machine, so that equality is documented, not tested.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from multires.errors import InterchangeError, WeightsError
from multires.graph import BatchNorm, Dense, Graph
from multires.interchange.common import match_weights, node_as
from multires.weights import CanonicalWeights, load_file, save, weight_shapes
from multires.zoo import spec

ARCHS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3)),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3)),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3)),
}
"""The torchvision models (zoo models of the same name) by (block type, blocks per stage)."""

COUNTER = "num_batches_tracked"

SUPPORTED = (
    f"Supported: the state dicts of torchvision.models {', '.join(ARCHS)} (any num_classes), and timm's "
    "resnet18..resnet152, whose keys are torchvision's. For another model pass graph=, a multires graph "
    "whose canonical names are the state dict's keys (e.g. multires.spec('resnet50', num_classes=10))."
)


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _state_dict(source: Any) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    if callable(getattr(source, "state_dict", None)):
        return source.state_dict()
    raise InterchangeError(f"a {type(source).__name__} is not a torchvision model or state dict. {SUPPORTED}")


def _structure(weights: Mapping[str, object]) -> tuple[str, tuple[int, ...]]:
    """(block type, blocks per stage) read from the keys."""
    blocks: dict[int, set[int]] = {}
    for key in weights:
        parts = key.split(".")
        if len(parts) > 2 and parts[0].startswith("layer") and parts[0][5:].isdigit() and parts[1].isdigit():
            blocks.setdefault(int(parts[0][5:]), set()).add(int(parts[1]))
    depths = tuple(len(blocks[stage]) for stage in sorted(blocks))
    bottleneck = any(".conv3." in key for key in weights)
    return ("bottleneck" if bottleneck else "basic", depths)


def recognise(weights: Mapping[str, np.ndarray]) -> Graph:
    """The zoo graph of the torchvision model these canonical weights belong to.

    Among the models with the same block type and blocks per stage, the one whose weight shapes
    differ least; `match_weights` then reports whatever still differs.
    """
    structure = _structure(weights)
    names = [name for name, arch in ARCHS.items() if arch == structure]
    if not names or "fc.weight" not in weights or "conv1.weight" not in weights:
        kind, depths = structure
        raise InterchangeError(
            f"not a torchvision ResNet state dict ({kind} blocks, {list(depths)} per stage, "
            f"fc.weight {'present' if 'fc.weight' in weights else 'missing'}, conv1.weight "
            f"{'present' if 'conv1.weight' in weights else 'missing'}). {SUPPORTED}"
        )
    options = {"num_classes": weights["fc.weight"].shape[0], "in_channels": weights["conv1.weight"].shape[1]}

    def mismatches(graph: Graph) -> int:
        expected = weight_shapes(graph, partial=True)
        shapes = {key: tuple(value.shape) for key, value in weights.items()}
        return len(set(expected.items()) ^ set(shapes.items()))

    return min((spec(name, **options) for name in names), key=mismatches)


def from_torchvision(model_or_state_dict: Any, graph: Graph | None = None) -> tuple[Graph, CanonicalWeights]:
    """The graph and canonical weights of a torchvision ResNet (a module or its state dict).

    Without `graph` the architecture is recognised from the keys and shapes (see the table).
    """
    state = _state_dict(model_or_state_dict)
    weights = {key: _numpy(value) for key, value in state.items() if key.rsplit(".", 1)[-1] != COUNTER}
    graph = recognise(weights) if graph is None else graph
    return graph, match_weights(graph, weights, "torchvision state dict")


def to_torchvision(graph: Graph, weights: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict of torch tensors that torchvision's model of `graph` loads with `load_state_dict`
    (`num_batches_tracked` included, as 0), in torchvision's key order."""
    import torch

    in_channels = graph.inputs[0].channels
    structure = _structure(weight_shapes(graph, partial=True))
    candidates = [name for name, arch in ARCHS.items() if arch == structure and "fc" in graph.by_name]
    same = (graph.inputs, graph.nodes, graph.outputs)
    zoo = (spec(name, num_classes=node_as(graph, "fc", Dense).out_features) for name in candidates)
    if in_channels != 3 or not any((g.inputs, g.nodes, g.outputs) == same for g in zoo):
        raise InterchangeError(
            f"graph {graph.name!r} is not a torchvision model (torchvision's ResNets take 3 input channels; "
            f"this graph has {in_channels}). {SUPPORTED}"
        )
    weights = match_weights(graph, weights, "weights")
    state: dict[str, Any] = {}
    for name, value in weights.items():
        state[name] = torch.from_numpy(value.copy())
        node, _, kind = name.rpartition(".")
        if kind == "running_var" and isinstance(graph[node], BatchNorm):
            state[f"{node}.{COUNTER}"] = torch.tensor(0, dtype=torch.long)
    return state


def read(path: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """A state dict from a `.pth`/`.pt` file (`torch.load(weights_only=True)`, no pickled code) or a
    `.safetensors` file (NumPy arrays, no torch needed)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file.")
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix not in (".pth", ".pt"):
        raise WeightsError(f"{path}: use a .pth, .pt or .safetensors checkpoint.")
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, **options)
    except Exception as error:
        raise WeightsError(
            f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})."
        ) from None
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict.")
    return dict(state)


def write(state_dict: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a state dict (what `to_torchvision` returns) atomically as `.pth` or `.safetensors`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        arrays = {
            k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
            for k, v in state_dict.items()
        }
        return save(arrays, path)
    if path.suffix not in (".pth", ".pt"):
        raise WeightsError(f"{path}: use a .pth, .pt or .safetensors file name.")
    import torch

    from multires.files import atomic_write

    return atomic_write(path, lambda handle: torch.save(dict(state_dict), handle))
