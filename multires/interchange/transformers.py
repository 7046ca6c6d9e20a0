"""Hugging Face transformers' ResNet in and out: `ResNetModel`, `ResNetForImageClassification` and
their checkpoints (a state dict with HF's keys plus a `ResNetConfig` or its dict).

The graph is built from the config by `multires.zoo.transformers.hf_resnet`, with torchvision's
node names; a config that is torchvision's architecture gives the zoo graph itself:

| transformers config (1000 labels, 3 channels)                    | graph                     |
|------------------------------------------------------------------|---------------------------|
| microsoft/resnet-18, -34 (`basic`, widths 64..512)               | `resnet18`, `resnet34`    |
| microsoft/resnet-50, -101, -152 (`bottleneck`, widths 256..2048) | `resnet50` ... `resnet152`|
| any other `layer_type`, `depths`, `hidden_sizes`, `embedding_size`, `downsample_in_first_stage`, `downsample_in_bottleneck`, `num_labels` | `hf_resnet` |
| `ResNetModel`, or `num_labels=0` (no head)                       | `hf_resnet`, output `flatten` |

Supported: `hidden_act="relu"` only (others raise `InterchangeError`). `ResNetBackbone` is not
mapped (its outputs are feature maps of several stages).

Conventions, all read from `modeling_resnet.py` and equal to torchvision's ResNet: convs without
bias and with `kernel // 2` padding; BatchNorm is `nn.BatchNorm2d`'s default (eps 1e-5,
momentum 0.1); the activation follows BN in each `ResNetConvLayer` except the last of a layer,
and follows the residual sum; bottleneck stride on the 3x3 (v1.5) unless
`downsample_in_bottleneck` puts it on the first 1x1 (v1).

A headless model (`ResNetModel`) becomes a graph whose output is `flatten` of the global average
pool, `(N, C)`: `pooler_output.flatten(1)`, the same in every backend and layout
(`last_hidden_state` is the input of that pool).

Checkpoint keys (`resnet.` prefixes each key of `ResNetForImageClassification` except the head;
`{S}` is `{s} + 1`, `{C}` is `{c} + 1`; kinds `weight`, `bias`, `running_mean`, `running_var`,
and `num_batches_tracked`, which is dropped), the table `KEYS`:

| Hugging Face key                                      | canonical name           |
|-------------------------------------------------------|--------------------------|
| `resnet.embedder.embedder.convolution`                | `conv1`                  |
| `resnet.embedder.embedder.normalization`              | `bn1`                    |
| `resnet.encoder.stages.{s}.layers.{b}.layer.{c}.convolution`   | `layer{S}.{b}.conv{C}` |
| `resnet.encoder.stages.{s}.layers.{b}.layer.{c}.normalization` | `layer{S}.{b}.bn{C}`   |
| `resnet.encoder.stages.{s}.layers.{b}.shortcut.convolution`    | `layer{S}.{b}.downsample.0` |
| `resnet.encoder.stages.{s}.layers.{b}.shortcut.normalization`  | `layer{S}.{b}.downsample.1` |
| `classifier.1`                                        | `fc`                     |
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from multires.errors import InterchangeError, WeightsError
from multires.graph import Conv2d, Dense, Graph
from multires.interchange.common import match_weights, node_as
from multires.weights import CanonicalWeights, weight_shapes
from multires.zoo import spec
from multires.zoo.transformers import LAYER_TYPES, hf_resnet

KEYS: tuple[tuple[str, str], ...] = (
    # Hugging Face module path (after "resnet.")             canonical node
    ("embedder.embedder.convolution", "conv1"),
    ("embedder.embedder.normalization", "bn1"),
    ("encoder.stages.{s}.layers.{b}.layer.{c}.convolution", "layer{S}.{b}.conv{C}"),
    ("encoder.stages.{s}.layers.{b}.layer.{c}.normalization", "layer{S}.{b}.bn{C}"),
    ("encoder.stages.{s}.layers.{b}.shortcut.convolution", "layer{S}.{b}.downsample.0"),
    ("encoder.stages.{s}.layers.{b}.shortcut.normalization", "layer{S}.{b}.downsample.1"),
    ("classifier.1", "fc"),
)
"""HF module path <-> canonical node name; `classifier.1` is the head, outside the `resnet.` prefix."""

PREFIX = "resnet."
HEAD = "classifier.1"
COUNTER = "num_batches_tracked"

TORCHVISION = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}
"""(layer_type, depths) of the configs that may be torchvision's ResNets (the graphs are compared)."""

DEFAULTS: dict[str, Any] = {
    "num_channels": 3,
    "embedding_size": 64,
    "hidden_sizes": (256, 512, 1024, 2048),
    "depths": (3, 4, 6, 3),
    "layer_type": "bottleneck",
    "hidden_act": "relu",
    "downsample_in_first_stage": False,
    "downsample_in_bottleneck": False,
}
"""`ResNetConfig`'s defaults, for a config given as a dict that leaves some out."""

SUPPORTED = (
    "Supported: transformers ResNetModel and ResNetForImageClassification (or their state dicts with "
    f"config=ResNetConfig or its dict), layer_type {' or '.join(LAYER_TYPES)}, any depths, hidden_sizes, "
    "embedding_size, downsample_in_first_stage, downsample_in_bottleneck and num_labels, hidden_act "
    "'relu'. For another architecture build its graph and map the weights by name "
    "(e.g. multires.interchange.from_torchvision(state_dict, graph=...))."
)


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w)\}", template)
    body = "".join(rf"(?P<{p}>\d+)" if i % 2 else re.escape(p) for i, p in enumerate(parts))
    return re.compile(body)


_FROM_HF = [(_pattern(hf), canonical) for hf, canonical in KEYS]
_TO_HF = [(_pattern(canonical), hf) for hf, canonical in KEYS]


def _rename(path: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    """`path` through the first matching row of `table`; a 0-based field `{x}` fills the 1-based
    `{X}` = x + 1 of the other side, and the other way round."""
    for pattern, template in table:
        match = pattern.fullmatch(path)
        if match:
            fields = {k: int(v) for k, v in match.groupdict().items()}
            values = {k.swapcase(): v + 1 if k.islower() else v - 1 for k, v in fields.items()}
            return template.format(**values, **fields)
    return None


def canonical_name(key: str) -> str | None:
    """The canonical weight name of an HF checkpoint key (None for keys the table does not map)."""
    path, _, kind = key.removeprefix(PREFIX).rpartition(".")
    node = _rename(path, _FROM_HF)
    return None if node is None else f"{node}.{kind}"


def hf_key(name: str, prefix: str = PREFIX) -> str:
    """The HF checkpoint key of canonical weight `name` (`prefix` before keys outside the head)."""
    node, _, kind = name.rpartition(".")
    path = _rename(node, _TO_HF)
    if path is None:
        raise InterchangeError(f"{name}: no transformers ResNet parameter has this canonical name.")
    return f"{path}.{kind}" if path == HEAD else f"{prefix}{path}.{kind}"


def _settings(config: Any) -> dict[str, Any]:
    """The config's architecture settings (a `ResNetConfig` or its dict), checked."""
    if config is None:
        raise InterchangeError(
            "a transformers state dict needs its config: pass config=ResNetConfig(...) or the dict of "
            "its config.json. " + SUPPORTED
        )
    read = config.get if isinstance(config, Mapping) else lambda key, default: getattr(config, key, default)
    if read("model_type", "resnet") != "resnet":
        raise InterchangeError(f"config model_type {read('model_type', None)!r} is not 'resnet'. {SUPPORTED}")
    settings = {key: read(key, default) for key, default in DEFAULTS.items()}
    if settings["hidden_act"] != "relu":
        raise InterchangeError(f"hidden_act {settings['hidden_act']!r} is not supported. {SUPPORTED}")
    if settings["layer_type"] not in LAYER_TYPES:
        raise InterchangeError(f"layer_type {settings['layer_type']!r} is not supported. {SUPPORTED}")
    # ResNetEncoder zips depths with hidden_sizes: the shorter list decides the number of stages.
    stages = min(len(settings["depths"]), len(settings["hidden_sizes"]))
    settings["depths"] = tuple(int(d) for d in settings["depths"][:stages])
    settings["hidden_sizes"] = tuple(int(h) for h in settings["hidden_sizes"][:stages])
    labels = read("num_labels", None)
    if labels is None:
        id2label = read("id2label", None)
        labels = 2 if id2label is None else len(id2label)
    settings["num_labels"] = int(labels)
    return settings


def _graph(settings: Mapping[str, Any], head: bool) -> Graph:
    """The graph of these settings: the zoo's torchvision graph where it is the same, else `hf_resnet`."""
    options = dict(
        depths=settings["depths"],
        hidden_sizes=settings["hidden_sizes"],
        layer_type=settings["layer_type"],
        embedding_size=settings["embedding_size"],
        downsample_in_first_stage=bool(settings["downsample_in_first_stage"]),
        downsample_in_bottleneck=bool(settings["downsample_in_bottleneck"]),
        in_channels=settings["num_channels"],
    )
    num_classes = settings["num_labels"] if head else 0
    graph = hf_resnet(**options, num_classes=num_classes)
    zoo_name = TORCHVISION.get((settings["layer_type"], settings["depths"]))
    if zoo_name and num_classes:
        zoo = spec(zoo_name, num_classes=num_classes, in_channels=settings["num_channels"])
        if (zoo.inputs, zoo.nodes, zoo.outputs) == (graph.inputs, graph.nodes, graph.outputs):
            return zoo
    return graph


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def from_transformers(model_or_state_dict: Any, config: Any = None) -> tuple[Graph, CanonicalWeights]:
    """The graph and canonical weights of a transformers ResNet model, or of its state dict and config.

    A state dict has a head when it has `classifier.*` keys; without one (a `ResNetModel`, or
    `num_labels=0`) the graph outputs the flattened `pooler_output`.
    """
    source = model_or_state_dict
    if isinstance(source, Mapping):
        state = source
        where = "transformers ResNet state dict"
    else:
        kind = type(source).__name__
        if kind not in ("ResNetModel", "ResNetForImageClassification") or not hasattr(source, "state_dict"):
            raise InterchangeError(f"{kind} is not a transformers ResNet model or state dict. {SUPPORTED}")
        config = source.config if config is None else config
        state = source.state_dict()
        where = f"transformers {kind}"
    settings = _settings(config)
    head = any(key.startswith("classifier.") for key in state)
    graph = _graph(settings, head)
    weights: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] == COUNTER:
            continue
        weights[canonical_name(key) or key] = _numpy(value)
    try:
        return graph, match_weights(graph, weights, where)
    except WeightsError as error:
        prefix = PREFIX if any(key.startswith(PREFIX) for key in state) else ""
        raise WeightsError(_with_hf_keys(str(error), graph, prefix)) from None


def _with_hf_keys(message: str, graph: Graph, prefix: str) -> str:
    """`message` with each canonical weight name followed by its HF key in brackets."""
    keys = {name: hf_key(name, prefix) for name in weight_shapes(graph, partial=True)}
    words = re.compile(r"[\w.]+")
    return words.sub(lambda m: f"{m[0]} [{keys[m[0]]}]" if m[0] in keys else m[0], message)


def _config_of(graph: Graph) -> dict[str, Any]:
    """The `ResNetConfig` settings whose model is `graph`, or an InterchangeError saying why not.

    The settings are read off the layer names and sizes, then the graph they build must equal `graph`.
    """
    try:
        depths: list[int] = []
        while f"layer{len(depths) + 1}.0.conv1" in graph.by_name:
            stage = len(depths) + 1
            depths.append(
                sum(1 for n in graph.by_name if n.startswith(f"layer{stage}.") and n.endswith(".conv1"))
            )
        bottleneck = "layer1.0.conv3" in graph.by_name
        last = "conv3" if bottleneck else "conv2"
        settings = {
            "num_channels": graph.inputs[0].channels,
            "embedding_size": node_as(graph, "conv1", Conv2d).out_channels,
            "hidden_sizes": tuple(
                node_as(graph, f"layer{i + 1}.0.{last}", Conv2d).out_channels for i in range(len(depths))
            ),
            "depths": tuple(depths),
            "layer_type": "bottleneck" if bottleneck else "basic",
            "hidden_act": "relu",
            "downsample_in_first_stage": "layer1.0.downsample.0" in graph.by_name
            and node_as(graph, "layer1.0.downsample.0", Conv2d).stride != (1, 1),
            "downsample_in_bottleneck": bottleneck
            and node_as(graph, f"layer{len(depths)}.0.conv1", Conv2d).stride != (1, 1),
            "num_labels": node_as(graph, "fc", Dense).out_features if "fc" in graph.by_name else 0,
        }
        built = _graph(settings, head=bool(settings["num_labels"]))
    except (KeyError, AttributeError, ValueError) as error:
        raise InterchangeError(
            f"graph {graph.name!r} is not a transformers ResNet ({error}). {SUPPORTED}"
        ) from None
    if (built.inputs, built.nodes, built.outputs) != (graph.inputs, graph.nodes, graph.outputs):
        ours = dict(zip((n.name for n in built.nodes), built.nodes, strict=True))
        differ = next((n for n in graph.nodes if ours.get(n.name) != n), None)
        where = f"; first difference at {differ.name} ({type(differ).__name__})" if differ else ""
        raise InterchangeError(
            f"graph {graph.name!r} is not a transformers ResNet: it differs from the ResNetConfig its "
            f"layer names suggest{where}. {SUPPORTED}"
        )
    return settings


def to_transformers(graph: Graph, weights: Mapping[str, Any]) -> Any:
    """A transformers `ResNetForImageClassification` (a `ResNetModel` for a headless graph) with the
    config of `graph` and `weights` set, in eval mode."""
    import torch
    import transformers

    settings = _config_of(graph)
    weights = match_weights(graph, weights, "weights")
    options = {k: v for k, v in settings.items() if k != "num_labels"}
    if options["downsample_in_bottleneck"] and not hasattr(
        transformers.ResNetConfig(), "downsample_in_bottleneck"
    ):
        raise InterchangeError(
            f"graph {graph.name!r} strides the bottleneck's first 1x1 (downsample_in_bottleneck), which "
            f"transformers {transformers.__version__} does not have; upgrade transformers."
        )
    options["hidden_sizes"], options["depths"] = list(options["hidden_sizes"]), list(options["depths"])
    if settings["num_labels"]:
        config = transformers.ResNetConfig(**options, num_labels=settings["num_labels"])
        model, prefix = transformers.ResNetForImageClassification(config), PREFIX
    else:
        model, prefix = transformers.ResNetModel(transformers.ResNetConfig(**options)), ""
    by_key = {hf_key(name, prefix): value for name, value in weights.items()}
    state = {
        key: torch.zeros_like(tensor) if key.endswith(COUNTER) else torch.from_numpy(by_key[key].copy())
        for key, tensor in model.state_dict().items()
    }
    model.load_state_dict(state, strict=True)
    return model.eval()


def read(path: str | os.PathLike, **options: Any) -> Any:
    """A transformers ResNet from a folder written by `save_pretrained` (offline; `options` go to
    `from_pretrained`)."""
    import transformers

    path = Path(path)
    if not (path / "config.json").is_file():
        raise InterchangeError(f"{path}: not a transformers model folder (no config.json). {SUPPORTED}")
    config = transformers.ResNetConfig.from_pretrained(path, local_files_only=True)
    headless = "ResNetModel" in (config.architectures or [])
    cls = transformers.ResNetModel if headless else transformers.ResNetForImageClassification
    return cls.from_pretrained(path, local_files_only=True, **options).eval()


def write(model: Any, path: str | os.PathLike) -> Path:
    """`model.save_pretrained` into folder `path`, atomically: a failure leaves `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    old = tmp.with_suffix(".old")
    try:
        model.save_pretrained(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path
