"""Lowering a spec Graph to a Gluon `HybridBlock`: one small function per node type.

`build` makes one Gluon block per spec node and hangs it at the node's dotted name in a tree of
`Scope` containers (`model.layer1[0].conv1` is a `Conv2D`); the root `GraphBlock` calls the
blocks in graph order, so `hybridize()` traces the whole network into one MXNet graph. Each
parameterised block's prefix is its canonical node name plus a dot, so Gluon's parameter names
(`collect_params()` and `save_parameters()` alike) read `layer1.0.conv1.weight`,
`layer1.0.bn1.gamma` (see `weights.GLUON_KINDS`).

How spec semantics map onto MXNet (1.9.1):

- Symmetric padding is the layer's own `padding`; asymmetric per-side padding is an explicit
  `pad` before the layer: zeros for convolution and average pooling, -inf for max pooling.
  MXNet's `Pooling` already leaves its own padding out of the max (checked by the tests).
- Average pooling with asymmetric padding and `count_include_pad=False` divides window sums of
  the padded input by those of a padded mask of ones (`AsymmetricAvgPool2D`).
- SAME padding (TensorFlow/XLA's; MXNet has none) becomes explicit per-side pads, lowered as
  above. They depend on the input size, which a Symbol does not know, so they cannot be computed
  inside `hybrid_forward`. Instead `GraphBlock.forward`, which sees the real NDArray input,
  computes every SAME node's pads for that size (`infer_shapes`, then `resolve_padding`, cached
  per input shape) and sets them on the blocks (`set_padding`); when any changed it clears the
  cached op, so the hybridized graph is rebuilt for them (once per distinct set of pads, not per
  call). That is exact at every size, eager or hybridized. A Symbol call (`export`, or nesting
  in another block's graph) uses the pads of the last NDArray input and is a ShapeError before
  any. SAME with `count_include_pad=False` is always `AsymmetricAvgPool2D`, as its pads are
  asymmetric at some sizes.
- Pad2d is `F.pad(mode="constant")` with zeros (`ZeroPad2D`).
- BatchNorm: MXNet updates running statistics in the *backward* pass and with the *biased*
  batch variance (measured for 1.9.1's `nn.BatchNorm`, eager and hybridized; a training-mode
  forward without backward leaves them alone), the spec in the forward pass with the unbiased
  or biased one as `running_variance` says. So `BatchNorm2D` runs MXNet's fused op with its own
  update switched off (`momentum=1` there) and also returns the batch mean and variance;
  `GraphBlock.forward` applies the spec's update, `running = (1 - m) * running + m * stat` with
  the variance scaled by n / (n - 1) for "unbiased" (not for "biased"), whenever it runs in
  training mode (`autograd.record(train_mode=True)` or `autograd.train_mode()`), eager or
  hybridized. Eval mode normalises with the running statistics, as MXNet's `use_global_stats`
  does.
- Flatten is `nn.Flatten` (channel-major in NCHW); GlobalAvgPool keeps (N, C, 1, 1).
- Mixed precision (`set_compute_dtype`): the blocks of the ops MXNet AMP lists for the target
  dtype (Convolution, FullyConnected) cast their inputs to it with `amp_cast` and their result
  back to float32; every other op, BatchNorm's statistics included, stays float32.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, NamedTuple

import mxnet as mx
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn

from multires.backend import LoweringTable
from multires.errors import ShapeError, SpecError
from multires.graph import (
    SAME,
    Add,
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Flatten,
    GlobalAvgPool,
    Graph,
    MaxPool2d,
    Node,
    Pad2d,
    Padding,
    ReLU,
    resolve_padding,
    symmetric_padding,
)
from multires.graph import Dense as DenseNode  # `Dense` here is the Gluon block
from multires.shapes import Shape, check_input_shape, check_layout, infer_shapes

LAYOUTS = ("NCHW",)

LAYOUT_HINT = (
    " MXNet's CPU convolution and pooling run channels-first only, so use layout='NCHW' (the "
    "default) and transpose NHWC input with x.transpose(0, 3, 1, 2); the weights are the same."
)
"""Appended by `multires.backend.resolve_layout` to the error for an unsupported layout."""


def _pad_width(padding: Padding) -> tuple[int, ...] | None:
    """MXNet `pad_width` for asymmetric per-side padding; None when the layer can pad itself."""
    if symmetric_padding(padding) is not None:
        return None
    (top, bottom), (left, right) = padding
    return (0, 0, 0, 0, top, bottom, left, right)


def _layer_padding(padding: Padding) -> tuple[int, int]:
    """The symmetric `(ph, pw)` the layer applies itself (0 when padded explicitly first)."""
    return symmetric_padding(padding) or (0, 0)


def _unresolved_same(where: str) -> ShapeError:
    return ShapeError(
        f"{where}: padding='same' depends on the input size, which an MXNet Symbol does not carry. "
        "Call the model once on an NDArray of the input size you will use (eager or hybridized) "
        "before tracing it with Symbols (export, or inside another block's graph); that fixes the "
        "pads of that size."
    )


class _SpecPadding:
    """The spec's window padding on a Gluon convolution or pooling layer.

    Symmetric pads are the layer's own `pad`; asymmetric ones an explicit `F.pad` with
    `PAD_VALUE` first. SAME pads (`spec_padding == "same"`) are unknown (`padding` None) until
    `GraphBlock.forward` sees the input size and calls `set_padding`.
    """

    PAD_VALUE = 0.0
    _kwargs: dict[str, Any]

    def _init_padding(self, node: Conv2d | MaxPool2d | AvgPool2d) -> None:
        self._where = f"{node.name} ({type(node).__name__})"
        self.spec_padding = node.padding
        self.padding: Padding | None = None
        self._pad_width: tuple[int, ...] | None = None
        if node.padding != SAME:
            self.set_padding(node.padding)

    def set_padding(self, padding: Padding) -> bool:
        """Pad per side by `padding` from now on; returns whether that changed anything."""
        if padding == self.padding:
            return False
        self.padding = padding
        self._pad_width = _pad_width(padding)
        self._kwargs["pad"] = _layer_padding(padding)
        return True

    def _pad(self, F: Any, x: Any) -> Any:
        if self.padding is None:
            raise _unresolved_same(self._where)
        if self._pad_width:
            x = F.pad(x, mode="constant", pad_width=self._pad_width, constant_value=self.PAD_VALUE)
        return x

    def _repr_padding(self, text: str, key: str) -> str:
        """Gluon's `repr` text, with the spec's padding where the layer's own `pad` is not all of it."""
        if self.spec_padding == SAME:
            text = text.replace(f", padding={self._kwargs['pad']}", "") if key == "padding" else text
            return f"{text[:-1]}, {key}='same')"
        return f"{text[:-1]}, {key}={self.spec_padding})" if self._pad_width else text


class Conv2D(_SpecPadding, nn.Conv2D):
    """`nn.Conv2D` that zero-pads explicitly first when the spec's padding is asymmetric."""

    compute_dtype: Any = None
    """The dtype of the convolution under mixed precision (`set_compute_dtype`); None: float32."""

    def __init__(self, node: Conv2d, in_channels: int) -> None:
        super().__init__(
            node.out_channels,
            node.kernel,
            strides=node.stride,
            dilation=node.dilation,
            groups=node.groups,
            use_bias=node.bias,
            in_channels=in_channels,
            prefix=f"{node.name}.",
        )
        self._init_padding(node)

    def hybrid_forward(self, F: Any, x: Any, weight: Any, bias: Any = None) -> Any:
        return _in_compute_dtype(self, super().hybrid_forward, F, self._pad(F, x), weight, bias)

    def __repr__(self) -> str:
        return self._repr_padding(super().__repr__(), "padding")


class Dense(nn.Dense):
    """`nn.Dense` that computes in its `compute_dtype` (mixed precision) where one is set."""

    compute_dtype: Any = None
    """The dtype of the matrix product under mixed precision (`set_compute_dtype`); None: float32."""

    def hybrid_forward(self, F: Any, x: Any, weight: Any, bias: Any = None) -> Any:
        return _in_compute_dtype(self, super().hybrid_forward, F, x, weight, bias)


def _in_compute_dtype(block: Any, forward: Callable[..., Any], F: Any, x: Any, weight: Any, bias: Any) -> Any:
    """`forward(F, x, weight, bias)` in float32, or, where `block.compute_dtype` is set (mixed
    precision), on its inputs cast to that dtype with AMP's `amp_cast`, the result cast back to
    float32 (the gradients flow back through the casts to the float32 parameters)."""
    dtype = block.compute_dtype
    if dtype is None:
        return forward(F, x, weight, bias)
    x, weight, bias = (None if v is None else F.amp_cast(v, dtype=dtype) for v in (x, weight, bias))
    return F.amp_cast(forward(F, x, weight, bias), dtype="float32")


class BatchNorm2D(nn.BatchNorm):
    """Batch normalisation over axis 1 returning `(y, batch_mean, biased_batch_var)`.

    `momentum` (shown by `print`) is Gluon's convention, `1 - spec momentum`; `spec_momentum`
    is the spec's. MXNet's own running-statistics update is disabled (it runs in backward with
    the biased variance); `GraphBlock` applies the spec's update from the returned statistics.
    MXNet's op reports the inverse standard deviation, so the variance is `inv_std^-2 - eps`.

    With `shift` (set by `GraphBlock.forward` in training mode) the op normalises `x` less one
    sample of each channel, and that sample is added back to the batch mean. The output is the
    same, but the op's float32 sums then run over values near zero: over the raw values a
    channel far from zero loses digits (4.6e-3 relative output error on 8192 values of mean 1000
    and deviation 0.1). Eval mode normalises `x` itself with the running statistics.
    """

    def __init__(self, node: BatchNorm, channels: int) -> None:
        super().__init__(
            axis=1,
            momentum=1.0 - node.momentum,
            epsilon=node.eps,
            in_channels=channels,
            prefix=f"{node.name}.",
        )
        self.eps = node.eps
        self.spec_momentum = node.momentum
        self.shift = False

    def hybrid_forward(
        self, F: Any, x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any
    ) -> tuple[Any, Any, Any]:
        sample = None
        if self.shift:
            sample = F.BlockGrad(F.slice(x, begin=(0, None, 0, 0), end=(1, None, 1, 1)))
            x = F.broadcast_sub(x, sample)
        out, mean, inv_std = F.BatchNorm(
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            name="fwd",
            axis=1,
            eps=self.eps,
            momentum=1.0,
            fix_gamma=False,
            use_global_stats=False,
            output_mean_var=True,
        )
        if sample is not None:
            mean = mean + F.reshape(sample, shape=(-1,))
        return out, mean, inv_std**-2 - self.eps


class MaxPool2D(_SpecPadding, nn.MaxPool2D):
    """`nn.MaxPool2D` (whose padding never wins the max) that pads with -inf explicitly first when
    the spec's padding is asymmetric."""

    PAD_VALUE = float("-inf")

    def __init__(self, node: MaxPool2d) -> None:
        super().__init__(node.kernel, node.stride, prefix=f"{node.name}.")
        self._init_padding(node)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return super().hybrid_forward(F, self._pad(F, x))

    def __repr__(self) -> str:
        return self._repr_padding(super().__repr__(), "spec_padding")


class AvgPool2D(_SpecPadding, nn.AvgPool2D):
    """`nn.AvgPool2D` that zero-pads explicitly first when the spec's padding is asymmetric (the
    padded zeros then count in the divisor: `count_include_pad=True` only)."""

    def __init__(self, node: AvgPool2d) -> None:
        super().__init__(
            node.kernel, node.stride, count_include_pad=node.count_include_pad, prefix=f"{node.name}."
        )
        self._init_padding(node)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return super().hybrid_forward(F, self._pad(F, x))

    def __repr__(self) -> str:
        return self._repr_padding(super().__repr__(), "spec_padding")


class AsymmetricAvgPool2D(gluon.HybridBlock):
    """Average pooling with per-side (asymmetric or SAME) padding whose divisor counts only real
    (unpadded) pixels.

    MXNet's `Pooling` pads symmetrically, and padding explicitly first would make the padded
    zeros count; this divides the window sums of the padded input by those of a padded mask.
    SAME pads are set per input size by `GraphBlock.forward` (`set_padding`).
    """

    def __init__(self, node: AvgPool2d) -> None:
        super().__init__(prefix=f"{node.name}.")
        self._where = f"{node.name} ({type(node).__name__})"
        self.kernel = node.kernel
        self.stride = node.stride
        self.spec_padding = node.padding
        self.padding: Padding | None = None if node.padding == SAME else node.padding

    def set_padding(self, padding: Padding) -> bool:
        """Pad per side by `padding` from now on; returns whether that changed anything."""
        changed, self.padding = padding != self.padding, padding
        return changed

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        if self.padding is None:
            raise _unresolved_same(self._where)
        pad_width = (0, 0, 0, 0, *self.padding[0], *self.padding[1])
        ones = F.ones_like(F.slice_axis(x, axis=1, begin=0, end=1))
        sums, counts = (
            F.Pooling(
                F.pad(v, mode="constant", pad_width=pad_width),
                kernel=self.kernel,
                stride=self.stride,
                pool_type="sum",
            )
            for v in (x, ones)
        )
        return F.broadcast_div(sums, counts)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.kernel}, stride={self.stride}, "
            f"padding={self.spec_padding!r}, count_include_pad=False)"
        )


class ZeroPad2D(gluon.HybridBlock):
    """Zero padding per side (`Pad2d`, Keras' `ZeroPadding2D`): `F.pad` in constant mode."""

    def __init__(self, node: Pad2d) -> None:
        super().__init__(prefix=f"{node.name}.")
        self.padding = node.padding

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        (top, bottom), (left, right) = self.padding
        return F.pad(x, mode="constant", pad_width=(0, 0, 0, 0, top, bottom, left, right), constant_value=0.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(padding={self.padding})"


class Sum(gluon.HybridBlock):
    """The elementwise sum of its inputs (a residual connection)."""

    def __init__(self, node: Add) -> None:
        super().__init__(prefix=f"{node.name}.")

    def hybrid_forward(self, F: Any, x: Any, *others: Any) -> Any:
        return F.add_n(x, *others)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _Container(gluon.HybridBlock):
    """Children by name (`block["0"]`, `block[0]`) and a `print` that lists every child (Gluon's
    lists only attribute children, and numbered segments like `0` cannot be attributes)."""

    def __getitem__(self, key: str | int) -> gluon.HybridBlock:
        return self._children[str(key)]

    def __len__(self) -> int:
        return len(self._children)

    def __repr__(self) -> str:
        lines = [f"  ({key}): " + repr(child).replace("\n", "\n  ") for key, child in self._children.items()]
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"


class Scope(_Container):
    """A container for the blocks under one prefix of the canonical names (`layer1`,
    `layer1.0`); children are reachable as attributes where the segment is an identifier and
    always by index, `model.layer1[0].conv1` or `model["layer1"]["0"]["conv1"]`."""

    def hybrid_forward(self, F: Any, *args: Any) -> Any:
        raise TypeError(f"{self.name} only groups blocks; call the model that contains it.")


def _attach(root: gluon.HybridBlock, path: str, block: gluon.HybridBlock, scopes: dict[str, Scope]) -> None:
    """Register `block` at the dotted `path` under `root`, creating `Scope`s on the way."""
    *parents, leaf = path.split(".")
    parent = root
    for depth in range(len(parents)):
        key = ".".join(parents[: depth + 1])
        if key not in scopes:
            scopes[key] = Scope(prefix=f"{key}.")
            _register(parent, parents[depth], scopes[key])
        parent = scopes[key]
    _register(parent, leaf, block)


def _register(parent: gluon.HybridBlock, name: str, child: gluon.HybridBlock) -> None:
    if name.isidentifier() and not hasattr(parent, name):
        setattr(parent, name, child)
    else:
        parent.register_child(child, name)


_MAX_FUSED = 45
"""Arrays per `multi_sgd_update` call: MXNet's own SGD caps its aggregation at 45, and the kernel
crashes on much larger groups."""


class GraphBlock(_Container):
    """The network: calls each node's block in graph order; returns the graph's output (a tuple
    for several outputs).

    With NDArray inputs, `forward` first sets the pads of every SAME node for the input size
    (clearing the hybridized graph when they change), and in training mode it then applies the
    spec's BatchNorm running-statistics update (in the forward pass). Use it like any Gluon block:
    `hybridize()`, `autograd.record(train_mode=True)`, `export(path)`. Called with Symbols (inside
    another block's hybridized graph, or `export`) it gives the outputs only, so there the
    running statistics are not updated and SAME nodes keep the pads of the last NDArray input.
    """

    def __init__(self, graph: Graph, blocks: dict[str, gluon.HybridBlock]) -> None:
        super().__init__(prefix=f"{graph.name}_")
        self.graph = graph
        scopes: dict[str, Scope] = {}
        for name, block in blocks.items():
            _attach(self, name, block, scopes)
        # A read-only view, not a dict: Gluon warns about dicts holding unregistered blocks.
        self.blocks = MappingProxyType(dict(blocks))
        self._batchnorms = tuple(n for n in graph.nodes if isinstance(n, BatchNorm))
        self._plans: dict[tuple[Any, ...], _Plan] = {}

    def hybrid_forward(self, F: Any, x: Any, *more: Any) -> tuple[Any, ...]:
        values = dict(zip((i.name for i in self.graph.inputs), (x, *more), strict=True))
        statistics = []
        for node in self.graph.nodes:
            out = self.blocks[node.name](*(values[source] for source in node.inputs))
            if isinstance(node, BatchNorm):
                out, mean, var = out
                statistics += [mean, var]
            values[node.name] = out
        return (*(values[name] for name in self.graph.outputs), *statistics)

    def forward(self, x: Any, *more: Any) -> Any:
        symbolic = isinstance(x, mx.sym.Symbol)
        training = autograd.is_training() and not symbolic
        if not symbolic:
            counts, same_pads = self._plan(tuple(tuple(v.shape) for v in (x, *more)), training)
            self._set_same_padding(same_pads)
        self._set_batch_shift(training)
        results = super().forward(x, *more)
        if not isinstance(results, (list, tuple)):
            results = (results,)
        outputs = tuple(results[: len(self.graph.outputs)])
        if training:
            self._update_running(results[len(outputs) :], counts, x.context)
        return outputs[0] if len(outputs) == 1 else outputs

    def _plan(self, shapes: tuple[tuple[int, ...], ...], training: bool) -> _Plan:
        """`_checked_plan` for these input shapes, cached per shape."""
        key = (shapes, training)
        if key not in self._plans:
            if len(self._plans) >= 64:
                self._plans.clear()
            self._plans[key] = _checked_plan(self.graph, shapes, training)
        return self._plans[key]

    def _set_same_padding(self, same_pads: dict[str, Padding]) -> None:
        """Give the SAME nodes' blocks their pads; a change drops the hybridized graph (rebuilt
        on this call with the new pads, as a Symbol cannot compute them from its input size)."""
        changed = [name for name, pads in same_pads.items() if self.blocks[name].set_padding(pads)]
        for name in changed:  # a block called on its own (data parallelism) has its own cached op
            self.blocks[name]._clear_cached_op()
        if changed:
            self._clear_cached_op()

    def _set_batch_shift(self, training: bool) -> None:
        """Shift BatchNorm inputs in training mode only (`BatchNorm2D`); a change drops the
        hybridized graph, so switching between training and eval rebuilds it once per switch."""
        changed = False
        for node in self._batchnorms:
            block = self.blocks[node.name]
            changed |= block.shift != training
            block.shift = training
        if changed:
            self._clear_cached_op()

    def _update_running(
        self, statistics: tuple[Any, ...], counts: dict[str, int], context: mx.Context | None = None
    ) -> None:
        """Running statistics as the spec defines them, from each BatchNorm's batch mean and
        biased variance: `running = (1 - m) * running + m * stat`, the variance scaled by
        n / (n - 1) where the node's `running_variance` is "unbiased" (by 1 where "biased").
        On a model placed on several contexts, the copies on `context` are updated.

        `multi_sgd_update` computes `w = (1 - lr * wd) * w - lr * g` for many arrays in one op:
        with `lr = -m * s` and `wd = -1 / s` that is the running average of `s * stat`.
        """
        arrays, lrs, wds = [], [], []
        for index, node in enumerate(self._batchnorms):
            block = self.blocks[node.name]
            n, m = counts[node.name], node.momentum
            for param, stat, scale in (
                (block.running_mean, statistics[2 * index], 1.0),
                (block.running_var, statistics[2 * index + 1], _variance_factor(node, n)),
            ):
                arrays.append((param.data(context), stat))
                lrs.append(-m * scale)
                wds.append(-1.0 / scale)
        with autograd.pause():
            for start in range(0, len(arrays), _MAX_FUSED):
                chunk = slice(start, start + _MAX_FUSED)
                nd.multi_sgd_update(
                    *(a for pair in arrays[chunk] for a in pair),
                    out=[running for running, _ in arrays[chunk]],
                    lrs=tuple(lrs[chunk]),
                    wds=tuple(wds[chunk]),
                    rescale_grad=1.0,
                    num_weights=len(arrays[chunk]),
                )

    def export(self, path: str | os.PathLike, epoch: int = 0) -> tuple[str, str]:
        """Write `path-symbol.json` and `path-EPOCH.params` for `gluon.SymbolBlock.imports`
        (input name `data`, or `data0`, `data1`, ... for several inputs); returns both paths.

        Needs no prior `hybridize()` or forward pass, except with SAME padding: a Symbol has no
        size to compute SAME pads from, so the export fixes the pads of the last NDArray input
        (ShapeError before any). The exported graph is then exact for inputs of that size, and
        of any size with the same pads (those of equal `size % stride` at each SAME node). The
        exported graph is plain MXNet: its BatchNorm nodes carry Gluon's momentum
        (1 - spec momentum) and MXNet's own running-statistics update, and return only their
        normalised output.
        """
        for block in self.blocks.values():
            if getattr(block, "spec_padding", None) == SAME and block.padding is None:
                raise _unresolved_same(block._where)
        path = os.fspath(path)
        names = (
            ["data"] if len(self.graph.inputs) == 1 else [f"data{i}" for i in range(len(self.graph.inputs))]
        )
        out = self(*(mx.sym.var(name) for name in names))
        symbol = mx.sym.Group(list(out)) if isinstance(out, tuple) else out
        symbol = mx.sym.load_json(json.dumps(self._plain_batchnorms(json.loads(symbol.tojson()))))
        symbol_file, params_file = f"{path}-symbol.json", f"{path}-{epoch:04d}.params"
        symbol.save(symbol_file)
        arguments, auxiliary = set(symbol.list_arguments()), set(symbol.list_auxiliary_states())
        params = {}
        for name, param in self.collect_params().items():
            if name in arguments:
                params[f"arg:{name}"] = param._reduce()
            elif name in auxiliary:
                params[f"aux:{name}"] = param._reduce()
        nd.save(params_file, params)
        return symbol_file, params_file

    def _plain_batchnorms(self, graph_json: dict[str, Any]) -> dict[str, Any]:
        """Give the exported BatchNorm nodes Gluon's momentum and a single output."""
        momentum = {
            f"{block.prefix}fwd": block._kwargs["momentum"]
            for block in self.blocks.values()
            if isinstance(block, BatchNorm2D)
        }
        for entry in graph_json["nodes"]:
            if entry["op"] == "BatchNorm" and entry["name"] in momentum:
                entry["attrs"]["momentum"] = repr(momentum[entry["name"]])
                entry["attrs"].pop("output_mean_var", None)
        return graph_json


def _variance_factor(node: BatchNorm, count: int) -> float:
    """What the running variance takes of the biased batch variance over `count` values."""
    return count / (count - 1) if node.running_variance == "unbiased" else 1.0


class _Plan(NamedTuple):
    """What `GraphBlock.forward` needs to know of an input size."""

    counts: dict[str, int]
    """N*H*W at each BatchNorm."""
    same_pads: dict[str, Padding]
    """Per-side pads of each SAME node."""


def _checked_plan(graph: Graph, shapes: tuple[tuple[int, ...], ...], training: bool) -> _Plan:
    """Check input shapes (ShapeError naming the expected shape); return N*H*W at each BatchNorm
    and the pads of each SAME node. In training mode each count must exceed 1, as the spec
    requires to estimate a batch variance."""
    if len(shapes) != len(graph.inputs):
        raise ShapeError(
            f"{graph.name}: takes {len(graph.inputs)} input(s) {[i.name for i in graph.inputs]}; "
            f"got {len(shapes)}."
        )
    if len(graph.inputs) == 1:
        check_input_shape(graph, shapes[0], "NCHW")
        inferred = infer_shapes(graph, shapes[0])
    else:
        try:
            inferred = infer_shapes(graph, {i.name: s for i, s in zip(graph.inputs, shapes, strict=True)})
        except SpecError as error:
            raise ShapeError(f"{graph.name}: inputs of shapes {list(shapes)} do not fit: {error}") from None
    counts, same_pads = {}, {}
    for node in graph.nodes:
        if isinstance(node, (Conv2d, MaxPool2d, AvgPool2d)) and node.padding == SAME:
            dilation = node.dilation if isinstance(node, Conv2d) else (1, 1)
            size = inferred[node.inputs[0]][2:]
            same_pads[node.name] = resolve_padding(SAME, size, node.kernel, node.stride, dilation)
        if isinstance(node, BatchNorm):
            n, _, h, w = inferred[node.inputs[0]]
            counts[node.name] = n * h * w
            if training and counts[node.name] < 2:
                raise ShapeError(
                    f"{node.name} (BatchNorm): training mode needs more than one value per channel to "
                    f"estimate the batch variance; got N*H*W = {counts[node.name]} for input "
                    f"{inferred[node.inputs[0]]}. Use a batch of 2 or more, or eval mode."
                )
    return _Plan(counts, same_pads)


class LoweringContext:
    """What a lowering function needs: the spec and its shapes (NCHW; spatial sizes unknown)."""

    def __init__(self, graph: Graph) -> None:
        self.spec = graph
        self.shapes: dict[str, Shape] = infer_shapes(graph)

    def channels(self, name: str) -> int | None:
        """Channels (or features) of the value named `name`; None for a Flatten of unknown size."""
        return self.shapes[name][1]


Lowering = Callable[[LoweringContext, Node], gluon.HybridBlock]
LOWERINGS = LoweringTable("mxnet")
"""Spec node type -> the function that makes its Gluon block."""
lowers = LOWERINGS.register


@lowers(Conv2d)
def _conv2d(ctx: LoweringContext, node: Conv2d) -> gluon.HybridBlock:
    return Conv2D(node, ctx.channels(node.inputs[0]))


@lowers(BatchNorm)
def _batchnorm(ctx: LoweringContext, node: BatchNorm) -> gluon.HybridBlock:
    return BatchNorm2D(node, ctx.channels(node.inputs[0]))


@lowers(ReLU)
def _relu(ctx: LoweringContext, node: ReLU) -> gluon.HybridBlock:
    return nn.Activation("relu", prefix=f"{node.name}.")


@lowers(Add)
def _add(ctx: LoweringContext, node: Add) -> gluon.HybridBlock:
    return Sum(node)


@lowers(MaxPool2d)
def _maxpool2d(ctx: LoweringContext, node: MaxPool2d) -> gluon.HybridBlock:
    return MaxPool2D(node)


@lowers(AvgPool2d)
def _avgpool2d(ctx: LoweringContext, node: AvgPool2d) -> gluon.HybridBlock:
    # SAME pads are asymmetric at some input sizes, so SAME counting only real pixels always
    # takes the masked division.
    if not node.count_include_pad and (node.padding == SAME or _pad_width(node.padding)):
        return AsymmetricAvgPool2D(node)
    return AvgPool2D(node)


@lowers(Pad2d)
def _pad2d(ctx: LoweringContext, node: Pad2d) -> gluon.HybridBlock:
    return ZeroPad2D(node)


@lowers(GlobalAvgPool)
def _global_avgpool(ctx: LoweringContext, node: GlobalAvgPool) -> gluon.HybridBlock:
    return nn.GlobalAvgPool2D(prefix=f"{node.name}.")


@lowers(Flatten)
def _flatten(ctx: LoweringContext, node: Flatten) -> gluon.HybridBlock:
    return nn.Flatten(prefix=f"{node.name}.")


@lowers(DenseNode)
def _dense(ctx: LoweringContext, node: DenseNode) -> gluon.HybridBlock:
    # A Flatten of a spatial map has an image-size-dependent width (None): Gluon infers it
    # from the first input or the loaded weights (in_units=0).
    return Dense(
        node.out_features,
        use_bias=node.bias,
        in_units=ctx.channels(node.inputs[0]) or 0,
        prefix=f"{node.name}.",
    )


AMP_OPS: dict[type, str] = {Conv2D: "Convolution", Dense: "FullyConnected"}
"""The blocks that can compute in a mixed-precision dtype, by the MXNet op AMP's lists name."""


def set_compute_dtype(model: GraphBlock, dtype: Any) -> GraphBlock:
    """Make the blocks of the ops MXNet AMP lists for `dtype` (`amp.list_lp16_ops`: Convolution
    and FullyConnected for bfloat16; float16's list adds ops the spec has no node for) compute in
    `dtype` (None: float32 again), the rest staying float32; parameters stay float32. Call it
    before `hybridize()` or the first call (a cached graph keeps the dtypes it was built with)."""
    from mxnet.contrib import amp

    ops = set() if dtype is None else set(amp.list_lp16_ops(dtype))
    for block in model.blocks.values():
        op = AMP_OPS.get(type(block))
        if op is not None:
            block.compute_dtype = dtype if op in ops else None
    model._clear_cached_op()
    return model


def build(graph: Graph, layout: str = "NCHW", initialize: bool = True) -> GraphBlock:
    """A Gluon `HybridBlock` computing `graph` on NCHW float32 input, on the CPU.

    With `initialize`, its weights are `multires.init_weights(graph, seed=0)` (torchvision's
    initialisation, the same in every backend); where a Dense width depends on the image size,
    Gluon's deferred initialisation fills the parameters on the first call instead.
    """
    from .weights import load_weights

    layout = check_layout(layout)
    if layout not in LAYOUTS:
        raise ShapeError(f"backend 'mxnet' supports layouts {list(LAYOUTS)}, not {layout!r}.{LAYOUT_HINT}")
    ctx = LoweringContext(graph)
    blocks = {node.name: LOWERINGS[type(node)](ctx, node) for node in graph.nodes}
    model = GraphBlock(graph, blocks)
    if initialize:
        from multires.errors import WeightsError
        from multires.weights import init_weights

        try:
            weights = init_weights(graph, seed=0)
        except WeightsError:
            model.initialize(mx.init.Xavier(magnitude=2.0), ctx=mx.cpu())
        else:
            load_weights(model, weights)
    return model
