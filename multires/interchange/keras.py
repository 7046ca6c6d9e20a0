"""Keras models in and out: the `keras.applications` ResNets by name, any other model by its graph.

`from_keras(model)` recognises these `keras.applications` models by their layer names and maps
them onto the zoo entries of `multires.zoo.keras`, which compute exactly their function:

| Keras                                  | zoo entry           | names        |
|----------------------------------------|---------------------|--------------|
| `ResNet50`, `ResNet101`, `ResNet152`   | `keras_resnet50`... | torchvision  |
| `ResNet50V2`, `ResNet101V2`, `ResNet152V2` | `keras_resnet50v2`... | timm resnetv2 |

with `include_top=True` (any `classes`) or `include_top=False` with `pooling=None` or `"avg"`
(Keras' `"max"` is a global max pool, which the spec has no node for: an `InterchangeError`).
The classifier must be built with `classifier_activation=None`: multires graphs end at logits,
and a graph that silently dropped Keras' default softmax would not compute the model's function.
`from_keras(model, drop_softmax=True)` imports a softmax classifier as its logits on purpose.

Layer names, per block `convS_blockJ_*` (stage S = 2..5, block J = 1..):

| Keras layer            | v1 node (`layer{S-1}.{J-1}.`) | v2 node (`stages.{S-2}.blocks.{J-1}.`) |
|------------------------|-------------------------------|----------------------------------------|
| `conv1_conv`           | `conv1`                       | `stem.conv`                            |
| `conv1_bn`             | `bn1`                         | -                                      |
| `..._preact_bn`        | -                             | `norm1`                                |
| `..._0_conv`           | `downsample.0`                | `downsample.conv`                      |
| `..._0_bn`             | `downsample.1`                | -                                      |
| `..._1_conv`, `_1_bn`  | `conv1`, `bn1`                | `conv1`, `norm2`                       |
| `..._2_conv`, `_2_bn`  | `conv2`, `bn2`                | `conv2`, `norm3`                       |
| `..._3_conv`, `_3_bn`  | `conv3`, `bn3`                | `conv3`, -                             |
| `post_bn`              | -                             | `norm`                                 |
| `predictions`          | `fc`                          | `head.fc`                              |

Conventions: Keras kernels are HWIO (canonical OIHW), dense kernels `(in, out)` (canonical
`(out, in)`); BatchNormalization `gamma`/`beta`/`moving_mean`/`moving_variance` are `weight`/
`bias`/`running_mean`/`running_var`. Keras' BN momentum m is the spec's `1 - m`, and Keras
updates the running variance with the biased batch variance (`running_variance="biased"`).

With `graph=`, any Keras model whose weighted layers (Conv2D, BatchNormalization, Dense)
correspond to the graph's weighted nodes maps onto it, e.g. the book's TensorFlow ResNet-18
onto `multires.spec("d2l_resnet18", edition="tf")`. Layers are matched by their path in the
model (attribute names of subclassed models, indices of `Sequential`s, names of functional
layers split at dots) against the node names, level by level: by name where the names agree,
else in order, and a single wrapper level (the book's `net`) is looked through. Each pair's
configuration (filters, kernel, strides, padding, bias, epsilon, momentum) is checked against
the node, and every mismatch is reported at once. Parameter-free layers are not checked: the
graph is trusted for activations, pools and sums.

`to_keras(graph, weights)` returns the `keras.applications` model for a graph of
`multires.zoo.keras` (any input size) and, for any other graph, the TensorFlow backend's Keras
model, whose layers are named by the graph's nodes.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from multires.errors import InterchangeError, WeightsError
from multires.graph import SAME, BatchNorm, Conv2d, Dense, Flatten, GlobalAvgPool, Graph, Node
from multires.interchange.common import hwio_to_oihw, match_weights, node_as, oihw_to_hwio
from multires.weights import CanonicalWeights
from multires.zoo import spec
from multires.zoo.keras import DEPTHS

V1_TOP = {"conv1_conv": "conv1", "conv1_bn": "bn1", "predictions": "fc"}
V2_TOP = {"conv1_conv": "stem.conv", "post_bn": "norm", "predictions": "head.fc"}
"""Keras layer name -> node name, outside the blocks."""

V1_BLOCK = {
    "0_conv": "downsample.0",
    "0_bn": "downsample.1",
    "1_conv": "conv1",
    "1_bn": "bn1",
    "2_conv": "conv2",
    "2_bn": "bn2",
    "3_conv": "conv3",
    "3_bn": "bn3",
}
V2_BLOCK = {
    "preact_bn": "norm1",
    "0_conv": "downsample.conv",
    "1_conv": "conv1",
    "1_bn": "norm2",
    "2_conv": "conv2",
    "2_bn": "norm3",
    "3_conv": "conv3",
}
"""Suffix of a Keras block layer `conv{S}_block{J}_<suffix>` -> leaf node name in the block."""

_BLOCK_LAYER = re.compile(r"^conv(?P<stage>[2-5])_block(?P<block>[1-9][0-9]*)_(?P<suffix>.+)$")

APPLICATIONS = {
    **{f"keras_resnet{depth}": f"ResNet{depth}" for depth in DEPTHS},
    **{f"keras_resnet{depth}v2": f"ResNet{depth}V2" for depth in DEPTHS},
}
"""Zoo entry -> its `keras.applications` constructor."""

SUPPORTED = (
    "keras.applications ResNet50, ResNet101, ResNet152, ResNet50V2, ResNet101V2 and ResNet152V2, "
    "with include_top=True and classifier_activation=None, or include_top=False and pooling=None or 'avg'"
)


# Recognising keras.applications ------------------------------------------------------------------


def _block_prefix(version: int, stage: int, block: int) -> str:
    if version == 1:
        return f"layer{stage - 1}.{block - 1}"
    return f"stages.{stage - 2}.blocks.{block - 1}"


def node_name(layer_name: str, version: int) -> str | None:
    """The node of a `keras.applications` ResNet layer (`conv2_block1_1_conv` -> `layer1.0.conv1`
    in v1), or None for a name outside the table."""
    top, block = (V1_TOP, V1_BLOCK) if version == 1 else (V2_TOP, V2_BLOCK)
    if layer_name in top:
        return top[layer_name]
    match = _BLOCK_LAYER.match(layer_name)
    if match is None or match["suffix"] not in block:
        return None
    prefix = _block_prefix(version, int(match["stage"]), int(match["block"]))
    return f"{prefix}.{block[match['suffix']]}"


def layer_names(graph: Graph, version: int) -> dict[str, str]:
    """Node name -> Keras layer name, for every weighted node of a `multires.zoo.keras` graph."""
    top, block = (V1_TOP, V1_BLOCK) if version == 1 else (V2_TOP, V2_BLOCK)
    names = {node: layer for layer, node in top.items()}
    for stage, depth in enumerate(_depths(graph, version), start=2):
        for j in range(1, depth + 1):
            prefix = _block_prefix(version, stage, j)
            names.update(
                {f"{prefix}.{leaf}": f"conv{stage}_block{j}_{suffix}" for suffix, leaf in block.items()}
            )
    return {node.name: names[node.name] for node in graph.nodes if node.name in names}


def _depths(graph: Graph, version: int) -> tuple[int, ...]:
    return tuple(
        sum(1 for j in range(1, 100) if f"{_block_prefix(version, stage, j)}.conv1" in graph.by_name)
        for stage in range(2, 6)
    )


def _recognise(model: Any, drop_softmax: bool) -> tuple[str, dict[str, Any], int] | None:
    """(zoo entry, its options, version) of a `keras.applications` ResNet, or None when the layer
    names are not those of one; an `InterchangeError` for a variant the spec cannot express."""
    names = {layer.name for layer in model.layers}
    if not {"conv1_pad", "conv1_conv", "pool1_pad", "pool1_pool", "conv2_block1_1_conv"} <= names:
        return None
    version = 2 if "post_bn" in names else 1
    depths = tuple(
        sum(1 for j in range(1, 100) if f"conv{stage}_block{j}_1_conv" in names) for stage in range(2, 6)
    )
    depth = next((d for d, layers in DEPTHS.items() if layers == depths), None)
    if depth is None:
        return None
    entry = f"keras_resnet{depth}" + ("v2" if version == 2 else "")
    where = f"Keras model {model.name!r} ({APPLICATIONS[entry]})"
    if "max_pool" in names:
        raise InterchangeError(
            f"{where}: pooling='max' ends in a GlobalMaxPooling2D, which the spec has no node for. "
            "Build the model with pooling=None (take the max of the feature map yourself) or 'avg'."
        )
    options: dict[str, Any] = {"in_channels": int(model.get_layer("conv1_conv").kernel.shape[2])}
    if "predictions" in names:
        dense = model.get_layer("predictions")
        activation = _activation(dense)
        if activation == "softmax" and not drop_softmax:
            raise InterchangeError(
                f"{where}: its classifier applies softmax, and multires graphs end at logits. Rebuild it "
                f"with classifier_activation=None (keras.applications.{APPLICATIONS[entry]}(..., "
                "classifier_activation=None), then new.set_weights(model.get_weights())), or pass "
                "drop_softmax=True to import the logits on purpose."
            )
        if activation not in ("linear", "softmax"):
            raise InterchangeError(
                f"{where}: its classifier activation {activation!r} has no spec node; rebuild it with "
                "classifier_activation=None."
            )
        options["num_classes"] = int(dense.units)
    else:
        options.update(include_top=False, pooling="avg" if "avg_pool" in names else None)
    return entry, options, version


def _activation(layer: Any) -> str:
    activation = layer.get_config().get("activation", "linear")
    return activation if isinstance(activation, str) else str(activation)


def _application_of(graph: Graph) -> tuple[str, dict[str, Any], int] | None:
    """(zoo entry, options, version) when `graph` is a `multires.zoo.keras` graph, else None."""
    entry = graph.name
    if entry not in APPLICATIONS:
        return None
    fc = "fc" if not entry.endswith("v2") else "head.fc"
    options: dict[str, Any] = {"in_channels": graph.inputs[0].channels}
    if fc in graph.by_name:
        options["num_classes"] = node_as(graph, fc, Dense).out_features
    else:
        pooled = any(isinstance(node, GlobalAvgPool) for node in graph.nodes)
        options.update(include_top=False, pooling="avg" if pooled else None)
    try:
        same = spec(entry, **options) == graph
    except (ValueError, TypeError):
        same = False
    return (entry, options, 2 if entry.endswith("v2") else 1) if same else None


# Reading weights from Keras layers ---------------------------------------------------------------


def _layer_weights(layer: Any, node_name: str) -> dict[str, np.ndarray]:
    """The canonical weights held by one Keras layer, named after `node_name`."""
    import keras

    def value(variable: Any) -> np.ndarray:
        return np.asarray(variable.numpy(), dtype=np.float32)

    if isinstance(layer, keras.layers.BatchNormalization):
        channels = int(layer.moving_mean.shape[0])
        gamma = value(layer.gamma) if layer.scale else np.ones(channels, np.float32)
        beta = value(layer.beta) if layer.center else np.zeros(channels, np.float32)
        kinds = {
            "weight": gamma,
            "bias": beta,
            "running_mean": value(layer.moving_mean),
            "running_var": value(layer.moving_variance),
        }
    elif isinstance(layer, keras.layers.Dense):
        kinds = {"weight": np.ascontiguousarray(value(layer.kernel).T)}
    else:
        kinds = {"weight": hwio_to_oihw(value(layer.kernel))}
    if not isinstance(layer, keras.layers.BatchNormalization) and layer.use_bias:
        kinds["bias"] = value(layer.bias)
    return {f"{node_name}.{kind}": array for kind, array in kinds.items()}


def _weighted(layer: Any) -> bool:
    import keras

    return isinstance(layer, (keras.layers.Conv2D, keras.layers.BatchNormalization, keras.layers.Dense))


def _zero_padding_before(layer: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """The padding of a `ZeroPadding2D` feeding `layer` in a functional model, else none."""
    import keras

    nodes = getattr(layer, "_inbound_nodes", [])
    parents = nodes[0].parent_nodes if len(nodes) == 1 else []
    if len(parents) == 1 and isinstance(parents[0].operation, keras.layers.ZeroPadding2D):
        (top, bottom), (left, right) = parents[0].operation.padding
        return ((int(top), int(bottom)), (int(left), int(right)))
    return ((0, 0), (0, 0))


def _comparable(
    padding: Any, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
) -> Any:
    """`padding` with SAME written out where it does not depend on the input size (a 1x1 kernel
    pads nothing; stride 1 pads `dilation * (kernel - 1) / 2` per side when that is whole)."""
    if padding != SAME:
        return padding
    if all(k == 1 for k in kernel):
        return ((0, 0), (0, 0))
    if all(s == 1 and d * (k - 1) % 2 == 0 for k, s, d in zip(kernel, stride, dilation, strict=True)):
        return tuple((d * (k - 1) // 2,) * 2 for k, d in zip(kernel, dilation, strict=True))
    return SAME


def _conv_padding(layer: Any) -> Any:
    """A Keras convolution's padding in the spec's terms (`_comparable`): SAME, or explicit per
    side, counting a `ZeroPadding2D` just before it."""
    padding = SAME if layer.padding == "same" else _zero_padding_before(layer)
    return _comparable(padding, tuple(layer.kernel_size), tuple(layer.strides), tuple(layer.dilation_rate))


def _problems(layer: Any, path: str, node: Node, drop_softmax: bool = False) -> list[str]:
    """How Keras `layer` (at `path` in its model) differs from the function of `node`: one line,
    or none when they agree."""
    import keras

    where = f"{node.name} ({type(node).__name__}) <- Keras {path} ({type(layer).__name__} {layer.name!r})"
    expected = {
        Conv2d: keras.layers.Conv2D,
        BatchNorm: keras.layers.BatchNormalization,
        Dense: keras.layers.Dense,
    }
    if not isinstance(layer, expected.get(type(node), ())) or isinstance(
        layer, (keras.layers.Conv2DTranspose, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
    ):
        return [f"{where}: a {type(layer).__name__} cannot hold a {type(node).__name__}'s weights"]
    differences: list[tuple[str, Any, Any]] = []
    if isinstance(node, Conv2d):
        differences += [
            ("filters", layer.filters, node.out_channels),
            ("kernel_size", tuple(layer.kernel_size), node.kernel),
            ("strides", tuple(layer.strides), node.stride),
            ("dilation_rate", tuple(layer.dilation_rate), node.dilation),
            ("groups", layer.groups, node.groups),
            ("use_bias", layer.use_bias, node.bias),
            (
                "padding",
                _conv_padding(layer),
                _comparable(node.padding, node.kernel, node.stride, node.dilation),
            ),
            ("activation", _activation(layer), "linear"),
        ]
    elif isinstance(node, BatchNorm):
        differences += [
            ("epsilon", layer.epsilon, node.eps),
            ("momentum (Keras' convention)", layer.momentum, 1 - node.momentum),
            ("running variance update", "biased", node.running_variance),
            ("renorm", layer.renorm, False),
        ]
    elif isinstance(node, Dense):
        activation = _activation(layer)
        differences += [
            ("units", layer.units, node.out_features),
            ("use_bias", layer.use_bias, node.bias),
            ("activation", "linear" if drop_softmax and activation == "softmax" else activation, "linear"),
        ]
    wrong = [
        f"{what} {actual!r} (graph: {wanted!r})"
        for what, actual, wanted in differences
        if not _equal(actual, wanted)
    ]
    return [f"{where}: " + "; ".join(wrong)] if wrong else []


def _equal(actual: Any, wanted: Any) -> bool:
    if isinstance(actual, float) or isinstance(wanted, float):
        return math.isclose(float(actual), float(wanted), rel_tol=1e-9, abs_tol=1e-12)
    return actual == wanted


# Matching any Keras model to a graph by structure ------------------------------------------------


def _children(layer: Any) -> list[tuple[tuple[str, ...], Any]]:
    """The sub-layers of `layer` with their relative paths: indices in a `Sequential`, dotted names
    in a functional model, attribute names (and list indices) in a subclassed one."""
    import keras
    from keras.src.models.functional import Functional

    if isinstance(layer, keras.Sequential):
        return [((str(i),), child) for i, child in enumerate(layer.layers)]
    if isinstance(layer, Functional):
        return [(tuple(child.name.split(".")), child) for child in layer.layers]
    found: list[tuple[tuple[str, ...], Any]] = []
    for attribute, value in vars(layer).items():
        if attribute.startswith("_"):
            continue
        if isinstance(value, keras.layers.Layer):
            found.append(((attribute,), value))
        elif isinstance(value, (list, tuple)):
            found += [
                ((attribute, str(i)), v) for i, v in enumerate(value) if isinstance(v, keras.layers.Layer)
            ]
    return found


def _weighted_layers(model: Any) -> list[tuple[tuple[str, ...], Any]]:
    """Every weighted layer of `model` with its path, depth first, each layer once."""
    seen: set[int] = set()

    def walk(layer: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
        for relative, child in _children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            if _weighted(child):
                yield (*path, *relative), child
            else:
                yield from walk(child, (*path, *relative))

    return list(walk(model, ()))


Item = tuple[tuple[str, ...], Any]
"""A weighted node or layer with its path (node name or Keras path split at dots)."""

Pair = tuple[Node, Any, str]
"""A node, the Keras layer holding its weights and that layer's path in the model."""


def _groups(items: list[Item]) -> dict[str, list[Item]]:
    """Items by the first segment of their path (in order of first appearance), paths shortened."""
    groups: dict[str, list[Item]] = {}
    for path, value in items:
        groups.setdefault(path[0], []).append((path[1:], value))
    return groups


def _align(
    nodes: list[Item], layers: list[Item], where: tuple[str, ...], keras_where: tuple[str, ...]
) -> tuple[list[Pair], list[str]]:
    """Pair weighted nodes with weighted layers level by level (see the module docstring)."""
    if len(nodes) == 1 and not nodes[0][0] and len(layers) == 1 and not layers[0][0]:
        return [(nodes[0][1], layers[0][1], ".".join(keras_where))], []
    if not nodes or not layers or not all(path for path, _ in nodes) or not all(path for path, _ in layers):
        node_names = [n.name for _, n in nodes]
        layer_paths = [".".join((*keras_where, *p)) for p, _ in layers]
        return [], [
            f"at {'.'.join(where) or 'the top'}: graph nodes {node_names} do not correspond to Keras layers "
            f"{layer_paths} (one side is a single layer, the other is not)"
        ]
    by_node, by_layer = _groups(nodes), _groups(layers)
    if set(by_node) != set(by_layer) and len(by_layer) == 1 and len(by_node) > 1:
        ((key, inner),) = by_layer.items()
        return _align(nodes, inner, where, (*keras_where, key))
    if set(by_node) != set(by_layer) and len(by_node) == 1 and len(by_layer) > 1:
        ((key, inner),) = by_node.items()
        return _align(inner, layers, (*where, key), keras_where)
    if set(by_node) == set(by_layer):
        pairs = [(key, key) for key in by_node]
    elif len(by_node) == len(by_layer):
        pairs = list(zip(by_node, by_layer, strict=True))
    else:
        level = ".".join(where) or "the top level"
        keras_level = ".".join(keras_where) or "the model"
        return [], [
            f"at {level}: the graph has {len(by_node)} weighted parts {list(by_node)}, Keras' {keras_level} "
            f"has {len(by_layer)} {list(by_layer)}"
        ]
    matched: list[Pair] = []
    problems: list[str] = []
    for node_key, layer_key in pairs:
        found, wrong = _align(
            by_node[node_key], by_layer[layer_key], (*where, node_key), (*keras_where, layer_key)
        )
        matched += found
        problems += wrong
    return matched, problems


def _check_flatten_dense(graph: Graph) -> list[str]:
    """A Dense fed by a Flatten of a spatial map would need its rows permuted (Keras flattens
    NHWC); the mapping only handles a Dense after a global pool."""
    problems = []
    for node in graph.nodes:
        source = graph.by_name.get(node.inputs[0])
        if isinstance(node, Dense) and isinstance(source, Flatten):
            before = graph.by_name.get(source.inputs[0])
            if not isinstance(before, GlobalAvgPool):
                problems.append(
                    f"{node.name} (Dense): reads a Flatten of a spatial map, whose order Keras (NHWC) and "
                    "the spec (channel-major) differ in; only a Dense after a global pool maps"
                )
    return problems


def _by_table(model: Any, graph: Graph, version: int) -> tuple[list[Pair], list[str], dict[str, np.ndarray]]:
    """Pairs (node, layer), problems and weights of a `keras.applications` ResNet, by the table."""
    pairs: list[Pair] = []
    problems: list[str] = []
    weights: dict[str, np.ndarray] = {}
    for layer in model.layers:
        if not _weighted(layer):
            continue
        name = node_name(layer.name, version)
        if name is None:
            problems.append(f"Keras layer {layer.name!r} ({type(layer).__name__}) is not in the name table")
            continue
        if name in graph.by_name:
            pairs.append((graph[name], layer, layer.name))
        weights.update(_layer_weights(layer, name))
    return pairs, problems, weights


# The public API ----------------------------------------------------------------------------------


def from_keras(
    model: Any, graph: Graph | None = None, *, drop_softmax: bool = False
) -> tuple[Graph, CanonicalWeights]:
    """The graph and canonical weights of Keras `model`.

    Without `graph`, `model` must be a `keras.applications` ResNet (see the module docstring);
    with it, any Keras model whose weighted layers correspond to the graph's nodes. Raises
    `InterchangeError` for a model it cannot map and `WeightsError` listing every mismatch
    between `model` and `graph`. `drop_softmax=True` imports a softmax classifier as its logits.
    """
    import keras

    if not isinstance(model, keras.Model):
        raise InterchangeError(
            f"from_keras takes a keras.Model; got {type(model).__module__}.{type(model).__name__}. "
            "Read a .keras file with multires.interchange.keras.read(path)."
        )
    recognised = _recognise(model, drop_softmax)
    if graph is None and recognised is None:
        from multires.interchange import FAMILIES

        raise InterchangeError(
            f"Keras model {model.name!r} is not a model multires recognises: it recognises {SUPPORTED}, "
            "by their layer names (conv1_conv, conv2_block1_1_conv, ..., predictions). For any other Keras "
            "model pass the graph that describes it, e.g. "
            "from_keras(model, graph=multires.spec('d2l_resnet18', edition='tf')) for the book's TensorFlow "
            f"ResNet-18. (Other families: {', '.join(FAMILIES)}.)"
        )
    source = f"Keras model {model.name!r}"
    if recognised is not None:
        entry, options, version = recognised
        graph = spec(entry, **options) if graph is None else graph
        pairs, problems, weights = _by_table(model, graph, version)
    else:
        assert graph is not None  # not recognised, so given: checked above
        nodes = [
            (tuple(n.name.split(".")), n) for n in graph.nodes if isinstance(n, (Conv2d, BatchNorm, Dense))
        ]
        pairs, problems = _align(nodes, _weighted_layers(model), (), ())
        problems += _check_flatten_dense(graph)
        weights = {}
        for node, layer, _ in pairs:
            weights.update(_layer_weights(layer, node.name))
    for node, layer, path in pairs:
        problems += _problems(layer, path, node, drop_softmax)
    try:
        canonical = match_weights(graph, weights, source)
    except WeightsError as error:
        if not problems:
            raise
        problems += [line.strip() for line in str(error).splitlines()[1:-1]]
        canonical = {}
    if problems:
        listing = "\n  ".join(problems)
        raise WeightsError(
            f"{source} does not match graph {graph.name!r} ({len(problems)} mismatches):\n  {listing}\n"
            "Pass the graph that describes this model, or fix the model's layers listed above."
        )
    return graph, canonical


def to_keras(graph: Graph, weights: Mapping[str, Any]) -> Any:
    """A Keras model computing `graph` with `weights` set.

    A `multires.zoo.keras` graph becomes its `keras.applications` model (`weights=None`,
    `classifier_activation=None`, input of any spatial size); any other graph the TensorFlow
    backend's functional Keras model, whose layers carry the node names (so
    `from_keras(to_keras(graph, w), graph)` gives `w` back).
    """
    canonical = match_weights(graph, weights, "weights")
    application = _application_of(graph)
    if application is None:
        from multires.backend import build

        return build(graph, backend="tf", weights=canonical)
    import keras

    entry, options, version = application
    channels = options["in_channels"]
    shape = (
        (None, None, channels)
        if keras.config.image_data_format() == "channels_last"
        else (channels, None, None)
    )
    constructor = getattr(keras.applications, APPLICATIONS[entry])
    include_top = options.get("include_top", True)
    model = constructor(
        include_top=include_top,
        weights=None,
        input_tensor=keras.Input(shape),
        pooling=options.get("pooling"),
        classes=options.get("num_classes", 1000),
        classifier_activation=None,
    )
    # Keras wraps an `input_tensor` in a list, so calls on one array would warn; unwrap it.
    model = keras.Model(model.inputs[0], model.outputs[0], name=model.name)
    for node, layer_name in layer_names(graph, version).items():
        layer = model.get_layer(layer_name)
        values = [
            canonical[f"{node}.{kind}"]
            for kind in _KERAS_ORDER[type(graph[node])]
            if f"{node}.{kind}" in canonical
        ]
        if isinstance(graph[node], Conv2d):
            values[0] = oihw_to_hwio(values[0])
        elif isinstance(graph[node], Dense):
            values[0] = np.ascontiguousarray(values[0].T)
        layer.set_weights(values)
    return model


_KERAS_ORDER = {
    Conv2d: ("weight", "bias"),
    Dense: ("weight", "bias"),
    BatchNorm: ("weight", "bias", "running_mean", "running_var"),
}
"""Canonical kinds in the order of a Keras layer's `get_weights()`."""


def read(path: str | os.PathLike, **options: Any) -> Any:
    """A Keras model from a `.keras` (or legacy `.h5`) file, via `keras.saving.load_model`
    (`options` go to it, e.g. `custom_objects`; `compile` defaults to False)."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Keras model file at {path}")
    options.setdefault("compile", False)
    return keras.saving.load_model(path, **options)


def write(model: Any, path: str | os.PathLike) -> Path:
    """Save Keras `model` to `path` (`.keras`, or legacy `.h5`) atomically: the file is complete
    or absent, and a failed save leaves nothing behind."""
    import keras

    path = Path(path)
    if path.suffix not in (".keras", ".h5"):
        raise InterchangeError(f"a Keras model file ends in .keras (or .h5); got {path.name!r}.")
    if not isinstance(model, keras.Model):
        raise InterchangeError(f"write takes a keras.Model; got {type(model).__name__}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp{path.suffix}")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
