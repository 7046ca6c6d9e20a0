"""MXNet Gluon models in and out: the model zoo's ResNets, any Gluon block given its graph, `.params` files.

`from_gluon(block)` recognises the ResNets of `mxnet.gluon.model_zoo.vision` (MXNet 1.9.1) by
their structure: the root class (`ResNetV1` / `ResNetV2`), the block class of every stage
(`BasicBlockV1` ... `BottleneckV2`), the blocks per stage (the depth), the first conv's kernel
(`thumbnail`), the output units (`num_classes`) and the first conv's input channels. It returns
the zoo graph of the same name (`multires.zoo.gluon`) and canonical weights:

| Gluon zoo                         | multires zoo                | blocks per stage |
|-----------------------------------|-----------------------------|------------------|
| `resnet18_v1`, `resnet34_v1`      | `gluon_resnet18_v1`, `..34` | BasicBlockV1     |
| `resnet50_v1` ... `resnet152_v1`  | `gluon_resnet50_v1` ...     | BottleneckV1     |
| `resnet18_v2`, `resnet34_v2`      | `gluon_resnet18_v2`, `..34` | BasicBlockV2     |
| `resnet50_v2` ... `resnet152_v2`  | `gluon_resnet50_v2` ...     | BottleneckV2     |

(each with `classes=` and `thumbnail=` as the zoo allows). Gluon's structural parameter paths
(`_collect_params_with_prefix()`, the keys of `save_parameters` files) map to canonical names by
the tables below; `features.<i>` is the i-th child of `features`, where the stages start at
`FIRST_STAGE`:

| Gluon (v1)                      | canonical                 |
|---------------------------------|---------------------------|
| `features.0` / `features.1`     | `conv1` / `bn1`           |
| `features.4.0.body.0`           | `layer1.0.conv1`          |
| `...body.1`, `.3`, `.4`         | `bn1`, `conv2`, `bn2`     |
| `...body.6`, `.7` (bottleneck)  | `conv3`, `bn3`            |
| `...downsample.0`, `.1`         | `downsample.0`, `.1`      |
| `output`                        | `fc`                      |

| Gluon (v2)                      | canonical                 |
|---------------------------------|---------------------------|
| `features.0`                    | `data_bn`                 |
| `features.1` / `features.2`     | `conv1` / `bn1`           |
| `features.5.0.bn1` ...          | `layer1.0.bn1` ... (same leaf names: bn1-3, conv1-3, downsample) |
| `features.9`                    | `final_bn`                |
| `output`                        | `fc`                      |

and parameter kinds `weight`, `bias` (conv, dense), `gamma` -> `weight`, `beta` -> `bias`,
`running_mean`, `running_var` (BatchNorm).

Conventions. Gluon's BatchNorm momentum `m` is the spec's `1 - m` (0.9 there is 0.1 here); eps is
copied (1e-5 in the zoo). MXNet 1.9.1 updates the running variance with the *biased* batch
variance, in the backward pass of `autograd.record(train_mode=True)` (measured), while a spec
BatchNorm updates it with the unbiased one; eval-mode outputs are the same. v2's input
`BatchNorm(scale=False, center=False)` runs with `fix_gamma=True`, which ignores the stored
gamma: it imports as weight 1 (and its beta, 0 in the zoo, as bias), and `to_gluon` refuses
weights where that node's weight is not 1 or its bias not 0, since the Gluon model cannot hold them.

`from_gluon(block, graph=graph)` maps any other Gluon block whose parameterised layers (Conv2D,
BatchNorm, Dense) correspond one to one to the graph's Conv2d, BatchNorm and Dense nodes, e.g.
the MXNet editions of *Dive into Deep Learning*'s ResNet-18 with `multires.spec("d2l_resnet18")`.
It traces one forward pass (symbolically for a HybridBlock, on a small zeros batch otherwise)
and pairs each layer, in the order it runs, with the first unpaired node of its type whose
upstream layers are paired already, that reads the paired node of the layer it reads directly
(if any), and whose weight shapes and settings fit; so a shortcut computed before the main
branch, or the other way round, pairs correctly. Every mismatch (layer type, stride, padding,
groups, eps, momentum; missing, unexpected or misshapen weights) is listed in one WeightsError. `to_gluon` returns the Gluon zoo model for a zoo graph and
multires' own mxnet model (a `HybridBlock`) for any other; `from_gluon` takes both back.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon
from mxnet.gluon import nn

import multires
from multires.errors import InterchangeError, WeightsError
from multires.files import atomic_write
from multires.graph import BatchNorm, Conv2d, Dense, Graph, Node
from multires.interchange.common import match_weights, node_as
from multires.weights import CanonicalWeights, weight_shapes
from multires.zoo.gluon import DEPTHS

__all__ = ["from_gluon", "read", "to_gluon", "write"]

FIRST_STAGE: dict[tuple[int, bool], int] = {(1, False): 4, (1, True): 1, (2, False): 5, (2, True): 2}
"""(version, thumbnail) -> index in `features` of the first stage (stem layers come before it)."""

STEM: dict[tuple[int, bool], dict[str, str]] = {
    (1, False): {"0": "conv1", "1": "bn1"},  # 2: ReLU, 3: max-pool
    (1, True): {"0": "conv1"},
    (2, False): {"0": "data_bn", "1": "conv1", "2": "bn1"},  # 3: ReLU, 4: max-pool
    (2, True): {"0": "data_bn", "1": "conv1"},
}
"""(version, thumbnail) -> `features` index -> canonical node of the stem."""

BLOCK: dict[int, dict[str, str]] = {
    1: {
        "body.0": "conv1",
        "body.1": "bn1",
        "body.3": "conv2",
        "body.4": "bn2",
        "body.6": "conv3",
        "body.7": "bn3",
        "downsample.0": "downsample.0",
        "downsample.1": "downsample.1",
    },
    2: {leaf: leaf for leaf in ("bn1", "conv1", "bn2", "conv2", "bn3", "conv3", "downsample")},
}
"""Version -> layer path inside a residual block -> canonical leaf name."""

FINAL_BN = "final_bn"
"""v2's BatchNorm after the last stage: `features.<FIRST_STAGE + 4>`."""

KINDS = {
    "weight": "weight",
    "bias": "bias",
    "gamma": "weight",
    "beta": "bias",
    "running_mean": "running_mean",
    "running_var": "running_var",
}
"""Gluon parameter attribute -> canonical weight kind."""

BLOCK_CLASSES = {
    1: {"BasicBlockV1": "basic", "BottleneckV1": "bottleneck"},
    2: {"BasicBlockV2": "basic", "BottleneckV2": "bottleneck"},
}

SUPPORTED = (
    "the Gluon model zoo's resnet{18,34,50,101,152}_v1 and resnet{18,34,50,101,152}_v2 "
    "(mxnet.gluon.model_zoo.vision.get_model(name, classes=..., thumbnail=...)) and models built "
    "by multires' mxnet backend"
)

_LAYER_TYPES = {Conv2d: nn.Conv2D, BatchNorm: nn.BatchNorm, Dense: nn.Dense}


def from_gluon(block: gluon.Block, graph: Graph | None = None) -> tuple[Graph, CanonicalWeights]:
    """The graph of Gluon `block` and its weights, canonical float32 in graph order.

    Without `graph`, `block` must be a Gluon zoo ResNet (see the module docstring) or a model of
    multires' mxnet backend; otherwise an InterchangeError says what is supported. With `graph`,
    any block whose Conv2D/BatchNorm/Dense layers correspond to the graph's nodes maps over (see
    the module docstring), else a WeightsError lists every mismatch. Parameters must be
    initialised (loaded, or shaped by a first forward pass).
    """
    if not isinstance(block, gluon.Block):
        raise InterchangeError(
            f"from_gluon takes a Gluon Block; got {type(block).__name__}. Supported: {SUPPORTED}. "
            "For a .params file use multires.interchange.gluon.read(path, model=...)."
        )
    own = _backend_graph(block)
    if own is not None:
        from multires.backends.mxnet.weights import export_weights

        graph = own if graph is None else graph
        return graph, match_weights(graph, export_weights(block), f"mxnet model {own.name!r}")
    if graph is None:
        graph, pairs = _recognise(block)
        source = f"Gluon {graph.name.removeprefix('gluon_')}"
    else:
        pairs = _traced_pairs(block, graph)
        source = f"Gluon {type(block).__name__}"
    return graph, _convert(pairs, graph, source)


def to_gluon(graph: Graph, weights: Mapping[str, Any]) -> gluon.HybridBlock:
    """A Gluon model computing `graph` with `weights` set: the zoo's own model (`get_model`) for a
    Gluon zoo graph (`gluon_resnet50_v1`, ...), else multires' mxnet model of `graph`."""
    canonical = match_weights(graph, weights, "weights")
    variant = _zoo_variant(graph)
    if variant is None:
        return multires.build(graph, backend="mxnet", weights=canonical)
    version, depth, thumbnail = variant
    if version == 2:
        _check_fixed_data_bn(canonical)
    num_classes = node_as(graph, "fc", Dense).out_features
    net = gluon.model_zoo.vision.get_model(
        f"resnet{depth}_v{version}", pretrained=False, classes=num_classes, thumbnail=thumbnail
    )
    for path, param in net._collect_params_with_prefix().items():
        param._load_init(_array(canonical[_zoo_name(path, version, thumbnail)]), mx.cpu())
    return net


def read(path: str | Path, model: str | None = None) -> gluon.HybridBlock:
    """The Gluon zoo model `model` (e.g. "resnet50_v1") with the parameters in `path`.

    `path` is a `save_parameters` file (keys like `features.0.weight`), or one file of an
    `export` pair (`<base>-symbol.json`, `<base>-0000.params`), whose symbol must be the zoo
    model's. Neither stores the architecture's name, so `model` is required; the number of
    classes, input channels and `thumbnail` are read from the parameter shapes.
    """
    name = _model_name(model, path)
    version, depth = int(name[-1]), int(name.split("resnet", 1)[1].split("_")[0])
    path = Path(path)
    symbol_file, params_file = _export_pair(path)
    file = params_file or path
    if not file.is_file():
        raise WeightsError(f"{file}: no such file.")
    try:
        loaded = {key: value.asnumpy() for key, value in mx.nd.load(str(file)).items()}
    except mx.base.MXNetError as error:
        raise WeightsError(f"{file}: not an MXNet parameter file ({error}).") from None
    if symbol_file is not None:
        return _read_export(symbol_file, file, loaded, name, version, depth)
    first = f"features.{1 if version == 2 else 0}.weight"
    if first not in loaded or "output.weight" not in loaded:
        raise WeightsError(
            f"{file}: no {first!r} or 'output.weight': not a save_parameters file of Gluon's {name}. "
            f"Its first keys: {sorted(loaded)[:5]}."
        )
    thumbnail = loaded[first].shape[-1] == 3
    net = gluon.model_zoo.vision.get_model(
        name, classes=loaded["output.weight"].shape[0], thumbnail=thumbnail
    )
    try:
        net.load_parameters(str(file), ctx=mx.cpu())
    except (AssertionError, ValueError, mx.base.MXNetError) as error:
        raise WeightsError(f"{file} does not hold the parameters of Gluon's {name}: {error}") from None
    return net


def write(block: gluon.Block, path: str | Path) -> Path:
    """Save `block`'s parameters with `save_parameters`, atomically: `path` is complete or untouched."""
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "params"
        block.save_parameters(str(staged))
        data = staged.read_bytes()
    return atomic_write(path, lambda handle: handle.write(data))


# Recognising the zoo models. ----------------------------------------------------------------


def _recognise(block: gluon.Block) -> tuple[Graph, list[tuple[str, gluon.Block | None, str | None]]]:
    """The zoo graph of `block` and its (Gluon path, layer, canonical node) pairs."""
    version = {"ResNetV1": 1, "ResNetV2": 2}.get(type(block).__name__)
    features = getattr(block, "features", None)
    if version is None or not isinstance(features, nn.HybridSequential):
        raise _unrecognised(block)
    children = list(features._children.values())
    conv = children[version - 1] if len(children) >= version else None
    thumbnail = _kernel(conv) == (3, 3)
    first = FIRST_STAGE[version, thumbnail]
    stages = children[first : first + 4]
    kinds = {
        BLOCK_CLASSES[version].get(type(b).__name__) for stage in stages for b in stage._children.values()
    }
    layers = tuple(len(stage._children) for stage in stages)
    depth = next((d for d, spec in DEPTHS.items() if ({spec[0]}, spec[1]) == (kinds, layers)), None)
    if (
        depth is None
        or not isinstance(conv, nn.Conv2D)
        or not isinstance(getattr(block, "output", None), nn.Dense)
    ):
        raise _unrecognised(block)
    if conv.weight.shape[1] in (0, -1):
        raise WeightsError(
            f"Gluon resnet{depth}_v{version}: its parameters are not initialised; load them "
            "(load_parameters) or run one forward pass first."
        )
    graph = multires.spec(
        f"gluon_resnet{depth}_v{version}",
        num_classes=block.output._units,
        in_channels=conv.weight.shape[1],
        thumbnail=thumbnail,
    )
    pairs = []
    for path, layer in _layers(block):
        try:
            node = _zoo_name(f"{path}.weight", version, thumbnail).rsplit(".", 1)[0]
        except KeyError:
            node = None
        pairs.append((path, layer, node))
    return graph, pairs


def _zoo_name(path: str, version: int, thumbnail: bool) -> str:
    """The canonical name of Gluon zoo parameter `path` (`features.4.0.body.0.weight` ->
    `layer1.0.conv1.weight`); KeyError for a path the tables do not hold."""
    layer, _, kind = path.rpartition(".")
    parts = layer.split(".")
    first = FIRST_STAGE[version, thumbnail]
    node: str | None
    if layer == "output":
        node = "fc"
    elif parts[0] != "features" or len(parts) < 2 or not parts[1].isdigit():
        raise KeyError(path)
    elif len(parts) == 2:
        index = int(parts[1])
        node = STEM[version, thumbnail].get(parts[1]) or {first + 4: FINAL_BN if version == 2 else None}.get(
            index
        )
    elif first <= int(parts[1]) < first + 4:
        node = f"layer{int(parts[1]) - first + 1}.{parts[2]}.{BLOCK[version].get('.'.join(parts[3:]))}"
        node = None if node.endswith(".None") else node
    else:
        node = None
    if node is None or kind not in KINDS:
        raise KeyError(path)
    return f"{node}.{KINDS[kind]}"


def _zoo_variant(graph: Graph) -> tuple[int, int, bool] | None:
    """(version, depth, thumbnail) when `graph` is exactly a Gluon zoo graph, else None."""
    match = re.fullmatch(r"gluon_resnet(\d+)_v([12])", graph.name)
    if match is None or int(match[1]) not in DEPTHS or not isinstance(graph.by_name.get("fc"), Dense):
        return None
    for thumbnail in (False, True):
        candidate = multires.spec(
            graph.name,
            num_classes=node_as(graph, "fc", Dense).out_features,
            in_channels=graph.inputs[0].channels,
            thumbnail=thumbnail,
        )
        if candidate == graph:
            return int(match[2]), int(match[1]), thumbnail
    return None


def _check_fixed_data_bn(weights: CanonicalWeights) -> None:
    problems = [
        f"data_bn.{kind} must be all {value:g}"
        for kind, value in (("weight", 1.0), ("bias", 0.0))
        if not np.all(weights[f"data_bn.{kind}"] == value)
    ]
    if problems:
        raise WeightsError(
            f"{' and '.join(problems)}: Gluon's ResNet v2 normalises its input with "
            "BatchNorm(scale=False, center=False), whose gamma is fixed to 1 and beta to 0, so it "
            "cannot hold other values. Set them to 1 and 0, or use to_gluon on a graph that is not a "
            "Gluon zoo graph (multires' own mxnet model)."
        )


def _unrecognised(block: gluon.Block) -> InterchangeError:
    return InterchangeError(
        f"{type(block).__name__} is not a Gluon model multires recognises; supported: {SUPPORTED}. "
        "For any other Gluon block, pass the graph that describes it, e.g. "
        "from_gluon(net, graph=multires.spec('d2l_resnet18')): its Conv2D, BatchNorm and Dense "
        "layers are then matched, in forward order, to the graph's nodes."
    )


def _kernel(layer: gluon.Block) -> tuple[int, ...] | None:
    return layer._kwargs.get("kernel") if isinstance(layer, nn.Conv2D) else None


# Any block, given its graph. -----------------------------------------------------------------


def _layers(block: gluon.Block, prefix: str = "") -> Iterator[tuple[str, gluon.Block]]:
    """(structural path, block) of every block that owns parameters, in registration order."""
    if block._reg_params:
        yield prefix, block
    for name, child in block._children.items():
        yield from _layers(child, f"{prefix}.{name}" if prefix else name)


def _traced_pairs(block: gluon.Block, graph: Graph) -> list[tuple[str, gluon.Block | None, str | None]]:
    """The parameterised layers of `block`, in the order its forward pass runs them, each paired
    with a Conv2d/BatchNorm/Dense node of `graph`.

    A layer takes the first unpaired node (in graph order) of its type whose parameterised
    ancestors are all paired already, that reads the node paired with the layer whose output it
    reads directly (if any), and whose weight shapes and settings fit; if none fits, the first
    such node whatever its shapes and settings, so that the differences get listed.
    """
    layers = dict(_layers(block))
    paths = {id(layer): path for path, layer in layers.items()}
    calls: list[tuple[str, Any, Any]] = []  # (path, input, output); holding them keeps ids unique

    def record(layer: gluon.Block, args: tuple[Any, ...], out: Any) -> None:
        calls.append((paths[id(layer)], args[0] if args else None, out))

    handles = [layer.register_forward_hook(record) for layer in layers.values()]
    try:
        _trace(block, graph)
    finally:
        for handle in handles:
            handle.detach()
    producer = {id(out): path for path, _, out in calls}
    expected = weight_shapes(graph, partial=True)
    ancestors = _param_ancestors(graph)
    unpaired = [node for node in graph.nodes if isinstance(node, tuple(_LAYER_TYPES))]
    paired: dict[str, str] = {}  # Gluon path -> node name
    pairs: list[tuple[str, gluon.Block | None, str | None]] = []
    traced = [(path, producer.get(id(data))) for path, data, _ in calls]
    traced += [(path, None) for path in layers if path not in {p for p, _, _ in calls}]
    for path, source in traced:
        layer = layers[path]
        done = set(paired.values())
        ready = [
            node
            for node in unpaired
            if isinstance(layer, _LAYER_TYPES[type(node)]) and ancestors[node.name] <= done
        ]
        direct = [node for node in ready if source not in paired or node.inputs[0] == paired[source]]
        fitting = [node for node in direct or ready if _fits_node(layer, node, expected)]
        node = next(iter(fitting or direct or ready), None)
        if node is not None:
            unpaired.remove(node)
            paired[path] = node.name
        pairs.append((path, layer, node.name if node is not None else None))
    return pairs


def _param_ancestors(graph: Graph) -> dict[str, set[str]]:
    """Node name -> the nearest Conv2d/BatchNorm/Dense nodes upstream of it."""
    nearest: dict[str, set[str]] = {i.name: set() for i in graph.inputs}
    result: dict[str, set[str]] = {}
    for node in graph.nodes:
        result[node.name] = set().union(*(nearest[source] for source in node.inputs))
        nearest[node.name] = {node.name} if isinstance(node, tuple(_LAYER_TYPES)) else result[node.name]
    return result


def _fits_node(layer: gluon.Block, node: Node, expected: dict[str, tuple[int, ...]]) -> bool:
    """Whether `layer`'s parameters have the shapes of `node`'s weights and its settings agree."""
    if _check_layer("", layer, node):
        return False
    shapes = {f"{node.name}.{KINDS.get(a, a)}": p.shape for a, p in layer._reg_params.items()}
    names = {name for name in expected if name.rsplit(".", 1)[0] == node.name}
    return set(shapes) == names and all(
        len(shape) == len(expected[name])
        and all(s in (0, -1, e) or e == -1 for s, e in zip(shape, expected[name], strict=True))
        for name, shape in shapes.items()
    )


def _trace(block: gluon.Block, graph: Graph) -> None:
    """Run `block` once so that its layers' forward hooks fire: on a Symbol for a HybridBlock, else
    on a zeros batch with every hybridized child run eagerly (a cached graph skips the hooks)."""
    np_mode = mx.util.is_np_array()
    if isinstance(block, gluon.HybridBlock):
        data = mx.sym.var("data")
        block(data.as_np_ndarray() if np_mode else data)
        return
    size = next(s for s in (32, 64, 128, 224, 512) if _fits(graph, s))
    shape = (1, graph.inputs[0].channels, size, size)
    active = [b for b in _descendants(block) if isinstance(b, gluon.HybridBlock) and b._active]
    for child in active:
        child._active = False
    try:
        block(mx.np.zeros(shape) if np_mode else mx.nd.zeros(shape))
    finally:
        for child in active:
            child._active = True


def _fits(graph: Graph, size: int) -> bool:
    try:
        multires.infer_shapes(graph, (1, graph.inputs[0].channels, size, size))
    except multires.MultiresError:
        return False
    return True


def _descendants(block: gluon.Block) -> Iterator[gluon.Block]:
    for child in block._children.values():
        yield child
        yield from _descendants(child)


def _convert(
    pairs: list[tuple[str, gluon.Block | None, str | None]], graph: Graph, source: str
) -> CanonicalWeights:
    """Canonical weights from (Gluon path, layer, node) pairs; one WeightsError lists every
    structural mismatch (layer type, hyperparameters) and every missing or misshapen weight."""
    found: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for path, layer, node_name in pairs:
        if layer is None:
            continue
        if node_name is None:
            problems.append(f"unexpected Gluon layer {path} ({type(layer).__name__}), no graph node for it")
            continue
        node = graph[node_name]
        layer_problems = _check_layer(path, layer, node)
        problems += layer_problems
        if layer_problems and not isinstance(layer, _LAYER_TYPES.get(type(node), ())):
            continue
        for attr, param in layer._reg_params.items():
            if param._data is None:
                problems.append(
                    f"{path}.{attr}: not initialised; load the parameters or run one forward pass first"
                )
                continue
            value = param.data().asnumpy()
            if attr == "gamma" and layer._kwargs.get("fix_gamma"):
                value = np.ones_like(value)  # MXNet's fix_gamma ignores the stored gamma
            found[f"{node_name}.{KINDS.get(attr, attr)}"] = value
    try:
        weights = match_weights(graph, found, source)
    except WeightsError as error:
        if not problems:
            raise
        raise WeightsError(_listing(source, graph, problems) + f"\nand {error}") from None
    if problems:
        raise WeightsError(_listing(source, graph, problems))
    return weights


def _listing(source: str, graph: Graph, problems: list[str]) -> str:
    return (
        f"{source} does not match graph {graph.name!r} ({len(problems)} layer mismatches):\n  "
        + "\n  ".join(problems)
    )


def _check_layer(path: str, layer: gluon.Block, node: Node) -> list[str]:
    """Differences between Gluon `layer` and spec `node` that the weights' shapes do not show."""
    where = f"{path} ({type(layer).__name__}) -> {node.name} ({type(node).__name__})"
    expected = _LAYER_TYPES.get(type(node))
    if expected is None or not isinstance(layer, expected):
        return [f"{where}: layer type differs"]
    kwargs = layer._kwargs if not isinstance(layer, nn.Dense) else {}
    found: list[tuple[str, Any, Any]] = []
    if isinstance(node, Conv2d):
        if isinstance(node.padding, str):
            return [f"{where}: padding 'same' (TensorFlow SAME) has no Gluon Conv2D equivalent"]
        (top, bottom), (left, right) = node.padding
        found = [
            ("stride", tuple(kwargs["stride"]), node.stride),
            ("dilation", tuple(kwargs["dilate"]), node.dilation),
            ("groups", kwargs["num_group"], node.groups),
            (
                "padding",
                tuple(kwargs["pad"]),
                (top, left) if (top, left) == (bottom, right) else node.padding,
            ),
            ("layout", kwargs["layout"], "NCHW"),
        ]
    elif isinstance(node, BatchNorm):
        found = [
            ("axis", kwargs["axis"], 1),
            ("eps", kwargs["eps"], node.eps),
            ("momentum (Gluon's, 1 - the spec's)", kwargs["momentum"], round(1.0 - node.momentum, 12)),
        ]
    elif isinstance(node, Dense):
        found = [("flatten", layer._flatten, True), ("activation", layer.act, None)]
    return [
        f"{where}: {what} {actual!r}, graph has {wanted!r}"
        for what, actual, wanted in found
        if not (
            actual == wanted
            or (isinstance(actual, float) and abs(actual - wanted) <= 1e-9 * max(1, abs(wanted)))
        )
    ]


def _backend_graph(block: gluon.Block) -> Graph | None:
    graph = getattr(block, "graph", None)
    return graph if isinstance(graph, Graph) and hasattr(block, "blocks") else None


def _array(value: np.ndarray) -> Any:
    array = np.ascontiguousarray(value, dtype=np.float32)
    return (
        mx.np.array(array, dtype="float32") if mx.util.is_np_array() else mx.nd.array(array, dtype="float32")
    )


# Files. --------------------------------------------------------------------------------------


def _model_name(model: str | None, path: str | Path) -> str:
    names = [f"resnet{d}_v{v}" for v in (1, 2) for d in DEPTHS]
    name = (model or "").removeprefix("gluon_")
    if name not in names:
        got = "no model=" if model is None else f"model={model!r}"
        raise InterchangeError(
            f"{path}: a Gluon .params file stores no architecture, so read() needs the zoo model's name; "
            f"got {got}. Pass model= one of {', '.join(names)} (or 'gluon_' + one of them)."
        )
    return name


def _export_pair(path: Path) -> tuple[Path | None, Path | None]:
    """(symbol file, params file) when `path` is one file of an `export` pair, else (None, None)."""
    if path.name.endswith("-symbol.json"):
        base = path.name.removesuffix("-symbol.json")
        candidates = sorted(path.parent.glob(f"{_glob_escape(base)}-[0-9][0-9][0-9][0-9].params"))
        if len(candidates) != 1:
            raise WeightsError(
                f"{path}: expected exactly one {base}-NNNN.params beside it; found "
                f"{[c.name for c in candidates] or 'none'}. Pass the .params file of the epoch you want."
            )
        return path, candidates[0]
    match = re.fullmatch(r"(.*)-\d{4}\.params", path.name)
    if match is not None and (path.parent / f"{match[1]}-symbol.json").is_file():
        return path.parent / f"{match[1]}-symbol.json", path
    return None, None


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _read_export(
    symbol_file: Path, params_file: Path, loaded: dict[str, np.ndarray], name: str, version: int, depth: int
) -> gluon.HybridBlock:
    """The zoo model `name` with the parameters of an `export` pair whose symbol is that model's."""
    try:
        nodes = json.loads(symbol_file.read_text())["nodes"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WeightsError(f"{symbol_file}: not an MXNet symbol file ({error}).") from None
    stored = {key.split(":", 1)[-1]: value for key, value in loaded.items()}
    conv = "conv0_weight"
    first = next((v for k, v in stored.items() if k.endswith(conv)), None)
    thumbnail = first is not None and first.shape[-1] == 3
    classes = next((v.shape[0] for k, v in stored.items() if k.endswith("dense0_weight")), 1000)
    net = gluon.model_zoo.vision.get_model(name, classes=classes, thumbnail=thumbnail)
    ours = json.loads(net(mx.sym.var("data")).tojson())["nodes"]
    if _ops(nodes) != _ops(ours):
        raise WeightsError(
            f"{symbol_file}: its symbol is not Gluon's {name} (classes={classes}, thumbnail={thumbnail}); "
            "pass the model name it was exported from."
        )
    params = {p.name.removeprefix(net.prefix): p for p in net.collect_params().values()}
    prefix = next((k[: -len(conv)] for k in stored if k.endswith(conv) and k[: -len(conv)].endswith("_")), "")
    problems = [
        f"unexpected {k}" for k in stored if not k.startswith(prefix) or k[len(prefix) :] not in params
    ]
    for short, param in params.items():
        value = stored.get(prefix + short)
        if value is None:
            problems.append(f"missing {prefix + short}")
        elif param.shape and not all(e in (0, s) for s, e in zip(value.shape, param.shape, strict=False)):
            problems.append(f"{prefix + short}: shape {value.shape}, expected {param.shape}")
    if problems:
        raise WeightsError(f"{params_file} does not match Gluon's {name}:\n  " + "\n  ".join(problems))
    for short, param in params.items():
        param._load_init(_array(stored[prefix + short]), mx.cpu())
    return net


def _ops(nodes: list[dict[str, Any]]) -> list[tuple[str, dict[str, str]]]:
    """A symbol's operators with their attributes, names left out (they carry the export prefix)."""
    return [(n["op"], {k: v for k, v in n.get("attrs", {}).items() if not k.startswith("__")}) for n in nodes]
