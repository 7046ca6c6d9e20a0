"""The spec: validation errors name the node, specs are values, serialisation round-trips."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multires import (
    Add,
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Dense,
    Flatten,
    GlobalAvgPool,
    Graph,
    Input,
    MaxPool2d,
    Pad2d,
    ReLU,
    SpecError,
    infer_shapes,
)
from multires.graph import NODE_TYPES, SCHEMA_VERSION, node_from_dict, symmetric_padding

X = (Input("x", 4),)


def graph(*nodes, outputs=None, inputs=X) -> Graph:
    return Graph("g", inputs, nodes, outputs or nodes[-1].name)


def raises_at(where: str, *fragments: str):
    """pytest.raises(SpecError) whose message starts by naming the node and holds `fragments`."""
    pattern = "^" + re.escape(where) + ".*" + ".*".join(map(re.escape, fragments))
    return pytest.raises(SpecError, match=re.compile(pattern, re.S))


# Validation -------------------------------------------------------------------------------------


def test_unknown_input_names_node_and_source() -> None:
    with raises_at("b.conv (Conv2d)", "unknown input 'nope'"):
        graph(ReLU("a", "x"), Conv2d("b.conv", "nope", out_channels=4))


def test_cycle_names_the_loop() -> None:
    with raises_at("q (ReLU)", "cycle", "q -> p -> q"):
        graph(ReLU("p", "q"), ReLU("q", "p"), ReLU("out", "q"))


def test_cycle_off_the_output_path_is_found() -> None:
    with raises_at("p (ReLU)", "cycle"):
        graph(ReLU("out", "x"), ReLU("p", "q"), ReLU("q", "p"), outputs=("out",))


def test_self_loop() -> None:
    with raises_at("a (ReLU)", "cycle", "a -> a"):
        graph(ReLU("a", "a"))


def test_duplicate_node_name() -> None:
    with raises_at("a (BatchNorm)", "duplicate name", "ReLU"):
        graph(ReLU("a", "x"), BatchNorm("a", "x"))


def test_node_named_like_an_input() -> None:
    with raises_at("x (ReLU)", "duplicate name", "Input"):
        graph(ReLU("x", "x"))


def test_name_that_is_node_and_prefix() -> None:
    with raises_at("block (ReLU)", "prefix of 'block.conv'"):
        graph(ReLU("block", "x"), Conv2d("block.conv", "block", out_channels=4))


def test_sibling_names_are_not_prefixes() -> None:
    g = graph(ReLU("block", "x"), ReLU("block0.a", "block"), ReLU("block_1", "block0.a"))
    assert [n.name for n in g.nodes] == ["block", "block0.a", "block_1"]


@pytest.mark.parametrize("name", ["", "a..b", ".a", "a.", "a b", "a-b", "layer1/conv", "é"])
def test_invalid_node_names(name: str) -> None:
    with pytest.raises(SpecError, match=re.escape(f"{name!r} (ReLU)")):
        ReLU(name, "x")


@pytest.mark.parametrize("name", ["", "a.b", "x y"])
def test_invalid_input_names(name: str) -> None:
    with pytest.raises(SpecError, match=re.escape(f"input {name!r}")):
        Input(name, 3)


@pytest.mark.parametrize(
    ("make", "where", "field"),
    [
        (lambda: Conv2d("c", "x", out_channels=0), "c (Conv2d)", "out_channels"),
        (lambda: Conv2d("c", "x", out_channels=-2), "c (Conv2d)", "out_channels"),
        (lambda: Conv2d("c", "x", out_channels=4, kernel=0), "c (Conv2d)", "kernel"),
        (lambda: Conv2d("c", "x", out_channels=4, kernel=(3, 0)), "c (Conv2d)", "kernel"),
        (lambda: Conv2d("c", "x", out_channels=4, stride=0), "c (Conv2d)", "stride"),
        (lambda: Conv2d("c", "x", out_channels=4, dilation=0), "c (Conv2d)", "dilation"),
        (lambda: Conv2d("c", "x", out_channels=4, groups=0), "c (Conv2d)", "groups"),
        (lambda: Conv2d("c", "x", out_channels=4, padding=-1), "c (Conv2d)", "padding"),
        (lambda: Conv2d("c", "x", out_channels=4, padding=((0, -1), (0, 0))), "c (Conv2d)", "padding"),
        (lambda: Conv2d("c", "x", out_channels=2.5), "c (Conv2d)", "out_channels"),
        (lambda: Conv2d("c", "x", out_channels=True), "c (Conv2d)", "out_channels"),
        (lambda: MaxPool2d("p", "x", kernel=0), "p (MaxPool2d)", "kernel"),
        (lambda: AvgPool2d("p", "x", kernel=2, stride=0), "p (AvgPool2d)", "stride"),
        (lambda: Dense("fc", "x", out_features=0), "fc (Dense)", "out_features"),
        (lambda: Dense("fc", "x", out_features=(10, 2)), "fc (Dense)", "out_features must be one"),
        (lambda: Conv2d("c", "x", out_channels=[8], groups=2), "c (Conv2d)", "out_channels must be one"),
    ],
)
def test_non_positive_or_non_integer_sizes(make, where: str, field: str) -> None:
    with raises_at(where, field):
        make()


@pytest.mark.parametrize("channels", [0, -1, 2.0, True])
def test_input_channels_must_be_positive_int(channels) -> None:
    with pytest.raises(SpecError, match="input x: channels"):
        Input("x", channels)


def test_groups_must_divide_out_channels_at_construction() -> None:
    with raises_at("layer2.0.conv1 (Conv2d)", "groups (=4)", "out_channels (=6)"):
        Conv2d("layer2.0.conv1", "x", out_channels=6, groups=4)


def test_groups_must_divide_in_channels_via_shape_inference() -> None:
    conv = Conv2d("layer2.0.conv1", "x", out_channels=8, groups=8)  # valid on its own
    with raises_at("layer2.0.conv1 (Conv2d)", "groups (=8)", "input channels (=4)"):
        graph(conv)


def test_add_of_mismatched_channels_at_construction() -> None:
    with raises_at("s (Add)", "'a' of shape (None, 8, None, None)", "'b' of shape (None, 4, None, None)"):
        graph(Conv2d("a", "x", out_channels=8), Conv2d("b", "x", out_channels=4), Add("s", ("a", "b")))


def test_add_of_mismatched_spatial_sizes_for_a_concrete_input() -> None:
    g = graph(Conv2d("a", "x", out_channels=4, stride=2), ReLU("b", "x"), Add("s", ("a", "b")))
    with raises_at("s (Add)", "(2, 4, 4, 4)", "(2, 4, 8, 8)", "projection"):
        infer_shapes(g, (2, 4, 8, 8))


def test_add_of_4d_and_flat() -> None:
    with raises_at("s (Add)", "cannot add"):
        graph(ReLU("a", "x"), Flatten("f", "x"), Add("s", ("a", "f")))


@pytest.mark.parametrize(
    ("node", "size", "shrunk"),
    [
        (Conv2d("c", "x", out_channels=4, kernel=5), 4, "0 x 0"),
        (Conv2d("c", "x", out_channels=4, kernel=3, dilation=3), 6, "0 x 0"),
        (Conv2d("c", "x", out_channels=4, kernel=(1, 7)), 5, "5 x -1"),
        (MaxPool2d("c", "x", kernel=3, stride=2), 2, "0 x 0"),
        (AvgPool2d("c", "x", kernel=2), 1, "0 x 0"),
    ],
)
def test_spatial_size_shrinking_to_zero(node, size: int, shrunk: str) -> None:
    g = graph(node)
    with raises_at(f"c ({type(node).__name__})", shrunk, f"{size} x {size}", "larger input"):
        infer_shapes(g, (1, 4, size, size))


def test_spatial_shrinking_is_blamed_on_the_first_node_that_empties() -> None:
    nodes = [
        Conv2d(f"down{i}", "x" if i == 0 else f"down{i - 1}", out_channels=4, kernel=3, stride=2)
        for i in range(6)
    ]
    g = graph(*nodes)
    assert infer_shapes(g, (1, 4, 128, 128))["down5"] == (1, 4, 1, 1)
    with raises_at("down5 (Conv2d)", "0 x 0", "1 x 1"):
        infer_shapes(g, (1, 4, 64, 64))


@pytest.mark.parametrize("padding", ["valid", "full", "same_lower"])
def test_string_padding_other_than_same_is_refused(padding: str) -> None:
    with raises_at("c (Conv2d)", "explicit per side or 'same'", repr(padding)):
        Conv2d("c", "x", out_channels=4, kernel=3, padding=padding)
    with raises_at("p (MaxPool2d)", "explicit per side or 'same'"):
        MaxPool2d("p", "x", kernel=3, padding=padding)


@pytest.mark.parametrize("padding", ["same", "SAME", "Same"])
def test_same_padding_is_a_mode_of_windowed_nodes(padding: str) -> None:
    assert Conv2d("c", "x", out_channels=4, kernel=3, stride=2, padding=padding).padding == "same"
    assert MaxPool2d("p", "x", kernel=3, stride=2, padding=padding).padding == "same"
    node = BatchNorm("bn", "x", running_variance="biased")
    assert node_from_dict(node.to_dict()) == node
    with raises_at("bn (BatchNorm)", "running_variance", "'sample'"):
        BatchNorm("bn", "x", running_variance="sample")
    with raises_at("z (Pad2d)", "explicit per side"):
        Pad2d("z", "x", padding="same")


@pytest.mark.parametrize("momentum", [-0.1, 1.5, 0.9 + 1])
def test_bad_momentum(momentum: float) -> None:
    with raises_at("bn1 (BatchNorm)", "momentum", "[0, 1]", "1 - m"):
        BatchNorm("bn1", "x", momentum=momentum)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_bad_eps(eps: float) -> None:
    with raises_at("bn1 (BatchNorm)", "eps must be > 0"):
        BatchNorm("bn1", "x", eps=eps)


def test_pool_padding_over_half_the_kernel() -> None:
    with raises_at("pool (MaxPool2d)", "exceeds half the kernel"):
        MaxPool2d("pool", "x", kernel=3, padding=2)


def test_arity() -> None:
    with raises_at("s (Add)", "two or more inputs"):
        Add("s", ("a",))
    with raises_at("c (Conv2d)", "takes 1 input"):
        Conv2d("c", ("a", "b"), out_channels=4)


def test_layer_order_rules() -> None:
    with raises_at("fc (Dense)", "Add a Flatten"):
        graph(Dense("fc", "x", out_features=3))
    with raises_at("c (Conv2d)", "4-D", "before the Flatten"):
        graph(Flatten("f", "x"), Conv2d("c", "f", out_channels=4))


def test_unknown_output_and_empty_graph() -> None:
    with pytest.raises(SpecError, match="output 'nope'"):
        graph(ReLU("a", "x"), outputs=("nope",))
    with pytest.raises(SpecError, match="at least one Input"):
        Graph("g", (), (ReLU("a", "x"),), ("a",))


def test_spec_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        Conv2d("c", "x", out_channels=0)


# Specs are values -------------------------------------------------------------------------------


def test_normalisation() -> None:
    conv = Conv2d("c", "x", out_channels=8, kernel=3, stride=2, padding=1)
    assert conv.inputs == ("x",)
    assert conv.kernel == (3, 3)
    assert conv.stride == (2, 2)
    assert conv.padding == ((1, 1), (1, 1))
    assert conv.dilation == (1, 1)
    assert Conv2d("c", "x", out_channels=8, padding=(1, 2)).padding == ((1, 1), (2, 2))
    assert Conv2d("c", "x", out_channels=8, padding=[[0, 1], [2, 3]]).padding == ((0, 1), (2, 3))
    assert MaxPool2d("p", "x", kernel=3).stride == (3, 3)
    assert isinstance(BatchNorm("b", "x", eps=1, momentum=0).eps, float)


def test_equal_and_hashable() -> None:
    a = Conv2d("c", "x", out_channels=8, kernel=3, padding=1)
    b = Conv2d("c", ("x",), out_channels=8, kernel=(3, 3), padding=((1, 1), (1, 1)))
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, Conv2d("c", "x", out_channels=8, kernel=3)}) == 2
    assert ReLU("r", "x") != GlobalAvgPool("r", "x")
    g1, g2 = graph(a, ReLU("r", "c")), graph(b, ReLU("r", "c"))
    assert g1 == g2
    assert hash(g1) == hash(g2)
    assert {g1: 1}[g2] == 1


def test_description_does_not_affect_equality() -> None:
    g1 = Graph("g", X, (ReLU("r", "x"),), ("r",), description="one")
    g2 = Graph("g", X, (ReLU("r", "x"),), ("r",), description="two")
    assert g1 == g2


def test_frozen() -> None:
    conv = Conv2d("c", "x", out_channels=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        conv.out_channels = 4
    g = graph(conv)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.name = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        X[0].channels = 1


def _diamond() -> list:
    return [
        Conv2d("blk.conv1", "x", out_channels=4, kernel=3, padding=1),
        BatchNorm("blk.bn1", "blk.conv1"),
        Conv2d("blk.down", "x", out_channels=4),
        Add("blk.add", ("blk.bn1", "blk.down")),
        ReLU("blk.relu", "blk.add"),
        ReLU("dead", "x"),
    ]


def test_topological_order_independent_of_node_order() -> None:
    nodes = _diamond()
    expected = ["blk.conv1", "blk.bn1", "blk.down", "blk.add", "blk.relu", "dead"]
    for order in (nodes, nodes[::-1], nodes[2:] + nodes[:2], [nodes[i] for i in (3, 5, 0, 4, 2, 1)]):
        g = graph(*order, outputs=("blk.relu",))
        assert [n.name for n in g.nodes] == expected
        assert g == graph(*nodes, outputs=("blk.relu",))


def test_graph_lookup_and_consumers() -> None:
    g = graph(*_diamond(), outputs=("blk.relu",))
    assert g["blk.down"].out_channels == 4
    assert g.consumers["x"] == ("blk.conv1", "blk.down", "dead")
    assert g.consumers["blk.relu"] == ()
    with pytest.raises(KeyError, match="no node 'nope'"):
        g["nope"]


def test_long_chain_does_not_recurse() -> None:
    nodes = [ReLU(f"r{i}", "x" if i == 0 else f"r{i - 1}") for i in range(3000)]
    g = graph(*reversed(nodes))
    assert g.nodes[0].name == "r0"
    assert g.nodes[-1].name == "r2999"


# Serialisation ----------------------------------------------------------------------------------

SMALL = st.integers(1, 3)


@st.composite
def graphs(draw) -> Graph:
    """Random small valid graphs: a chain of blocks with residual branches, then maybe a head."""
    channels = draw(st.integers(1, 6))
    nodes: list = []
    current, width = "x", channels
    for block in range(draw(st.integers(1, 4))):
        prefix = f"b{block}"
        for step in range(draw(st.integers(1, 4))):
            name = f"{prefix}.n{step}"
            kind = draw(st.sampled_from(["conv", "bn", "relu", "add", "maxpool", "avgpool"]))
            if kind == "conv":
                groups = draw(st.sampled_from([g for g in (1, 2, 3, 4) if width % g == 0]))
                width = groups * draw(st.integers(1, 4))
                kernel = (draw(SMALL), draw(SMALL))
                node = Conv2d(
                    name,
                    current,
                    out_channels=width,
                    kernel=kernel,
                    stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
                    padding=tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(2)),
                    dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
                    groups=groups,
                    bias=draw(st.booleans()),
                )
            elif kind == "bn":
                node = BatchNorm(
                    name,
                    current,
                    eps=draw(st.floats(1e-12, 1.0)),
                    momentum=draw(st.floats(0.0, 1.0)),
                )
            elif kind == "relu":
                node = ReLU(name, current)
            elif kind == "add":
                k = draw(st.sampled_from([1, 3]))
                branch = draw(
                    st.sampled_from(
                        [
                            ReLU(f"{name}_branch", current),
                            Conv2d(f"{name}_branch", current, out_channels=width, kernel=k, padding=k // 2),
                        ]
                    )
                )
                nodes.append(branch)
                sources = [current, branch.name] + ([branch.name] if draw(st.booleans()) else [])
                node = Add(name, tuple(draw(st.permutations(sources))))
            else:
                kernel = (draw(SMALL), draw(SMALL))
                padding = tuple((draw(st.integers(0, k // 2)), draw(st.integers(0, k // 2))) for k in kernel)
                stride = draw(st.none() | st.tuples(SMALL, SMALL))
                node = (
                    MaxPool2d(name, current, kernel=kernel, stride=stride, padding=padding)
                    if kind == "maxpool"
                    else AvgPool2d(
                        name,
                        current,
                        kernel=kernel,
                        stride=stride,
                        padding=padding,
                        count_include_pad=draw(st.booleans()),
                    )
                )
            nodes.append(node)
            current = name
    head = draw(st.sampled_from(["none", "gap", "gap_fc", "flatten_fc"]))
    if head in ("gap", "gap_fc"):
        nodes.append(GlobalAvgPool("head.pool", current))
        current = "head.pool"
    if head in ("gap_fc", "flatten_fc"):
        nodes.append(Flatten("head.flatten", current))
        nodes.append(
            Dense("head.fc", "head.flatten", out_features=draw(st.integers(1, 5)), bias=draw(st.booleans()))
        )
        current = "head.fc"
    description = draw(st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=20))
    return Graph(
        draw(st.text("abc_-. 0", min_size=1, max_size=8)),
        (Input("x", channels),),
        tuple(draw(st.permutations(nodes))),
        (current,),
        description=description,
    )


def _check_same(a: Graph, b: Graph) -> None:
    assert b == a
    assert hash(b) == hash(a)
    assert b.description == a.description
    assert [type(n) for n in b.nodes] == [type(n) for n in a.nodes]
    assert b.to_dict() == a.to_dict()


@settings(max_examples=60, deadline=None)
@given(graphs())
def test_json_round_trip(g: Graph) -> None:
    _check_same(g, Graph.from_json(g.to_json()))
    _check_same(g, Graph.from_json(g.to_json(indent=None)))


@settings(max_examples=40, deadline=None)
@given(graphs())
def test_yaml_round_trip(g: Graph) -> None:
    pytest.importorskip("yaml")
    _check_same(g, Graph.from_yaml(g.to_yaml()))


@settings(max_examples=30, deadline=None)
@given(graphs(), st.randoms(use_true_random=False))
def test_node_order_is_canonical(g: Graph, rng) -> None:
    nodes = list(g.nodes)
    rng.shuffle(nodes)
    assert [n.name for n in Graph(g.name, g.inputs, nodes, g.outputs).nodes] == [n.name for n in g.nodes]


def test_every_node_type_serialises() -> None:
    g = graph(
        Conv2d("c", "x", out_channels=4, kernel=3, padding=((0, 1), (1, 0)), bias=True),
        BatchNorm("bn", "c", eps=1e-3, momentum=0.01, running_variance="biased"),
        ReLU("r", "bn"),
        Pad2d("z", "r", padding=((1, 0), (0, 2))),
        MaxPool2d("mp", "z", kernel=3, stride=2, padding="same"),
        AvgPool2d("ap", "mp", kernel=2, count_include_pad=False),
        Add("s", ("ap", "ap")),
        GlobalAvgPool("gap", "s"),
        Flatten("f", "gap"),
        Dense("fc", "f", out_features=3, bias=False),
    )
    data = json.loads(g.to_json())
    assert {n["op"] for n in data["nodes"]} == set(NODE_TYPES)
    assert data["version"] == SCHEMA_VERSION
    assert data["nodes"][0] == {
        "op": "conv2d",
        "name": "c",
        "inputs": ["x"],
        "out_channels": 4,
        "kernel": [3, 3],
        "stride": [1, 1],
        "padding": [[0, 1], [1, 0]],
        "dilation": [1, 1],
        "groups": 1,
        "bias": True,
    }
    assert Graph.from_json(g.to_json()) == g


@pytest.mark.parametrize(
    "change",
    [
        {"version": SCHEMA_VERSION + 1},
        {"version": "1"},
        {"schema": "something.else"},
    ],
)
def test_wrong_schema_is_refused(change: dict) -> None:
    data = {**graph(ReLU("r", "x")).to_dict(), **change}
    with pytest.raises(SpecError, match="schema"):
        Graph.from_dict(data)


def test_missing_schema_is_refused() -> None:
    data = graph(ReLU("r", "x")).to_dict()
    del data["version"]
    with pytest.raises(SpecError, match="version"):
        Graph.from_json(json.dumps(data))


def test_unknown_op_and_field_are_refused() -> None:
    data = graph(ReLU("r", "x")).to_dict()
    data["nodes"][0]["op"] = "gelu"
    with pytest.raises(SpecError, match="unknown op 'gelu'"):
        Graph.from_dict(data)
    data["nodes"][0].update(op="relu", alpha=0.1)
    with pytest.raises(SpecError, match=re.escape("r (ReLU): unknown fields ['alpha']")):
        Graph.from_dict(data)


def test_symmetric_padding_is_what_a_layer_argument_can_express() -> None:
    assert symmetric_padding(((1, 1), (2, 2))) == (1, 2)
    assert symmetric_padding(((0, 0), (0, 0))) == (0, 0)
    assert symmetric_padding(((0, 1), (2, 2))) is None
    assert symmetric_padding(((1, 1), (2, 1))) is None
