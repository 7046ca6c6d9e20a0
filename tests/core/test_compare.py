"""`multires compare` without any framework: the registry is replaced by fake entry points, and
the fake backends run the NumPy reference (or a deliberately wrong copy of it), so every status
of a row is exercised in the core's environment."""

from __future__ import annotations

import json
import sys
import types
from importlib.metadata import EntryPoint

import numpy as np
import pytest

import multires
from multires import backend as registry
from multires.cli import main
from multires.compare import DIFFERS, FAILED, NOT_INSTALLED, OK, REFERENCE, TOLERANCE, compare
from multires.errors import BackendNotFoundError, ShapeError
from multires.graph import BatchNorm, Conv2d, Dense, Flatten, GlobalAvgPool, Graph, Input, MaxPool2d, ReLU
from multires.reference import ReferenceRunner

SHAPE = (2, 3, 12, 12)
MISSING = "nonexistent_framework_xyz_backend"


def small() -> Graph:
    return Graph(
        "small",
        (Input("x", 3),),
        (
            Conv2d("conv", "x", out_channels=4, kernel=3, padding=1),
            BatchNorm("bn", "conv"),
            ReLU("relu", "bn"),
            MaxPool2d("pool", "relu", kernel=3, stride=2, padding=1),
            GlobalAvgPool("gap", "pool"),
            Flatten("flat", "gap"),
            Dense("fc", "flat", out_features=5),
        ),
        ("fc",),
    )


class WrongRunner(ReferenceRunner):
    """The reference, off by 1% of the output's largest magnitude: a backend with a bug."""

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        y = super().forward(x, training)
        return y + 0.01 * np.abs(y).max()


def fake_backend(name: str, layouts: tuple[str, ...], make_runner) -> types.ModuleType:
    module = types.ModuleType(f"fake_{name}_backend")
    module.NAME, module.LAYOUTS, module.FRAMEWORK_MODULES = name, layouts, (f"fake_{name}",)
    module.make_runner = make_runner
    return module


def broken_runner(graph, weights, layout, optimizer):
    raise RuntimeError("kernel exploded\non two lines")


@pytest.fixture
def backends(monkeypatch: pytest.MonkeyPatch) -> dict[str, EntryPoint]:
    """A registry of four fake backends: an exact NHWC one, a wrong one, a broken one and one whose
    framework is not installed."""
    modules = {
        "exact": fake_backend("exact", ("NHWC", "NCHW"), ReferenceRunner),
        "wrong": fake_backend("wrong", ("NCHW",), WrongRunner),
        "broken": fake_backend("broken", ("NCHW",), broken_runner),
    }
    points = {}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, module.__name__, module)
        points[name] = EntryPoint(name=name, value=module.__name__, group=registry.ENTRY_POINT_GROUP)
    points["ghost"] = EntryPoint(name="ghost", value=MISSING, group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_registered", lambda: dict(points))
    registry._load.cache_clear()
    yield points
    registry._load.cache_clear()


def test_reference_only() -> None:
    graph = small()
    result = compare(graph, SHAPE, backends=[], seed=3, repeats=1)
    (row,) = result.rows
    assert (row.backend, row.status, row.layout, row.output_shape) == (REFERENCE, OK, "NCHW", (2, 5))
    assert row.params == multires.param_count(graph) and row.max_rel_diff == 0.0 and row.latency_ms > 0
    assert result.ok and (result.model, result.input_shape, result.seed) == ("small", SHAPE, 3)
    assert result.tolerance == TOLERANCE


def test_every_status(backends) -> None:
    result = compare(small(), SHAPE, ["exact", "wrong", "broken", "ghost"], repeats=2)
    rows = {row.backend: row for row in result.rows}
    assert list(rows) == [REFERENCE, "exact", "wrong", "broken", "ghost"]

    exact = rows["exact"]
    assert (exact.status, exact.layout, exact.output_shape) == (OK, "NHWC", (2, 5))
    assert exact.max_rel_diff <= 1e-6 and exact.params == rows[REFERENCE].params and exact.latency_ms > 0

    wrong = rows["wrong"]
    assert wrong.status == DIFFERS and wrong.max_rel_diff == pytest.approx(0.01, rel=1e-3)

    broken = rows["broken"]
    assert broken.status == FAILED and broken.note == "RuntimeError: kernel exploded on two lines"
    assert broken.max_rel_diff is None and broken.latency_ms is None

    ghost = rows["ghost"]
    assert (ghost.status, ghost.note, ghost.framework) == (
        NOT_INSTALLED,
        "pip install 'multires[ghost]'",
        "ghost",
    )
    assert ghost.layout is None and ghost.output_shape is None
    assert not result.ok


def test_missing_backends_do_not_fail_a_comparison(backends) -> None:
    result = compare(small(), SHAPE, ["ghost", "exact", "exact"], repeats=1)
    assert [(row.backend, row.status) for row in result.rows] == [
        (REFERENCE, OK),
        ("ghost", NOT_INSTALLED),
        ("exact", OK),
    ]
    assert result.ok


def test_default_is_every_registered_backend(backends) -> None:
    result = compare(small(), SHAPE, repeats=1)
    assert [row.backend for row in result.rows] == [REFERENCE, *sorted(backends)]


def test_the_same_input_and_weights_reach_every_backend(backends) -> None:
    first = compare(small(), SHAPE, ["exact"], seed=1, repeats=1)
    second = compare(small(), SHAPE, ["exact"], seed=2, repeats=1)
    assert first.rows[1].max_rel_diff <= 1e-6 and second.rows[1].max_rel_diff <= 1e-6
    assert first.to_dict()["seed"] == 1 and second.to_dict()["seed"] == 2


def test_user_errors() -> None:
    with pytest.raises(BackendNotFoundError, match="unknown backend 'nope'"):
        compare(small(), SHAPE, ["nope"])
    with pytest.raises(ShapeError, match=r"expects shape \(N, 3, H, W\) in NCHW; got \(1, 12, 12, 3\)"):
        compare(small(), (1, 12, 12, 3), [])
    two = Graph("two", (Input("x", 1),), (ReLU("a", "x"), ReLU("b", "x")), ("a", "b"))
    with pytest.raises(ShapeError, match="one input and one output"):
        compare(two, (1, 1, 4, 4), [])


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["compare", "d2l_resnet", "--option", "arch=((1, 64),)", "--input", "2,1,16,16", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_table(backends, capsys) -> None:
    code, out, err = cli(capsys, "--backends", "exact,ghost", "--repeats", "1")
    assert (code, err) == (0, "")
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 2}
    assert "NumPy (float64)" in lines[REFERENCE] and "agrees" in lines[REFERENCE]
    assert "NHWC" in lines["exact"] and "(2, 10)" in lines["exact"] and "agrees" in lines["exact"]
    assert "not installed: pip install 'multires[ghost]'" in lines["ghost"]
    assert "d2l_resnet: input (2, 1, 16, 16) NCHW, random weights (seed 0)" in out


def test_cli_json_and_exit_status(backends, capsys) -> None:
    code, out, _ = cli(capsys, "--backends", "exact,wrong", "--json", "--repeats", "1")
    data = json.loads(out)
    assert code == 1 and not data["ok"]
    assert [(r["backend"], r["status"]) for r in data["rows"]] == [
        (REFERENCE, OK),
        ("exact", OK),
        ("wrong", DIFFERS),
    ]
    assert data["input_shape"] == [2, 1, 16, 16] and data["rows"][1]["output_shape"] == [2, 10]


def test_cli_user_errors(backends, capsys) -> None:
    code, _, err = cli(capsys, "--backends", "exact,torhc")
    assert code == 2 and err.startswith("error: unknown backend 'torhc'")
    code, _, err = cli(capsys, "--repeats", "0")
    assert code == 2 and err == "error: --repeats 0: give 1 or more.\n"
