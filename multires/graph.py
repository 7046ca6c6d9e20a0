"""The network spec: frozen node dataclasses forming a DAG in a `Graph`.

A spec is a value: hashable, comparable and serialisable to JSON/YAML. Every node pins what
frameworks disagree on (explicit per-side padding, BatchNorm momentum convention, max-pool
padding that never wins the max), and `multires.reference` defines what each node computes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from itertools import pairwise
from typing import Any, ClassVar, Literal

from multires.errors import SpecError

SCHEMA_VERSION = 1
SCHEMA = "multires.graph"

Pair = tuple[int, int]
Padding = tuple[Pair, Pair]
"""Per-side padding `((top, bottom), (left, right))`."""

SAME: Literal["same"] = "same"
"""TensorFlow/XLA's SAME padding, whose per-side pads depend on the input size (see `same_padding`)."""

WindowPadding = Padding | Literal["same"]
"""The padding of a convolution or pooling window: explicit per side, or `SAME`."""

VARIANCE_CONVENTIONS = ("unbiased", "biased")
"""How BatchNorm's running variance takes in the batch variance: PyTorch uses the unbiased
estimate (`n / (n - 1)` times the biased one), Keras, Flax and MXNet the biased one."""


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow/XLA SAME padding of one axis: `(before, after)` for an input of `size`.

    The output has `ceil(size / stride)` positions; the total padding is
    `max((ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)`, which equals
    `max((kernel - 1) * dilation - (size - 1) % stride, 0)`, and the smaller half goes before. With
    stride 1 this is PyTorch's `padding='same'`; with a larger stride it is asymmetric and depends
    on the input size (even and odd sizes differ), which PyTorch's own `'same'` does not support.
    """
    total = max((kernel - 1) * dilation - (size - 1) % stride, 0)
    return (total // 2, total - total // 2)


def resolve_padding(
    padding: WindowPadding, size: tuple[int, int], kernel: Pair, stride: Pair, dilation: Pair = (1, 1)
) -> Padding:
    """Per-side padding for an input of spatial `size` `(h, w)`: explicit padding as it is, SAME
    computed by `same_padding` per axis."""
    if padding != SAME:
        return padding
    rows, cols = (same_padding(*axis) for axis in zip(size, kernel, stride, dilation, strict=True))
    return (rows, cols)


def static_padding(node: Conv2d | MaxPool2d | AvgPool2d) -> Padding | None:
    """The node's per-side padding when no input size changes it, else None.

    Explicit padding is static; so is SAME with stride 1 (`(k - 1) * d` in all, the larger half
    after) or with a one-pixel window (nothing), on both axes. Only SAME at a stride above 1 over
    a wider window depends on the input size, and a backend computes it when it sees the input.
    """
    if node.padding != SAME:
        return node.padding
    dilation = node.dilation if isinstance(node, Conv2d) else (1, 1)
    axes = list(zip(node.kernel, node.stride, dilation, strict=True))
    if any(s > 1 and k > 1 for k, s, _ in axes):
        return None
    rows, cols = (same_padding(1, k, s, d) for k, s, d in axes)
    return (rows, cols)


def pads_as_same(node: Conv2d | MaxPool2d | AvgPool2d) -> bool:
    """Whether the node's explicit padding is what SAME pads at every input size: stride 1 on
    both axes and `(k - 1) * d` in all, the larger half after (a 3 x 3 window padded 1 on each
    side). A backend may then use its framework's own SAME, which needs no separate padding op."""
    if node.padding == SAME or any(s != 1 for s in node.stride):
        return False
    dilation = node.dilation if isinstance(node, Conv2d) else (1, 1)
    return tuple(node.padding) == tuple(
        same_padding(1, k, 1, d) for k, d in zip(node.kernel, dilation, strict=True)
    )


def symmetric_padding(padding: Padding) -> Pair | None:
    """`(ph, pw)` when each axis pads both sides alike (what a framework layer's own `padding`
    argument can express), else None (the backend pads explicitly before the layer)."""
    (top, bottom), (left, right) = padding
    return (top, left) if top == bottom and left == right else None


_SEGMENT = re.compile(r"^[A-Za-z0-9_]+$")


def _where(node: Node) -> str:
    return f"{node.name} ({type(node).__name__})"


MAX_INT = 2**31 - 1
"""The largest size, stride or padding a spec holds (frameworks index with 32-bit ints)."""


def _ints(value: Any, node: Node, what: str) -> tuple[int, ...]:
    items = value if isinstance(value, (tuple, list)) else (value,)
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise SpecError(f"{_where(node)}: {what} must be integers; got {str(value)[:100]}.")
        if abs(item) > MAX_INT:
            raise SpecError(f"{_where(node)}: {what} must lie within +-{MAX_INT}; got {str(value)[:100]}.")
        out.append(int(item))
    return tuple(out)


def _pair(value: Any, node: Node, what: str, minimum: int = 1) -> Pair:
    items = _ints(value, node, what)
    if len(items) == 1:
        items = items * 2
    if len(items) != 2:
        raise SpecError(f"{_where(node)}: {what} must be an int or a pair (h, w); got {value!r}.")
    if min(items) < minimum:
        raise SpecError(
            f"{_where(node)}: {what} must be >= {minimum}; got {value!r}. Use a value >= {minimum}."
        )
    return (items[0], items[1])


def _window_padding(value: Any, node: Node) -> WindowPadding:
    """`_padding`, or `SAME` for the string "same" (any case)."""
    if isinstance(value, str) and value.lower() == SAME:
        return SAME
    if isinstance(value, str):
        raise SpecError(
            f"{_where(node)}: padding must be explicit per side or 'same' (TensorFlow/XLA SAME), not "
            f"{value!r}; give an int, (ph, pw), ((top, bottom), (left, right)) or 'same'."
        )
    return _padding(value, node)


def _padding(value: Any, node: Node) -> Padding:
    """Normalise `p`, `(ph, pw)` or `((top, bottom), (left, right))` to the per-side form."""
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (tuple, list)) for v in value)
    ):
        rows, cols = (_pair(v, node, "padding", minimum=0) for v in value)
        return (rows, cols)
    if isinstance(value, str):
        raise SpecError(
            f"{_where(node)}: padding must be explicit per side, not {value!r}; give an int, "
            "(ph, pw) or ((top, bottom), (left, right))."
        )
    ph, pw = _pair(value, node, "padding", minimum=0)
    return ((ph, ph), (pw, pw))


def _positive(value: Any, node: Node, what: str) -> int:
    numbers = _ints(value, node, what)
    if len(numbers) != 1 or isinstance(value, (tuple, list)):
        raise SpecError(f"{_where(node)}: {what} must be one positive int; got {value!r}.")
    (number,) = numbers
    if number < 1:
        raise SpecError(f"{_where(node)}: {what} must be positive; got {number}. Use a value >= 1.")
    return number


@dataclass(frozen=True)
class Input:
    """A graph input: a batch of `channels`-channel images, NCHW in the spec."""

    name: str
    channels: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _SEGMENT.match(self.name):
            raise SpecError(f"input {self.name!r}: a name is letters, digits and '_'.")
        if (
            isinstance(self.channels, bool)
            or not isinstance(self.channels, int)
            or not 1 <= self.channels <= MAX_INT
        ):
            raise SpecError(
                f"input {self.name}: channels must be a positive int up to {MAX_INT}; got {str(self.channels)[:100]}."
            )


@dataclass(frozen=True)
class Node:
    """A named operation reading the outputs of the nodes (or graph inputs) named in `inputs`."""

    name: str
    inputs: tuple[str, ...]

    op: ClassVar[str] = ""
    arity: ClassVar[int | None] = 1
    """Number of inputs; None means two or more."""

    def __post_init__(self) -> None:
        if (
            not isinstance(self.name, str)
            or not self.name
            or not all(_SEGMENT.match(part) for part in self.name.split("."))
        ):
            raise SpecError(
                f"{self.name!r} ({type(self).__name__}): a node name is dot-separated segments of "
                "letters, digits and '_', like 'layer1.0.conv1'."
            )
        inputs = (self.inputs,) if isinstance(self.inputs, str) else self.inputs
        if not isinstance(inputs, (tuple, list)) or not all(isinstance(i, str) for i in inputs):
            raise SpecError(f"{_where(self)}: inputs must be a name or a list of names; got {inputs!r}.")
        inputs = tuple(inputs)
        object.__setattr__(self, "inputs", inputs)
        if self.arity is None and len(inputs) < 2:
            raise SpecError(f"{_where(self)}: needs two or more inputs; got {list(inputs)}.")
        if self.arity is not None and len(inputs) != self.arity:
            raise SpecError(f"{_where(self)}: takes {self.arity} input(s); got {list(inputs)}.")
        self._normalise()

    def _normalise(self) -> None:
        """Check and normalise the node's own fields (overridden by node types with fields)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: `op`, `name`, `inputs` and the node's own fields."""
        data: dict[str, Any] = {"op": self.op, "name": self.name, "inputs": list(self.inputs)}
        for f in dataclasses.fields(self):
            if f.name not in ("name", "inputs"):
                data[f.name] = _to_json_value(getattr(self, f.name))
        return data


def _to_json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json_value(v) for v in value]
    return value


@dataclass(frozen=True)
class Conv2d(Node):
    """2-D cross-correlation, as `torch.nn.Conv2d`. Weight OIHW `(out, in/groups, kh, kw)`.

    `padding` is zeros per side, or `"same"`: TensorFlow/XLA SAME, pads computed from the input
    size by `same_padding` (asymmetric for stride > 1).
    """

    out_channels: int = 0
    kernel: Pair = (1, 1)
    stride: Pair = (1, 1)
    padding: WindowPadding = ((0, 0), (0, 0))
    dilation: Pair = (1, 1)
    groups: int = 1
    bias: bool = False

    op: ClassVar[str] = "conv2d"

    def _normalise(self) -> None:
        object.__setattr__(self, "out_channels", _positive(self.out_channels, self, "out_channels"))
        object.__setattr__(self, "kernel", _pair(self.kernel, self, "kernel"))
        object.__setattr__(self, "stride", _pair(self.stride, self, "stride"))
        object.__setattr__(self, "padding", _window_padding(self.padding, self))
        object.__setattr__(self, "dilation", _pair(self.dilation, self, "dilation"))
        object.__setattr__(self, "groups", _positive(self.groups, self, "groups"))
        object.__setattr__(self, "bias", bool(self.bias))
        if self.out_channels % self.groups:
            raise SpecError(
                f"{_where(self)}: groups (={self.groups}) must divide out_channels "
                f"(={self.out_channels}). Change groups or out_channels."
            )


@dataclass(frozen=True)
class BatchNorm(Node):
    """Batch normalisation over the channel axis of a 4-D map.

    `momentum` is PyTorch's: the weight of the new batch statistic,
    `running = (1 - momentum) * running + momentum * batch_stat`, where the running variance
    takes the batch variance by `running_variance`: "unbiased" (PyTorch: `n / (n - 1)` times the
    biased variance) or "biased" (Keras, Flax, MXNet); normalisation always uses the biased one.
    Keras, Flax, MXNet and ONNX call `1 - momentum` their momentum; backends convert.
    """

    eps: float = 1e-5
    momentum: float = 0.1
    running_variance: str = "unbiased"

    op: ClassVar[str] = "batchnorm"

    def _normalise(self) -> None:
        for what in ("eps", "momentum"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise SpecError(f"{_where(self)}: {what} must be a finite number; got {value!r}.")
            object.__setattr__(self, what, float(value))
        if self.running_variance not in VARIANCE_CONVENTIONS:
            raise SpecError(
                f"{_where(self)}: running_variance must be one of {VARIANCE_CONVENTIONS} (PyTorch's "
                f"unbiased update, or Keras/Flax/MXNet's biased one); got {self.running_variance!r}."
            )
        if not self.eps > 0:
            raise SpecError(f"{_where(self)}: eps must be > 0; got {self.eps}.")
        if not 0 <= self.momentum <= 1:
            raise SpecError(
                f"{_where(self)}: momentum is the weight of the new batch statistic and must lie "
                f"in [0, 1]; got {self.momentum}. (Keras/Flax momentum m is 1 - m here.)"
            )


@dataclass(frozen=True)
class ReLU(Node):
    """max(x, 0), elementwise."""

    op: ClassVar[str] = "relu"


@dataclass(frozen=True)
class Add(Node):
    """Elementwise sum of two or more inputs of the same shape."""

    op: ClassVar[str] = "add"
    arity: ClassVar[int | None] = None


@dataclass(frozen=True)
class MaxPool2d(Node):
    """Max pooling; padded positions are -inf, so padding never wins the max (also with "same")."""

    kernel: Pair = (1, 1)
    stride: Pair = None  # type: ignore[assignment]  # None means the kernel; always a Pair once built
    padding: WindowPadding = ((0, 0), (0, 0))

    op: ClassVar[str] = "maxpool2d"

    def _normalise(self) -> None:
        _normalise_pool(self)


@dataclass(frozen=True)
class AvgPool2d(Node):
    """Average pooling; with `count_include_pad` padded zeros count in the divisor (PyTorch's default).

    TensorFlow's SAME average pooling is `padding="same", count_include_pad=False`.
    """

    kernel: Pair = (1, 1)
    stride: Pair = None  # type: ignore[assignment]  # None means the kernel; always a Pair once built
    padding: WindowPadding = ((0, 0), (0, 0))
    count_include_pad: bool = True

    op: ClassVar[str] = "avgpool2d"

    def _normalise(self) -> None:
        _normalise_pool(self)
        object.__setattr__(self, "count_include_pad", bool(self.count_include_pad))


def _normalise_pool(node: MaxPool2d | AvgPool2d) -> None:
    object.__setattr__(node, "kernel", _pair(node.kernel, node, "kernel"))
    stride = node.kernel if node.stride is None else node.stride
    object.__setattr__(node, "stride", _pair(stride, node, "stride"))
    object.__setattr__(node, "padding", _window_padding(node.padding, node))
    if node.padding == SAME:
        return  # SAME pads at most kernel // 2 per side: (kernel - 1) in all, the larger half after.
    for (before, after), k in zip(node.padding, node.kernel, strict=True):
        if max(before, after) > k // 2:
            raise SpecError(
                f"{_where(node)}: padding {node.padding} exceeds half the kernel {node.kernel}; "
                "a window could then hold only padding. Use padding <= kernel // 2."
            )


@dataclass(frozen=True)
class Pad2d(Node):
    """Zero padding per side `((top, bottom), (left, right))`, as Keras' `ZeroPadding2D` and
    `torch.nn.ZeroPad2d`. A separate node where zeros must take part in what follows: Keras pads
    before a max-pool with zeros, which win the max over negative values (a pool's own padding
    never does)."""

    padding: Padding = ((0, 0), (0, 0))

    op: ClassVar[str] = "pad2d"

    def _normalise(self) -> None:
        object.__setattr__(self, "padding", _padding(self.padding, self))


@dataclass(frozen=True)
class GlobalAvgPool(Node):
    """Mean over the spatial axes, keeping them: (N, C, H, W) -> (N, C, 1, 1)."""

    op: ClassVar[str] = "global_avgpool"


@dataclass(frozen=True)
class Flatten(Node):
    """(N, C, H, W) -> (N, C*H*W) in NCHW (channel-major) order, whatever the backend's layout."""

    op: ClassVar[str] = "flatten"


@dataclass(frozen=True)
class Dense(Node):
    """Fully connected layer `y = x W^T + b`, weight `(out_features, in_features)`."""

    out_features: int = 0
    bias: bool = True

    op: ClassVar[str] = "dense"

    def _normalise(self) -> None:
        object.__setattr__(self, "out_features", _positive(self.out_features, self, "out_features"))
        object.__setattr__(self, "bias", bool(self.bias))


NODE_TYPES: dict[str, type[Node]] = {
    cls.op: cls
    for cls in (Conv2d, BatchNorm, ReLU, Add, MaxPool2d, AvgPool2d, Pad2d, GlobalAvgPool, Flatten, Dense)
}
"""Every node type by its `op` name; backends must lower each of them."""


def node_from_dict(data: Mapping[str, Any]) -> Node:
    """Rebuild a node from `Node.to_dict` output."""
    if not isinstance(data, Mapping) or "name" not in data or "inputs" not in data:
        raise SpecError(
            f"a node must be a JSON object with 'op', 'name', 'inputs' and its fields; got {str(data)[:100]}."
        )
    data = dict(data)
    op = data.pop("op", None)
    if not isinstance(op, str) or op not in NODE_TYPES:
        raise SpecError(f"{data.get('name', '?')!r}: unknown op {op!r}; known: {sorted(NODE_TYPES)}.")
    cls = NODE_TYPES[op]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"{data.get('name', '?')} ({cls.__name__}): unknown fields {unknown}.")
    return cls(**data)


@dataclass(frozen=True)
class Graph:
    """A DAG of nodes with named inputs and outputs.

    Nodes are stored in a topological order that depends on the graph alone (see
    `_topological`), so two graphs with the same nodes compare equal whatever order the nodes
    were given in. Construction checks the structure
    (names, references, cycles) and the channel arithmetic; `multires.infer_shapes` checks the
    spatial sizes for a given input.
    """

    name: str
    inputs: tuple[Input, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        inputs = (self.inputs,) if isinstance(self.inputs, Input) else tuple(self.inputs)
        outputs = (self.outputs,) if isinstance(self.outputs, str) else tuple(self.outputs)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "outputs", outputs)
        object.__setattr__(self, "nodes", _topological(tuple(self.nodes), inputs, outputs))
        from multires.shapes import infer_shapes

        infer_shapes(self)

    @cached_property
    def by_name(self) -> dict[str, Node]:
        """Nodes by name."""
        return {node.name: node for node in self.nodes}

    @cached_property
    def consumers(self) -> dict[str, tuple[str, ...]]:
        """For each node or input name, the nodes that read it."""
        users: dict[str, list[str]] = {i.name: [] for i in self.inputs}
        users.update({n.name: [] for n in self.nodes})
        for node in self.nodes:
            for source in node.inputs:
                users[source].append(node.name)
        return {name: tuple(v) for name, v in users.items()}

    def __getitem__(self, name: str) -> Node:
        try:
            return self.by_name[name]
        except KeyError:
            raise KeyError(f"graph {self.name!r} has no node {name!r}") from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict carrying the schema name and version."""
        return {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "name": self.name,
            "description": self.description,
            "inputs": [{"name": i.name, "channels": i.channels} for i in self.inputs],
            "nodes": [node.to_dict() for node in self.nodes],
            "outputs": list(self.outputs),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Graph:
        """Rebuild a graph from `to_dict` output, checking the schema version and every field's
        type, so untrusted data gives a SpecError and nothing else."""
        if (
            not isinstance(data, Mapping)
            or data.get("schema") != SCHEMA
            or data.get("version") != SCHEMA_VERSION
        ):
            got = (
                f"schema={data.get('schema')!r}, version={data.get('version')!r}"
                if isinstance(data, Mapping)
                else f"a JSON {type(data).__name__}"
            )
            raise SpecError(f"not a multires graph of schema {SCHEMA} version {SCHEMA_VERSION}: got {got}.")
        fields: dict[str, type | tuple[type, ...]] = {
            "name": str,
            "description": str,
            "inputs": list,
            "nodes": list,
            "outputs": (list, str),
        }
        for key, kind in fields.items():
            if not isinstance(data.get(key, ""), kind) or (key != "description" and key not in data):
                raise SpecError(
                    f"graph field {key!r} is missing or not a {kind}; got {str(data.get(key))[:100]}."
                )
        outputs = [data["outputs"]] if isinstance(data["outputs"], str) else data["outputs"]
        if not all(isinstance(output, str) for output in outputs):
            raise SpecError(f"graph outputs must be node names; got {str(outputs)[:100]}.")
        for entry in data["inputs"]:
            if not isinstance(entry, Mapping) or set(entry) != {"name", "channels"}:
                raise SpecError(f"a graph input is {{'name': ..., 'channels': ...}}; got {str(entry)[:100]}.")
        return cls(
            name=data["name"],
            inputs=tuple(Input(**i) for i in data["inputs"]),
            nodes=tuple(node_from_dict(n) for n in data["nodes"]),
            outputs=tuple(data["outputs"]),
            description=data.get("description", ""),
        )

    def to_json(self, indent: int | None = 2) -> str:
        """Serialise to JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Graph:
        """Parse JSON text written by `to_json`; malformed or hostile text is a SpecError."""
        try:
            data = json.loads(text)
        except RecursionError:
            raise SpecError("graph JSON nested too deeply to be a multires graph.") from None
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an int of over 4300 digits
            raise SpecError(f"not valid graph JSON ({error}).") from None
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        """Serialise to YAML text (needs PyYAML: `pip install 'multires[yaml]'`)."""
        return _yaml().safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, text: str) -> Graph:
        """Parse YAML text written by `to_yaml`."""
        return cls.from_dict(_yaml().safe_load(text))


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        from multires.errors import BackendUnavailableError

        raise BackendUnavailableError(
            "YAML needs PyYAML: pip install 'multires[yaml]' (or pyyaml)."
        ) from None
    return yaml


def _topological(
    nodes: tuple[Node, ...], inputs: tuple[Input, ...], outputs: tuple[str, ...]
) -> tuple[Node, ...]:
    """Check names and references, then order nodes so each follows its inputs.

    The order depends on the graph alone, not on the order the nodes were given in: a
    depth-first walk from the outputs that follows each node's inputs in order (so a residual
    block lists its main branch, then its shortcut, then the sum), followed by any nodes no
    output depends on, by name.
    """
    if not inputs:
        raise SpecError("a graph needs at least one Input.")
    seen: dict[str, str] = {}
    items: tuple[Input | Node, ...] = (*inputs, *nodes)
    for item in items:
        if item.name in seen:
            raise SpecError(
                f"{item.name} ({type(item).__name__}): duplicate name; it is also a {seen[item.name]}. "
                "Give every node and input a unique name."
            )
        seen[item.name] = type(item).__name__
    names = sorted(seen)
    for shorter, longer in pairwise(names):
        if longer.startswith(shorter + "."):
            raise SpecError(
                f"{shorter} ({seen[shorter]}): its name is also the prefix of {longer!r}, so it would be "
                "both a layer and a container. Rename one of them."
            )
    for node in nodes:
        for source in node.inputs:
            if source not in seen:
                raise SpecError(
                    f"{_where(node)}: unknown input {source!r}. Name an existing node or graph input."
                )
    if not outputs:
        raise SpecError("a graph needs at least one output.")
    for out in outputs:
        if out not in seen:
            raise SpecError(f"output {out!r}: no node or input has that name.")
    by_name = {node.name: node for node in nodes}
    state: dict[str, str] = {}
    ordered: list[Node] = []
    for root in (*outputs, *sorted(by_name)):
        if root not in by_name or root in state:
            continue
        state[root] = "open"
        stack = [(root, 0)]
        while stack:
            name, index = stack[-1]
            node = by_name[name]
            if index == len(node.inputs):
                stack.pop()
                state[name] = "done"
                ordered.append(node)
                continue
            stack[-1] = (name, index + 1)
            source = node.inputs[index]
            if source not in by_name or state.get(source) == "done":
                continue
            if state.get(source) == "open":
                path = [n for n, _ in stack]
                loop = [*path[path.index(source) :], source]
                raise SpecError(
                    f"{_where(by_name[source])}: part of a cycle {' -> '.join(reversed(loop))}. "
                    "A graph must be acyclic: break the loop."
                )
            state[source] = "open"
            stack.append((source, 0))
    return tuple(ordered)
