"""Untrusted files: every reader meets mutated files with its own typed error or a correct load.

Hypothesis mutates valid files byte-wise (overwrite, insert, delete, truncate) and structurally
(a header field replaced by any JSON value, offsets shifted, the length prefix changed). A
safetensors file must then load exactly as the `safetensors` package loads it, or raise
`WeightsError`, and whatever the package refuses, multires refuses too; an `.npz` loads as
`numpy.load(allow_pickle=False)` does or raises `WeightsError`; an IDX file gives the array its
header describes or `DataError`; graph JSON gives a Graph or `SpecError`.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multires as mr
from multires import data
from multires.data import parse_idx, read_idx
from multires.errors import DataError, SpecError, WeightsError
from multires.weights import MAX_HEADER, load_file, save

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def small_graph() -> mr.Graph:
    return mr.Graph(
        "small",
        mr.Input("input", 1),
        (
            mr.Conv2d("conv", "input", out_channels=2, kernel=3, padding=1, bias=True),
            mr.BatchNorm("bn", "conv"),
            mr.ReLU("relu", "bn"),
            mr.MaxPool2d("pool", "relu", kernel=2),
            mr.GlobalAvgPool("gap", "pool"),
            mr.Flatten("flat", "gap"),
            mr.Dense("fc", "flat", out_features=3),
        ),
        "fc",
    )


ARRAYS = {
    "a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b.bias": np.array([1.5, -2.0], dtype=np.float64),
    "c.half": np.array([0.25, 4.0, -1.0], dtype=np.float16),
    "d.count": np.array([[7], [-9]], dtype=np.int64),
    "e.empty": np.zeros((0, 4), dtype=np.float32),
}


def _good_bytes(tmp: Path, suffix: str) -> bytes:
    path = save(ARRAYS, tmp / f"good{suffix}", graph=small_graph() if suffix == ".safetensors" else None)
    return path.read_bytes()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@st.composite
def byte_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with a few bytes overwritten, inserted or deleted, or cut short."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "set" and out:
            out[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del out[at : at + draw(st.integers(1, 8))]
        else:
            del out[at:]
    return bytes(out)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


# safetensors.


def _check_safetensors(path: Path, data: bytes) -> None:
    """multires loads what the safetensors package loads (same arrays) or raises WeightsError,
    and refuses whatever the package refuses."""
    st_numpy = pytest.importorskip("safetensors.numpy")
    try:
        ours: dict[str, np.ndarray] | None = load_file(path)
    except WeightsError:
        ours = None
    try:
        theirs = st_numpy.load(data)
    except Exception:  # the package's own SafetensorError, or a NumPy error on a dtype it cannot map
        theirs = None
    if ours is None:
        return
    assert theirs is not None, "multires loaded a file the safetensors package refuses"
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert value.dtype.isnative and value.dtype == theirs[name].dtype.newbyteorder("=")
        np.testing.assert_array_equal(value, theirs[name])


def test_the_valid_file_loads_like_the_package(folder: Path) -> None:
    data = _good_bytes(folder, ".safetensors")
    _check_safetensors(_write(folder, "valid.safetensors", data), data)
    loaded = load_file(folder / "valid.safetensors")
    assert all(np.array_equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in ARRAYS.items())


@FUZZ
@given(st.data())
def test_safetensors_byte_mutations(folder: Path, data: st.DataObject) -> None:
    mutated = data.draw(byte_mutations(_good_bytes(folder, ".safetensors")))
    _check_safetensors(_write(folder, "bytes.safetensors", mutated), mutated)


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: Any, payload: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + payload


@FUZZ
@given(st.data())
def test_safetensors_structural_mutations(folder: Path, data: st.DataObject) -> None:
    header, payload = _split(_good_bytes(folder, ".safetensors"))
    name = data.draw(st.sampled_from(sorted(header)))
    kind = data.draw(st.sampled_from(["value", "field", "offset", "dim", "length", "payload", "extra"]))
    length = None
    if kind == "value":
        header[name] = data.draw(JSON_VALUES)
    elif kind == "field" and name != "__metadata__":
        header[name][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = data.draw(JSON_VALUES)
    elif kind == "field":
        header[name][data.draw(st.text(max_size=4))] = data.draw(JSON_VALUES)
    elif kind == "offset" and name != "__metadata__":
        header[name]["data_offsets"][data.draw(st.integers(0, 1))] += data.draw(st.integers(-16, 16))
    elif kind == "dim" and name != "__metadata__" and header[name]["shape"]:
        header[name]["shape"][0] = data.draw(st.sampled_from([0, 1, 2**31, 2**62, 2**64 - 1, 2**64, -1]))
    elif kind == "length":
        length = data.draw(st.sampled_from([0, 1, MAX_HEADER + 1, 2**63, 2**64 - 1]))
    elif kind == "payload":
        payload = payload[: data.draw(st.integers(0, len(payload) + 8))] + b"\x00" * data.draw(
            st.integers(0, 8)
        )
    else:
        header[data.draw(st.text(max_size=6))] = data.draw(JSON_VALUES)
    mutated = _join(header, payload, length)
    _check_safetensors(_write(folder, "struct.safetensors", mutated), mutated)


@pytest.mark.parametrize(
    ("header", "payload", "complaint"),
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\x00" * 12, "cover 8 of the 12"),
        (
            {
                "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\x00" * 12,
            "contiguous and must not overlap",
        ),
        (
            {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
            b"\x00" * 8,
            "starts at byte 4 of the data, expected 0",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}},
            b"\x00" * 8,
            "claims bytes",
        ),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\x00" * 8, "non-negative ints"),
        ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\x00" * 4, "non-negative ints"),
        ({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4, "dtype one of F32"),
        ({"__metadata__": {"k": 1}}, b"", "strings to strings"),
        ({"__metadata__": ["k"]}, b"", "strings to strings"),
    ],
)
def test_safetensors_format_rules(folder: Path, header: dict, payload: bytes, complaint: str) -> None:
    with pytest.raises(WeightsError, match=complaint):
        load_file(_write(folder, "rule.safetensors", _join(header, payload)))


def test_safetensors_header_nesting_size_and_encoding(folder: Path) -> None:
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(WeightsError, match="nested too deeply"):
        load_file(_write(folder, "deep.safetensors", struct.pack("<Q", len(deep)) + deep))
    huge = b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}'
    with pytest.raises(WeightsError, match="corrupt safetensors header"):
        load_file(_write(folder, "digits.safetensors", struct.pack("<Q", len(huge)) + huge))
    utf16 = '{"__metadata__": {}}'.encode("utf-16-le")
    with pytest.raises(WeightsError, match="corrupt safetensors header"):
        load_file(_write(folder, "utf16.safetensors", struct.pack("<Q", len(utf16)) + utf16))
    with pytest.raises(WeightsError, match=f"at most {MAX_HEADER} bytes"):
        load_file(_write(folder, "long.safetensors", struct.pack("<Q", MAX_HEADER + 1) + b"{}"))


def test_a_bad_graph_in_the_metadata_is_a_weights_error(folder: Path) -> None:
    header = {"__metadata__": {"multires.graph": '{"schema": "multires.graph", "version": 1, "name": 5}'}}
    path = _write(folder, "graph.safetensors", _join(header, b""))
    with pytest.raises(WeightsError, match="not a valid multires graph"):
        mr.weights.file_graph(path)


# npz.


def _check_npz(path: Path) -> None:
    try:
        ours: dict[str, np.ndarray] | None = load_file(path)
    except WeightsError:
        return
    assert ours is not None
    with np.load(path, allow_pickle=False) as theirs:
        assert sorted(theirs.files) == sorted(ours)
        for name, value in ours.items():
            assert value.dtype.isnative and value.dtype == theirs[name].dtype.newbyteorder("=")
            np.testing.assert_array_equal(value, theirs[name])


@FUZZ
@given(st.data())
def test_npz_byte_mutations(folder: Path, data: st.DataObject) -> None:
    path = _write(folder, "bytes.npz", data.draw(byte_mutations(_good_bytes(folder, ".npz"))))
    _check_npz(path)


@FUZZ
@given(
    shape=st.lists(st.integers(0, 2**40), max_size=3),
    descr=st.sampled_from(["<f4", ">f8", "|O", "<i8", "|b1", "<c8", "|V4"]),
    payload=st.integers(0, 64),
    compress=st.booleans(),
)
def test_npz_hostile_npy_headers(
    folder: Path, shape: list[int], descr: str, payload: int, compress: bool
) -> None:
    """A member whose header promises any shape (up to 2**120 bytes) of any dtype: never an
    allocation of that size, never pickle."""
    header = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    member = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\x00" * payload
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
        archive.writestr("w.npy", member)
    path = _write(folder, "header.npz", buffer.getvalue())
    _check_npz(path)
    if descr == "|O" or np.prod(shape, dtype=object) * np.dtype(descr).itemsize != payload:
        with pytest.raises(WeightsError):
            load_file(path)


def test_npz_members_that_are_not_arrays(folder: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", b"hello")
    with pytest.raises(WeightsError, match="'notes.txt' is not a"):
        load_file(_write(folder, "text.npz", buffer.getvalue()))


# IDX (Fashion-MNIST's format).


IDX = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 4) + bytes(range(24))


def _check_idx(data: bytes, array: np.ndarray) -> None:
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    assert array.shape == shape and array.dtype.isnative
    assert array.astype(array.dtype.newbyteorder(">")).tobytes() == data[4 + 4 * ndim :]


@FUZZ
@given(st.data(), st.booleans())
def test_idx_byte_mutations(folder: Path, data: st.DataObject, gz: bool) -> None:
    mutated = data.draw(byte_mutations(gzip.compress(IDX) if gz else IDX))
    path = _write(folder, "bytes-idx", mutated)
    try:
        array = read_idx(path)
    except DataError:
        return
    _check_idx(gzip.decompress(mutated) if mutated[:2] == b"\x1f\x8b" else mutated, array)


@FUZZ
@given(
    st.sampled_from([8, 9, 11, 12, 13, 14, 0, 7, 255]),
    st.lists(st.integers(0, 2**32 - 1), max_size=5),
    st.integers(0, 32),
)
def test_idx_hostile_headers(code: int, shape: list[int], payload: int) -> None:
    data = bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + b"\x01" * payload
    try:
        array = parse_idx(data)
    except DataError:
        return
    _check_idx(data, array)


def _gzip_bomb(head: bytes, zeros: int) -> bytes:
    """A gzip member of `head` followed by `zeros` zero bytes, compressed without holding them."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(2**20)
    parts = [compressor.compress(head)]
    for start in range(0, zeros, len(chunk)):
        parts.append(compressor.compress(chunk[: zeros - start]))
    return b"".join([*parts, compressor.flush()])


def test_an_idx_gzip_bomb_is_refused_after_what_its_header_promises(folder: Path) -> None:
    """A 64 MiB expansion behind a header promising 24 values: refused, naming the file, with
    little more memory than one decompressed chunk."""
    path = _write(folder, "bomb-idx.gz", _gzip_bomb(IDX[:16], 64 * 2**20))
    assert path.stat().st_size < 2**17
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"bomb-idx.gz: the gzip data expands past the 40 bytes its IDX"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20


def test_an_idx_header_promising_more_than_the_bound_is_refused(folder: Path) -> None:
    path = _write(folder, "huge-idx.gz", gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 2**31)))
    with pytest.raises(DataError, match=r"huge-idx.gz: its IDX header promises shape \(2147483648,\)"):
        read_idx(path)


def test_a_gzip_without_an_idx_header_stops_at_the_absolute_bound(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "MAX_IDX_BYTES", 2**20)
    path = _write(folder, "bomb-not-idx.gz", _gzip_bomb(b"\x1f\x8b", 2**21))
    with pytest.raises(DataError, match=f"bomb-not-idx.gz: the gzip data expands past the {2**20} bytes"):
        read_idx(path)


def test_a_gzip_of_several_members_reads_as_their_concatenation(folder: Path) -> None:
    path = _write(folder, "members-idx.gz", gzip.compress(IDX[:10]) + gzip.compress(IDX[10:]) + bytes(8))
    _check_idx(IDX, read_idx(path))


# Graph JSON.


GRAPH = small_graph().to_dict()


def _check_graph(text: str | bytes) -> None:
    try:
        graph = mr.Graph.from_json(text)
    except SpecError:
        return
    assert isinstance(graph, mr.Graph)
    assert mr.Graph.from_json(graph.to_json()) == graph


def _paths(value: Any, path: tuple = ()) -> list[tuple]:
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [path, *(p for key, sub in items for p in _paths(sub, (*path, key)))]


@FUZZ
@given(st.data())
def test_graph_json_structural_mutations(data: st.DataObject) -> None:
    tree = json.loads(json.dumps(GRAPH))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(tree)))
        if not path:
            tree = data.draw(JSON_VALUES)
            break
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(JSON_VALUES)
        elif isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = [parent[path[-1]]]
    _check_graph(json.dumps(tree))


@FUZZ
@given(st.data())
def test_graph_json_byte_mutations(data: st.DataObject) -> None:
    _check_graph(data.draw(byte_mutations(small_graph().to_json().encode())))


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"schema": "multires.graph", "version": 1, "name": "g", "inputs": '
        + "[" * 50_000
        + "]" * 50_000
        + "}",
        "9" * 5000,
        json.dumps({**GRAPH, "inputs": [{"name": "input", "channels": 10**40}]}),
        json.dumps({**GRAPH, "nodes": [{**GRAPH["nodes"][0], "out_channels": 10**40}, *GRAPH["nodes"][1:]]}),
        json.dumps({**GRAPH, "nodes": [{**GRAPH["nodes"][0], "kernel": 1e308}, *GRAPH["nodes"][1:]]}),
        json.dumps({**GRAPH, "nodes": [{**GRAPH["nodes"][1], "eps": "tiny"}, *GRAPH["nodes"][2:]]}),
        json.dumps({**GRAPH, "nodes": [{**GRAPH["nodes"][1], "eps": float("inf")}, *GRAPH["nodes"][2:]]}),
        json.dumps({**GRAPH, "outputs": 7}),
        json.dumps({**GRAPH, "name": ["g"]}),
        json.dumps({**GRAPH, "description": {}}),
        json.dumps([GRAPH]),
        "",
        b"\xff\xfe{",
    ],
)
def test_graph_json_hostile_inputs_are_spec_errors(text: str | bytes) -> None:
    with pytest.raises(SpecError):
        mr.Graph.from_json(text)
