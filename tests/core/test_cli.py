"""The `multires` command line, driven through `main(argv)` (and once through the installed script)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import multires
from multires import backend as registry
from multires.cli import COMMANDS, group_rows, main, parse_options, parse_shape

# The book's printout for d2l_resnet18 (its ResNet chapter), per top-level block.
BOOK_96 = {
    "b1": "(1, 64, 24, 24)",
    "b2": "(1, 64, 24, 24)",
    "b3": "(1, 128, 12, 12)",
    "b4": "(1, 256, 6, 6)",
    "b5": "(1, 512, 3, 3)",
    "last": "(1, 10)",
}


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(text: str) -> dict[str, list[str]]:
    """The body and footer rows of a rich table, by the first cell."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells and cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


def test_commands_table() -> None:
    assert list(COMMANDS)[:3] == ["models", "summary", "backends"]
    assert all(entry.help and entry.name == name for name, entry in COMMANDS.items())


# models ---------------------------------------------------------------------------------------


def test_models_table(capsys) -> None:
    code, out, err = run(capsys, "models")
    assert (code, err) == (0, "")
    rows = table_rows(out)
    for name in multires.models():
        assert name in rows
    assert rows["resnet18"][0] == "11,689,512"
    assert rows["resnet50"][0] == "25,557,032"
    assert rows["d2l_resnet18"][1].startswith("Dive into Deep Learning's ResNet18")
    assert rows["resnet50"][1] == "torchvision.models.resnet50"


def test_models_long_shows_whole_descriptions(capsys) -> None:
    code, out, _ = run(capsys, "models", "--long")
    assert code == 0
    assert "max-pool 3x3/2" in out


def test_models_json(capsys) -> None:
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0
    data = json.loads(out)
    assert [m["name"] for m in data] == multires.models()
    counts = {m["name"]: m["params"] for m in data}
    assert counts["resnet152"] == 60_192_808
    assert counts["d2l_resnet18"] == multires.param_count(multires.spec("d2l_resnet18"))


# summary --------------------------------------------------------------------------------------


def test_summary_prints_the_books_shapes(capsys) -> None:
    code, out, err = run(capsys, "summary", "d2l_resnet18", "--input", "1,1,96,96", "--depth", "1")
    assert (code, err) == (0, "")
    assert "d2l_resnet18: input (1, 1, 96, 96) NCHW" in out
    rows = table_rows(out)
    assert {name: rows[name][1] for name in BOOK_96} == BOOK_96
    graph = multires.spec("d2l_resnet18")
    assert rows["Total"][2] == f"{multires.param_count(graph):,}"
    assert rows["Total"][3] == f"{multires.macs(graph, (1, 1, 96, 96)):,}"
    assert sum(int(rows[name][2].replace(",", "")) for name in BOOK_96) == multires.param_count(graph)


def test_summary_lists_every_node(capsys) -> None:
    code, out, _ = run(capsys, "summary", "d2l_resnet18", "--input", "1,1,96,96")
    assert code == 0
    graph = multires.spec("d2l_resnet18")
    rows = table_rows(out)
    assert [name for name in rows if name != "Total"] == [n.name for n in graph.nodes]
    shapes = multires.infer_shapes(graph, (1, 1, 96, 96))
    for node in graph.nodes:
        assert rows[node.name][0] == type(node).__name__
        assert rows[node.name][1] == "(" + ", ".join(map(str, shapes[node.name])) + ")"
    assert rows[graph.nodes[0].name][1] == "(1, 64, 48, 48)"


def test_summary_default_input_and_nhwc(capsys) -> None:
    code, out, _ = run(capsys, "summary", "d2l_resnet18", "--depth", "1")
    assert code == 0
    assert "input (1, 1, 224, 224) NCHW" in out
    assert table_rows(out)["b5"][1] == "(1, 512, 7, 7)"

    code, out, _ = run(capsys, "summary", "d2l_resnet18", "--layout", "nhwc", "--depth", "1")
    assert code == 0
    assert "input (1, 224, 224, 1) NHWC" in out
    assert table_rows(out)["b2"][1] == "(1, 56, 56, 64)"

    code, out, _ = run(
        capsys, "summary", "d2l_resnet18", "--layout", "NHWC", "--input", "2,96,96,1", "--depth", "1"
    )
    assert code == 0
    assert table_rows(out)["b4"][1] == "(2, 6, 6, 256)"
    assert table_rows(out)["last"][1] == "(2, 10)"


def test_summary_options(capsys) -> None:
    argv = [
        "summary",
        "d2l_resnet18",
        "--option",
        "num_classes=5",
        "--option",
        "in_channels=3",
        "--depth",
        "1",
    ]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert "input (1, 3, 224, 224)" in out
    assert table_rows(out)["last"][1] == "(1, 5)"


def test_summary_json(capsys) -> None:
    code, out, err = run(
        capsys, "summary", "resnet18", "--input", "2,224,224,3", "--layout", "NHWC", "--json"
    )
    assert (code, err) == (0, "")
    data = json.loads(out)
    graph = multires.spec("resnet18")
    assert data["graph"] == "resnet18"
    assert data["layout"] == "NHWC"
    assert data["input_shape"] == [2, 224, 224, 3]
    assert data["total_params"] == 11_689_512
    assert data["total_macs"] == multires.macs(graph, (2, 3, 224, 224))
    assert sum(n["macs"] for n in data["nodes"]) == data["total_macs"]
    assert [n["name"] for n in data["nodes"]] == [n.name for n in graph.nodes]
    assert data["nodes"][-1]["shape"] == [2, 1000]


# errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["summary", "d2l_resnet81"], "unknown model 'd2l_resnet81'. Did you mean 'd2l_resnet18'"),
        (["summary", "d2l_resnet18", "--input", "1,96,96,1"], "It looks like NHWC"),
        (["summary", "d2l_resnet18", "--input", "1,1,96"], "--input '1,1,96': give four positive"),
        (["summary", "d2l_resnet18", "--input", "1,1,a,96"], "give four positive"),
        (["summary", "d2l_resnet18", "--input", "0,1,96,96"], "give four positive"),
        (["summary", "d2l_resnet18", "--input", "1,1,96,96,1"], "give four positive"),
        (["summary", "d2l_resnet18", "--layout", "NWHC"], "unknown layout 'NWHC'"),
        (["summary", "d2l_resnet18", "--option", "num_classes"], "write it as key=value"),
        (["summary", "d2l_resnet18", "--option", "colour=1"], "has no option(s) ['colour']"),
        (["summary", "d2l_resnet18", "--option", "num_classes=0"], "out_features must be positive"),
        (["summary", "d2l_resnet18", "--option", "num_classes=(10, 2)"], "out_features must be one"),
        (["summary", "d2l_resnet18", "--depth", "0"], "--depth 0"),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, argv: list[str], message: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("error: ")
    assert err.endswith("\n")
    assert err.count("\n") == 1
    assert message in err
    assert "Traceback" not in err


def test_argument_errors_and_help(capsys) -> None:
    code, out, err = run(capsys)
    assert code == 2
    assert "usage: multires" in err
    code, out, err = run(capsys, "summary")
    assert code == 2
    assert "name" in err
    code, out, err = run(capsys, "--help")
    assert code == 0
    for name in COMMANDS:
        assert name in out


def test_installed_script(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("multires")
    if not script.exists():
        pytest.skip("the multires console script is not installed next to this Python")
    done = subprocess.run(
        [str(script), "summary", "d2l_resnet18", "--input", "1,1,96,96", "--depth", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = table_rows(done.stdout)
    assert {name: rows[name][1] for name in BOOK_96} == BOOK_96
    done = subprocess.run([str(script), "summary", "nope"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: unknown model 'nope'")
    assert "Traceback" not in done.stderr


# backends -------------------------------------------------------------------------------------


def test_backends_lists_installed_missing_and_broken(capsys, monkeypatch) -> None:
    module = types.ModuleType("cli_fake_backend")
    module.LAYOUTS = ("NHWC", "NCHW")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    group = registry.ENTRY_POINT_GROUP
    points = {
        "fake": EntryPoint(name="fake", value=module.__name__, group=group),
        "tf": EntryPoint(name="tf", value="nonexistent_framework_xyz_backend", group=group),
        "odd": EntryPoint(name="odd", value="json:no_such_attribute", group=group),
    }
    monkeypatch.setattr(registry, "_registered", lambda: dict(points))
    registry._load.cache_clear()
    try:
        code, out, err = run(capsys, "backends")
    finally:
        registry._load.cache_clear()
    assert (code, err) == (0, "")
    rows = table_rows(out)
    assert rows["fake"][1] == "installed (layouts NHWC, NCHW)"
    assert rows["tf"] == ["TensorFlow/Keras", "not installed: pip install 'multires[tf]'"]
    assert rows["odd"][1].startswith("broken: AttributeError")


def test_backends_with_none_registered(capsys, monkeypatch) -> None:
    monkeypatch.setattr(registry, "_registered", dict)
    code, out, _ = run(capsys, "backends")
    assert code == 0
    assert "no package registers the entry-point group 'multires.backends'" in out


# helpers --------------------------------------------------------------------------------------


def test_parse_shape_and_options() -> None:
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_shape(" 2, 96 ,96,1") == (2, 96, 96, 1)
    assert parse_options(None) == {}
    assert parse_options(
        ["num_classes=10", "arch=((2, 64), (2, 128))", "variant=v1", "bias=False", "x= 1.5 "]
    ) == {
        "num_classes": 10,
        "arch": ((2, 64), (2, 128)),
        "variant": "v1",
        "bias": False,
        "x": 1.5,
    }


def test_group_rows() -> None:
    rows = multires.summarize(multires.spec("d2l_resnet18"), (1, 1, 96, 96)).rows
    grouped = group_rows(rows, 2)
    assert [r.name for r in grouped][:4] == ["b1.0", "b1.1", "b1.2", "b1.3"]
    assert "b2.0" in [r.name for r in grouped]
    assert sum(r.params for r in grouped) == sum(r.params for r in rows)
    assert group_rows(rows, 100) == list(rows)


def test_convert_safetensors_carries_the_graph_to_compare_and_build(capsys, tmp_path: Path) -> None:
    graph = multires.spec("d2l_resnet18", edition="tf")
    weights = multires.random_weights(graph, seed=2)
    source = multires.weights.save(weights, tmp_path / "plain.safetensors")
    code, out, err = run(
        capsys,
        "convert",
        str(source),
        "--from",
        "safetensors",
        "--graph",
        "d2l_resnet18",
        "--option",
        "edition=tf",
        "--to",
        "safetensors",
        "-o",
        str(tmp_path / "converted.safetensors"),
    )
    assert code == 0, err
    assert "wrote" in out and "11,178,378 parameters" in out
    assert multires.weights.file_graph(tmp_path / "converted.safetensors") == graph
    code, out, err = run(
        capsys, "compare", str(tmp_path / "converted.safetensors"), "--input", "1,1,29,29", "--backends", ""
    )
    assert code == 0, err
    assert "reference" in out


def test_convert_failures_write_nothing_and_say_why(capsys, tmp_path: Path) -> None:
    source = multires.weights.save(
        multires.random_weights(multires.spec("resnet18")), tmp_path / "w.safetensors"
    )
    target = tmp_path / "out.safetensors"
    code, _, err = run(
        capsys, "convert", str(source), "--from", "safetensors", "--to", "safetensors", "-o", str(target)
    )
    assert code == 2 and "carries no multires graph; pass --graph NAME" in err
    code, _, err = run(
        capsys,
        "convert",
        str(source),
        "--from",
        "safetensors",
        "--graph",
        "resnet34",
        "--to",
        "safetensors",
        "-o",
        str(target),
    )
    assert code == 2 and "missing layer1.2.conv1.weight" in err
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
