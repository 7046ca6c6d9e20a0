"""benchmarks/gpu_check.py on the CPU with torch: its conformance check passes on the torch backend,
fails (and the script exits 1) when the backend's update is off by 1%, and its throughput loop runs."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("torch")

import multires  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import gpu_check  # noqa: E402

CASE = gpu_check.QUICK_CASES[0]  # the book's ResNet with one block per stage, 16x16: quick in float64


@pytest.fixture(scope="module")
def expected() -> gpu_check.Expected:
    return gpu_check.Expected(CASE)


def test_the_torch_backend_passes_in_both_layouts(expected: gpu_check.Expected) -> None:
    for layout in ("NCHW", "NHWC"):
        result = gpu_check.check_case("torch", "cpu", layout, expected)
        assert not result["failed"], result
        assert result["ratio"] < 0.2
        assert set(result["errors"]) == set(gpu_check.BUDGETS)


@pytest.mark.parametrize(
    ("wrong", "kinds"),
    [
        (dict(lr=0.101), {"updates"}),  # every gradient 1% too large
        (dict(momentum=0.8), {"updates", "buffers"}),  # the second step's momentum term
    ],
)
def test_a_wrong_update_fails(
    expected: gpu_check.Expected, monkeypatch: pytest.MonkeyPatch, wrong: dict[str, float], kinds: set[str]
) -> None:
    monkeypatch.setattr(gpu_check, "OPTIMIZER", replace(gpu_check.OPTIMIZER, **wrong))
    result = gpu_check.check_case("torch", "cpu", "NCHW", expected)
    assert kinds <= set(result["failed"]), result


def test_the_script_reports_and_exits_1_on_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check, "QUICK_CASES", [CASE])
    arguments = ["--device", "cpu", "--quick", "--backends", "torch", "--no-pytest", "--no-throughput"]
    assert gpu_check.main([*arguments, "--out", str(tmp_path / "good")]) == 0
    report = json.loads((tmp_path / "good" / "gpu_check.json").read_text())
    assert report["ok"] and {row["layout"] for row in report["conformance"]} == {"NCHW", "NHWC"}
    assert "**Result: pass.**" in (tmp_path / "good" / "gpu_check.md").read_text()

    real = multires.make_runner

    def off_by_one_percent(graph, weights, backend, layout, optimizer, **execution):  # type: ignore[no-untyped-def]
        return real(graph, weights, backend, layout, replace(optimizer, lr=optimizer.lr * 1.01), **execution)

    monkeypatch.setattr(multires, "make_runner", off_by_one_percent)
    assert gpu_check.main([*arguments, "--out", str(tmp_path / "bad")]) == 1
    report = json.loads((tmp_path / "bad" / "gpu_check.json").read_text())
    assert not report["ok"] and all(row["status"] == "fail" for row in report["conformance"])
    assert "**Result: FAIL.**" in (tmp_path / "bad" / "gpu_check.md").read_text()


def test_throughput_steps_the_runner_and_reports_examples_per_second() -> None:
    workload = gpu_check.Workload("tiny", CASE.make_graph, (1, 16, 16), 4)
    row = gpu_check.throughput("torch", "cpu", workload, "fp32", warmup=1, seconds=0.0, chunk=2)
    assert row["steps"] == 2 and row["examples_per_sec"] > 0 and row["layout"] == "NCHW"
